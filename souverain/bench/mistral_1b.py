"""The random Mistral-shaped checkpoints of the bench, written once into its cache folder as
a Hugging Face folder (bf16 safetensors; transformers, and souverain with --quantization, run
it) and F16 / Q8_0 / Q4_0 GGUF files of the same weights (souverain and llama.cpp run those):

- ``mistral-1b``: dim 2048, 16 layers, 32/8 heads, head_dim 64, hidden 5632, vocab 32768,
  sliding window 4096, rope_theta 1e6 (0.86B parameters);
- ``mistral-7b``: Mistral 7B v0.3's shape: dim 4096, 32 layers, 32/8 heads, head_dim 128,
  hidden 14336, vocab 32768, no window (7.25B parameters; 14.5 GB of bf16 safetensors, written
  in shards of 4 layers so the writer never holds the whole model).

The format conventions (q/k permutation, GGUF names and metadata) are `souverain.bench.formats`'.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from souverain.bench.formats import (
    add_gguf_tensor,
    add_sentencepiece_vocab,
    finish_gguf,
    gguf_name,
    llama_gguf_writer,
    permute_rotate_half_to_interleaved,
    v3_tokenizer_path,
)
from souverain.bench.measure import log

MISTRAL_1B: dict[str, Any] = dict(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=5632,
    vocab_size=32768, sliding_window=4096, rope_theta=1e6, norm_eps=1e-5,
    max_position_embeddings=32768, init_std=0.02, seed=0)
MISTRAL_7B: dict[str, Any] = dict(
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
    vocab_size=32768, sliding_window=None, rope_theta=1e6, norm_eps=1e-5,
    max_position_embeddings=32768, init_std=0.02, seed=0, layers_per_shard=4)
RANDOM_MODELS: dict[str, dict[str, Any]] = {"mistral-1b": MISTRAL_1B, "mistral-7b": MISTRAL_7B}
GGUF_FORMATS = ("f16", "q8_0", "q4_0")


def hf_config_dict(c: dict[str, Any]) -> dict[str, Any]:
    """transformers' config.json of a `MISTRAL_1B`-style config."""
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": c["dim"], "intermediate_size": c["hidden_dim"],
        "num_hidden_layers": c["n_layers"], "num_attention_heads": c["n_heads"],
        "num_key_value_heads": c["n_kv_heads"], "head_dim": c["head_dim"],
        "vocab_size": c["vocab_size"], "sliding_window": c["sliding_window"],
        "rope_theta": c["rope_theta"], "rms_norm_eps": c["norm_eps"],
        "max_position_embeddings": c["max_position_embeddings"], "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "attention_dropout": 0.0, "initializer_range": c["init_std"], "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def hf_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names -> shapes, in the order they are written."""
    d, hd, kv = c["dim"], c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], d)}
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (c["n_heads"] * hd, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, c["n_heads"] * hd),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.mlp.gate_proj.weight": (c["hidden_dim"], d),
            f"{p}.mlp.up_proj.weight": (c["hidden_dim"], d),
            f"{p}.mlp.down_proj.weight": (d, c["hidden_dim"]),
        })
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (c["vocab_size"], d)
    return shapes


def _shards(c: dict[str, Any]) -> list[list[str]]:
    """The tensor names of each safetensors file: one file, or ``layers_per_shard`` layers per
    file (embeddings with the first, the final norm and head with the last)."""
    names = list(hf_shapes(c))
    per = c.get("layers_per_shard")
    if not per:
        return [names]
    shards: list[list[str]] = [[]]
    for name in names:
        parts = name.split(".")
        layer = int(parts[2]) if parts[1] == "layers" else None
        if layer is not None and layer > 0 and layer % per == 0 and name.endswith(
                "input_layernorm.weight"):
            shards.append([])
        shards[-1].append(name)
    return shards


def _shard_files(c: dict[str, Any]) -> list[str]:
    n = len(_shards(c))
    return (["model.safetensors"] if n == 1 else
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])


def write_mistral_hf(folder: Path, c: dict[str, Any]) -> None:
    """Seeded random weights (normal(0, init_std), norms = 1, as transformers' own init) saved
    as bf16 safetensors (+ an index when sharded) + config.json + the v3 tokenizer; one shard
    in memory at a time."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(c["seed"])
    shapes = hf_shapes(c)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for names, file in zip(_shards(c), _shard_files(c)):
        state = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                state[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                state[name] = (torch.randn(shape, generator=gen) * c["init_std"]).to(
                    torch.bfloat16)
            weight_map[name] = file
        save_file(state, str(tmp / file), metadata={"format": "pt"})
        del state
    if len(_shard_files(c)) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}, indent=1) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(c), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}) + "\n")
    shutil.copyfile(v3_tokenizer_path(), tmp / "tokenizer.model.v3")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def write_mistral_gguf(hf_folder: Path, path: Path, fmt: str, c: dict[str, Any]) -> None:
    """One GGUF (arch llama) of the HF folder's weights: 2-D tensors in ``fmt`` (all of them,
    token embedding and output included: a "pure" file), norms F32."""
    import numpy as np
    from safetensors import safe_open

    tmp = path.with_name(path.name + ".partial")
    w = llama_gguf_writer(tmp, f"souverain-bench-{path.stem}", c,
                          c["max_position_embeddings"], fmt)
    add_sentencepiece_vocab(w, v3_tokenizer_path())
    for names, file in zip(_shards(c), _shard_files(c)):
        with safe_open(str(hf_folder / file), framework="pt") as f:
            for name in names:
                t = f.get_tensor(name).float()
                if name.endswith("q_proj.weight"):
                    t = permute_rotate_half_to_interleaved(t, c["n_heads"])
                elif name.endswith("k_proj.weight"):
                    t = permute_rotate_half_to_interleaved(t, c["n_kv_heads"])
                arr = np.ascontiguousarray(t.numpy())
                add_gguf_tensor(w, gguf_name(name), arr, "f32" if arr.ndim == 1 else fmt)
    finish_gguf(w)
    tmp.rename(path)


def ensure_mistral_1b(cache_dir: Path, formats: list[str]) -> dict[str, Any]:
    """`ensure_random_model` of ``mistral-1b``."""
    return ensure_random_model("mistral-1b", cache_dir, formats)


def ensure_random_model(model: str, cache_dir: Path, formats: list[str]) -> dict[str, Any]:
    """Write (once) ``model``'s HF folder and the requested GGUF files; return their paths."""
    c = RANDOM_MODELS[model]
    root = cache_dir / model
    hf = root / "hf"
    log_path = root / "written.json"
    written = json.loads(log_path.read_text()) if log_path.is_file() else {}
    root.mkdir(parents=True, exist_ok=True)
    if not all((hf / f).is_file() for f in _shard_files(c)):
        log(f"writing the random {model} Mistral-shaped checkpoint into {hf} (once)")
        t = time.perf_counter()
        write_mistral_hf(hf, c)
        written["hf_bf16_s"] = round(time.perf_counter() - t, 1)
        log(f"  HF bf16 folder: {written['hf_bf16_s']} s")
    out: dict[str, Any] = {"hf": hf, "gguf": {}}
    for fmt in formats:
        path = root / f"{model}-{fmt}.gguf"
        if not path.is_file():
            log(f"writing {path.name} (once)")
            t = time.perf_counter()
            write_mistral_gguf(hf, path, fmt, c)
            written[f"gguf_{fmt}_s"] = round(time.perf_counter() - t, 1)
            log(f"  {path.name}: {written[f'gguf_{fmt}_s']} s")
        out["gguf"][fmt] = path
    log_path.write_text(json.dumps(written, indent=2) + "\n")
    out["written_s"] = written
    return out
