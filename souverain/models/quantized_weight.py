"""What `Int8Linear` and `Int4Linear` share: how they read a source weight, how they take their
input, and the ``.weight`` they show to code written for `nn.Linear`.

A source weight (a float tensor, possibly a memory map, or the blocks of a quantized GGUF
tensor as `GGUFRows`) is never converted whole: `row_chunks` hands it over as float32 rows, a
few MB at a time (`chunk_rows`), so quantizing a tensor costs its quantized size plus one
chunk. `QuantizedWeight` is the storage-less ``.weight`` of a quantized linear; `as_2d` turns
activations into the contiguous 2-D matrix the kernels take.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Self, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from souverain.weights.checkpoint import drop_pages

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

_CHUNK_ELEMS = 1 << 20  # quantize this many weights at a time (bounded transient memory)


def chunk_rows(k: int, multiple: int) -> int:
    """Rows of ``k`` columns read at a time: about ``_CHUNK_ELEMS`` weights, a multiple of
    ``multiple`` rows (at least ``multiple``)."""
    return max(multiple, (_CHUNK_ELEMS // max(1, k)) // multiple * multiple)


class GGUFRows:
    """A quantized GGUF matrix seen as float32 rows, dequantized only when sliced
    (``rows[a:b]``): what the float quantizers read when no exact int4 mapping exists."""

    def __init__(self, blocks: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]):
        self.blocks, self.qtype, self.shape = blocks, qtype, tuple(shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        from gguf.quants import dequantize

        blocks = self.blocks[rows]
        out = torch.from_numpy(dequantize(blocks, self.qtype)).view(-1, self.shape[1])
        drop_blocks(blocks)  # done with these bytes of the memory map
        return out


# a weight to quantize, (out_features, in_features): float (any dtype) or GGUF blocks
SourceWeight: TypeAlias = torch.Tensor | GGUFRows


def drop_blocks(blocks: np.ndarray) -> None:
    """Release the memory-mapped pages of raw GGUF rows once decoded."""
    drop_pages(blocks.ctypes.data, blocks.nbytes)


def row_chunks(weight: SourceWeight, multiple: int, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, float32 rows)`` of a 2-D weight (rows ``start:stop``), a few MB at a
    time."""
    n, k = weight.shape
    stop = n if stop is None else stop
    step = chunk_rows(k, multiple)
    for r in range(start, stop, step):
        yield r, weight[r:min(r + step, stop)].to(torch.float32)


def as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the contiguous 2-D ``dtype`` matrix the kernels take (few ops: at batch 1 the
    Python/dispatch overhead of a linear is a sizeable part of its time)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != dtype:
        return x.to(dtype, memory_format=torch.contiguous_format)
    return x if x.is_contiguous() else x.contiguous()


_CPU = torch.device("cpu")


class QuantizedWeight(torch.Tensor):
    """The ``.weight`` of a quantized linear: a storage-less stand-in so that code written for
    `nn.Linear` (``F.linear(x, module.weight)``, as `Transformer.forward` does for the head)
    runs the module's kernel. Shape and dtype are those of the float weight it replaces; any
    other use of it raises."""

    _module: nn.Module

    @staticmethod
    def __new__(cls, module: nn.Module, out_features: int, in_features: int,
                dtype: torch.dtype) -> Self:
        t = torch.Tensor._make_wrapper_subclass(cls, (out_features, in_features), dtype=dtype,
                                                device=_CPU)
        t._module = module
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
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
