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

**souverain's own kernel** (`torch.ops.souverain.q4_linear`, `souverain/kernels/fused.cpp`)
serves the default bfloat16 compute where the CPU has AVX2 + FMA + F16C (`q4_kernel`): the
layout is then ``"q4"``, GGUF's own: per row, blocks of 32 weights as 16 bytes (weight i in the
low nibble of byte i, weight i + 16 in its high one) and float16 ``d`` and ``m`` per block with
``w = q * d + m`` (GGUF Q4_0 / Q4_1 keep their float16 d, and Q4_1 its m, bit for bit;
group sizes above 32 are split into blocks of 32). The activations are quantized per block of 32 to int16 (~16
bits; the block's exact float sum carries ``m``) and the integer dot runs on ``vpmaddwd``
(``vpdpwssd`` with AVX-512 VNNI, two blocks per instruction with AVX-512): exact in int32, one
float FMA per block. So it is ~10x more exact than PyTorch's kernel, which rounds the
activations to bfloat16 (rms error per matmul ~2e-5 vs ~3e-3; llama.cpp's int8 activations
measured 5x the bf16 error on the tiny test models, hence int16). Speed per call on a 2-core
AMD EPYC (Zen 4, BENCHMARKS.md): 1.2-1.7x PyTorch's at one row, 0.9-1.2x at 4-128 rows. Each
output row is the same bits at any batch size or thread count. ``SOUVERAIN_INT4_KERNEL=aten``
keeps PyTorch's kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
_q4: dict[str, object] = {}  # "ok": whether `q4_kernel`; "op": the q4_linear overload


def q4_kernel() -> bool:
    """Whether bfloat16-compute int4 linears run on souverain's own kernel (layout "q4"):
    the fused kernels built for a CPU with AVX2 + FMA + F16C, and ``SOUVERAIN_INT4_KERNEL``
    not ``aten``."""
    if "ok" not in _q4:
        from souverain import kernels

        ok = (os.environ.get("SOUVERAIN_INT4_KERNEL", "auto").strip().lower() != "aten"
              and kernels.available() and bool(torch.ops.souverain.has_q4()))
        if ok:
            _q4["op"] = torch.ops.souverain.q4_linear.default
        _q4["ok"] = ok
    return bool(_q4["ok"])


def _q4_blocks(k: int) -> int:
    """Blocks of 32 per row in the q4 layout's scales: K/32 padded to a multiple of 8."""
    return (k // 32 + 7) // 8 * 8


class Int4Linear(nn.Module):
    """``w = (q - 8) * scale + zero`` per group of ``group_size`` input columns (q in 0..15),
    packed for ``aten._weight_int4pack_mm_for_cpu`` (``layout="aten"``) or for souverain's
    own kernel (``layout="q4"``, see the module docstring)."""

    qweight: torch.Tensor  # (N, K/2) uint8: the ATen kernel's packed layout, or q4's blocks
    # aten: (K/group, N, 2) in compute_dtype; q4: (2, N, K/32 padded to 8s) float16, d then m
    scales_and_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 in_features: int, layout: str = "aten"):
        super().__init__()
        self.layout, self.in_features = layout, in_features
        if layout == "q4":
            self.out_features = packed.shape[0]
            assert scales_and_zeros.dtype == torch.float16 and scales_and_zeros.shape == (
                2, self.out_features, _q4_blocks(in_features))
            self.group_size, self.compute_dtype = 32, torch.bfloat16
            if not q4_kernel():
                raise ValueError("the q4 int4 layout needs souverain's kernel, which this CPU "
                                 "or setting does not have (SOUVERAIN_INT4_KERNEL=aten?)")
            self._q4_op: Callable[..., torch.Tensor] = _q4["op"]  # type: ignore[assignment]
        else:
            assert layout == "aten", layout
            self.out_features = scales_and_zeros.shape[1]
            assert scales_and_zeros.shape == (in_features // group_size, self.out_features, 2)
            self.group_size = group_size
            self.compute_dtype = scales_and_zeros.dtype
        assert packed.dtype == torch.uint8 and packed.shape == (self.out_features, in_features // 2)
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
        if any(p.group_size != first.group_size or p.layout != first.layout for p in parts):
            return None
        if first.layout == "q4":  # rows are independent: no tiles
            return cls(torch.cat([p.qweight for p in parts]),
                       torch.cat([p.scales_and_zeros for p in parts], dim=1),
                       32, first.in_features, "q4")
        if any(p.out_features % INT4_TILE_N for p in parts[:-1]):
            return None
        return cls(torch.cat([p.qweight for p in parts]),
                   torch.cat([p.scales_and_zeros for p in parts], dim=1),
                   first.group_size, first.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "q4":
            return self._q4_op(x, self.qweight, self.scales_and_zeros)
        y = _int4_mm(as_2d(x, self.compute_dtype), self.qweight, self.group_size,
                     self.scales_and_zeros)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q4 layout: ``(q, scales, zeros)``, ``q`` (N, K) uint8 in 0..15 and float32
        (N, K/32) scales and zeros with ``w = (q - 8) * scale + zero``, exactly."""
        assert self.layout == "q4"
        n, k = self.out_features, self.in_features
        b = self.qweight.view(n, k // 32, 16)
        q = torch.cat([b & 15, b >> 4], dim=-1).view(n, k)
        d, m = self.scales_and_zeros.float()[:, :, :k // 32]
        return q, d, m + 8 * d

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) the kernel multiplies by, for tests and debugging. The
        ATen layout is CPU-specific, so its kernel unpacks it itself: identity rows times the
        weight on the float32 path (exact), ``block`` input columns at a time."""
        if self.layout == "q4":  # w = q * d + m, as the kernel has it
            n, k = self.out_features, self.in_features
            q = self.codes()[0].view(n, k // 32, 32).float()
            d, m = self.scales_and_zeros.float()[:, :, :k // 32, None]
            return (q * d + m).view(n, k)
        sz = self.scales_and_zeros.float()
        out = torch.empty((self.out_features, self.in_features), dtype=torch.float32)
        block = 512
        for c in range(0, self.in_features, block):
            eye = torch.zeros((min(block, self.in_features - c), self.in_features))
            eye[:, c:c + block].fill_diagonal_(1.0)
            out[:, c:c + block] = _int4_mm(eye, self.qweight, self.group_size, sz).t()
        return out

    def extra_repr(self) -> str:
        kernel = "souverain q4 (int16 activations)" if self.layout == "q4" else \
            f"aten, compute_dtype={self.compute_dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={kernel}")


class _Int4Builder:
    """Packs an (N, K) int4 weight a few rows at a time.

    ATen layout: made of independent blocks of 64 rows (32 on AVX2), so packing 64-row
    multiples separately and concatenating gives the same bytes as packing the whole matrix,
    without the whole int32 intermediate. q4 layout (bfloat16 compute where `q4_kernel`):
    rows are independent; each group's scale and zero become ``d = scale`` and ``m = zero -
    8 * scale`` of its blocks of 32, in float16. A weight with a d or m beyond float16's
    range keeps the ATen layout."""

    def __init__(self, n: int, k: int, group_size: int, compute_dtype: torch.dtype):
        if not Int4Linear.supports(n, k, group_size):
            raise ValueError(f"int4 needs out_features % 16 == 0 and in_features % group == 0 "
                             f"with group in {INT4_GROUP_SIZES}; got ({n}, {k}), "
                             f"group {group_size}")
        self.n, self.k, self.group_size = n, k, group_size
        self.compute_dtype = compute_dtype
        self.q4 = compute_dtype == torch.bfloat16 and q4_kernel()
        self.packed = torch.empty((n, k // 2), dtype=torch.uint8)
        if self.q4:
            self.dm = torch.zeros((2, n, _q4_blocks(k)), dtype=torch.float16)
        else:
            self.sz = torch.empty((k // group_size, n, 2), dtype=compute_dtype)
        self.rows_per_chunk = chunk_rows(k, 64)

    def add(self, row: int, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        rows = q.shape[0]
        assert row % 64 == 0 and (rows % 64 == 0 or row + rows == self.n)
        if self.q4 and not self._add_q4(row, q, scales, zeros):
            # float16 cannot hold these scales: the ATen layout for the whole weight, the rows
            # already packed re-read from their q4 codes (the zeros within float16's rounding)
            done = Int4Linear(self.packed[:row], self.dm[:, :row].contiguous(), 32, self.k,
                              "q4").codes() if row else None
            g = self.group_size // 32
            self.q4 = False
            self.sz = torch.empty((self.k // self.group_size, self.n, 2),
                                  dtype=self.compute_dtype)
            if done is not None:
                self._add_aten(0, done[0], done[1][:, ::g], done[2][:, ::g])
        if not self.q4:
            self._add_aten(row, q, scales, zeros)

    def _add_aten(self, row: int, q: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor) -> None:
        rows = q.shape[0]
        packed = _int4_pack(q.to(torch.int32).contiguous(), 1)
        self.packed[row:row + rows] = packed.view(rows, self.k // 2)
        self.sz[:, row:row + rows, 0] = scales.t()
        self.sz[:, row:row + rows, 1] = zeros.t()

    def _add_q4(self, row: int, q: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor) -> bool:
        rows, nb = q.shape[0], self.k // 32
        scales, zeros = scales.float(), zeros.float()  # (GGUF's float16 d and m stay exact)
        d = scales.repeat_interleave(self.group_size // 32, dim=1)
        m = (zeros - 8 * scales).repeat_interleave(self.group_size // 32, dim=1)
        # (below float16's normal numbers a scale keeps an absolute error under 2^-25, under
        # 5e-7 per weight: far below int4's own; beyond its range nothing can be kept)
        big = torch.finfo(torch.float16).max
        if not bool((d.abs() <= big).all() and (m.abs() <= big).all()):
            return False
        b = q.to(torch.uint8).view(rows, nb, 32)
        self.packed[row:row + rows] = (b[..., :16] | (b[..., 16:] << 4)).view(rows, self.k // 2)
        self.dm[0, row:row + rows, :nb] = d
        self.dm[1, row:row + rows, :nb] = m
        return True

    def build(self) -> Int4Linear:
        if self.q4:
            return Int4Linear(self.packed, self.dm, 32, self.k, "q4")
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

