"""Quantization of a model by module swapping: which linears, which kind, and the fused ones.

``quantize_model_(model, "int8" | "int4")`` replaces the `nn.Linear` modules of the blocks
(``wq wk wv wo w1 w2 w3``, MoE experts included; the MoE gate stays float) and the output head
by `Int8Linear` / `Int4Linear`, in the gpt-fast style: the model's maths is never edited, only
its modules. For a tied head a separate quantized copy becomes ``model.output``; the embedding
stays as it is (so a tied model pays the quantized head on top: vocab x dim x 1 byte for int8,
x 0.5 byte + scales for int4). The loader (`souverain.models.loader`) builds the same modules
straight from the checkpoint, following the same `quantization_plan`.

The kernels live with their modules: `souverain.models.int8_linear` (int8 weights x two int8
activation planes, exact integer products) and `souverain.models.int4_linear` (weight-only
int4, bf16 activations by default; GGUF Q4 blocks packed straight to it). Both are batch
invariant: row i of a batch is bitwise the row computed alone, at any batch size or thread
count (float32/bf16 ``F.linear`` are not), so a quantized model gives the same logits for a
sequence whatever else shares its batch.

The head: vocab x dim is the biggest single matrix of a small model (SmolLM2-135M: 28M of
135M weights). By default it is int8 per channel under both schemes: on SmolLM2 an int4 head
was ~10% faster per token but tripled the logits error (rel. RMS .064 vs .020) and changed the
first greedy token on 2 of 5 chat prompts; ``head="int4"`` or ``"none"`` choose otherwise.
Where int8 has no dot-product units (`fast_int8` False: AVX2-only CPUs) the int4 scheme keeps
the head float instead (in the model's dtype, bf16 by default): the int8 head alone took 31.6
of SmolLM2's ~37 ms per token there, a bf16 head takes 3.7.

`fuse_block_` then merges a block's quantized wq|wk|wv into ``attention.wqkv`` and w1|w3 into
``feed_forward.w13``: one kernel call each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from souverain.errors import CheckpointError
from souverain.models.int4_linear import DEFAULT_GROUP_SIZE, Int4Linear
from souverain.models.int8_linear import Int8Linear, fast_int8
from souverain.models.quantized_weight import SourceWeight
from souverain.models.transformer import FeedForward
from souverain.weights.checkpoint import release_mapped

if TYPE_CHECKING:
    from souverain.models.transformer import Transformer, TransformerBlock

SCHEMES = ("none", "int8", "int4")
HEAD_KINDS = ("none", "int8", "int4")
DEFAULT_HEAD = {"int8": "int8", "int4": "int8"}  # the head stays int8 under int4 (see above)


def default_head(scheme: str) -> str:
    """The head's kind under ``scheme`` on this CPU (see the module docstring)."""
    if scheme == "int4" and not fast_int8():
        return "none"
    return DEFAULT_HEAD[scheme]


def parse_quantization(scheme: str | None) -> str:
    scheme = "none" if scheme is None else str(scheme).lower()
    if scheme not in SCHEMES:
        raise CheckpointError(
            f"quantization {scheme!r} is not supported; use one of {', '.join(SCHEMES)}.")
    return scheme


def quantization_plan(model: Transformer, scheme: str, head: str | None = None
                      ) -> dict[str, str]:
    """``{module name: "int8" | "int4"}`` for the linears ``scheme`` quantizes: every
    `nn.Linear` under ``layers`` except the MoE gate, plus ``"output"`` (also for a tied
    head, which then gets its own quantized copy). ``head`` overrides the head's kind
    ("none" keeps it float); by default `default_head`: int8, or float under int4 where int8
    has no dot-product units."""
    scheme = parse_quantization(scheme)
    if scheme == "none":
        return {}
    head = default_head(scheme) if head is None else head
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


def quantized_linear(weight: SourceWeight, kind: str,
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
    the parts are not all `Int4Linear` or all `Int8Linear` with the same ``in_features`` and
    compute dtype, or when their packings cannot be concatenated (`Int4Linear.concat`)."""
    first = parts[0]
    if not isinstance(first, (Int4Linear, Int8Linear)):
        return None
    if not all(type(p) is type(first) and p.in_features == first.in_features
               and p.compute_dtype == first.compute_dtype for p in parts):
        return None
    if isinstance(first, Int4Linear):  # (the filters keep every part: all are first's type)
        return Int4Linear.concat([p for p in parts if isinstance(p, Int4Linear)])
    return Int8Linear.concat([p for p in parts if isinstance(p, Int8Linear)])


@torch.no_grad()
def fuse_block_(block: TransformerBlock) -> None:
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
    ff = block.feed_forward  # a MoE layer has no w13: its experts stay apart
    if isinstance(ff, FeedForward) and ff.w13 is None and hasattr(ff, "w1") and hasattr(ff, "w3"):
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
