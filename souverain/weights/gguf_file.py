"""Reader for GGUF files (llama.cpp / Ollama), architecture ``llama`` (Mistral, Mixtral, Llama).

llama.cpp's converter already stores q/k rows in the interleaved-pair RoPE layout, so only the
names change. Quantized tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, ...) are dequantized with
the ``gguf`` package when read; F32 tensors are used in place from the memory map.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from souverain.errors import CheckpointError
from souverain.weights.args import ModelArgs, MoeArgs
from souverain.weights.checkpoint import (
    Checkpoint,
    TensorInfo,
    convert_mapped,
    drop_pages,
    validate,
)

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
           "output.weight": "output.weight"}
_BLOCK = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "ffn_gate_inp.weight": "feed_forward.gate.weight",
}
_STACKED = {"ffn_gate_exps.weight": "w1", "ffn_down_exps.weight": "w2", "ffn_up_exps.weight": "w3"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_OLD_EXPERT = re.compile(r"^ffn_(gate|down|up)\.(\d+)\.weight$")  # pre-2024 Mixtral GGUFs
_OLD_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class _Reader(GGUFReader):
    """gguf's `GGUFReader`, reading through a plain ndarray view of its memory map.

    The reader makes one array per metadata value and string part (about 250,000 for a
    49,152-token vocabulary and its merges); slicing an ``np.memmap`` runs numpy's
    ``memmap.__array_finalize__`` for each, which made opening smollm2's GGUF take ~4.5 s on an
    EPYC core. A plain view of the same mapping (no copy, the map stays its base) gives the
    same fields and tensors in ~1.7 s; tensor data are then ndarrays over the map."""

    def _get(self, offset: int, dtype: Any, count: int = 1,
             override_order: Any = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def open_gguf_reader(path: Path) -> GGUFReader:
    try:
        return _Reader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors/IndexError on bad bytes
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is probably "
            "truncated or corrupt: download it again."
        ) from None


def args_from_gguf(reader: GGUFReader, path: Path) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; souverain reads 'llama' "
            "(Mistral, Mixtral and Llama models)."
        )

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    scaling = key("rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(
            f"{path}: RoPE scaling ({scaling or 'rope_freqs, Llama 3.1 style'}) is not supported "
            "yet; only plain RoPE checkpoints (Mistral, Mixtral, Llama 2 style) load."
        )
    try:
        dim = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        n_layers = int(key("block_count"))
        hidden = int(key("feed_forward_length"))
    except TypeError:
        raise CheckpointError(
            f"{path}: GGUF metadata lacks {arch}.embedding_length/block_count/"
            "attention.head_count/feed_forward_length; the file is incomplete."
        ) from None
    vocab = key("vocab_size")
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = int(embd.shape[1]) if embd is not None else 0
    n_experts = key("expert_count")
    moe = MoeArgs(int(n_experts), int(key("expert_used_count"))) if n_experts else None
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer list in some exports: must be uniform here
        if len(set(n_kv)) != 1:
            raise CheckpointError(f"{path}: per-layer head_count_kv {n_kv} is not supported.")
        n_kv = n_kv[0]
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        head_dim=int(key("attention.key_length", dim // n_heads)),
        hidden_dim=hidden,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=int(vocab),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        sliding_window=key("attention.sliding_window"),
        moe=moe,
        tied_embeddings="output.weight" not in {t.name for t in reader.tensors},
        max_seq_len=key("context_length"),
        extra={"architecture": arch},
    )


_CHUNK_BYTES = 2 << 20  # dequantize this much quantized data at a time (float32 temporaries ~4x)


def _read(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...],
          dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor from its memory-mapped bytes, in ``dtype`` (default float32)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        with warnings.catch_warnings():  # the memory map is read-only; we never write to it
            warnings.simplefilter("ignore", UserWarning)
            return convert_mapped(torch.from_numpy(data), dtype or torch.float32)
    # Quantized rows are independent: dequantize a few MB of rows at a time straight into the
    # final tensor, so the float32 intermediate never exists for the whole tensor at once.
    out = torch.empty(shape, dtype=dtype or torch.float32)
    rows_out, rows_in = out.view(-1, shape[-1]), data.reshape(-1, data.shape[-1])
    step = max(1, _CHUNK_BYTES // max(1, rows_in.shape[-1]))
    for r in range(0, rows_in.shape[0], step):
        chunk = rows_in[r:r + step]
        rows_out[r:r + step] = torch.from_numpy(dequantize(chunk, qtype))
        drop_pages(chunk.ctypes.data, chunk.nbytes)  # the source pages go as we go
    drop_pages(data.ctypes.data, data.nbytes)  # and the pages at chunk boundaries
    return out


_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _info(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> TensorInfo:
    """A lazy tensor; quantized ones also expose their raw blocks (``TensorInfo.raw``)."""
    raw = None if qtype in _FLOAT_TYPES else (lambda: (data.reshape(-1, data.shape[-1]), qtype))
    return TensorInfo(shape, qtype.name, lambda dt: _read(data, qtype, shape, dt), raw)


def open_gguf(path: Path) -> Checkpoint:
    reader = open_gguf_reader(path)
    args = args_from_gguf(reader, path)
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost-first
        if t.name in _GLOBAL:
            tensors[_GLOBAL[t.name]] = _info(t.data, t.tensor_type, shape)
            continue
        m = _BLK.match(t.name)
        if m is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name}; souverain cannot load it.")
        prefix, rest = f"layers.{m.group(1)}.", m.group(2)
        if rest in _BLOCK:
            tensors[prefix + _BLOCK[rest]] = _info(t.data, t.tensor_type, shape)
        elif rest in _STACKED:  # (n_experts, rows, cols): one expert is one leading slice
            w = _STACKED[rest]
            for j in range(shape[0]):
                tensors[f"{prefix}feed_forward.experts.{j}.{w}.weight"] = _info(
                    t.data[j], t.tensor_type, shape[1:])
        elif (e := _OLD_EXPERT.match(rest)) is not None:
            tensors[f"{prefix}feed_forward.experts.{e.group(2)}.{_OLD_NAMES[e.group(1)]}.weight"] = (
                _info(t.data, t.tensor_type, shape))
        else:
            raise CheckpointError(f"{path}: unexpected tensor {t.name}; souverain cannot load it.")
    qtypes: dict[str, int] = {}
    for t in reader.tensors:
        qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1
    meta = {
        "architecture": args.extra.get("architecture"),
        "name": _field(reader, "general.name"),
        "file_type": _field(reader, "general.file_type"),
        "tensor_types": qtypes,
    }
    ckpt = Checkpoint(path=path, format="gguf", args=args, tensors=tensors, metadata=meta)
    validate(ckpt, "the GGUF metadata")
    from souverain.tokenizer import tokenizer_from_gguf

    ckpt.tokenizer = tokenizer_from_gguf(reader)
    return ckpt
