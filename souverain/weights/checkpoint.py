"""`Checkpoint`: what every reader returns — args, lazily read tensors, tokenizer."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from souverain.errors import CheckpointError
from souverain.weights.args import ModelArgs

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGMLQuantizationType

    from souverain.tokenizer import Tokenizer


@dataclass
class TensorInfo:
    """Where one model tensor comes from, without reading it."""

    shape: tuple[int, ...]  # shape in our layout (PyTorch order)
    source_dtype: str  # as stored: "BF16", "F32", "Q4_K", ...
    # read(dtype): the tensor in our layout, converted to ``dtype`` (None: a natural float
    # dtype for the source); a view of the file's memory map when nothing had to change
    read: Callable[[torch.dtype | None], torch.Tensor]
    # raw(): the stored bytes and their GGUF type, for quantized GGUF tensors only (None
    # elsewhere): (rows, bytes per row) uint8 rows of blocks, a view of the memory map (release
    # its pages with `drop_pages` once used). Lets a loader keep 4-bit blocks 4-bit.
    raw: Callable[[], tuple[np.ndarray, GGMLQuantizationType]] | None = None


@dataclass
class Checkpoint:
    """A model on disk, opened but not yet read.

    ``tensors`` maps mistral-inference names (``layers.0.attention.wq.weight``) to
    `TensorInfo`; q/k rows are already in the interleaved RoPE layout whatever the format.
    Reading a tensor materialises only that tensor, so a loader can stream tensors into the
    model one at a time and keep peak memory near the size of the final weights.
    """

    path: Path
    format: str  # "consolidated" | "huggingface" | "gguf"
    args: ModelArgs
    tensors: dict[str, TensorInfo]
    tokenizer: Tokenizer | None = None
    metadata: dict[str, object] = field(default_factory=dict)  # format-specific facts for inspect
    closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def tensor_info(self, name: str) -> TensorInfo:
        """The `TensorInfo` of one tensor by its mistral-inference name; a missing one is a
        `CheckpointError`."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint.")
        return info

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor by its mistral-inference name, converted to ``dtype`` if given."""
        return self.tensor_info(name).read(dtype)

    def items(self) -> Iterator[tuple[str, TensorInfo]]:
        return iter(self.tensors.items())

    @property
    def n_params(self) -> int:
        total = 0
        for info in self.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total

    def source_dtypes(self) -> dict[str, int]:
        """How many tensors of each stored dtype / quantization type."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.source_dtype] = counts.get(info.source_dtype, 0) + 1
        return counts

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers.clear()


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
_MADV_DONTNEED = 4


def drop_pages(address: int, nbytes: int) -> None:
    """Tell the kernel we are done with the memory-mapped file pages of a source tensor that
    has been copied (converted, dequantized, permuted), so they stop counting in our RSS.

    Only whole pages strictly inside ``[address, address + nbytes)`` are dropped, so nothing
    outside the source tensor is touched; for a file mapping the data is simply re-read from
    the file if it is ever accessed again. A no-op off Linux.
    """
    if _LIBC is None or nbytes <= 0:
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``). Quantizing a
    tensor allocates and frees a few MB of temporaries between the small final buffers; the
    holes they leave are otherwise kept by malloc and add up over hundreds of tensors."""
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC is not None else None
    if trim is not None:
        trim(0)


def _file_mapping_ranges() -> list[tuple[int, int]]:
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                # file-backed: a path (not [heap]/[stack]/anonymous) and a real inode
                if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def release_mapped(tensor: torch.Tensor) -> None:
    """Drop the pages of ``tensor`` if (and only if) it is a view of a memory-mapped *file*
    (what `TensorInfo.read` returns when nothing had to be converted), once its values have
    been used to build something else (a quantized copy). Never touches anonymous memory, so
    a tensor that is a private copy keeps its values. A no-op off Linux."""
    if _LIBC is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if any(lo <= start and end <= hi for lo, hi in _file_mapping_ranges()):
        drop_pages(start, end - start)


def convert_mapped(
    source: torch.Tensor,
    dtype: torch.dtype | None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``transform(source)`` in ``dtype``; when that made a copy, the memory-mapped pages of
    ``source`` are released at once, so peak memory is the final weights plus one tensor."""
    out = transform(source) if transform is not None else source
    if dtype is not None and out.dtype != dtype:
        out = out.to(dtype)
    if out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
        drop_pages(source.data_ptr(), source.numel() * source.element_size())
    return out


def mapped_reader(
    get: Callable[[], torch.Tensor],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[torch.dtype | None], torch.Tensor]:
    """A `TensorInfo.read` for the tensor ``get()`` returns (a view of a memory map), through
    `convert_mapped`: nothing is read before it is called."""
    return lambda dtype: convert_mapped(get(), dtype, transform)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a model with ``args`` needs, by mistral-inference name, with its shape."""
    d, hd = args.dim, args.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (args.vocab_size, d),
        "norm.weight": (d,),
    }
    if not args.tied_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (args.n_heads * hd, d)
        shapes[p + "attention.wk.weight"] = (args.n_kv_heads * hd, d)
        shapes[p + "attention.wv.weight"] = (args.n_kv_heads * hd, d)
        shapes[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
        ffns = [p + "feed_forward."]
        if args.moe is not None:
            shapes[p + "feed_forward.gate.weight"] = (args.moe.num_experts, d)
            ffns = [p + f"feed_forward.experts.{j}." for j in range(args.moe.num_experts)]
        for f in ffns:
            shapes[f + "w1.weight"] = (args.hidden_dim, d)
            shapes[f + "w2.weight"] = (d, args.hidden_dim)
            shapes[f + "w3.weight"] = (args.hidden_dim, d)
    return shapes


def validate(ckpt: Checkpoint, config_name: str) -> None:
    """Check names and shapes against the args before anything is read, so a mismatch is
    one clear sentence instead of a crash deep inside the model."""
    want = expected_shapes(ckpt.args)
    missing = [n for n in want if n not in ckpt.tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{ckpt.path}: tensor(s) {', '.join(missing[:3])}{more} are missing: the weights are "
            f"incomplete or do not match {config_name}; re-download or re-convert the checkpoint."
        )
    for name, shape in want.items():
        got = ckpt.tensors[name].shape
        if tuple(got) != shape:
            raise CheckpointError(
                f"{ckpt.path}: tensor {name} has shape {list(got)} but {config_name} implies "
                f"{list(shape)}; the weights and the config do not belong together."
            )
    extra = [n for n in ckpt.tensors if n not in want]
    if extra:
        raise CheckpointError(
            f"{ckpt.path}: unexpected tensor(s) {', '.join(extra[:3])}: this checkpoint has parts "
            f"souverain does not support (or {config_name} is wrong)."
        )
