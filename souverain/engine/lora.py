"""Multi-LoRA serving: several adapters resident at once, applied per row of ONE forward.

Every flat-batch row belongs to the base model or to one resident adapter (a *slot*). Each
adaptable linear of the model is wrapped by a `MultiLoRALinear` (module swapping, as the quantized
linears: the model's maths is not edited) that computes

    y = base(x) + sum over adapters a in the step:  index_add(rows_a, (x[rows_a] @ A_a^T) @ B_a^T)

with ``B_a`` pre-scaled by the adapter's ``scaling``. Rows are gathered with ``index_select``
and scattered with ``index_add_`` (advanced indexing costs ~1 ms per call on CPU); when every
row of the step uses the same adapter, neither is needed. The delta is computed in float32
(A and B are held in float32, the activation is upcast: a no-op for a float32 model, one cast
for bf16 activations under quantization) and rounded once when added to ``y``.

Fused projections (``attention.wqkv`` = wq|wk|wv, ``feed_forward.w13`` = w1|w3, built for
quantized models) are adapted as one: ``A = [A_q; A_k; A_v]`` (3r x in) and a block-diagonal
``B`` (out_q+out_k+out_v x 3r), two matmuls in all. The zeros of that B cost memory traffic
once it is large (7B shapes: measured 139 us vs 79 us for the parts separately at 8 rows),
so above `_BLOCK_DIAG_MAX` elements the parts share the A matmul and run their B apart.

The wrappers are swapped into the model only for steps that use an adapter and swapped out
at the first step that uses none: a base-only step runs the unmodified model.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from souverain.errors import CheckpointError, RequestError
from souverain.models.transformer import Transformer
from souverain.weights.adapter import LoRAAdapter
from souverain.weights.args import ModelArgs

# Block-diagonal B up to this many elements (SmolLM2 wqkv r=16: 46k; 7B wqkv: 295k).
_BLOCK_DIAG_MAX = 1 << 17


@dataclass(frozen=True)
class LoRARef:
    """What a request carries: the adapter's name, its slot, and its load generation (a name
    re-added after removal gets a new generation, so it never meets KV computed by the old)."""

    name: str
    slot: int
    generation: int

    @property
    def hash_seed(self) -> int:
        """Seeds the prefix-cache block hash chain: KV is only shared within one adapter."""
        return hash(("lora", self.name, self.generation))


@dataclass
class _Delta:
    """One adapter's weights for one wrapped linear (float32, B pre-scaled).
    ``bt`` set: ``(x @ at) @ bt`` is the whole delta; else ``parts`` (out lo, out hi, rank lo,
    rank hi, B^T) each fill their output columns from the shared ``x @ at``."""

    at: torch.Tensor  # [in, R]
    bt: torch.Tensor | None  # [R, out]
    parts: list[tuple[int, int, int, int, torch.Tensor]] = field(default_factory=list)

    def nbytes(self) -> int:
        ts = [self.at] + ([self.bt] if self.bt is not None else [p[4] for p in self.parts])
        return sum(t.numel() * t.element_size() for t in ts)


class _Step:
    """The adapter rows of the current forward, shared by every wrapper:
    ``[(slot, rows)]``, ``rows`` None when the slot owns every row of the batch."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor | None]] = []


class MultiLoRALinear(nn.Module):
    """A linear (float, quantized, or fused) plus the LoRA deltas of the resident adapters."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], step: _Step):
        super().__init__()
        self.base = base
        self.parts = parts  # (adapter module name, output rows), in output order
        # float, int8 and int4 linears all say their shape as nn.Linear does
        self.in_features = int(cast(int, base.in_features))
        self.out_features = int(cast(int, base.out_features))
        self.step = step
        self.deltas: dict[int, _Delta] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for slot, rows in self.step.groups:
            d = self.deltas.get(slot)
            if d is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            h = xs.float() @ d.at  # (n, R)
            if d.bt is not None:
                delta = h @ d.bt  # (n, out)
            else:
                delta = h.new_zeros(h.shape[0], self.out_features)
                for lo, hi, r0, r1, bt in d.parts:
                    torch.mm(h[:, r0:r1], bt, out=delta[:, lo:hi])
            delta = delta.to(y.dtype)
            if rows is None:
                y.add_(delta)
            else:
                y.index_add_(0, rows, delta)
        return y

    def pack(self, adapter: LoRAAdapter) -> _Delta | None:
        """This linear's share of ``adapter`` (validated), or None if it adapts no part."""
        blocks: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (out lo, hi, A, sB)
        lo = 0
        for name, rows in self.parts:
            if name in adapter.weights:
                a, b = adapter.weights[name]
                r = a.shape[0]
                if a.shape != (r, self.in_features) or b.shape != (rows, r):
                    raise CheckpointError(
                        f"adapter {adapter.name!r}: {name} has lora_A {tuple(a.shape)} and "
                        f"lora_B {tuple(b.shape)}, but this model needs ({r}, "
                        f"{self.in_features}) and ({rows}, {r}); it was trained for another "
                        "base model.")
                blocks.append((lo, lo + rows, a.float(), b.float() * adapter.scaling))
            lo += rows
        if not blocks:
            return None
        at = torch.cat([a for _, _, a, _ in blocks]).t().contiguous()  # [in, R]
        total_rank = at.shape[1]
        if len(blocks) == 1 and len(self.parts) == 1:
            return _Delta(at, blocks[0][3].t().contiguous())
        if total_rank * self.out_features <= _BLOCK_DIAG_MAX:
            bt = torch.zeros(total_rank, self.out_features)
            r0 = 0
            for lo, hi, a, b in blocks:
                bt[r0:r0 + a.shape[0], lo:hi] = b.t()
                r0 += a.shape[0]
            return _Delta(at, bt)
        parts, r0 = [], 0
        for lo, hi, a, b in blocks:
            parts.append((lo, hi, r0, r0 + a.shape[0], b.t().contiguous()))
            r0 += a.shape[0]
        return _Delta(at, None, parts)


@dataclass
class _Resident:
    ref: LoRARef
    nbytes: int
    rank: int
    targets: list[str]


def _adaptable(model: Transformer, args: ModelArgs) -> dict[str, list[tuple[str, int]]]:
    """``{model module name: [(adapter module name, output rows)]}`` for every linear a LoRA
    may target, seeing through the fused projections."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    out: dict[str, list[tuple[str, int]]] = {}
    for i, layer in enumerate(model.layers):
        att, ff = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        if getattr(layer.attention, "wqkv", None) is not None:
            out[f"{att}.wqkv"] = [(f"{att}.wq", q), (f"{att}.wk", kv), (f"{att}.wv", kv)]
        else:
            out.update({f"{att}.{n}": [(f"{att}.{n}", r)] for n, r in
                        (("wq", q), ("wk", kv), ("wv", kv))})
        out[f"{att}.wo"] = [(f"{att}.wo", args.dim)]
        if args.moe is not None:
            continue  # expert LoRAs: not yet (see LoRAManager.add)
        if getattr(layer.feed_forward, "w13", None) is not None:
            out[f"{ff}.w13"] = [(f"{ff}.w1", args.hidden_dim), (f"{ff}.w3", args.hidden_dim)]
        else:
            out.update({f"{ff}.{n}": [(f"{ff}.{n}", args.hidden_dim)] for n in ("w1", "w3")})
        out[f"{ff}.w2"] = [(f"{ff}.w2", args.dim)]
    return out


class LoRAManager:
    """The resident adapters (at most ``max_loras``, and ``budget_bytes`` of packed weights),
    their slots, LRU order, and the wrappers that apply them. Not thread-safe: the engine
    serialises calls with its lock."""

    def __init__(self, model: Transformer, args: ModelArgs, max_loras: int,
                 budget_bytes: int | None = None):
        self.model = model
        self.args = args
        self.max_loras = max_loras
        self.budget_bytes = budget_bytes
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self.num_evictions = 0
        self._step = _Step()
        self._wrappers: dict[str, MultiLoRALinear] | None = None  # built at the first add
        self._active = False  # wrappers swapped into the model
        self._slots: list[tuple[nn.Module, str, MultiLoRALinear]] = []  # (parent, leaf, wrapper)
        self._generations = itertools.count(1)

    # -- registry --------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.resident)

    def ref(self, name: str) -> LoRARef:
        entry = self.resident.get(name)
        if entry is None:
            loaded = ", ".join(repr(n) for n in self.resident) or "none"
            raise RequestError(f"no LoRA adapter named {name!r} is loaded (loaded: {loaded}); "
                               "load it with add_lora first.")
        return entry.ref

    def is_current(self, ref: LoRARef) -> bool:
        entry = self.resident.get(ref.name)
        return entry is not None and entry.ref == ref

    def touch(self, name: str) -> None:
        self.resident.move_to_end(name)

    def add(self, name: str, adapter: LoRAAdapter, in_use: Callable[[str], bool]) -> LoRARef:
        """Pack and install ``adapter`` under ``name``, evicting least recently used adapters
        that no unfinished request uses when ``max_loras`` or the byte budget is reached; if
        every resident adapter is in use, RequestError (nothing is changed)."""
        if name in self.resident:
            raise RequestError(f"a LoRA adapter named {name!r} is already loaded; "
                               "remove_lora it first to replace it.")
        experts = sorted(k for k in adapter.weights if ".experts." in k)
        if experts:
            raise RequestError(f"adapter {name!r} adapts mixture-of-experts weights "
                               f"({experts[0]}...): serving LoRA on MoE experts is not "
                               "supported yet (attention-only adapters are).")
        if self._wrappers is None:
            step = self._step
            self._wrappers = {mod: MultiLoRALinear(self.model.get_submodule(mod), parts, step)
                              for mod, parts in _adaptable(self.model, self.args).items()}
            self._slots = [(self.model.get_submodule(mod.rpartition(".")[0]),
                            mod.rpartition(".")[2], w) for mod, w in self._wrappers.items()]
        known = {p for w in self._wrappers.values() for p, _ in w.parts}
        unknown = sorted(set(adapter.weights) - known)
        if unknown:
            raise CheckpointError(f"adapter {name!r} targets {unknown[0]}, which this model "
                                  "has no adaptable linear for (targets: wq wk wv wo w1 w2 w3 "
                                  "of layers 0..{}).".format(self.args.n_layers - 1))
        packed = {mod: d for mod, w in self._wrappers.items()
                  if (d := w.pack(adapter)) is not None}
        nbytes = sum(d.nbytes() for d in packed.values())
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise RequestError(f"adapter {name!r} needs {nbytes / 2**30:.3f} GiB, more than "
                               f"the whole LoRA budget ({self.budget_bytes / 2**30:.3f} GiB).")
        while len(self.resident) >= self.max_loras or (
                self.budget_bytes is not None
                and sum(e.nbytes for e in self.resident.values()) + nbytes > self.budget_bytes):
            victim = next((n for n in self.resident if not in_use(n)), None)
            if victim is None:
                raise RequestError(
                    f"cannot load adapter {name!r}: the {len(self.resident)} resident adapters "
                    "are all used by unfinished requests (max_loras / lora_budget_gib "
                    "reached); retry when they finish or raise the limit.")
            self.remove(victim)
            self.num_evictions += 1
        used = {e.ref.slot for e in self.resident.values()}
        slot = next(s for s in itertools.count() if s not in used)
        ref = LoRARef(name, slot, next(self._generations))
        for mod, d in packed.items():
            self._wrappers[mod].deltas[slot] = d
        self.resident[name] = _Resident(ref, nbytes, adapter.rank, adapter.targets)
        return ref

    def remove(self, name: str) -> None:
        entry = self.resident.pop(name)
        for w in self._wrappers.values() if self._wrappers else ():
            w.deltas.pop(entry.ref.slot, None)
        if not self.resident:
            self._set_active(False)

    # -- per step ----------------------------------------------------------------------------
    def begin_step(self, rows_by_slot: dict[int, list[int]], num_rows: int) -> None:
        """Route the next forward's rows (flat-batch row indices per slot; the rest are base)."""
        if not rows_by_slot:
            self._step.groups = []
            self._set_active(False)
            return
        groups: list[tuple[int, torch.Tensor | None]] = []
        for slot, rows in rows_by_slot.items():
            full = len(rows_by_slot) == 1 and len(rows) == num_rows
            groups.append((slot, None if full else torch.tensor(rows, dtype=torch.long,
                                                                  device=self.model.device)))
        self._step.groups = groups
        self._set_active(True)

    def end_step(self) -> None:
        self._step.groups = []  # wrappers left in place act as their base until the next step

    @contextmanager
    def applied(self, name: str | None) -> Iterator[None]:
        """Every row of the forwards inside uses adapter ``name`` (None: the base model)."""
        if name is None:
            self.begin_step({}, 0)
        else:
            self.begin_step({self.ref(name).slot: []}, 0)  # no row list: all rows
        try:
            yield
        finally:
            self.end_step()

    def _set_active(self, active: bool) -> None:
        if active == self._active or self._wrappers is None:
            return
        # straight into the parents' module dicts: nn.Module.__setattr__ costs ~8 us a call
        # (SmolLM2: 210 linears, 1.7 ms a swap; 0.1 ms this way)
        for parent, leaf, w in self._slots:
            parent._modules[leaf] = w if active else w.base
        self._active = active
