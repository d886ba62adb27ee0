"""Merge a LoRA adapter into its base model: ``W' = W + scaling * B @ A`` for every adapted
linear, written as a full model folder.

- ``format="consolidated"``: ``params.json`` + ``consolidated.safetensors`` (mistral-inference
  names, interleaved q/k rows) + the base's tokenizer files; souverain loads it.
- ``format="hf"``: ``config.json`` + ``model.safetensors`` with Hugging Face names, q/k rows
  permuted back to the rotate-half layout (the inverse of `weights.huggingface`), + tokenizer
  files; ``transformers.AutoModelForCausalLM.from_pretrained`` loads it.

The sum is computed in float32 and stored in the base's float dtype (float32 for quantized
GGUF bases, which are dequantized). A GGUF base's embedded tokenizer is exported as
``tokenizer.json`` + ``tokenizer_config.json`` (with its chat template).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from souverain.errors import FinetuneError
from souverain.weights.adapter import load_adapter
from souverain.weights.args import ModelArgs
from souverain.weights.checkpoint import Checkpoint
from souverain.weights.huggingface import TO_HF_LAYER, interleaved_to_hf

_FLOAT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "generation_config.json",
)


def merged_state_dict(
    ckpt: Checkpoint, adapter_path: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the base (mistral-inference names) with the adapter folded in."""
    args = ckpt.args
    adapter = load_adapter(adapter_path, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    unknown = [m for m in adapter.weights if f"{m}.weight" not in ckpt.tensors]
    if unknown:
        raise FinetuneError(
            f"the adapter at {adapter_path} adapts {unknown[0]}, which "
            f"{ckpt.path} does not have; merge it into the model it was "
            "trained on."
        )
    state: dict[str, torch.Tensor] = {}
    for name, info in ckpt.items():
        out_dtype = dtype or _FLOAT.get(info.source_dtype, torch.float32)
        w = info.read(torch.float32)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        delta = adapter.delta(module) if module else None
        if delta is not None:
            if delta.shape != w.shape:
                raise FinetuneError(
                    f"the adapter's {module} update is {tuple(delta.shape)} but "
                    f"the base weight is {tuple(w.shape)}; this adapter belongs "
                    "to another model."
                )
            w = w + delta
        state[name] = w.to(out_dtype).contiguous()
    return state


def params_json(args: ModelArgs) -> dict[str, Any]:
    """mistral-inference ``params.json`` for ``args``."""
    p: dict[str, Any] = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_dim": args.hidden_dim,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
    }
    if args.sliding_window is not None:
        sw = args.sliding_window
        p["sliding_window"] = list(sw) if isinstance(sw, tuple) else sw
    if args.moe is not None:
        p["moe"] = {
            "num_experts": args.moe.num_experts,
            "num_experts_per_tok": args.moe.num_experts_per_tok,
        }
    if args.tied_embeddings:
        p["tied_embeddings"] = True
    if args.max_seq_len:
        p["max_seq_len"] = args.max_seq_len
    return p


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    """transformers ``config.json`` (Mistral, Mixtral or Llama architecture) for ``args``."""
    if isinstance(args.sliding_window, tuple):
        raise FinetuneError(
            "a per-layer sliding-window pattern has no Hugging Face "
            "config equivalent; merge with --format consolidated."
        )
    arch = args.extra.get("architecture")
    if arch not in ("MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM"):
        arch = (
            "MixtralForCausalLM"
            if args.moe
            else "MistralForCausalLM"
            if args.sliding_window
            else "LlamaForCausalLM"
        )
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": arch.replace("ForCausalLM", "").lower(),
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len or 32768,
        "tie_word_embeddings": args.tied_embeddings,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "attention_bias": False,
        "mlp_bias": False,
    }
    if arch != "LlamaForCausalLM":
        cfg["sliding_window"] = args.sliding_window
    elif args.sliding_window is not None:
        raise FinetuneError(
            "a Llama-architecture base with a sliding window cannot be written "
            "as a Hugging Face folder; merge with --format consolidated."
        )
    if args.moe is not None:
        cfg["num_local_experts"] = args.moe.num_experts
        cfg["num_experts_per_tok"] = args.moe.num_experts_per_tok
    return cfg


def to_hf_names(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """mistral-inference names -> Hugging Face names, q/k rows back to rotate-half."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        else:
            _, i, rest = name.split(".", 2)
            mod = rest[: -len(".weight")]
            h = f"model.layers.{i}"
            if rest == "attention.wq.weight":
                t = interleaved_to_hf(t, args.n_heads)
            elif rest == "attention.wk.weight":
                t = interleaved_to_hf(t, args.n_kv_heads)
            if rest in TO_HF_LAYER:
                out[f"{h}.{TO_HF_LAYER[rest]}"] = t
            elif mod.startswith("feed_forward.experts."):
                out[f"{h}.block_sparse_moe.{mod[len('feed_forward.') :]}.weight"] = t
            else:
                raise FinetuneError(f"no Hugging Face name for tensor {name}.")
    return {k: v.contiguous() for k, v in out.items()}


def _copy_tokenizer(ckpt: Checkpoint, out: Path) -> None:
    src = ckpt.path if ckpt.path.is_dir() else None
    copied = False
    if src is not None:
        from souverain.tokenizer.loader import mistral_tokenizer_files

        for f in [*mistral_tokenizer_files(src), *(src / n for n in _TOKENIZER_FILES)]:
            if f.is_file():
                shutil.copyfile(f, out / f.name)
                copied = True
    if copied:
        return
    tok = ckpt.tokenizer
    backend = getattr(tok, "backend", None)
    if tok is None or backend is None:
        raise FinetuneError(f"{ckpt.path} has no tokenizer file to copy into the merged model.")
    (out / "tokenizer.json").write_text(backend.to_str())
    config: dict[str, Any] = {
        "add_bos_token": bool(getattr(tok, "add_bos", False)),
        **getattr(tok, "special_tokens", {}),
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def merge_adapter(
    base: str | os.PathLike[str],
    adapter_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    format: Literal["consolidated", "hf"] = "consolidated",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``base`` + adapter as a full model folder in ``format``; returns the folder.
    The folder is written beside and renamed into place, so a failure leaves nothing half
    written."""
    from souverain import weights

    if format not in ("consolidated", "hf"):
        raise FinetuneError(f"merge format {format!r} is unknown; use consolidated or hf.")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FinetuneError(f"{out} exists and is not empty; choose a new output folder.")
    ckpt = weights.load(base)
    state = merged_state_dict(ckpt, adapter_path, dtype)
    tmp = out.with_name(f".tmp_{out.name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if format == "consolidated":
            (tmp / "params.json").write_text(json.dumps(params_json(ckpt.args), indent=2))
            save_file(state, str(tmp / "consolidated.safetensors"))
        else:
            first = next(iter(state.values())).dtype
            (tmp / "config.json").write_text(json.dumps(hf_config(ckpt.args, first), indent=2))
            save_file(
                to_hf_names(state, ckpt.args),
                str(tmp / "model.safetensors"),
                metadata={"format": "pt"},
            )
        _copy_tokenizer(ckpt, tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
