"""`SamplingParams` and the batched sampler.

`sample_batch` picks one token for every row of a ``(B, vocab)`` logits batch. Per row, in
this order (vLLM's):

1. ``logits_processors`` (each gets the ids generated so far and the row, returns a new row);
2. penalties: ``repetition_penalty`` (HF/vLLM: over prompt and output tokens, positive logits
   divided, negative multiplied), then ``frequency_penalty`` / ``presence_penalty`` (OpenAI:
   ``logit -= count * frequency + (count > 0) * presence`` over output tokens only);
3. ``temperature < 1e-5`` (0 included): argmax (ties go to the lowest id; dividing float32
   logits by a smaller temperature would overflow); otherwise divide by temperature,
   then ``top_k``, ``top_p`` (over the top-k renormalized distribution), ``min_p``; ties at a
   cut-off are kept (as HF and vLLM do);
4. one draw with the row's own generator.

Masking stop ids before ``min_tokens`` is the engine's job: it edits the logits before calling.
Logprobs are ``log_softmax`` of the logits as given (before processors, penalties,
temperature and truncation), as vLLM reports them by default.

Reproducibility: every sampled row consumes exactly one float64 uniform from its own
generator per step, whatever its parameters and whatever else is in the batch, and the way a
row is handled depends on that row alone (its parameters and logits), never on its
neighbours. The draw is an inverse-CDF lookup in token-id order, in two levels (sums of
256-token blocks, then inside the chosen block) so float error stays relative to a block's
mass. Top-k / top-p thresholds come from ``topk`` over the top candidates (64, then 1024, then
8192 tokens, then a full sort when the nucleus is wider), found inside the blocks with the
largest maxima; a row whose kept set lies inside its candidates is drawn among them.
Exponential-race sampling (``argmax(p / Exp(1))``) would need ``vocab`` random numbers per row
per step, which on CPU costs more than everything else here together.

Speed (CPU): every whole-vocabulary operation is batched over rows; per row there is only the
random draw and a little Python. ``python -m souverain.engine.sampling`` prints timings.
"""

from __future__ import annotations

import array
import dataclasses
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from souverain.errors import RequestError

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's _SAMPLING_EPS)
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts
_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (names follow vLLM and the La Plateforme API).

    ``temperature=0`` is greedy. ``seed`` makes sampling reproducible: each sequence owns its
    own generator, so the same seed gives the same text whatever else runs beside it.
    ``n`` samples of one request get their own streams from `clone_for`.
    ``top_logprobs > 0`` implies ``logprobs``. ``logits_processors`` are called in order with
    ``(ids generated so far, (vocab,) float32 logits row)`` and return the new row; to ban a
    token set its logit to ``-inf`` (a ``+inf`` logit forces the tokens that have it).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int | None = 256  # None: until EOS or the model's context is full
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.logits_processors is None:
            self.logits_processors = []
        elif callable(self.logits_processors):
            self.logits_processors = [self.logits_processors]
        else:
            self.logits_processors = list(self.logits_processors)
        self._validate()
        if self.top_logprobs:
            self.logprobs = True

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise RequestError(f"invalid sampling parameter: {message}.")

        def real_in(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = _is_real(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                fail(f"{name}={v!r} must be a number in {'(' if lo_open else '['}{lo}, {hi}]")

        if not (_is_real(self.temperature) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            fail(f"temperature={self.temperature!r} must be a finite number >= 0 (0 is greedy)")
        real_in("top_p", 0, 1, lo_open=True)
        if not (_is_int(self.top_k) and self.top_k >= -1):
            fail(f"top_k={self.top_k!r} must be -1, 0 (off) or a positive integer")
        real_in("min_p", 0, 1)
        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            fail(f"max_tokens={self.max_tokens!r} must be an integer >= 1 (or None)")
        if not (_is_int(self.min_tokens) and self.min_tokens >= 0):
            fail(f"min_tokens={self.min_tokens!r} must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop strings must be non-empty")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail(f"stop_token_ids={self.stop_token_ids!r} must be integers >= 0")
        if self.seed is not None and not (_is_int(self.seed)
                                          and _SEED_MIN <= self.seed <= _SEED_MAX):
            fail(f"seed={self.seed!r} must be an integer in [-2**63, 2**64 - 1] or None")
        if not (_is_int(self.n) and self.n >= 1):
            fail(f"n={self.n!r} must be an integer >= 1")
        real_in("presence_penalty", -2, 2)
        real_in("frequency_penalty", -2, 2)
        if not (_is_real(self.repetition_penalty) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            fail(f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0 "
                 "(1 is off)")
        if not isinstance(self.logprobs, bool):
            fail(f"logprobs={self.logprobs!r} must be true or false")
        if not (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            fail(f"top_logprobs={self.top_logprobs!r} must be an integer in "
                 f"[0, {MAX_TOP_LOGPROBS}]")
        if not all(callable(f) for f in self.logits_processors):
            fail("logits_processors must be callables (ids, logits row) -> logits row")

    # -- helpers the engine uses --------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0
                or self.presence_penalty != 0)

    def clone_for(self, index: int) -> SamplingParams:
        """The parameters of sample ``index`` (0-based) of an ``n > 1`` request.

        Seed rule (vLLM's): with ``seed=None`` every sample stays randomly seeded; with
        ``seed=s`` sample ``i`` is seeded ``s + i`` (wrapped modulo 2**64 past the top of the
        range), so sample 0 is exactly the ``n=1`` request and every sample is reproducible
        and distinct from its siblings. Everything else is kept (``n`` included). Logits
        processors with a ``clone()`` method (stateful ones, e.g. grammar matchers) are
        cloned, so every sample owns its own state; other processors are shared and should
        derive their state from the ids they are given.
        """
        if not (_is_int(index) and 0 <= index):
            raise ValueError(f"sample index {index!r} must be an integer >= 0")
        seed = self.seed
        if seed is not None and index:
            seed += index
            if seed > _SEED_MAX:
                seed %= 1 << 64
        return dataclasses.replace(self, seed=seed,
                                   logits_processors=[f.clone() if hasattr(f, "clone") else f
                                                      for f in self.logits_processors],
                                   stop=list(self.stop),
                                   stop_token_ids=list(self.stop_token_ids))

    def make_generator(self) -> torch.Generator | None:
        """This sequence's generator: seeded with ``seed``, or randomly; None when greedy."""
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


@dataclass
class SamplingRow:
    """What the engine hands the sampler for one sequence at one step."""

    params: SamplingParams
    generator: torch.Generator | None  # from params.make_generator(); None for greedy
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the ``top_logprobs`` most likely tokens (best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           prompt_token_ids: Sequence[int] = (), output_token_ids: Sequence[int] = ()) -> int:
    """One token from a (vocab,) float32 logits row (a batch of one for `sample_batch`)."""
    tokens, _ = sample_batch(logits.reshape(1, -1),
                             [SamplingRow(params, generator, prompt_token_ids, output_token_ids)])
    return tokens[0]


def sample_batch(logits: torch.Tensor, rows: Sequence[SamplingRow]
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of a ``(B, vocab)`` logits batch, and its logprobs when asked.

    ``logits`` is not modified. Returns ``(token ids, logprobs)``, ``logprobs[i]`` None where
    row ``i`` did not ask for them.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows; "
                         "expected (rows, vocab)")
    logits = logits.detach()
    if logits.dtype != torch.float32 or logits.device.type != "cpu":
        logits = logits.to("cpu", torch.float32)
    logits = logits.contiguous()
    B, V = logits.shape
    if B == 0:
        return [], []
    params = [r.params for r in rows]
    tokens = [0] * B

    modified = {i for i, p in enumerate(params) if p.logits_processors or p.has_penalties}

    greedy = [i for i, p in enumerate(params) if p.greedy]
    raw_greedy = [i for i in greedy if i not in modified]
    if raw_greedy:
        src = logits if len(raw_greedy) == B else torch.index_select(
            logits, 0, _index(raw_greedy), out=_scratch(0, len(raw_greedy), V))
        for i, t in zip(raw_greedy, _argmax(src)[0].tolist()):
            tokens[i] = t
    mod_greedy = [i for i in greedy if i in modified]
    if mod_greedy:
        xg = _process_(logits.index_select(0, _index(mod_greedy)), [rows[i] for i in mod_greedy])
        best, top = _argmax(xg)
        _check_alive(top)
        for i, t in zip(mod_greedy, best.tolist()):
            tokens[i] = t

    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        # exactly one uniform per sampled row per step, whatever happens next
        u = torch.tensor([float(torch.rand(1, dtype=torch.float64, generator=rows[i].generator))
                          for i in sampled], dtype=torch.float64).unsqueeze(1)
        if len(sampled) == B and not modified:
            raw, own = logits, False  # read only
        else:
            raw = torch.index_select(logits, 0, _index(sampled),
                                     out=_scratch(0, len(sampled), V))
            raw, own = _process_(raw, [rows[i] for i in sampled]), True
        for i, t in zip(sampled, _sample_rows(raw, own, [params[i] for i in sampled], u)):
            tokens[i] = t

    return tokens, _logprobs(logits, params, tokens)


# -- internals ------------------------------------------------------------------------------
_PB = 64  # block of the max / top-k candidate prefilter
_TIERS = (64, 1024, 8192)  # top-k candidates tried before a full sort finds a nucleus
_NEG_INF = float("-inf")
_SCRATCH_MAX = 1 << 24  # floats (64 MiB) kept per slot and thread; larger batches allocate
_scratch_local = threading.local()


def _scratch(slot: int, n: int, V: int) -> torch.Tensor:
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


def _index(ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def _ids(seq: Sequence[int]) -> torch.Tensor:
    if isinstance(seq, torch.Tensor):
        return seq.to("cpu", torch.long).reshape(-1)
    return torch.tensor(list(seq), dtype=torch.long)


def _flat_ids(seqs: list[Sequence[int]], rows: list[int], V: int) -> torch.Tensor:
    """Token ids of several sequences as one LongTensor, each offset by ``row * V`` so they
    index the flattened logits (lists go through array.array: 3x faster than torch.tensor)."""
    if any(isinstance(q, torch.Tensor) for q in seqs):
        ids = torch.cat([_ids(q) for q in seqs]) if seqs else torch.zeros(0, dtype=torch.long)
    else:
        buf = array.array("q")
        for q in seqs:
            buf.extend(q)
        ids = (torch.frombuffer(buf, dtype=torch.long) if len(buf)
               else torch.zeros(0, dtype=torch.long))
    lengths = torch.tensor([len(q) for q in seqs])
    return ids + torch.repeat_interleave(torch.tensor(rows) * V, lengths)


def _per_row(values: torch.Tensor, rows: list[int], where: torch.Tensor, V: int
             ) -> torch.Tensor:
    """``values[k]`` belongs to row ``rows[k]``; spread it over flat indices ``where``."""
    table = torch.zeros(max(rows) + 1, dtype=values.dtype)
    table[torch.tensor(rows)] = values
    return table[torch.div(where, V, rounding_mode="floor")]


def _check_alive(row_max: torch.Tensor) -> None:
    if bool(torch.isneginf(row_max).any()):
        raise RequestError("no token is allowed at this step: the logits processors (e.g. the "
                           "response format) banned every token; relax the constraint.")


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _below(t: float) -> float:
    """The float32 just below ``t``: ``x > _below(t)`` is ``x >= t`` for float32 ``x``."""
    return float(torch.nextafter(torch.tensor(t, dtype=torch.float32),
                                 torch.tensor(_NEG_INF, dtype=torch.float32)))


def _block_max(x: torch.Tensor) -> torch.Tensor | None:
    n, V = x.shape
    if V % _PB or V < 8 * _PB:
        return None
    return x.view(n, V // _PB, _PB).amax(-1)


def _argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of the max, the max) per row; torch.argmax is ~10x slower than amax on
    CPU, so find the first block holding the max, then the max inside it."""
    n, V = x.shape
    bm = _block_max(x)
    if bm is None:
        return x.argmax(-1), x.amax(-1, keepdim=True)
    m = bm.amax(-1, keepdim=True)
    blk = (bm == m).view(torch.uint8).argmax(-1)
    inner = x.view(n, V // _PB, _PB)[torch.arange(n), blk]
    return blk * _PB + (inner == m).view(torch.uint8).argmax(-1), m


def _topk(x: torch.Tensor, K: int, bm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
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


def _process_(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Apply each row's logits processors, then its penalties, to ``x`` (one row per entry of
    ``rows``, modified in place; rows without either are left alone). Returns ``x``."""
    n, V = x.shape
    forced = []
    for j, r in enumerate(rows):
        if not r.params.logits_processors:
            continue
        generated = [int(t) for t in r.output_token_ids]
        row = x[j]
        for f in r.params.logits_processors:
            new = f(list(generated), row)
            if not isinstance(new, torch.Tensor) or new.numel() != V:
                raise TypeError(f"logits processor {f!r} returned "
                                f"{type(new).__name__} {tuple(getattr(new, 'shape', ()))}; "
                                f"it must return a ({V},) tensor")
            row = new.detach().to("cpu", torch.float32).reshape(V)
        x[j] = row
        forced.append(j)
    if forced:  # a +inf logit forces its token(s): keep only those, evenly
        f_idx = _index(forced)
        xs = x.index_select(0, f_idx)
        inf = torch.isposinf(xs)
        hit = inf.any(-1)
        if bool(hit.any()):
            xs[hit] = torch.where(inf[hit], 0.0, _NEG_INF)
            x[f_idx] = xs

    # penalties touch only the tokens seen, through the flat view
    flat = x.view(-1)
    params = [r.params for r in rows]
    rep = [j for j, p in enumerate(params) if p.repetition_penalty != 1]
    if rep:
        seqs: list[Sequence[int]] = []
        for j in rep:
            seqs += [rows[j].prompt_token_ids, rows[j].output_token_ids]
        where = _flat_ids(seqs, [j for j in rep for _ in (0, 1)], V)
        pen = _per_row(torch.tensor([params[j].repetition_penalty for j in rep],
                                    dtype=torch.float32), rep, where, V)
        v = flat[where]  # duplicates all get the same new value
        flat[where] = torch.where(v > 0, v / pen, v * pen)
    fp = [j for j, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
    if fp:
        where, counts = torch.unique(
            _flat_ids([rows[j].output_token_ids for j in fp], fp, V), return_counts=True)
        if len(where):
            freq = _per_row(torch.tensor([params[j].frequency_penalty for j in fp],
                                         dtype=torch.float32), fp, where, V)
            pres = _per_row(torch.tensor([params[j].presence_penalty for j in fp],
                                         dtype=torch.float32), fp, where, V)
            flat[where] -= counts.to(torch.float32) * freq + pres
    return x


def _sample_rows(raw: torch.Tensor, own: bool, params: list[SamplingParams], u: torch.Tensor
                 ) -> list[int]:
    """Temperature, top-k, top-p, min-p and the draw for (processed) logits rows ``raw``
    (clobbered when ``own``)."""
    n, V = raw.shape
    bm = _block_max(raw)  # the block order survives the shift and scaling below
    m = (bm if bm is not None else raw).amax(-1, keepdim=True)
    _check_alive(m)
    # every row's max is 0 from here on, so p = exp(x) is relative to it
    x = raw.sub_(m) if own else torch.sub(raw, m, out=_scratch(0, n, V))
    temps = [float(p.temperature) for p in params]
    if any(t != 1 for t in temps):
        x.div_(torch.tensor(temps, dtype=torch.float32).unsqueeze(1))
    # min_p keeps p >= min_p * p_max, i.e. x >= log(min_p)
    thr = [_f32(math.log(p.min_p)) if p.min_p > 0 else _NEG_INF for p in params]
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
            idx = _index(full)
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
        idx = _index(pending)
        every = len(pending) == x.shape[0]
        xs = x if every else x.index_select(0, idx)
        bms = bm if (every or bm is None) else bm.index_select(0, idx)
        K = max(krow_l)
        vals, ids = _topk(xs, K, bms)
        krow = torch.tensor(krow_l)
        kk = torch.tensor([ks[j] for j in pending])
        has_k = kk > 0
        kth = vals.gather(1, (kk - 1).clamp(min=0).unsqueeze(1))
        thr_k = torch.where(has_k.unsqueeze(1), kth, _NEG_INF)
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
                          else xs.index_select(0, _index(need_mass)))
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


def _block_sums(p: torch.Tensor) -> torch.Tensor:
    """(n, V) -> (n, ceil(V / 256)) sums of 256-token blocks (V a multiple of 256)."""
    n, V = p.shape
    return p.view(n, V // _BLOCK, _BLOCK).sum(-1)


def _pad_block(p: torch.Tensor) -> torch.Tensor:
    pad = (-p.shape[1]) % _BLOCK
    return torch.nn.functional.pad(p, (0, pad)) if pad else p


def _mass(xs: torch.Tensor, thr: list[float]) -> torch.Tensor:
    """Total of exp(x) over x >= thr per (shifted) row, float64."""
    p = torch.exp(xs, out=_scratch(1, *xs.shape))
    for r, t in enumerate(thr):
        if t > _NEG_INF:
            row = xs[r].clone()
            torch.nn.functional.threshold_(row, _below(t), _NEG_INF)
            p[r] = row.exp_()
    return _block_sums(_pad_block(p)).cumsum(-1, dtype=torch.float64)[:, -1]


def _draw_full(xs: torch.Tensor, thr: list[float], u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the whole vocabulary of shifted rows ``xs`` (clobbered), in
    token-id order: pick a 256-token block from the block sums, then a token inside it."""
    n = xs.shape[0]
    for r, t in enumerate(thr):
        if t > _NEG_INF:
            torch.nn.functional.threshold_(xs[r], _below(t), _NEG_INF)
    p = _pad_block(xs.exp_())
    bcum = _block_sums(p).cumsum(-1, dtype=torch.float64)
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


def _logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
              ) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs]
    if not want:
        return out
    src = logits if len(want) == len(params) else torch.index_select(
        logits, 0, _index(want), out=_scratch(0, len(want), logits.shape[1]))
    bm = _block_max(src)
    m = (bm if bm is not None else src).amax(-1, keepdim=True)
    p = torch.sub(src, m, out=_scratch(1, *src.shape)).exp_()
    sums = _block_sums(_pad_block(p)).sum(-1, dtype=torch.float64)
    lse = m + torch.log(sums).to(torch.float32).unsqueeze(1)
    chosen = (src.gather(1, _index([tokens[i] for i in want]).unsqueeze(1)) - lse)
    chosen_l = chosen.squeeze(1).tolist()
    top_n = max(params[i].top_logprobs for i in want)
    if top_n:
        tv, ti = _topk(src, min(top_n, src.shape[1]), bm)
        tv, ti = (tv - lse).tolist(), ti.tolist()
    for r, i in enumerate(want):
        t = params[i].top_logprobs
        top = list(zip(ti[r][:t], tv[r][:t])) if t else []
        out[i] = TokenLogprob(tokens[i], chosen_l[r], top)
    return out


def _benchmark() -> None:  # python -m souverain.engine.sampling
    import time

    def per_step(logits: torch.Tensor, rows: list[SamplingRow]) -> float:
        times: list[float] = []
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end or len(times) < 5:
            t0 = time.perf_counter()
            sample_batch(logits, rows)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e6  # median: the machine may be shared

    configs = {
        "greedy": dict(temperature=0),
        "temp": dict(temperature=0.7),
        "top_p.95": dict(temperature=0.7, top_p=0.95),
        "top_k50": dict(temperature=0.7, top_k=50),
        "k50+p.9+minp": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
        "penalties": dict(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3,
                          repetition_penalty=1.1),
        "logprobs5": dict(temperature=0.7, top_logprobs=5),
        "mixed": None,
    }
    mixed = [dict(temperature=0), dict(temperature=0.7, top_p=0.95), dict(temperature=1.0),
             dict(temperature=0.7, top_k=50, frequency_penalty=0.5),
             dict(temperature=0.8, min_p=0.1, top_logprobs=2)]
    print(f"torch threads: {torch.get_num_threads()}; microseconds per sample_batch call")
    print(f"{'config':>14} " + " ".join(f"{f'B={b} V={v}':>16}" for v in (32768, 131072)
                                            for b in (1, 32)))
    g = torch.Generator().manual_seed(0)
    for name, kw in configs.items():
        cells = []
        for V in (32768, 131072):
            for B in (1, 32):
                # LLM-like rows: a heavy head over a Gaussian tail
                logits = torch.randn(B, V, generator=g) * 2.0
                logits[:, :200] += torch.randn(B, 200, generator=g) * 3.0 + 6.0
                rows = []
                for b in range(B):
                    p = SamplingParams(seed=b, **(kw or mixed[b % len(mixed)]))
                    rows.append(SamplingRow(p, p.make_generator(),
                                            list(range(0, 3000, 7)), list(range(100, 400))))
                cells.append(f"{per_step(logits, rows):16.0f}")
        print(f"{name:>14} " + " ".join(cells))


if __name__ == "__main__":
    _benchmark()
