"""Reader for Hugging Face folders: ``config.json`` + (sharded) ``model*.safetensors``.

Supports ``MistralForCausalLM``, ``MixtralForCausalLM`` and ``LlamaForCausalLM``. Names are
mapped to mistral-inference's, and q/k rows are un-permuted from Hugging Face's rotate-half
layout back to the interleaved-pair layout our RoPE (like mistral-inference and llama.cpp) uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from souverain.errors import CheckpointError
from souverain.weights.args import ModelArgs, MoeArgs
from souverain.weights.checkpoint import Checkpoint, TensorInfo, mapped_reader, validate
from souverain.weights.safetensors_files import SafetensorsFiles

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM")


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's q/k row permutation: per head, rows ``[r0..r_{h/2-1}, i0..]``
    (rotate-half halves) become interleaved pairs ``[r0, i0, r1, i1, ...]``."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_to_interleaved`: rows ``[r0, i0, r1, i1..]`` per head become
    ``[r0, r1.., i0, i1..]`` (for writing Hugging Face checkpoints and adapters)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"{source}: architecture {archs or config.get('model_type')!r} is not supported; "
            f"souverain reads {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(
            f"{source}: RoPE scaling {rope_type!r} is not supported yet; only plain RoPE "
            "(Mistral, Mixtral, Llama 2 style) checkpoints load."
        )
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (Mistral models have no biases).")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only silu).")
    n_heads = int(config["num_attention_heads"])
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False:
        window = None
    moe = None
    if arch == "MixtralForCausalLM":
        moe = MoeArgs(int(config["num_local_experts"]), int(config["num_experts_per_tok"]))
    try:
        return ModelArgs(
            dim=int(config["hidden_size"]),
            n_layers=int(config["num_hidden_layers"]),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // n_heads),
            hidden_dim=int(config["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            vocab_size=int(config["vocab_size"]),
            rope_theta=float(theta),
            sliding_window=window,
            moe=moe,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_seq_len=config.get("max_position_embeddings"),
            extra={"architecture": arch},
        )
    except KeyError as exc:
        raise CheckpointError(f"{source} lacks the field {exc.args[0]!r}; fix or re-download it.") from None


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAME = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "block_sparse_moe.gate.weight": "feed_forward.gate.weight",
    "mlp.gate.weight": "feed_forward.gate.weight",  # transformers 5 in-memory Mixtral naming
}
# our per-layer names -> Hugging Face's (the inverse of _RENAME; Mixtral's router keeps the
# checkpoint name block_sparse_moe.gate)
TO_HF_LAYER = {ours: hf for hf, ours in _RENAME.items() if hf != "mlp.gate.weight"}
_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def open_huggingface(folder: Path) -> Checkpoint:
    """Open a Hugging Face folder: config.json -> `ModelArgs`, then every safetensors tensor
    under our name (nothing read yet), validated against the args."""
    config_path = folder / "config.json"
    args = args_from_config(_read_config(config_path), str(config_path))
    files = _weight_files(folder)
    st = SafetensorsFiles(files)
    tensors: dict[str, TensorInfo] = {}
    for key in st.keys():
        tensors.update(_tensor_infos(st, key, args, folder))
    ckpt = Checkpoint(path=folder, format="huggingface", args=args, tensors=tensors,
                      closers=[st.close],
                      metadata={"architecture": args.extra["architecture"],
                                "shards": len(files)})
    validate(ckpt, "config.json")
    return ckpt


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or re-download it.") from None
    return config


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files: the shards the index lists (all present), else every
    ``*.safetensors`` of the folder; none at all is an error naming the fix."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}).") from None
        files = sorted({folder / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(
                f"{folder}: shard(s) {', '.join(absent)} listed in model.safetensors.index.json "
                "are missing; finish downloading the checkpoint."
            )
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        hint = (" It holds only pytorch_model*.bin files: convert them to safetensors "
                "(transformers: model.save_pretrained(dir, safe_serialization=True)).") if bins else ""
        raise CheckpointError(f"{folder} has config.json but no *.safetensors weights.{hint}")
    return files


def _info(shape: tuple[int, ...], dtype: str, get: Callable[[], torch.Tensor],
          transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TensorInfo:
    return TensorInfo(shape, dtype, mapped_reader(get, transform))


def _tensor_infos(st: SafetensorsFiles, key: str, args: ModelArgs, folder: Path
                  ) -> dict[str, TensorInfo]:
    """Our tensors for one Hugging Face tensor ``key``: usually one, renamed; none for an
    ignored one; one per expert for a fused expert stack."""
    shape, dtype = st.shape(key), st.dtype(key)
    get = partial(st.get, key)
    if key == "model.embed_tokens.weight":
        return {"tok_embeddings.weight": _info(shape, dtype, get)}
    if key == "model.norm.weight":
        return {"norm.weight": _info(shape, dtype, get)}
    if key == "lm_head.weight":
        return {} if args.tied_embeddings else {"output.weight": _info(shape, dtype, get)}
    if (m := _LAYER.match(key)) is None:
        raise CheckpointError(f"{folder}: unexpected tensor {key}; this is not a {args.extra['architecture']} checkpoint souverain understands.")
    return _layer_tensor_infos(st, key, m.group(2), f"layers.{m.group(1)}.", args, folder)


def _layer_tensor_infos(st: SafetensorsFiles, key: str, rest: str, prefix: str,
                        args: ModelArgs, folder: Path) -> dict[str, TensorInfo]:
    """`_tensor_infos` for ``key`` = ``model.layers.{i}.{rest}`` (``prefix`` = ``layers.{i}.``)."""
    shape, dtype = st.shape(key), st.dtype(key)
    get = partial(st.get, key)
    if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        heads = args.n_heads if "q_proj" in rest else args.n_kv_heads
        return {prefix + _RENAME[rest]:
                _info(shape, dtype, get, partial(hf_to_interleaved, n_heads=heads))}
    if rest in _RENAME:
        return {prefix + _RENAME[rest]: _info(shape, dtype, get)}
    if (e := _EXPERT.match(rest)) is not None:
        return {f"{prefix}feed_forward.experts.{e.group(1)}.{e.group(2)}.weight":
                _info(shape, dtype, get)}
    out: dict[str, TensorInfo] = {}
    if rest == "mlp.experts.gate_up_proj":  # fused (n_experts, 2*hidden, dim): gate then up
        n_exp, two_h, d = shape
        h = two_h // 2
        for j in range(n_exp):
            out[f"{prefix}feed_forward.experts.{j}.w1.weight"] = _info(
                (h, d), dtype, partial(_expert_rows, st, key, j, slice(None, h)))
            out[f"{prefix}feed_forward.experts.{j}.w3.weight"] = _info(
                (h, d), dtype, partial(_expert_rows, st, key, j, slice(h, None)))
    elif rest == "mlp.experts.down_proj":  # fused (n_experts, dim, hidden)
        for j in range(shape[0]):
            out[f"{prefix}feed_forward.experts.{j}.w2.weight"] = _info(
                tuple(shape[1:]), dtype, partial(st.get_slice, key, j))
    elif rest.endswith("rotary_emb.inv_freq"):
        pass  # a cached buffer some old exports include; we compute it
    else:
        raise CheckpointError(f"{folder}: unexpected tensor {key}; souverain does not know how to load it.")
    return out


def _expert_rows(st: SafetensorsFiles, key: str, expert: int, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of expert ``expert`` of a fused expert stack (gate or up half)."""
    return st.get_slice(key, expert)[rows].contiguous()
