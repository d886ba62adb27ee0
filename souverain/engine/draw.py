"""Picking one token per row of processed logits: temperature, top-k / top-p / min-p and the
seeded draw; with the vocabulary-block primitives (block maxima, first argmax, top-k by blocks,
scratch buffers) the sampler also uses for greedy rows and logprobs.

Reproducibility: every sampled row consumes exactly one float64 uniform from its own
generator per step (drawn by the caller), and the way a row is handled depends on that row
alone (its parameters and logits), never on its neighbours. The draw is an inverse-CDF lookup
in token-id order, in two levels (sums of 256-token blocks, then inside the chosen block) so
float error stays relative to a block's mass. Top-k / top-p thresholds come from ``topk`` over
the top candidates (64, then 1024, then 8192 tokens, then a full sort when the nucleus is
wider), found inside the blocks with the largest maxima; a row whose kept set lies inside its
candidates is drawn among them. Exponential-race sampling (``argmax(p / Exp(1))``) would need
``vocab`` random numbers per row per step, which on CPU costs more than everything else here
together.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from souverain.engine.sampling import SamplingParams
from souverain.errors import RequestError

_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw
_PB = 64  # block of the max / top-k candidate prefilter
_TIERS = (64, 1024, 8192)  # top-k candidates tried before a full sort finds a nucleus
NEG_INF = float("-inf")
_SCRATCH_MAX = 1 << 24  # floats (64 MiB) kept per slot and thread; larger batches allocate
_scratch_local = threading.local()


def scratch(slot: int, n: int, V: int) -> torch.Tensor:
    """A reusable (n, V) float32 buffer: fresh big tensors cost a page fault per 4 KiB, which
    on some machines (VMs) is most of a sampling step."""
    pool = getattr(_scratch_local, "pool", None)
    if pool is None:
        pool = _scratch_local.pool = {}
    need = n * V
    if need > _SCRATCH_MAX:
        return torch.empty((n, V), dtype=torch.float32)
    buf = pool.get(slot)
    if buf is None or buf.numel() < need:
        buf = pool[slot] = torch.empty(max(need, 1 << 16), dtype=torch.float32)
    return buf[:need].view(n, V)


def index_tensor(ids: Sequence[int]) -> torch.Tensor:
    """Row or token ids as a LongTensor index."""
    return torch.tensor(ids, dtype=torch.long)


def check_alive(row_max: torch.Tensor) -> None:
    """RequestError when a row's max is -inf: every token of it was banned."""
    if bool(torch.isneginf(row_max).any()):
        raise RequestError("no token is allowed at this step: the logits processors (e.g. the "
                           "response format) banned every token; relax the constraint.")


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _below(t: float) -> float:
    """The float32 just below ``t``: ``x > _below(t)`` is ``x >= t`` for float32 ``x``."""
    return float(torch.nextafter(torch.tensor(t, dtype=torch.float32),
                                 torch.tensor(NEG_INF, dtype=torch.float32)))


def block_max(x: torch.Tensor) -> torch.Tensor | None:
    """Maxima of 64-token blocks per row, or None when the vocabulary has no such blocks."""
    n, V = x.shape
    if V % _PB or V < 8 * _PB:
        return None
    return x.view(n, V // _PB, _PB).amax(-1)


def first_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of the max, the max) per row; torch.argmax is ~10x slower than amax on
    CPU, so find the first block holding the max, then the max inside it."""
    n, V = x.shape
    bm = block_max(x)
    if bm is None:
        return x.argmax(-1), x.amax(-1, keepdim=True)
    m = bm.amax(-1, keepdim=True)
    blk = (bm == m).view(torch.uint8).argmax(-1)
    inner = x.view(n, V // _PB, _PB)[torch.arange(n), blk]
    return blk * _PB + (inner == m).view(torch.uint8).argmax(-1), m


def block_topk(x: torch.Tensor, K: int, bm: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K largest values per row (sorted, exact) and their ids. The K largest values all
    lie in the K blocks with the largest maxima, so topk runs on those blocks only."""
    n, V = x.shape
    if K >= V:
        return x.sort(-1, descending=True)
    if bm is None or 4 * K * _PB > V:
        return x.topk(K, -1)
    blocks = bm.topk(K, -1).indices
    cand = (blocks.unsqueeze(-1) * _PB + torch.arange(_PB)).view(n, K * _PB)
    vals, j = x.gather(1, cand).topk(K, -1)
    return vals, cand.gather(1, j)


def sample_rows(raw: torch.Tensor, own: bool, params: list[SamplingParams], u: torch.Tensor
                ) -> list[int]:
    """Temperature, top-k, top-p, min-p and the draw for (processed) logits rows ``raw``
    (clobbered when ``own``)."""
    n, V = raw.shape
    bm = block_max(raw)  # the block order survives the shift and scaling below
    m = (bm if bm is not None else raw).amax(-1, keepdim=True)
    check_alive(m)
    # every row's max is 0 from here on, so p = exp(x) is relative to it
    x = raw.sub_(m) if own else torch.sub(raw, m, out=scratch(0, n, V))
    temps = [float(p.temperature) for p in params]
    if any(t != 1 for t in temps):
        x.div_(torch.tensor(temps, dtype=torch.float32).unsqueeze(1))
    # min_p keeps p >= min_p * p_max, i.e. x >= log(min_p)
    thr = [_f32(math.log(p.min_p)) if p.min_p > 0 else NEG_INF for p in params]
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    tps = [float(p.top_p) for p in params]
    tokens: list[int | None] = [None] * n
    trunc = [j for j in range(n) if ks[j] or tps[j] < 1]
    full = [j for j in range(n) if not (ks[j] or tps[j] < 1)]
    if trunc:
        full += _truncate(x, bm, thr, trunc, ks, tps, u, tokens)
    if full:
        full.sort()
        if len(full) == n:
            xs, us = x, u
        else:
            idx = index_tensor(full)
            xs, us = x.index_select(0, idx), u[idx]
        for j, t in zip(full, _draw_full(xs, [thr[j] for j in full], us).tolist()):
            tokens[j] = t
    return tokens  # type: ignore[return-value]


def _truncate(x: torch.Tensor, bm: torch.Tensor | None, thr: list[float], trunc: list[int],
              ks: list[int], tps: list[float], u: torch.Tensor, tokens: list[int | None]
              ) -> list[int]:
    """Top-k / top-p thresholds for rows ``trunc`` of shifted rows ``x`` (raising ``thr`` in
    place). Rows whose kept set lies inside their top-``K`` candidates are drawn here
    (``tokens`` filled); the others are returned for the whole-vocabulary draw. ``K`` depends
    on the row alone (tiers 64, 1024, 8192, all), so the result does too."""
    V = x.shape[1]
    tier = dict.fromkeys(trunc, 0)
    mass: dict[int, float] = {}  # top-p normalizer of each row (the top-k-kept mass)
    to_full: list[int] = []
    pending = list(trunc)
    while pending:
        krow_l = []
        for j in pending:
            k, t = ks[j], tier[j]
            size = (_TIERS[t] if t < len(_TIERS) else V) if tps[j] < 1 else 0
            krow_l.append(min(V, max(size, k + 1 if k else 0)))
        idx = index_tensor(pending)
        every = len(pending) == x.shape[0]
        xs = x if every else x.index_select(0, idx)
        bms = bm if (every or bm is None) else bm.index_select(0, idx)
        K = max(krow_l)
        vals, ids = block_topk(xs, K, bms)
        krow = torch.tensor(krow_l)
        kk = torch.tensor([ks[j] for j in pending])
        has_k = kk > 0
        kth = vals.gather(1, (kk - 1).clamp(min=0).unsqueeze(1))
        thr_k = torch.where(has_k.unsqueeze(1), kth, NEG_INF)
        new_thr = torch.maximum(torch.tensor([thr[j] for j in pending]).unsqueeze(1), thr_k)
        resolved = torch.ones(len(pending), dtype=torch.bool)
        has_p = torch.tensor([tps[j] < 1 for j in pending])
        if bool(has_p.any()):
            cols = torch.arange(K).unsqueeze(0)
            pc = vals.exp().masked_fill_((vals < thr_k) | (cols >= krow.unsqueeze(1)), 0.0)
            cum = pc.cumsum(-1).double()
            need_mass = []
            for r, j in enumerate(pending):
                if tps[j] >= 1 or j in mass:
                    continue
                k = ks[j]
                if k and krow_l[r] > k and bool(vals[r, k] < vals[r, k - 1]):
                    mass[j] = float(cum[r, k - 1])  # the top-k set is exactly these k
                else:
                    need_mass.append(r)
            if need_mass:
                rows_x = (xs if len(need_mass) == len(pending)
                          else xs.index_select(0, index_tensor(need_mass)))
                z = _mass(rows_x, [float(thr_k[r]) for r in need_mass])
                for r, zr in zip(need_mass, z.tolist()):
                    mass[pending[r]] = zr
            target = torch.tensor([tps[j] * mass[j] if tps[j] < 1 else 0.0 for j in pending],
                                  dtype=torch.float64)
            cut = (cum < target.unsqueeze(1)).sum(-1)  # first index reaching top_p of the mass
            resolved = ~has_p | (cut < krow) | (krow >= V)
            thr_p = vals.gather(1, cut.clamp(max=K - 1).unsqueeze(1))
            new_thr = torch.where((has_p & resolved).unsqueeze(1),
                                  torch.maximum(new_thr, thr_p), new_thr)
        last = vals.gather(1, (krow - 1).unsqueeze(1))
        cand = resolved & (krow < V) & (last < new_thr).squeeze(1)
        for r, t in enumerate(new_thr.squeeze(1).tolist()):
            if bool(resolved[r]):
                thr[pending[r]] = t
        if bool(cand.any()):
            c = cand.nonzero().squeeze(1)
            drawn = _draw_candidates(vals[c], ids[c], new_thr[c], u[idx[c]], V)
            for r, t in zip(c.tolist(), drawn.tolist()):
                tokens[pending[r]] = t
        nxt = []
        for r, j in enumerate(pending):
            if not bool(resolved[r]):
                tier[j] += 1
                nxt.append(j)
            elif not bool(cand[r]):
                to_full.append(j)
        pending = nxt
    return to_full


def block_sums(p: torch.Tensor) -> torch.Tensor:
    """(n, V) -> (n, ceil(V / 256)) sums of 256-token blocks (V a multiple of 256)."""
    n, V = p.shape
    return p.view(n, V // _BLOCK, _BLOCK).sum(-1)


def pad_block(p: torch.Tensor) -> torch.Tensor:
    pad = (-p.shape[1]) % _BLOCK
    return torch.nn.functional.pad(p, (0, pad)) if pad else p


def _mass(xs: torch.Tensor, thr: list[float]) -> torch.Tensor:
    """Total of exp(x) over x >= thr per (shifted) row, float64."""
    p = torch.exp(xs, out=scratch(1, *xs.shape))
    for r, t in enumerate(thr):
        if t > NEG_INF:
            row = xs[r].clone()
            torch.threshold_(row, _below(t), NEG_INF)
            p[r] = row.exp_()
    return block_sums(pad_block(p)).cumsum(-1, dtype=torch.float64)[:, -1]


def _draw_full(xs: torch.Tensor, thr: list[float], u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the whole vocabulary of shifted rows ``xs`` (clobbered), in
    token-id order: pick a 256-token block from the block sums, then a token inside it."""
    n = xs.shape[0]
    for r, t in enumerate(thr):
        if t > NEG_INF:
            torch.threshold_(xs[r], _below(t), NEG_INF)
    p = pad_block(xs.exp_())
    bcum = block_sums(p).cumsum(-1, dtype=torch.float64)
    total = bcum[:, -1:].contiguous()
    target = u * total
    b = torch.searchsorted(bcum, target, right=True)
    b = torch.minimum(b, torch.searchsorted(bcum, total))  # never past the last block with mass
    prev = torch.where(b > 0, bcum.gather(1, (b - 1).clamp(min=0)), 0.0)
    lc = p.view(n, -1, _BLOCK)[torch.arange(n), b.squeeze(1)].cumsum(-1, dtype=torch.float64)
    w = torch.searchsorted(lc, target - prev, right=True)
    w = torch.minimum(w, torch.searchsorted(lc, lc[:, -1:].contiguous()))
    return (b * _BLOCK + w).squeeze(1)


def _draw_candidates(vals: torch.Tensor, ids: torch.Tensor, thr: torch.Tensor,
                     u: torch.Tensor, V: int) -> torch.Tensor:
    """Inverse-CDF draw among the kept candidates (``vals >= thr``), in token-id order."""
    sid, perm = torch.where(vals >= thr, ids, V).sort(-1)
    p = torch.where(sid < V, vals.gather(1, perm).exp(), 0.0)
    cum = p.cumsum(-1, dtype=torch.float64)
    total = cum[:, -1:].contiguous()
    w = torch.searchsorted(cum, u * total, right=True)
    w = torch.minimum(w, torch.searchsorted(cum, total))
    return sid.gather(1, w).squeeze(1)
