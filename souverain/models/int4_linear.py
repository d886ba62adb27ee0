"""`Int4Linear`: weight-only int4 on PyTorch's CPU kernel, and GGUF 4-bit blocks packed into
it without a float detour.

The kernel is ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/group,
N, 2])`` with ``packed = aten._convert_weight_to_int4pack_for_cpu(q_int32 [N, K] in 0..15, 1)``
(a CPU-specific uint8 [N, K/2] layout: pack on the machine that runs it, never store it):
``w = (q - 8) * scale + zero`` per group of ``group`` input columns. ``group`` in 32/64/128/256,
``K % group == 0``, ``N % 16 == 0``. It takes float32, bfloat16 or float16 activations with
scales in the *same* dtype and accumulates in float32; only bfloat16 has a vectorised
(AVX-512/AVX2) path (float32 is a scalar loop, 27-34x slower at batch 1 on the Cascade Lake of
PERF-NOTES). So its default ``compute_dtype`` is bfloat16: activations are cast to bf16 for the
matmul and the result back to the model's dtype (relative error ~2e-3 per matmul: one rounding
in, one out). ``compute_dtype=torch.float32`` keeps every bit of the source (a Q4 GGUF then
gives bit-identical logits to the dequantized float32 model); tests use it. Rows are
independent, so a row's result is bitwise the row computed alone, at any batch size.

GGUF 4-bit blocks map exactly onto the int4 form (group 32):

- Q4_0 ``w = (q - 8) * d``            -> scale d, zero 0
- Q4_1 ``w = q * d + m``              -> scale d, zero m + 8d
- Q4_K ``w = (d*sc) * q - dmin*mn``   -> scale d*sc, zero 8*d*sc - dmin*mn  (sub-blocks of 32)

so `int4_from_gguf` packs them straight from their raw bytes; the only rounding is of the scale
and zero to ``compute_dtype`` (bf16: 8 significant bits instead of fp16's 11).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from souverain.models.quantized_weight import (
    QuantizedWeight,
    SourceWeight,
    as_2d,
    chunk_rows,
    drop_blocks,
    row_chunks,
)

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

DEFAULT_GROUP_SIZE = 32
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_TILE_N = 64  # output rows per tile of the CPU int4 packed layout

# the overload packets resolved once (``torch.ops.aten.x`` is an attribute lookup chain)
_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu.default


class Int4Linear(nn.Module):
    """``w = (q - 8) * scale + zero`` per group of ``group_size`` input columns (q in 0..15),
    packed for ``aten._weight_int4pack_mm_for_cpu``."""

    qweight: torch.Tensor  # (N, K/2) uint8, the CPU kernel's packed layout
    scales_and_zeros: torch.Tensor  # (K/group, N, 2) in compute_dtype

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 in_features: int):
        super().__init__()
        self.out_features, self.in_features = scales_and_zeros.shape[1], in_features
        assert packed.dtype == torch.uint8 and packed.shape == (self.out_features, in_features // 2)
        assert scales_and_zeros.shape == (in_features // group_size, self.out_features, 2)
        self.group_size = group_size
        self.compute_dtype = scales_and_zeros.dtype
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.weight = QuantizedWeight(self, self.out_features, in_features, self.compute_dtype)

    @staticmethod
    def supports(out_features: int, in_features: int, group_size: int) -> bool:
        return (group_size in INT4_GROUP_SIZES and in_features % group_size == 0
                and out_features % 16 == 0)

    @classmethod
    def from_int4(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """From unpacked values: ``q`` (N, K) integers in 0..15, ``scales``/``zeros``
        (N, K/group_size) float, meaning ``w = (q - 8) * scale + zero``."""
        builder = _Int4Builder(q.shape[0], q.shape[1], group_size, compute_dtype)
        for r in range(0, q.shape[0], builder.rows_per_chunk):
            e = r + builder.rows_per_chunk
            builder.add(r, q[r:e], scales[r:e], zeros[r:e])
        return builder.build()

    @classmethod
    def from_float(cls, weight: SourceWeight, group_size: int = DEFAULT_GROUP_SIZE,
                   compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """Asymmetric min/max round-to-nearest int4 of ``weight``, per group of columns (read in
        chunks of rows, never converted whole)."""
        n, k = weight.shape
        builder = _Int4Builder(n, k, group_size, compute_dtype)
        for r, w in row_chunks(weight, builder.rows_per_chunk):
            g = w.view(w.shape[0], k // group_size, group_size)
            lo, hi = torch.aminmax(g, dim=-1)
            scale = ((hi - lo).clamp(min=1e-6) / 15).to(compute_dtype).float()
            zero = (lo + 8 * scale).to(compute_dtype).float()
            # q from the *rounded* scale and zero: the best q for what the kernel will use
            q = g - zero[..., None]  # a new tensor: ``w`` may be a view of the source
            q.div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
            builder.add(r, q.view(w.shape[0], k), scale, zero)
        return builder.build()

    @classmethod
    def concat(cls, parts: list[Int4Linear]) -> Int4Linear | None:
        """One linear computing ``cat([p(x) for p in parts], -1)`` exactly (the parts share
        ``in_features`` and ``compute_dtype``), or None when their group sizes differ or a part
        but the last does not fill whole tiles: output rows are independent, but the CPU layout
        packs N in tiles of ``INT4_TILE_N`` rows (measured: a 96-row part breaks it)."""
        first = parts[0]
        if any(p.group_size != first.group_size for p in parts):
            return None
        if any(p.out_features % INT4_TILE_N for p in parts[:-1]):
            return None
        return cls(torch.cat([p.qweight for p in parts]),
                   torch.cat([p.scales_and_zeros for p in parts], dim=1),
                   first.group_size, first.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _int4_mm(as_2d(x, self.compute_dtype), self.qweight, self.group_size,
                     self.scales_and_zeros)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) the kernel multiplies by, for tests and debugging. The
        packed layout is CPU-specific, so the kernel unpacks it itself: identity rows times the
        weight on the float32 path (exact), ``block`` input columns at a time."""
        sz = self.scales_and_zeros.float()
        out = torch.empty((self.out_features, self.in_features), dtype=torch.float32)
        block = 512
        for c in range(0, self.in_features, block):
            eye = torch.zeros((min(block, self.in_features - c), self.in_features))
            eye[:, c:c + block].fill_diagonal_(1.0)
            out[:, c:c + block] = _int4_mm(eye, self.qweight, self.group_size, sz).t()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute_dtype={self.compute_dtype}")


class _Int4Builder:
    """Packs an (N, K) int4 weight a few rows at a time: the kernel's layout is made of
    independent blocks of 64 rows (32 on AVX2), so packing 64-row multiples separately and
    concatenating gives the same bytes as packing the whole matrix, without the whole int32
    intermediate."""

    def __init__(self, n: int, k: int, group_size: int, compute_dtype: torch.dtype):
        if not Int4Linear.supports(n, k, group_size):
            raise ValueError(f"int4 needs out_features % 16 == 0 and in_features % group == 0 "
                             f"with group in {INT4_GROUP_SIZES}; got ({n}, {k}), "
                             f"group {group_size}")
        self.n, self.k, self.group_size = n, k, group_size
        self.packed = torch.empty((n, k // 2), dtype=torch.uint8)
        self.sz = torch.empty((k // group_size, n, 2), dtype=compute_dtype)
        self.rows_per_chunk = chunk_rows(k, 64)

    def add(self, row: int, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        rows = q.shape[0]
        assert row % 64 == 0 and (rows % 64 == 0 or row + rows == self.n)
        packed = _int4_pack(q.to(torch.int32).contiguous(), 1)
        self.packed[row:row + rows] = packed.view(rows, self.k // 2)
        self.sz[:, row:row + rows, 0] = scales.t()
        self.sz[:, row:row + rows, 1] = zeros.t()

    def build(self) -> Int4Linear:
        return Int4Linear(self.packed, self.sz, self.group_size, self.k)


# ---------------------------------------------------------------------------------------------
# GGUF 4-bit blocks -> int4 groups of 32
# ---------------------------------------------------------------------------------------------


def gguf_int4_types() -> dict[GGMLQuantizationType, int]:
    """The GGUF types `int4_from_gguf` maps exactly, with their block size in weights."""
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0: 32, T.Q4_1: 32, T.Q4_K: 256}


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def gguf_int4_groups(blocks: np.ndarray, qtype: GGMLQuantizationType
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode raw GGUF rows ``blocks`` (rows, bytes per row; uint8) of type Q4_0, Q4_1 or Q4_K
    into ``q`` (rows, K) uint8 in 0..15 and float32 ``scales``, ``zeros`` (rows, K/32) with
    ``w = (q - 8) * scale + zero`` exactly the weight ``gguf.quants.dequantize`` gives (up to
    one float32 rounding of ``zero`` for Q4_1/Q4_K)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import Q4_K

    rows = blocks.shape[0]
    if qtype == T.Q4_0:
        b = blocks.reshape(rows, -1, 18)
        d = _f16(b[..., 0:2])[..., 0]
        qs = b[..., 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        return q.reshape(rows, -1), d, np.zeros_like(d)
    if qtype == T.Q4_1:
        b = blocks.reshape(rows, -1, 20)
        d, m = _f16(b[..., 0:2])[..., 0], _f16(b[..., 2:4])[..., 0]
        qs = b[..., 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        return q.reshape(rows, -1), d, m + np.float32(8) * d
    if qtype == T.Q4_K:
        b = blocks.reshape(rows, -1, 144)  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 qs
        nb = b.shape[1]
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # (rows, nb, 1)
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
        scale = d * sc.reshape(rows, nb, 8).astype(np.float32)
        zero = np.float32(8) * scale - dmin * mn.reshape(rows, nb, 8).astype(np.float32)
        qs = b[..., 16:].reshape(rows, nb, 4, 1, 32)  # 4 x 32 bytes: sub-blocks 2c (low), 2c+1
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2)
        return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)
    raise ValueError(f"{qtype!r} does not map onto int4 groups")




def int4_from_gguf(blocks: np.ndarray, qtype: GGMLQuantizationType,
                   compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
    """An `Int4Linear` (group 32) straight from raw GGUF rows of Q4_0 / Q4_1 / Q4_K, decoded a
    few rows at a time (``blocks``: (out_features, bytes per row) uint8, e.g. a memory map)."""
    from gguf.constants import GGML_QUANT_SIZES

    if qtype not in gguf_int4_types():
        raise ValueError(f"{qtype!r} does not map onto int4 groups")
    block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
    rows = blocks.shape[0]
    k = blocks.shape[1] // block_bytes * block_weights
    builder = _Int4Builder(rows, k, 32, compute_dtype)
    for r in range(0, rows, builder.rows_per_chunk):
        chunk = blocks[r:r + builder.rows_per_chunk]
        q, s, z = gguf_int4_groups(chunk, qtype)
        drop_blocks(chunk)
        builder.add(r, torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z))
    return builder.build()

