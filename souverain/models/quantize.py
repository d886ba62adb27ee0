"""Quantized linears on PyTorch's own CPU kernels, swapped in module by module.

``quantize_model_(model, "int8" | "int4")`` replaces the `nn.Linear` modules of the blocks
(``wq wk wv wo w1 w2 w3``, MoE experts included; the MoE gate stays float) and the output head
by `Int8Linear` / `Int4Linear`, in the gpt-fast style: the model's maths is never edited, only
its modules. For a tied head a separate quantized copy becomes ``model.output``; the embedding
stays as it is (so a tied model pays the quantized head on top: vocab x dim x 1 byte for int8,
x 0.5 byte + scales for int4).

The kernels (ATen, CPU):

- int8 (`Int8Linear`): souverain's own AVX-512 VNNI matmul (`kernels.int8_linear`) where the
  fused kernels are built on a VNNI CPU, else oneDNN's int8 matmul on a weight pre-packed at
  load (``onednn.qlinear_prepack`` / ``onednn.qlinear_pointwise``; ``aten._int_mm`` where
  those ops are missing): exact integer products (the VNNI kernel and oneDNN give the same
  bits). The activations are quantized per row on the fly into two int8 planes (~15 bits
  kept; see the class), the weights per output channel.
- int4 (`Int4Linear`): ``aten._weight_int4pack_mm_for_cpu(x, packed, group,
  scales_and_zeros [K/group, N, 2])`` with ``packed =
  aten._convert_weight_to_int4pack_for_cpu(q_int32 [N, K] in 0..15, 1)`` (a CPU-specific
  uint8 [N, K/2] layout: pack on the machine that runs it, never store it): ``w = (q - 8) *
  scale + zero`` per group of ``group`` input columns. ``group`` in 32/64/128/256,
  ``K % group == 0``, ``N % 16 == 0``. It takes float32, bfloat16 or float16 activations with
  scales in the *same* dtype and accumulates in float32; only bfloat16 has a vectorised
  (AVX-512/AVX2) path (float32 is a scalar loop, 27-34x slower at batch 1 on the Cascade Lake
  of PERF-NOTES). So its default ``compute_dtype`` is bfloat16: activations are cast to bf16
  for the matmul and the result back to the model's dtype (relative error ~2e-3 per matmul:
  one rounding in, one out). ``compute_dtype=torch.float32`` keeps every bit of the source (a
  Q4 GGUF then gives bit-identical logits to the dequantized float32 model); tests use it.

Both kernels are batch invariant: row i of a batch is bitwise the row computed alone, at any
batch size or thread count (float32/bf16 ``F.linear`` are not), so a quantized model gives the
same logits for a sequence whatever else shares its batch.

The head: vocab x dim is the biggest single matrix of a small model (SmolLM2-135M: 28M of
135M weights). By default it is int8 per channel under both schemes: on SmolLM2 an int4 head
was ~10% faster per token but tripled the logits error (rel. RMS .064 vs .020) and changed the
first greedy token on 2 of 5 chat prompts; ``head="int4"`` or ``"none"`` choose otherwise.

GGUF 4-bit blocks map exactly onto the int4 form (group 32):

- Q4_0 ``w = (q - 8) * d``            -> scale d, zero 0
- Q4_1 ``w = q * d + m``              -> scale d, zero m + 8d
- Q4_K ``w = (d*sc) * q - dmin*mn``   -> scale d*sc, zero 8*d*sc - dmin*mn  (sub-blocks of 32)

so `int4_from_gguf` packs them straight from their raw bytes; the only rounding is of the scale
and zero to ``compute_dtype`` (bf16: 8 significant bits instead of fp16's 11).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from souverain import kernels
from souverain.errors import CheckpointError
from souverain.weights.checkpoint import drop_pages, release_mapped

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

    from souverain.models.transformer import Transformer

SCHEMES = ("none", "int8", "int4")
HEAD_KINDS = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
DEFAULT_HEAD = {"int8": "int8", "int4": "int8"}  # the head stays int8 under int4 (see above)
INT4_GROUP_SIZES = (32, 64, 128, 256)
_CHUNK_ELEMS = 1 << 20  # quantize this many weights at a time (bounded transient memory)


def parse_quantization(scheme: str | None) -> str:
    scheme = "none" if scheme is None else str(scheme).lower()
    if scheme not in SCHEMES:
        raise CheckpointError(
            f"quantization {scheme!r} is not supported; use one of {', '.join(SCHEMES)}.")
    return scheme


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class _LinearWeight(torch.Tensor):
    """The ``.weight`` of a quantized linear: a storage-less stand-in so that code written for
    `nn.Linear` (``F.linear(x, module.weight)``, as `Transformer.forward` does for the head)
    runs the module's kernel. Shape and dtype are those of the float weight it replaces; any
    other use of it raises."""

    _module: nn.Module

    @staticmethod
    def __new__(cls, module: nn.Module, out_features: int, in_features: int,
                dtype: torch.dtype) -> Self:
        t = torch.Tensor._make_wrapper_subclass(cls, (out_features, in_features), dtype=dtype,
                                                device="cpu")
        t._module = module
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], cls):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None and not isinstance(args[0], cls):
                return args[1]._module(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)  # attribute reads (shape, dtype); ops end in dispatch

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        raise TypeError(f"{func} on a quantized weight: only F.linear(x, weight) is supported; "
                        "call the module's dequantize() for a float tensor.")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"QuantizedWeight(shape={tuple(self.shape)}, via={type(self._module).__name__})"


# the overload packets resolved once (``torch.ops.aten.x`` is an attribute lookup chain)
_int_mm = torch.ops.aten._int_mm.default
_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_INT4_TILE_N = 64  # output rows per tile of the CPU int4 packed layout
_int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu.default


def _as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the contiguous 2-D ``dtype`` matrix the kernels take (few ops: at batch 1 the
    Python/dispatch overhead of a linear is a sizeable part of its time)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != dtype:
        return x.to(dtype, memory_format=torch.contiguous_format)
    return x if x.is_contiguous() else x.contiguous()


def _onednn_qlinear() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    try:
        return (torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qlinear_prepack"))
    except Exception:
        return False


_HAS_QLINEAR = _onednn_qlinear()
if _HAS_QLINEAR:
    _qlinear = torch.ops.onednn.qlinear_pointwise.default
    _qlinear_prepack = torch.ops.onednn.qlinear_prepack.default


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
    step = max(1, _CHUNK_ELEMS // (k4 * 64))
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
        self.weight = _LinearWeight(self, self.out_features, self.in_features, torch.float32)

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
    def from_float(cls, weight: torch.Tensor, compute_dtype: torch.dtype | None = None,
                   ) -> Int8Linear:
        """Round-to-nearest per-channel int8 of ``weight`` (any float dtype, may be a memory
        map: read in chunks of rows, never converted whole; packed a row block at a time).
        ``compute_dtype`` is accepted for symmetry with `Int4Linear` and ignored: this kernel
        always quantizes in float32."""
        n, k = weight.shape
        scales = torch.empty((n,), dtype=torch.float32)
        if _vnni_layout():  # quantized and packed a chunk of rows at a time, in place
            packed = torch.empty((-(-n // 16), -(-k // 4), 64), dtype=torch.int8)
            for r, w in _row_chunks(weight, 16):
                blocks = slice(r // 16, -(-(r + w.shape[0]) // 16))
                packed[blocks] = _vnni_pack(_quantize_rows(w, scales, r))
            return cls(packed, scales, k)
        rows = _block_rows(n, k)
        blocks: list[torch.Tensor] = []
        for r0 in range(0, n, rows):  # one row block at a time: quantized, packed, dropped
            block = torch.empty((min(rows, n - r0), k), dtype=torch.int8)
            for r, w in _row_chunks(weight, 1, r0, r0 + block.shape[0]):
                block[r - r0:r - r0 + w.shape[0]] = _quantize_rows(w, scales, r)
            blocks.append(_qlinear_prepack(block, None) if _HAS_QLINEAR else block)
            del block
        return cls(blocks, scales)

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
        x2 = _as_2d(x, torch.float32)
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


class Int4Linear(nn.Module):
    """``w = (q - 8) * scale + zero`` per group of ``group_size`` input columns (q in 0..15),
    packed for ``aten._weight_int4pack_mm_for_cpu``."""

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
        self.weight = _LinearWeight(self, self.out_features, in_features, self.compute_dtype)

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
    def from_float(cls, weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                   compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """Asymmetric min/max round-to-nearest int4 of ``weight``, per group of columns (read in
        chunks of rows, never converted whole)."""
        n, k = weight.shape
        builder = _Int4Builder(n, k, group_size, compute_dtype)
        for r, w in _row_chunks(weight, builder.rows_per_chunk):
            g = w.view(w.shape[0], k // group_size, group_size)
            lo, hi = torch.aminmax(g, dim=-1)
            scale = ((hi - lo).clamp(min=1e-6) / 15).to(compute_dtype).float()
            zero = (lo + 8 * scale).to(compute_dtype).float()
            # q from the *rounded* scale and zero: the best q for what the kernel will use
            q = g - zero[..., None]  # a new tensor: ``w`` may be a view of the source
            q.div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
            builder.add(r, q.view(w.shape[0], k), scale, zero)
        return builder.build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _int4_mm(_as_2d(x, self.compute_dtype), self.qweight, self.group_size,
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
        self.rows_per_chunk = max(64, (_CHUNK_ELEMS // k) // 64 * 64)

    def add(self, row: int, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        rows = q.shape[0]
        assert row % 64 == 0 and (rows % 64 == 0 or row + rows == self.n)
        packed = _int4_pack(q.to(torch.int32).contiguous(), 1)
        self.packed[row:row + rows] = packed.view(rows, self.k // 2)
        self.sz[:, row:row + rows, 0] = scales.t()
        self.sz[:, row:row + rows, 1] = zeros.t()

    def build(self) -> Int4Linear:
        return Int4Linear(self.packed, self.sz, self.group_size, self.k)


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


def _row_chunks(weight: torch.Tensor, multiple: int, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, float32 rows)`` of a 2-D weight (rows ``start:stop``), a few MB at a
    time."""
    n, k = weight.shape
    stop = n if stop is None else stop
    step = max(multiple, (_CHUNK_ELEMS // max(1, k)) // multiple * multiple)
    for r in range(start, stop, step):
        yield r, weight[r:min(r + step, stop)].to(torch.float32)


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


class GGUFRows:
    """A quantized GGUF matrix seen as float32 rows, dequantized only when sliced
    (``rows[a:b]``): what the float quantizers read when no exact int4 mapping exists."""

    def __init__(self, blocks: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]):
        self.blocks, self.qtype, self.shape = blocks, qtype, tuple(shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        from gguf.quants import dequantize

        blocks = self.blocks[rows]
        out = torch.from_numpy(dequantize(blocks, self.qtype)).view(-1, self.shape[1])
        _drop(blocks)  # done with these bytes of the memory map
        return out


def _drop(blocks: np.ndarray) -> None:
    """Release the memory-mapped pages of raw GGUF rows once decoded."""
    drop_pages(blocks.ctypes.data, blocks.nbytes)


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
        _drop(chunk)
        builder.add(r, torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z))
    return builder.build()


# ---------------------------------------------------------------------------------------------
# Which modules, and the in-place swap
# ---------------------------------------------------------------------------------------------


def quantization_plan(model: Transformer, scheme: str, head: str | None = None
                      ) -> dict[str, str]:
    """``{module name: "int8" | "int4"}`` for the linears ``scheme`` quantizes: every
    `nn.Linear` under ``layers`` except the MoE gate, plus ``"output"`` (also for a tied
    head, which then gets its own quantized copy). ``head`` overrides the head's kind
    ("none" keeps it float); by default it is int8 under both schemes."""
    scheme = parse_quantization(scheme)
    if scheme == "none":
        return {}
    head = DEFAULT_HEAD[scheme] if head is None else head
    if head not in HEAD_KINDS:
        raise CheckpointError(f"head quantization {head!r} is not supported; use one of "
                              f"{', '.join(HEAD_KINDS)}.")
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        if (name.startswith("layers.") and isinstance(module, nn.Linear)
                and not name.endswith("feed_forward.gate")):
            plan[name] = scheme
    if head != "none":
        plan["output"] = head
    return plan


def quantized_linear(weight: torch.Tensor | GGUFRows, kind: str,
                     group_size: int = DEFAULT_GROUP_SIZE,
                     compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """An `Int8Linear` or `Int4Linear` for a float ``weight`` (out, in). int4 falls back to
    int8 for a shape its kernel cannot take (out % 16, in % group)."""
    n, k = weight.shape
    if kind == "int4" and Int4Linear.supports(n, k, group_size):
        return Int4Linear.from_float(weight, group_size, compute_dtype)
    if kind in ("int4", "int8"):
        return Int8Linear.from_float(weight, compute_dtype)
    raise ValueError(f"unknown quantized kind {kind!r}")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_model_(model: Transformer, scheme: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                    head: str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """Swap ``model``'s linears for quantized ones in place (see `quantization_plan`) and
    return it. ``scheme`` "none" leaves it untouched. The float weights of swapped modules
    are released (for a tied head the embedding is kept and quantized as a copy).

    This quantizes whatever floats the model holds (for a GGUF: the dequantized blocks, re-
    quantized by min/max); `souverain.models.loader.load_model(..., quantization=...)` builds
    the same modules without ever holding the float model, and maps Q4 blocks exactly."""
    plan = quantization_plan(model, scheme, head)
    for name, kind in plan.items():
        if name == "output" and model.output is None:
            weight = model.tok_embeddings.weight
        else:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                continue  # already quantized
            weight = module.weight
        set_submodule(model, name, quantized_linear(weight.detach(), kind, group_size,
                                                    compute_dtype))
        release_mapped(weight)  # a float weight still mapped from its file: drop its pages
    return model


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One quantized linear computing ``cat([p(x) for p in parts], -1)`` exactly, or None when
    the parts are not all `Int4Linear` (same group) or all `Int8Linear` (same compute dtype).
    Output rows of both packed layouts are independent, so fusing is a concatenation; the
    int4 CPU layout packs N in tiles of 64 rows, so every part but the last must fill whole
    tiles (measured: a 96-row part breaks it)."""
    first = parts[0]
    if not isinstance(first, (Int4Linear, Int8Linear)):
        return None
    if not all(type(p) is type(first) and p.in_features == first.in_features
               and p.compute_dtype == first.compute_dtype for p in parts):
        return None
    if isinstance(first, Int4Linear):
        if any(p.group_size != first.group_size for p in parts):
            return None
        if any(p.out_features % _INT4_TILE_N for p in parts[:-1]):
            return None
        return Int4Linear(torch.cat([p.qweight for p in parts]),
                          torch.cat([p.scales_and_zeros for p in parts], dim=1),
                          first.group_size, first.in_features)
    if isinstance(first, Int8Linear):
        scales = torch.cat([p.scales for p in parts])
        if (all(p._vnni is not None for p in parts)
                and not any(p.out_features % 16 for p in parts[:-1])):
            return Int8Linear(torch.cat([p._vnni for p in parts]), scales, first.in_features)
        return Int8Linear(torch.cat([p.qweight for p in parts]), scales)
    return None


@torch.no_grad()
def fuse_block_(block: nn.Module) -> None:
    """Fuse one `TransformerBlock`'s quantized wq|wk|wv into ``attention.wqkv`` and w1|w3 into
    ``feed_forward.w13`` (dense FFNs), removing the parts: at batch 1 every kernel call costs
    dispatch and casts, so 7 calls per block become 4. Float linears are left alone (fusing
    them would copy weights that may be memory-mapped). The loader fuses each block as soon as
    its parts are built, so the copies never add up to more than one block."""
    att = block.attention
    if att.wqkv is None and all(hasattr(att, n) for n in ("wq", "wk", "wv")):
        fused = fuse_linears([att.wq, att.wk, att.wv])
        if fused is not None:
            att.wqkv = fused
            del att.wq, att.wk, att.wv
    ff = block.feed_forward
    if getattr(ff, "w13", "n/a") is None and hasattr(ff, "w1") and hasattr(ff, "w3"):
        fused = fuse_linears([ff.w1, ff.w3])
        if fused is not None:
            ff.w13 = fused
            del ff.w1, ff.w3


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the weights held outside parameters and buffers (`Int8Linear`'s packed ones)."""
    return sum(m.packed_nbytes for m in model.modules() if isinstance(m, Int8Linear))


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters, buffers and packed weights (quantized weights, scales, float
    rest)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total + packed_bytes(model)
