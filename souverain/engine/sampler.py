"""The batched sampler: `sample_batch` applies each row's `SamplingParams`.

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

Masking stop ids before ``min_tokens`` is the caller's job (`ModelRunner.sample` edits the
logits first).
Logprobs are ``log_softmax`` of the logits as given (before processors, penalties,
temperature and truncation), as vLLM reports them by default.

The draw itself (truncation, one seeded uniform per sampled row, inverse CDF in token-id
order) is `souverain.engine.draw`'s; its docstring says why results never depend on the rest
of the batch.

Speed (CPU): every whole-vocabulary operation is batched over rows; per row there is only the
random draw and a little Python. ``python -m souverain.engine.sampler`` prints timings.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from souverain.engine.draw import (
    NEG_INF,
    block_max,
    block_sums,
    block_topk,
    check_alive,
    first_argmax,
    index_tensor,
    pad_block,
    sample_rows,
    scratch,
)
from souverain.engine.sampling import SamplingParams, TokenLogprob


@dataclass
class SamplingRow:
    """What the engine hands the sampler for one sequence at one step."""

    params: SamplingParams
    generator: torch.Generator | None  # from params.make_generator(); None for greedy
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


_F32_MAX = float(torch.finfo(torch.float32).max)

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
            logits, 0, index_tensor(raw_greedy), out=scratch(0, len(raw_greedy), V))
        for i, t in zip(raw_greedy, first_argmax(src)[0].tolist()):
            tokens[i] = t
    mod_greedy = [i for i in greedy if i in modified]
    if mod_greedy:
        xg = _process_(logits.index_select(0, index_tensor(mod_greedy)),
                       [rows[i] for i in mod_greedy])
        best, top = first_argmax(xg)
        check_alive(top)
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
            raw = torch.index_select(logits, 0, index_tensor(sampled),
                                     out=scratch(0, len(sampled), V))
            raw, own = _process_(raw, [rows[i] for i in sampled]), True
        for i, t in zip(sampled, sample_rows(raw, own, [params[i] for i in sampled], u)):
            tokens[i] = t

    return tokens, _logprobs(logits, params, tokens)


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
        f_idx = index_tensor(forced)
        xs = x.index_select(0, f_idx)
        inf = torch.isposinf(xs)
        hit = inf.any(-1)
        if bool(hit.any()):
            xs[hit] = torch.where(inf[hit], 0.0, NEG_INF)
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
        # a penalty as small as 5e-324 is 0 in float32 (and 1e-30 overflows v / pen): keep
        # the penalised logits finite, so the row still has a largest logit to draw from
        flat[where] = torch.where(v > 0, v / pen, v * pen).clamp_(-_F32_MAX, _F32_MAX)
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


def _logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
              ) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs]
    if not want:
        return out
    src = logits if len(want) == len(params) else torch.index_select(
        logits, 0, index_tensor(want), out=scratch(0, len(want), logits.shape[1]))
    bm = block_max(src)
    m = (bm if bm is not None else src).amax(-1, keepdim=True)
    p = torch.sub(src, m, out=scratch(1, *src.shape)).exp_()
    sums = block_sums(pad_block(p)).sum(-1, dtype=torch.float64)
    lse = m + torch.log(sums).to(torch.float32).unsqueeze(1)
    chosen = (src.gather(1, index_tensor([tokens[i] for i in want]).unsqueeze(1)) - lse)
    chosen_l = chosen.squeeze(1).tolist()
    top_n = max(params[i].top_logprobs for i in want)
    if top_n:
        tv, ti = block_topk(src, min(top_n, src.shape[1]), bm)
        top_v, top_i = (tv - lse).tolist(), ti.tolist()
    for r, i in enumerate(want):
        t = params[i].top_logprobs
        top = list(zip(top_i[r][:t], top_v[r][:t])) if t else []
        out[i] = TokenLogprob(tokens[i], chosen_l[r], top)
    return out


def _benchmark() -> None:  # python -m souverain.engine.sampler
    import time

    def per_step(logits: torch.Tensor, rows: list[SamplingRow]) -> float:
        times: list[float] = []
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end or len(times) < 5:
            t0 = time.perf_counter()
            sample_batch(logits, rows)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e6  # median: the machine may be shared

    configs: dict[str, dict[str, Any] | None] = {
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
    mixed: list[dict[str, Any]] = [
        dict(temperature=0), dict(temperature=0.7, top_p=0.95), dict(temperature=1.0),
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
