"""Megatron-style tensor parallelism of a loaded `Transformer` over ``torch.distributed`` ranks.

`shard_model_(model, rank, world)` turns a whole model into rank ``rank``'s shard, in place, by
module swapping (the model's maths is never edited, as in `souverain.models.quantize`):

- attention: wq / wk / wv (or the fused ``wqkv`` of a quantized model) are *column-parallel*
  by whole heads: rank r keeps q heads ``[r*H/K, (r+1)*H/K)`` and kv heads
  ``[r*KVH/K, (r+1)*KVH/K)``, so each GQA group stays with its kv head. ``wo`` is
  *row-parallel* (the input columns of those q heads); the `Attention` module is told its local
  head counts, and its output (a partial sum) is all-reduced;
- feed forward: w1 / w3 (or the fused ``w13``) column-parallel over the hidden units, w2
  row-parallel, the block's FFN output all-reduced. Mixtral: every expert is split the same
  way, the gate is replicated (every rank routes identically, from the same full activations)
  and ONE all-reduce follows the combined output of the experts;
- embeddings, norms and the output head stay whole on every rank (replicated), so every rank
  computes the same logits.

So a block costs two all-reduces (SUM) of its ``(T, dim)`` output halves, none when
``world == 1``. The all-reduces are forward hooks on each block's ``attention`` and
``feed_forward`` modules: whatever later wraps the linears inside (LoRA) stays inside the sum.

Quantized linears shard their stored codes, never re-quantized: `Int8Linear` keeps its int8
rows / columns and per-channel scales (so a column-parallel slice is bitwise the rows it had;
a row-parallel one quantizes its activations per row over its *own* columns: see
`shard_linear_cols`); `Int4Linear`'s CPU-packed layout cannot be sliced in place, so its codes
are unpacked (`_int4_codes`) and the shard's re-packed (exact), provided it keeps whole
quantization groups and the kernel's shape rules (otherwise `CheckpointError` naming them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from souverain.errors import CheckpointError, RequestError
from souverain.models.int4_linear import INT4_TILE_N, Int4Linear
from souverain.models.int8_linear import Int8Linear
from souverain.models.transformer import (
    Attention,
    FeedForward,
    MoeLayer,
    Transformer,
    TransformerBlock,
)
from souverain.weights.args import ModelArgs

__all__ = ["TPShard", "check_shardable", "shard_linear_cols", "shard_linear_rows",
           "shard_model_", "shard_of", "tensor_parallel_sizes"]

# the int4 kernel and its packing (see `souverain.models.int4_linear`), to read codes back
_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu.default


@dataclass(frozen=True)
class TPShard:
    """What a sharded model holds: its rank, the world size and its local sizes."""

    rank: int
    world: int
    n_heads: int  # local q heads
    n_kv_heads: int  # local kv heads: the size of this rank's KV cache
    hidden_dim: int  # local FFN (or per-expert) hidden units


def tensor_parallel_sizes(args: ModelArgs) -> list[int]:
    """The tensor-parallel sizes ``args`` can be split into: the common divisors of its q
    heads, kv heads and FFN hidden units."""
    g = math.gcd(args.n_heads, args.n_kv_heads, args.hidden_dim)
    return [k for k in range(1, g + 1) if g % k == 0]


def check_shardable(args: ModelArgs, world: int) -> None:
    """Raise unless a model of ``args`` splits over ``world`` ranks: `RequestError` for a
    size below 1, `CheckpointError` naming the numbers and the sizes that work otherwise."""
    if world < 1:
        raise RequestError(f"the tensor-parallel size must be at least 1, got {world}.")
    bad = [f"{name} = {value}" for name, value in (
        ("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
        ("hidden_dim", args.hidden_dim)) if value % world]
    if bad:
        sizes = ", ".join(str(k) for k in tensor_parallel_sizes(args))
        raise CheckpointError(
            f"this model cannot be split over {world} tensor-parallel ranks: {'; '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not divisible by {world} (each rank takes "
            f"whole heads, with their kv heads, and an equal share of the FFN); use a "
            f"tensor-parallel size among {sizes}.")


def shard_of(model: Transformer) -> TPShard | None:
    """The `TPShard` of a model `shard_model_` has split, else None."""
    shard = getattr(model, "tensor_parallel", None)
    return shard if isinstance(shard, TPShard) else None


@torch.no_grad()
def shard_model_(model: Transformer, rank: int, world: int,
                 group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep rank ``rank`` of ``world``'s shard of ``model`` (float, int8 or int4) in place and
    return it; ``group`` is the process group of the all-reduces (None: the default group,
    which must be initialised before the first forward when ``world > 1``).

    ``world == 1`` leaves the weights alone and adds no collective. Raises `CheckpointError`
    for a model that does not split over ``world`` ranks (see `check_shardable`) or a linear
    that cannot be sliced (an int4 shard off its groups, an unknown module), and `ValueError`
    for a rank outside ``[0, world)`` or a model split already (over several ranks)."""
    args = model.args
    check_shardable(args, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    previous = shard_of(model)
    if previous is not None and previous.world > 1:
        raise ValueError(f"this model is rank {previous.rank} of {previous.world}'s shard already")
    h, kvh, hidden = args.n_heads // world, args.n_kv_heads // world, args.hidden_dim // world
    if world > 1:
        # every shard built before any is swapped in: a linear that cannot be split leaves
        # the model whole
        swaps: list[tuple[nn.Module, str, nn.Module]] = []
        for i, block in enumerate(model.layers):
            assert isinstance(block, TransformerBlock)
            att, ff = block.attention, block.feed_forward
            swaps += _attention_shards(att, rank, world, args, f"layers.{i}.attention")
            experts = ([(e, f"layers.{i}.feed_forward.experts.{j}")
                        for j, e in enumerate(ff.experts)] if isinstance(ff, MoeLayer)
                       else [(ff, f"layers.{i}.feed_forward")])
            for expert, name in experts:
                assert isinstance(expert, FeedForward)
                swaps += _feed_forward_shards(expert, rank, hidden, args.hidden_dim, name)
        for parent, attr, module in swaps:
            setattr(parent, attr, module)  # nn.Module registers it; the whole one is dropped
        reduce_hook = _all_reduce_hook(group)
        for block in model.layers:
            assert isinstance(block, TransformerBlock)
            block.attention.n_heads, block.attention.n_kv_heads = h, kvh
            block.attention.register_forward_hook(reduce_hook)
            block.feed_forward.register_forward_hook(reduce_hook)
    setattr(model, "tensor_parallel", TPShard(rank, world, h, kvh, hidden))  # noqa: B010
    return model


def _all_reduce_hook(group: dist.ProcessGroup | None) -> Any:
    """A forward hook summing a module's output over the ranks of ``group`` (in place: the
    output is a fresh tensor of the module's own)."""

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
        return output

    return hook


def _attention_shards(att: Attention, rank: int, world: int, args: ModelArgs, name: str
                      ) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(att, attribute, shard)`` for its q/k/v (or wqkv) and wo linears."""
    D, H, KVH = args.head_dim, args.n_heads, args.n_kv_heads
    h, kvh = H // world, KVH // world
    q_rows = torch.arange(rank * h * D, (rank + 1) * h * D)
    kv_rows = torch.arange(rank * kvh * D, (rank + 1) * kvh * D)
    if att.wqkv is not None:  # rows: [q (H*D) | k (KVH*D) | v (KVH*D)]
        rows = torch.cat([q_rows, H * D + kv_rows, (H + KVH) * D + kv_rows])
        parts = [("wqkv", shard_linear_rows(att.wqkv, rows, f"{name}.wqkv"))]
    else:
        parts = [(part, shard_linear_rows(getattr(att, part), part_rows, f"{name}.{part}"))
                 for part, part_rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows))]
    parts.append(("wo", shard_linear_cols(att.wo, rank * h * D, (rank + 1) * h * D,
                                          f"{name}.wo")))
    return [(att, part, module) for part, module in parts]


def _feed_forward_shards(ff: FeedForward, rank: int, local: int, hidden: int, name: str
                         ) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(ff, attribute, shard)`` for its w1/w3 (or w13) and w2 linears."""
    rows = torch.arange(rank * local, (rank + 1) * local)
    if ff.w13 is not None:  # rows: [w1 (hidden) | w3 (hidden)]; silu_mul splits the halves
        parts = [("w13", shard_linear_rows(ff.w13, torch.cat([rows, hidden + rows]),
                                           f"{name}.w13"))]
    else:
        parts = [(part, shard_linear_rows(getattr(ff, part), rows, f"{name}.{part}"))
                 for part in ("w1", "w3")]
    parts.append(("w2", shard_linear_cols(ff.w2, rank * local, (rank + 1) * local,
                                          f"{name}.w2")))
    return [(ff, part, module) for part, module in parts]


# --------------------------------------------------------------------------------------
# One linear: float, int8 or int4
# --------------------------------------------------------------------------------------


def shard_linear_rows(module: nn.Module, rows: torch.Tensor, name: str = "linear"
                      ) -> nn.Module:
    """A column-parallel shard of ``module``: the linear computing ``module(x)[..., rows]``
    (its output channels ``rows``), of the same kind. Exact for every kind: float rows are
    copied, int8 rows keep their codes and scales (activations are quantized per row of the
    full input, as before), int4 rows their codes, scales and zeros."""
    if isinstance(module, nn.Linear):
        w = module.weight.detach()
        return _float_linear(w.index_select(0, rows.to(w.device)))
    if isinstance(module, Int8Linear):
        return Int8Linear(module.qweight.index_select(0, rows).contiguous(),
                          module.scales.index_select(0, rows))
    if isinstance(module, Int4Linear):
        q, scales, zeros = _int4_codes(module)
        return _int4_linear(module, q.index_select(0, rows), scales.index_select(0, rows),
                            zeros.index_select(0, rows), name)
    raise _unshardable(module, name)


def shard_linear_cols(module: nn.Module, start: int, stop: int, name: str = "linear"
                      ) -> nn.Module:
    """A row-parallel shard of ``module``: the linear of its input features
    ``[start, stop)``, whose outputs over a partition of the features sum to ``module(x)``.

    Float: exact up to the order of the sum. int8: the weight codes and per-channel scales are
    kept, but the activations are quantized per row over the shard's own features (its own
    max magnitude): each part keeps ~15 bits of its own slice (relative error <= 1/(2*127*254)
    of that slice's largest magnitude, at most the whole row's), so the sum differs from the
    unsharded product within about that bound. int4 (weight-only): exact codes; the shard must
    start and end on quantization groups and keep ``in_features % group == 0``."""
    if isinstance(module, nn.Linear):
        return _float_linear(module.weight.detach()[:, start:stop])
    if isinstance(module, Int8Linear):
        return Int8Linear(module.qweight[:, start:stop].contiguous(), module.scales.clone())
    if isinstance(module, Int4Linear):
        g = module.group_size
        if start % g or stop % g:
            raise CheckpointError(
                f"{name}: int4 groups of {g} input features cannot be split at [{start}, "
                f"{stop}) for tensor parallelism; use a tensor-parallel size that keeps whole "
                f"groups, or quantization 'int8'.")
        q, scales, zeros = _int4_codes(module)
        return _int4_linear(module, q[:, start:stop], scales[:, start // g:stop // g],
                            zeros[:, start // g:stop // g], name)
    raise _unshardable(module, name)


def _float_linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` owning a copy of ``weight`` (out, in): nothing left pointing at the
    whole matrix (nor at its memory map), so it can be freed."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta",
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format),
                                 requires_grad=False)
    return linear


def _int4_codes(linear: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scales, zeros)`` of an `Int4Linear`: ``q`` (N, K) uint8 codes in 0..15, float32
    ``scales`` / ``zeros`` (N, K/group), so that ``w = (q - 8) * scale + zero``.

    The packed layout is the CPU kernel's own (tiles of 64 or 32 rows, by CPU), a fixed
    permutation of the nibbles: `_int4_layout` learns it by packing the digits of each
    weight's index, the codes are put back in place, and re-packing them must give the module's
    bytes exactly. Should it not (another layout), they are read through the kernel instead:
    identity rows times the weight with every scale 1 and zero 8 give ``q`` itself (exact,
    but K x K x N products)."""
    if linear.layout == "q4":  # souverain's own layout: the codes are in order
        return linear.codes()
    n, k = linear.out_features, linear.in_features
    packed = linear.qweight.reshape(n, k // 2)
    tile = min(n, INT4_TILE_N)
    q = torch.empty((n, k), dtype=torch.uint8)
    layouts: dict[int, torch.Tensor] = {}
    for r in range(0, n, tile):
        rows = min(tile, n - r)
        if rows not in layouts:
            layouts[rows] = _int4_layout(rows, k)
        nibbles = _nibbles(packed[r:r + rows])
        q[r:r + rows].view(-1)[layouts[rows]] = nibbles
    if not torch.equal(_int4_pack(q.to(torch.int32), 1).view(n, k // 2), packed):
        q = _int4_codes_by_kernel(linear)
    sz = linear.scales_and_zeros.float()
    return q, sz[..., 0].t(), sz[..., 1].t()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 bytes -> their nibbles, low then high of each byte, flat."""
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=1).view(-1)


def _int4_layout(rows: int, k: int) -> torch.Tensor:
    """Where the CPU int4 packing puts each weight of a (rows, k) block: for each nibble of
    the packed bytes (`_nibbles` order), the flat index of its weight (int64)."""
    index = torch.arange(rows * k, dtype=torch.int64)
    where = torch.zeros(rows * k, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(rows * k, 16)))):
        values = ((index >> (4 * digit)) & 15).to(torch.int32).view(rows, k)
        where |= _nibbles(_int4_pack(values, 1)).to(torch.int64) << (4 * digit)
    return where


def _int4_codes_by_kernel(linear: Int4Linear) -> torch.Tensor:
    n, k, g, dt = linear.out_features, linear.in_features, linear.group_size, linear.compute_dtype
    unit = torch.empty((k // g, n, 2), dtype=dt)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    q = torch.empty((n, k), dtype=torch.uint8)
    block = 512
    for c in range(0, k, block):
        m = min(block, k - c)
        eye = torch.zeros((m, k), dtype=dt)
        eye[:, c:c + m].fill_diagonal_(1.0)
        q[:, c:c + m] = _int4_mm(eye, linear.qweight, g, unit).t().round().to(torch.uint8)
    return q


def _int4_linear(like: Int4Linear, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 name: str) -> Int4Linear:
    n, k = q.shape
    if not Int4Linear.supports(n, k, like.group_size):
        raise CheckpointError(
            f"{name}: an int4 shard of {n} x {k} does not fit the int4 kernel (it needs "
            f"out_features % 16 == 0 and in_features % {like.group_size} == 0); use a "
            f"tensor-parallel size that keeps those, or quantization 'int8'.")
    return Int4Linear.from_int4(q.contiguous(), scales.contiguous(), zeros.contiguous(),
                                like.group_size, like.compute_dtype)


def _unshardable(module: nn.Module, name: str) -> CheckpointError:
    return CheckpointError(
        f"{name} is a {type(module).__name__}, which tensor parallelism cannot split (it "
        f"splits nn.Linear, Int8Linear and Int4Linear); shard the model before wrapping its "
        f"linears (LoRA adapters are not supported on a sharded model yet).")
