"""Build a `Transformer` on the meta device and fill it from a `Checkpoint`, one tensor at a time.

No parameter is ever allocated twice: the model is created without storage (meta device), each
tensor is read, converted to the target dtype (a no-op view of the memory map when it already
has it) and handed to ``load_state_dict(assign=True)``. Peak memory stays near the size of the
final weights plus one tensor in flight.

With ``quantization`` "int8" / "int4" the linears that `souverain.models.quantize` plans to
quantize are built straight from their source tensors, a few MB of rows at a time, and swapped
into the meta model: their float weights never exist whole. GGUF Q4_0 / Q4_1 / Q4_K tensors
become int4 directly from their raw blocks (exact up to the scale dtype); other quantized GGUF
tensors are dequantized a chunk of rows at a time. The source pages of each tensor are released
once it is built, so peak memory stays near the *quantized* weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from souverain.errors import CheckpointError
from souverain.models.int4_linear import (
    DEFAULT_GROUP_SIZE,
    Int4Linear,
    gguf_int4_types,
    int4_from_gguf,
)
from souverain.models.quantize import (
    fuse_block_,
    parse_quantization,
    quantization_plan,
    quantized_linear,
    set_submodule,
)
from souverain.models.quantized_weight import GGUFRows, drop_blocks
from souverain.models.transformer import Transformer, TransformerBlock
from souverain.weights.checkpoint import (
    Checkpoint,
    TensorInfo,
    release_mapped,
    trim_heap,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ProgressFn = Callable[[int, int], None]  # (tensors done, tensors total)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise CheckpointError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}.")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_",
                   "xavier_uniform_", "xavier_normal_", "ones_", "zeros_", "constant_")


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """No random init while building the meta model (every value comes from the checkpoint).

    On the meta device ``nn.init`` still runs, through torch's Python reference
    implementations: the first call in a process imports them, ~1 s and ~36 MB of RSS for
    nothing. Same idea as transformers' ``no_init_weights``; restored on exit."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS
             if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_model(ckpt: Checkpoint, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu",
               progress: ProgressFn | None = None,
               quantization: str = "none", *,
               group_size: int = DEFAULT_GROUP_SIZE,
               head: str | None = None,
               compute_dtype: torch.dtype = torch.bfloat16,
               fuse: bool = True) -> Transformer:
    """Instantiate ``ckpt``'s model in ``dtype`` on ``device`` (inference mode, no grads).

    ``quantization`` "int8" / "int4" swaps the block linears (and the head: int8 unless
    ``head`` says "int4" or "none") for quantized ones (CPU only; see
    `souverain.models.quantize`); ``dtype`` is then the dtype of everything else (embedding,
    norms, residual stream, KV cache). "none" is the plain float model. ``fuse`` (quantized
    only) merges wq|wk|wv and w1|w3 into one kernel call each (`fuse_block_`, as each block is built)."""
    target = parse_dtype(dtype)
    scheme = parse_quantization(quantization)
    with _skip_init(), torch.device("meta"):
        model = Transformer(ckpt.args)
    if scheme == "none":
        names = list(model.state_dict().keys())
        state: dict[str, torch.Tensor] = {}
        for i, name in enumerate(names):
            tensor = ckpt.read(name, target)
            if tensor.device != torch.device(device):
                tensor = tensor.to(device=device)
            state[name] = tensor
            if progress is not None:
                progress(i + 1, len(names))
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.requires_grad_(False)
        return model.eval()

    if torch.device(device).type != "cpu":
        raise CheckpointError(f"quantization {scheme!r} runs on the CPU only; load it with "
                              f"device='cpu' or use quantization='none' on {device}.")
    plan = quantization_plan(model, scheme, head)
    swapped = {f"{module}.weight": kind for module, kind in plan.items()}
    names = list(model.state_dict().keys())
    tied_head = "output" in plan and model.output is None
    total = len(names) + int(tied_head)
    # The head first: the biggest matrix, whose quantizing/packing transient (a plain and a
    # packed copy of each block) then comes while little else is resident (SmolLM2 int4 load
    # peak 1.25x -> 1.08x its weights).
    names.sort(key=lambda n: n != "output.weight")
    done = 0
    if tied_head:  # a quantized copy of the embedding, used only as the head
        model.output = build_quantized(ckpt.tensors["tok_embeddings.weight"], plan["output"],
                                       group_size, compute_dtype)
        trim_heap()
        done = 1
        if progress is not None:
            progress(done, total)
    state = {}
    for i, name in enumerate(names, start=done):
        kind = swapped.get(name)
        if kind is None:
            state[name] = ckpt.read(name, target)
        else:
            set_submodule(model, name[: -len(".weight")],
                          build_quantized(ckpt.tensor_info(name), kind, group_size,
                                          compute_dtype))
            if fuse and name.endswith((".attention.wv.weight", ".feed_forward.w3.weight")):
                block = model.layers[int(name.split(".")[1])]
                assert isinstance(block, TransformerBlock)
                fuse_block_(block)  # its parts are all built
            trim_heap()
        if progress is not None:
            progress(i + 1, total)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    built = set(plan) | {n for n, _ in model.named_modules() if n.endswith((".wqkv", ".w13"))}
    missing = [k for k in missing if k.rpartition(".")[0] not in built]
    if missing or unexpected:  # cannot happen with a validated checkpoint
        raise CheckpointError(f"{ckpt.path}: loading left {missing[:3]} unset and "
                              f"{unexpected[:3]} unused.")
    model.requires_grad_(False)
    return model.eval()


_FLOAT_SOURCES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def build_quantized(info: TensorInfo, kind: str, group_size: int = DEFAULT_GROUP_SIZE,
                    compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A quantized linear (``kind`` "int8" | "int4") from one checkpoint tensor, never holding
    more than a few MB of float rows; the tensor's source pages are released afterwards.

    GGUF Q4_0 / Q4_1 / Q4_K become int4 (group 32, whatever ``group_size``) straight from their
    blocks; other GGUF types are dequantized a chunk of rows at a time; float tensors are read
    in their own dtype (a view of the memory map) and quantized a chunk of rows at a time."""
    n, k = info.shape
    if info.raw is not None:
        blocks, qtype = info.raw()
        try:
            if kind == "int4" and qtype in gguf_int4_types() and Int4Linear.supports(n, k, 32):
                return int4_from_gguf(blocks, qtype, compute_dtype)
            return quantized_linear(GGUFRows(blocks, qtype, (n, k)), kind, group_size,
                                    compute_dtype)
        finally:
            drop_blocks(blocks)
    weight = info.read(_FLOAT_SOURCES.get(info.source_dtype, torch.float32))
    try:
        return quantized_linear(weight, kind, group_size, compute_dtype)
    finally:
        release_mapped(weight)
