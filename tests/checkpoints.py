"""Tiny random reference checkpoints, written by Hugging Face transformers and converted into
every weight format souverain reads.

transformers is the reference implementation: a parity test loads one of these folders with
our loader and compares its logits / greedy continuation with :func:`hf_reference_logits` /
:func:`hf_greedy` run on the ``hf/`` folder of the same model.

Layout produced by :func:`build_tiny_checkpoint` under ``root/<name>/``::

    hf/            config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json,
                   generation_config.json, tokenizer.model.v3
    consolidated/  params.json, consolidated.safetensors, tokenizer.model.v3
    pth/           params.json, consolidated.00.pth, tokenizer.model.v3
    gguf/          model-f32.gguf, model-f16.gguf, model-q8_0.gguf   (no tokenizer metadata)

Conversions (HF -> mistral-inference names) permute the rows of wq / wk from Hugging Face's
rotate-half RoPE layout to the interleaved-pair layout used by consolidated checkpoints and
GGUF (llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute``; transformers'
``LlamaTensorProcessor._reverse_permute_weights`` is its inverse). That permutation, the GGUF
tensor names and metadata and the SentencePiece vocabulary are `souverain.bench.formats`' (the
bench's mistral-1b writer uses the same ones).

Everything is float32 and seeded: building the same model twice gives identical bytes.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from souverain.bench.formats import (
    GGUF_EXPERT_NAMES,
    add_gguf_tensor,
    add_llama_hparams,  # noqa: F401  (tests import it from here)
    add_sentencepiece_vocab,
    finish_gguf,
    gguf_name,
    llama_gguf_writer,
    permute_interleaved_to_rotate_half,
    permute_rotate_half_to_interleaved,
    v3_tokenizer_path,
)

V3_TOKENIZER_NAME = "tokenizer.model.v3"
GGUF_QTYPES = ("f32", "f16", "q8_0")


# --------------------------------------------------------------------------------------
# Specs of the three reference models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    name: str
    hf_class: str  # "MistralForCausalLM" | "MixtralForCausalLM" | "LlamaForCausalLM"
    config: dict[str, Any]  # kwargs of the transformers config class
    seed: int
    embed_std: float = 1.0  # token embeddings
    linear_std: float = 0.1  # every other matrix (attention, FFN, experts, router)
    head_std: float = 0.3  # untied lm_head (bigger logits -> bigger top-1/top-2 margins)
    norm_std: float = 0.1  # RMSNorm weights ~ N(1, norm_std)


_COMMON = dict(
    vocab_size=32768,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=512,
    hidden_act="silu",
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    dtype="float32",
)

SPECS: dict[str, TinySpec] = {
    "mistral": TinySpec(
        name="mistral",
        hf_class="MistralForCausalLM",
        config=dict(
            _COMMON,
            intermediate_size=160,
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=32,  # != hidden_size / num_attention_heads = 16
            sliding_window=6,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        seed=1234,
    ),
    "mixtral": TinySpec(
        name="mixtral",
        hf_class="MixtralForCausalLM",
        config=dict(
            _COMMON,
            intermediate_size=96,
            num_hidden_layers=2,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
        ),
        seed=2345,
    ),
    "llama": TinySpec(
        name="llama",
        hf_class="LlamaForCausalLM",
        config=dict(
            _COMMON,
            intermediate_size=128,
            num_hidden_layers=2,
            num_key_value_heads=1,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
        ),
        seed=3456,
        # Tied head: logits = E . norm(h). With big embeddings the residual stream is dominated by
        # the current token's own embedding and greedy decoding repeats the last token forever;
        # smaller embeddings + stronger layers give varied continuations.
        embed_std=0.3,
        linear_std=0.25,
    ),
}


# --------------------------------------------------------------------------------------
# Building the Hugging Face reference model
# --------------------------------------------------------------------------------------


def _hf_classes(hf_class: str):
    import transformers

    model_cls = getattr(transformers, hf_class)
    config_cls = getattr(transformers, hf_class.replace("ForCausalLM", "Config"))
    return config_cls, model_cls


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int, *, embed_std: float = 1.0,
                       linear_std: float = 0.1, head_std: float = 0.3,
                       norm_std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (deterministic, independent of the
    model's own ``_init_weights``): norms ~ N(1, norm_std), embeddings ~ N(0, embed_std),
    an untied ``lm_head`` ~ N(0, head_std), everything else ~ N(0, linear_std). Tied parameters
    are drawn once (as embeddings)."""
    gen = torch.Generator().manual_seed(seed)
    embedding = model.get_input_embeddings().weight  # may be the same Parameter as lm_head
    head = model.get_output_embeddings().weight
    seen: set[int] = set()
    for _name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        if id(p) in seen:
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1:  # RMSNorm weights (no biases in these models)
            value = 1.0 + norm_std * noise
        elif p is embedding:
            value = embed_std * noise
        elif p is head:
            value = head_std * noise
        else:
            value = linear_std * noise
        p.copy_(value.to(p.dtype))
    return model


def build_hf_model(name: str, **config_overrides: Any) -> torch.nn.Module:
    """A fresh seeded float32 transformers model for ``SPECS[name]`` (eager attention, eval mode).

    ``config_overrides`` replace config fields (e.g. ``num_hidden_layers=1`` for a probe)."""
    spec = SPECS[name]
    config_cls, model_cls = _hf_classes(spec.hf_class)
    config = config_cls(**{**spec.config, **config_overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    model = model_cls(config).to(torch.float32).eval()
    randomize_weights_(model, spec.seed, embed_std=spec.embed_std, linear_std=spec.linear_std,
                       head_std=spec.head_std, norm_std=spec.norm_std)
    return model


def write_hf(model: torch.nn.Module, out_dir: str | Path, *, max_shard_size: str = "2MB") -> Path:
    """``save_pretrained`` (safetensors, forced to shard -> ``model.safetensors.index.json``)
    plus a copy of the v3 tokenizer as ``tokenizer.model.v3``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    if not (out / "model.safetensors.index.json").is_file():
        raise AssertionError(f"save_pretrained did not shard into {out}")
    shutil.copyfile(v3_tokenizer_path(), out / V3_TOKENIZER_NAME)
    return out


# --------------------------------------------------------------------------------------
# Reading the HF folder back (the files, not the in-memory module)
# --------------------------------------------------------------------------------------


def hf_config(hf_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the (possibly sharded) safetensors checkpoint, with the names on disk."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else ["model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(hf_dir / f)))
    return state


def _head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _rope_theta(cfg: dict[str, Any]) -> float:
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise KeyError("rope_theta missing from config.json")
    return float(theta)


def params_from_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """mistral-inference ``params.json`` for a transformers config.json."""
    params: dict[str, Any] = {
        "dim": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "head_dim": _head_dim(cfg),
        "hidden_dim": cfg["intermediate_size"],
        "n_heads": cfg["num_attention_heads"],
        "n_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "norm_eps": cfg["rms_norm_eps"],
        "vocab_size": cfg["vocab_size"],
        "rope_theta": _rope_theta(cfg),
    }
    if cfg.get("sliding_window") is not None:
        params["sliding_window"] = cfg["sliding_window"]
    if cfg.get("num_local_experts"):
        params["moe"] = {"num_experts": cfg["num_local_experts"],
                         "num_experts_per_tok": cfg["num_experts_per_tok"]}
    if cfg.get("tie_word_embeddings"):
        params["tied_embeddings"] = True
    return params


# --------------------------------------------------------------------------------------
# HF <-> mistral-inference names
# --------------------------------------------------------------------------------------


def _hf_experts(sd: dict[str, torch.Tensor], i: int, n_experts: int, inter: int):
    """(w1, w2, w3) lists for layer ``i``, whichever layout the file uses: the legacy per-expert
    ``block_sparse_moe.experts.{j}.w{1,2,3}.weight`` (what transformers 5.23 writes) or the
    in-memory fused ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) + ``down_proj`` [E, H, I]."""
    for prefix in (f"model.layers.{i}.block_sparse_moe", f"model.layers.{i}.mlp"):
        if f"{prefix}.experts.0.w1.weight" in sd:
            w1 = [sd[f"{prefix}.experts.{j}.w1.weight"] for j in range(n_experts)]
            w2 = [sd[f"{prefix}.experts.{j}.w2.weight"] for j in range(n_experts)]
            w3 = [sd[f"{prefix}.experts.{j}.w3.weight"] for j in range(n_experts)]
            return sd[f"{prefix}.gate.weight"], w1, w2, w3
        if f"{prefix}.experts.gate_up_proj" in sd:
            gate_up = sd[f"{prefix}.experts.gate_up_proj"]
            down = sd[f"{prefix}.experts.down_proj"]
            assert gate_up.shape[1] == 2 * inter, gate_up.shape
            w1 = [gate_up[j, :inter] for j in range(n_experts)]
            w3 = [gate_up[j, inter:] for j in range(n_experts)]
            w2 = [down[j] for j in range(n_experts)]
            return sd[f"{prefix}.gate.weight"], w1, w2, w3
    raise KeyError(f"no MoE experts found for layer {i}")


def hf_to_mistral_state_dict(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF state dict (names on disk) -> mistral-inference names, wq/wk in interleaved layout.

    Tied models get no ``output.weight`` (``params.json`` says ``tied_embeddings``)."""
    p = params_from_hf_config(cfg)
    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
    }
    if not p.get("tied_embeddings"):
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(p["n_layers"]):
        h = f"model.layers.{i}"
        m = f"layers.{i}"
        out[f"{m}.attention.wq.weight"] = permute_rotate_half_to_interleaved(
            sd[f"{h}.self_attn.q_proj.weight"], p["n_heads"])
        out[f"{m}.attention.wk.weight"] = permute_rotate_half_to_interleaved(
            sd[f"{h}.self_attn.k_proj.weight"], p["n_kv_heads"])
        out[f"{m}.attention.wv.weight"] = sd[f"{h}.self_attn.v_proj.weight"]
        out[f"{m}.attention.wo.weight"] = sd[f"{h}.self_attn.o_proj.weight"]
        out[f"{m}.attention_norm.weight"] = sd[f"{h}.input_layernorm.weight"]
        out[f"{m}.ffn_norm.weight"] = sd[f"{h}.post_attention_layernorm.weight"]
        if "moe" in p:
            gate, w1, w2, w3 = _hf_experts(sd, i, p["moe"]["num_experts"], p["hidden_dim"])
            out[f"{m}.feed_forward.gate.weight"] = gate
            for j in range(p["moe"]["num_experts"]):
                out[f"{m}.feed_forward.experts.{j}.w1.weight"] = w1[j]
                out[f"{m}.feed_forward.experts.{j}.w2.weight"] = w2[j]
                out[f"{m}.feed_forward.experts.{j}.w3.weight"] = w3[j]
        else:
            out[f"{m}.feed_forward.w1.weight"] = sd[f"{h}.mlp.gate_proj.weight"]
            out[f"{m}.feed_forward.w2.weight"] = sd[f"{h}.mlp.down_proj.weight"]
            out[f"{m}.feed_forward.w3.weight"] = sd[f"{h}.mlp.up_proj.weight"]
    return {k: v.to(torch.float32).contiguous().clone() for k, v in out.items()}


def mistral_to_hf_state_dict(sd: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mistral_state_dict` (HF on-disk names; experts per-expert under
    ``block_sparse_moe``, as transformers 5.23 writes them). Tied models get no ``lm_head``."""
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
    }
    if not params.get("tied_embeddings"):
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(params["n_layers"]):
        h = f"model.layers.{i}"
        m = f"layers.{i}"
        out[f"{h}.self_attn.q_proj.weight"] = permute_interleaved_to_rotate_half(
            sd[f"{m}.attention.wq.weight"], params["n_heads"])
        out[f"{h}.self_attn.k_proj.weight"] = permute_interleaved_to_rotate_half(
            sd[f"{m}.attention.wk.weight"], params["n_kv_heads"])
        out[f"{h}.self_attn.v_proj.weight"] = sd[f"{m}.attention.wv.weight"]
        out[f"{h}.self_attn.o_proj.weight"] = sd[f"{m}.attention.wo.weight"]
        out[f"{h}.input_layernorm.weight"] = sd[f"{m}.attention_norm.weight"]
        out[f"{h}.post_attention_layernorm.weight"] = sd[f"{m}.ffn_norm.weight"]
        if "moe" in params:
            b = f"{h}.block_sparse_moe"
            out[f"{b}.gate.weight"] = sd[f"{m}.feed_forward.gate.weight"]
            for j in range(params["moe"]["num_experts"]):
                for w in ("w1", "w2", "w3"):
                    out[f"{b}.experts.{j}.{w}.weight"] = sd[f"{m}.feed_forward.experts.{j}.{w}.weight"]
        else:
            out[f"{h}.mlp.gate_proj.weight"] = sd[f"{m}.feed_forward.w1.weight"]
            out[f"{h}.mlp.down_proj.weight"] = sd[f"{m}.feed_forward.w2.weight"]
            out[f"{h}.mlp.up_proj.weight"] = sd[f"{m}.feed_forward.w3.weight"]
    return out


# --------------------------------------------------------------------------------------
# Writers: consolidated safetensors, consolidated .pth, GGUF
# --------------------------------------------------------------------------------------


def _write_consolidated_common(hf_dir: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg = hf_config(hf_dir)
    params = params_from_hf_config(cfg)
    sd = hf_to_mistral_state_dict(hf_state_dict(hf_dir), cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    shutil.copyfile(v3_tokenizer_path(), out / V3_TOKENIZER_NAME)
    return sd, params


def write_consolidated(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """``params.json`` + ``consolidated.safetensors`` + ``tokenizer.model.v3``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    sd, _ = _write_consolidated_common(Path(hf_dir), out)
    save_file(sd, str(out / "consolidated.safetensors"))
    return out


def write_pth(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """``params.json`` + ``consolidated.00.pth`` (``torch.save`` of the state dict) + tokenizer."""
    out = Path(out_dir)
    sd, _ = _write_consolidated_common(Path(hf_dir), out)
    torch.save(sd, out / "consolidated.00.pth")
    return out


def mistral_to_gguf_tensors(sd: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, np.ndarray]:
    """mistral-inference names -> llama.cpp names (float32 numpy, numpy shape = torch shape;
    MoE experts stacked ``[n_expert, rows, cols]``). wq/wk are already interleaved."""
    t = {gguf_name(k): sd[k] for k in ("tok_embeddings.weight", "norm.weight", "output.weight")
         if k in sd}
    for i in range(params["n_layers"]):
        m = f"layers.{i}"
        parts = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "ffn_norm"]
        parts += (["feed_forward.gate"] if "moe" in params
                  else ["feed_forward.w1", "feed_forward.w3", "feed_forward.w2"])
        t.update({gguf_name(f"{m}.{part}.weight"): sd[f"{m}.{part}.weight"] for part in parts})
        if "moe" in params:  # experts stacked [n_expert, rows, cols], one tensor per projection
            n = params["moe"]["num_experts"]
            for w, gname in GGUF_EXPERT_NAMES.items():
                t[f"blk.{i}.{gname}.weight"] = torch.stack(
                    [sd[f"{m}.feed_forward.experts.{j}.{w}.weight"] for j in range(n)])
    return {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in t.items()}


def gguf_path(out_dir: str | Path, qtype: str) -> Path:
    return Path(out_dir) / f"model-{qtype}.gguf"


def write_gguf(hf_dir: str | Path, out_dir: str | Path, qtype: str = "f32", *,
               name: str | None = None, with_tokenizer: bool = False) -> Path:
    """``out_dir/model-{qtype}.gguf`` (qtype f32 | f16 | q8_0), architecture ``llama``.

    1-D tensors (norms) and the MoE router ``ffn_gate_inp`` stay F32, as in a stock llama.cpp
    conversion. ``llama.attention.sliding_window`` is written when the model has a window (our
    own convention: llama.cpp ignores it for arch llama). No tokenizer metadata unless
    ``with_tokenizer`` (then a minimal ``tokenizer.ggml.*`` llama/SentencePiece vocab taken
    from the v3 tokenizer)."""
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype must be one of {sorted(GGUF_QTYPES)}, not {qtype!r}")
    hf_dir = Path(hf_dir)
    cfg = hf_config(hf_dir)
    params = params_from_hf_config(cfg)
    tensors = mistral_to_gguf_tensors(hf_to_mistral_state_dict(hf_state_dict(hf_dir), cfg), params)
    path = gguf_path(out_dir, qtype)
    path.parent.mkdir(parents=True, exist_ok=True)

    w = llama_gguf_writer(path, name or f"souverain-tiny-{cfg.get('model_type', 'llama')}",
                          params, cfg.get("max_position_embeddings", 512), qtype)
    if with_tokenizer:
        add_sentencepiece_vocab(w, v3_tokenizer_path(), add_bos=None)
    for tname, arr in tensors.items():
        keep_f32 = arr.ndim == 1 or tname.endswith("_norm.weight") or ".ffn_gate_inp." in tname
        add_gguf_tensor(w, tname, arr, "f32" if keep_f32 else qtype)
    finish_gguf(w)
    return path


# --------------------------------------------------------------------------------------
# Everything for one model
# --------------------------------------------------------------------------------------


def build_tiny_checkpoint(name: str, root: str | Path) -> dict[str, Any]:
    """Build ``SPECS[name]`` and write every format under ``root/name``; returns
    ``{"hf", "consolidated", "pth", "gguf_f32", "gguf_f16", "gguf_q8_0": Path, "args": params.json
    dict, "tokenizer": Path to the v3 file, "spec": TinySpec}``."""
    base = Path(root) / name
    model = build_hf_model(name)
    hf = write_hf(model, base / "hf")
    del model
    out: dict[str, Any] = {
        "hf": hf,
        "consolidated": write_consolidated(hf, base / "consolidated"),
        "pth": write_pth(hf, base / "pth"),
    }
    for q in GGUF_QTYPES:
        out[f"gguf_{q}"] = write_gguf(hf, base / "gguf", q)
    out["args"] = json.loads((out["consolidated"] / "params.json").read_text())
    out["tokenizer"] = hf / V3_TOKENIZER_NAME
    out["spec"] = SPECS[name]
    return out


# --------------------------------------------------------------------------------------
# Reference outputs from transformers
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def load_hf_model(hf_dir: str | Path) -> torch.nn.Module:
    """transformers model (float32, eager attention, eval) for an ``hf/`` folder; cached."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    # Pure greedy reference: never stop at (nor suppress) EOS. generate() fills unset fields of
    # the call's GenerationConfig from model.generation_config, so clear it here.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def hf_reference_logits(hf_dir: str | Path, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """transformers' logits, float32 ``[len(token_ids), vocab]`` (one forward, no padding)."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)[None]
    out = load_hf_model(str(Path(hf_dir))).forward(input_ids=ids, use_cache=False)
    return out.logits[0].to(torch.float32)


@torch.no_grad()
def hf_greedy(hf_dir: str | Path, token_ids: list[int], n_new: int) -> list[int]:
    """transformers ``generate(do_sample=False)`` with its KV cache (a sliding-window cache for
    Mistral): exactly ``n_new`` argmax tokens; EOS neither stops nor is suppressed."""
    model = load_hf_model(str(Path(hf_dir)))
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)[None]
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
        max_new_tokens=n_new)
    new = out[0, ids.shape[1]:].tolist()
    if len(new) != n_new:
        raise AssertionError(f"generate returned {len(new)} tokens, wanted {n_new}")
    return new


@torch.no_grad()
def greedy_min_margin(hf_dir: str | Path, token_ids: list[int], continuation: list[int]) -> float:
    """Smallest top-1 minus top-2 logit gap (transformers) over the steps that produced
    ``continuation``: how robust a greedy comparison is to float rounding."""
    logits = hf_reference_logits(hf_dir, list(token_ids) + list(continuation))
    steps = logits[len(token_ids) - 1: len(token_ids) - 1 + len(continuation)]
    top2 = steps.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())
