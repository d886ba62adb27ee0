"""`Int8Linear`: int8 weights times activations split into two int8 planes, exact integer
products, on souverain's own VNNI kernel or oneDNN's packed int8 matmul.

The kernels (ATen, CPU): souverain's own AVX-512 VNNI matmul (`kernels.int8_linear`) where the
fused kernels are built on a VNNI CPU, else oneDNN's int8 matmul on a weight pre-packed at load
(``onednn.qlinear_prepack`` / ``onednn.qlinear_pointwise``; ``aten._int_mm`` where those ops are
missing): exact integer products (the VNNI kernel and oneDNN give the same bits). The
activations are quantized per row on the fly into two int8 planes (~15 bits kept; see the
class), the weights per output channel. Every other op is row-wise, so a row's result is bitwise
the row computed alone, at any batch size or thread count.

Packing happens here too: the VNNI kernel's (N/16, K/4, 64) layout (`_vnni_pack`), or oneDNN's
opaque blocked layout a row block of at most ``_PACK_ELEMS`` weights at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from souverain import kernels
from souverain.models.quantized_weight import (
    QuantizedWeight,
    SourceWeight,
    as_2d,
    chunk_rows,
    row_chunks,
)

# the overload packet resolved once (``torch.ops.aten.x`` is an attribute lookup chain)
_int_mm = torch.ops.aten._int_mm.default


def _onednn_qlinear() -> bool:
    """Whether oneDNN's packed int8 matmul is both present and exact on this CPU.

    oneDNN multiplies our uint8 activation planes by int8 weights with VNNI (``vpdpbusd``,
    int32 sums) or AMX where the CPU has them. On a CPU with AVX2 only (AMD Zen 2/3, older
    Intel) it falls back to ``vpmaddubsw``, which adds each PAIR of u8 x s8 products in
    saturating int16: 2 x 255 x 127 overflows, and outlier channels came out ~10x less
    accurate than `aten._int_mm` (relative error 2.4e-3 vs 2.1e-4 on AMD EPYC Zen 3). Those
    CPUs take the exact `aten._int_mm` path instead.
    """
    ops = getattr(torch.ops, "onednn", None)
    try:
        present = (torch.backends.mkldnn.is_available() and ops is not None
                   and hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qlinear_prepack"))
        return present and (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


_HAS_QLINEAR = _onednn_qlinear()
if _HAS_QLINEAR:
    _qlinear = torch.ops.onednn.qlinear_pointwise.default
    _qlinear_prepack = torch.ops.onednn.qlinear_prepack.default


def fast_int8() -> bool:
    """Whether int8 matmuls run on integer dot-product units here: souverain's VNNI kernel or
    oneDNN's exact VNNI / AMX path. False on AVX2-only CPUs (AMD Zen 2/3, older Intel), where
    `aten._int_mm` is several times slower than a bf16 matmul of the same weight (SmolLM2's
    head at batch 1 on AMD EPYC Zen 3: 31.6 ms int8 vs 3.7 ms bf16 vs 2.2 ms int4)."""
    return _vnni_layout() or _HAS_QLINEAR


def _vnni_layout() -> bool:
    """Whether new `Int8Linear`s pack for souverain's own VNNI kernel (`kernels.int8_linear`):
    the kernels built, on a CPU with AVX-512 VNNI. Otherwise oneDNN's packing."""
    return kernels.has_vnni()


def _vnni_pack(q: torch.Tensor) -> torch.Tensor:
    """(n, k) int8 -> the kernel's (ceil(n/16), ceil(k/4), 64) layout, zero padded: block b,
    step j holds output rows 16b..16b+15, each with its input columns 4j..4j+3."""
    n, k = q.shape
    n16, k4 = -(-n // 16), -(-k // 4)
    if (n, k) != (16 * n16, 4 * k4):
        q = F.pad(q, (0, 4 * k4 - k, 0, 16 * n16 - n))
    return q.view(n16, 16, k4, 4).permute(0, 2, 1, 3).contiguous().view(n16, k4, 64)


def _vnni_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    n16, k4, _ = packed.shape
    return packed.view(n16, k4, 16, 4).permute(0, 2, 1, 3).reshape(16 * n16, 4 * k4)[:n, :k]


def _vnni_comp(packed: torch.Tensor) -> torch.Tensor:
    """128 * (sum of each output row's weights), int32 (n16 * 16,): the uint8 activations'
    zero point taken back out. A few blocks at a time (int32 is 4x the weight)."""
    n16, k4, _ = packed.shape
    comp = torch.empty((n16, 16), dtype=torch.int32)
    step = chunk_rows(k4 * 64, 1)
    for b in range(0, n16, step):
        comp[b:b + step] = packed[b:b + step].view(-1, k4, 16, 4).sum((1, 3), dtype=torch.int32)
    return comp.view(-1).mul_(128)


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scales[:, None]).T``: int8 weights, one scale per output channel
    (symmetric), multiplied in integers against activations split into two int8 planes,
    quantized on the fly per row:

        x ~= (amax_x / 127) * (hi + lo / 254),   hi = round(x * 127 / amax_x),
                                                 lo = round((x * 127 / amax_x - hi) * 254)

    so the activations keep ~15 bits (relative error <= 1/(2 * 127 * 254) of the row's
    largest magnitude: ~3e-5 per matmul, finer than a bf16 rounding) while the product runs on
    the integer units. Both planes go through one call (2M rows), so the weights are read
    once. One plane alone (plain per-token int8 "W8A8") is not accurate enough on small
    models: on SmolLM2-135M its logits were 0.06-0.22 relative RMS from fp32 (the weight
    rounding alone: ~0.04), because a few large channels set each row's scale.

    The kernel is oneDNN's int8 matmul with the weight pre-packed once into its blocked layout
    (``onednn.qlinear_prepack`` / ``qlinear_pointwise``, the ops torch's x86 inductor
    quantization uses; AVX-512 VNNI ``vpdpbusd`` here), which applies the per-channel scale in
    its epilogue. Measured on the Cascade Lake of PERF-NOTES, 2 threads: a 0.86B model's
    linears at 2 rows (batch 1, both planes) read ~23 GB/s, the machine's bandwidth, where
    ``aten._int_mm`` (which re-packs the weight on every call) reached 13 and the weight-only
    ``aten._weight_int8pack_mm`` ~8; at 16+ rows it is ~2x faster than float32 ``F.linear``
    or the weight-only int8/int4 kernels (those cost linearly in the rows). Without oneDNN's
    quantized ops (other builds) it runs on ``aten._int_mm``. The packed weight is an opaque
    oneDNN tensor, not a buffer: `qweight` unpacks a copy, `packed_nbytes` counts it.

    With souverain's kernels built on a CPU with AVX-512 VNNI, the weight is packed instead
    for its own kernel (`kernels.int8_linear`: the planes, the integer products and the
    epilogue in one call, 8 plane rows x 48 output channels of int32 accumulators per tile),
    whose results are bitwise those of the oneDNN path (tested) and which is faster at every
    batch on cold weights, where oneDNN pays ~30 us a call and streams them poorly: all of
    SmolLM2's linears and its head at 2 plane rows (batch 1) 8.6 -> 4.9 ms, at 32 (batch 16)
    15.6 -> 11.6 ms, at 1024 (a 512-token prefill) 277 -> 255 ms, planes and epilogue included
    (`benchmarks/int8_kernels.py`; BENCHMARKS.md, session 7).

    The integer product is exact (int32 accumulation: |sum| <= 128 * 127 * K, no overflow for
    K < 132k) and every other op is row-wise, so a row's result is bitwise the same at any
    batch size or thread count. Any float activation dtype; the output has the input's dtype.
    """

    scales: torch.Tensor  # (N,) float32, one per output channel
    _scales_127: torch.Tensor  # scales / 127: the epilogue's factor

    def __init__(self, qweight: torch.Tensor | list[torch.Tensor], scales: torch.Tensor,
                 in_features: int | None = None):
        """``qweight``: the (N, K) int8 weight, or its consecutive row blocks, plain (n_i, K)
        or already packed by ``qlinear_prepack`` ((K, n_i), as `from_float` builds them, so
        that only one block is ever held both plain and packed), or already in the VNNI
        kernel's layout ((N/16, K/4, 64), with ``in_features`` = K)."""
        super().__init__()
        self._vnni: torch.Tensor | None = None  # the VNNI kernel's packed weight, if used
        self._packed: list[torch.Tensor] = []  # oneDNN's packed row blocks (or plain ones)
        self._bounds: list[tuple[int, int]] = []
        if isinstance(qweight, torch.Tensor) and qweight.dim() == 3:
            assert in_features is not None and qweight.dtype == torch.int8
            self._vnni, self.in_features = qweight, in_features
        elif _vnni_layout() and not (isinstance(qweight, (list, tuple))
                                     and any(b.is_mkldnn for b in qweight)):
            plain = torch.cat(list(qweight)) if isinstance(qweight, (list, tuple)) else qweight
            self._vnni, self.in_features = _vnni_pack(plain), plain.shape[1]
        else:
            self._pack_blocks(
                list(qweight) if isinstance(qweight, (list, tuple)) else _row_blocks(qweight))
        self.out_features = scales.shape[0]
        if self._vnni is not None:
            assert self._vnni.shape == (-(-self.out_features // 16), -(-self.in_features // 4), 64)
        else:
            assert self._bounds[-1][1] == self.out_features
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        # the epilogue's factor, kept so a call does not recompute it
        self.register_buffer("_scales_127", self.scales / 127.0, persistent=False)
        self._zero_point = torch.zeros(1, dtype=torch.long)
        if self._vnni is not None:  # the kernel reads 16 channels at a time: padded
            self._comp = _vnni_comp(self._vnni)
            self._s127 = F.pad(self._scales_127, (0, 16 * self._vnni.shape[0] - self.out_features))
        self.weight = QuantizedWeight(self, self.out_features, self.in_features, torch.float32)

    def _pack_blocks(self, blocks: list[torch.Tensor]) -> None:
        """oneDNN's packing, a row block at a time. Weights larger than _PACK_ELEMS are packed
        in row blocks (one oneDNN call each): the packing holds a plain and a packed copy of
        what it packs, and a whole 49k-row head at once pushed SmolLM2's int4 load peak to
        1.31x its weights. Each extra call costs ~50 us at batch 1 (the 0.86B model's linears:
        39.8 ms in one block each, 41.6 with 16M-weight blocks, 47.4 with 4M ones), so blocks
        are 16M weights."""
        start, self.in_features = 0, -1
        while blocks:  # pack and drop each plain block in turn
            b = blocks.pop(0)
            if b.is_mkldnn:
                k, n = b.shape
            else:
                assert b.dtype == torch.int8 and b.dim() == 2
                n, k = b.shape
                b = _qlinear_prepack(b.contiguous(), None) if _HAS_QLINEAR else b.contiguous()
            assert self.in_features in (-1, k)
            self.in_features = k
            self._packed.append(b)
            self._bounds.append((start, start + n))
            start += n

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32  # of the quantization and the epilogue; the product is int32

    @property
    def qweight(self) -> torch.Tensor:
        """The (N, K) int8 weight (packed for a kernel: a copy unpacked from its layout)."""
        if self._vnni is not None:
            return _vnni_unpack(self._vnni, self.out_features, self.in_features)
        if _HAS_QLINEAR:
            return torch.cat([p.to_dense().t() for p in self._packed])
        return self._packed[0] if len(self._packed) == 1 else torch.cat(self._packed)

    @property
    def packed_nbytes(self) -> int:
        if self._vnni is not None:
            return self._vnni.numel()
        return self.out_features * self.in_features

    @classmethod
    def from_float(cls, weight: SourceWeight, compute_dtype: torch.dtype | None = None,
                   ) -> Int8Linear:
        """Round-to-nearest per-channel int8 of ``weight`` (any float dtype, may be a memory
        map: read in chunks of rows, never converted whole; packed a row block at a time).
        ``compute_dtype`` is accepted for symmetry with `Int4Linear` and ignored: this kernel
        always quantizes in float32."""
        n, k = weight.shape
        scales = torch.empty((n,), dtype=torch.float32)
        if _vnni_layout():  # quantized and packed a chunk of rows at a time, in place
            packed = torch.empty((-(-n // 16), -(-k // 4), 64), dtype=torch.int8)
            for r, w in row_chunks(weight, 16):
                tiles = slice(r // 16, -(-(r + w.shape[0]) // 16))
                packed[tiles] = _vnni_pack(_quantize_rows(w, scales, r))
            return cls(packed, scales, k)
        rows = _block_rows(n, k)
        blocks: list[torch.Tensor] = []
        for r0 in range(0, n, rows):  # one row block at a time: quantized, packed, dropped
            block = torch.empty((min(rows, n - r0), k), dtype=torch.int8)
            for r, w in row_chunks(weight, 1, r0, r0 + block.shape[0]):
                block[r - r0:r - r0 + w.shape[0]] = _quantize_rows(w, scales, r)
            blocks.append(_qlinear_prepack(block, None) if _HAS_QLINEAR else block)
            del block
        return cls(blocks, scales)

    @classmethod
    def concat(cls, parts: list[Int8Linear]) -> Int8Linear:
        """One linear computing ``cat([p(x) for p in parts], -1)`` exactly (the parts share
        ``in_features``): output rows are independent in both packings, so the VNNI blocks are
        concatenated when every part but the last fills whole 16-row blocks, and the plain
        weights repacked otherwise."""
        scales = torch.cat([p.scales for p in parts])
        vnni = [p._vnni for p in parts if p._vnni is not None]
        if len(vnni) == len(parts) and not any(p.out_features % 16 for p in parts[:-1]):
            return cls(torch.cat(vnni), scales, parts[0].in_features)
        return cls(torch.cat([p.qweight for p in parts]), scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._vnni is not None and kernels.usable(x):
            return kernels.int8_linear(x, self._vnni, self._comp, self._s127, self.out_features)
        onednn = _HAS_QLINEAR and self._vnni is None
        if onednn and kernels.usable(x):
            # the same planes, then the same sum, in one fused kernel each (`souverain.kernels`:
            # ~14 small ops per linear otherwise, which dominate at small batch)
            q, amax = kernels.int8_planes(x)
            y = torch.empty((q.shape[0] // 2, self.out_features), dtype=x.dtype)
            for a, b, acc in self._block_products(q):
                kernels.int8_epilogue_(y[:, a:b], acc, amax)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        x2 = as_2d(x, torch.float32)
        m = x2.shape[0]
        amax = x2.abs().amax(-1, keepdim=True).clamp_min_(1e-30)
        xs = torch.mul(x2, 127.0 / amax)  # |xs| <= 127 (to an ulp): the casts below are exact
        planes = torch.empty((2 * m, self.in_features), dtype=torch.float32)
        hi = torch.round(xs, out=planes[:m])
        torch.sub(xs, hi, out=planes[m:]).mul_(254.0).round_()  # |lo| <= 127
        if onednn:
            # uint8 with zero point 128: signed int8 activations send oneDNN to its reference
            # (naive) int8 matmul at 2+ rows, ~1000x slower. Float32 out, times scales / 127.
            q = planes.add_(128.0).to(torch.uint8)
            y = torch.empty((m, self.out_features), dtype=torch.float32)
            for a, b, acc in self._block_products(q):  # each block's sum into its columns
                torch.add(acc[:m], acc[m:], alpha=1.0 / 254.0, out=y[:, a:b])
            y = y.mul_(amax)
        else:
            q = planes.to(torch.int8)  # (a VNNI-packed weight, kernels off: unpacked)
            parts = [_int_mm(q, p.t()) for p in (self._packed or [self.qweight])]
            acc = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(torch.float32)
            y = torch.add(acc[:m], acc[m:], alpha=1.0 / 254.0).mul_(amax * self._scales_127)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _block_products(self, q: torch.Tensor
                        ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Per packed row block: its output columns ``a:b`` and oneDNN's float32 product of
        the uint8 planes ``q`` (2m, K; zero point 128) with it, times ``scales[a:b] / 127``."""
        for p, (a, b) in zip(self._packed, self._bounds):
            yield a, b, _qlinear(q, 1.0, 128, p, self._scales_127[a:b], self._zero_point, None,
                                 1.0, 0, torch.float32, "none", [], "")

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the kernel multiplies by."""
        return self.qweight.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activations=two int8 planes per row")


def _quantize_rows(w: torch.Tensor, scales: torch.Tensor, r: int) -> torch.Tensor:
    """Round-to-nearest symmetric int8 of float32 rows ``w`` (rows ``r..`` of the weight),
    one scale per row written into ``scales``."""
    lo, hi = torch.aminmax(w, dim=1)
    amax = torch.maximum(hi, -lo)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    scales[r:r + w.shape[0]] = s
    q = w / s[:, None]  # a new tensor: ``w`` may be a view of the source
    return q.round_().clamp_(-127, 127).to(torch.int8)


_PACK_ELEMS = 1 << 24  # int8 weights packed per oneDNN call (16 MB; see Int8Linear.__init__)


def _block_rows(n: int, k: int) -> int:
    """Rows per packed block of an (n, k) int8 weight: whole when it fits in _PACK_ELEMS,
    else near-equal blocks of a multiple of 64 rows under it."""
    if n * k <= _PACK_ELEMS:
        return n
    count = math.ceil(n * k / _PACK_ELEMS)
    return math.ceil(math.ceil(n / count) / 64) * 64


def _row_blocks(qweight: torch.Tensor) -> list[torch.Tensor]:
    rows = _block_rows(*qweight.shape)
    return [qweight[r:r + rows] for r in range(0, qweight.shape[0], rows)]

