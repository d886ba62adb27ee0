"""Speculative decoding: draft tokens proposed per sequence, checked in the step's one forward.

A decoding sequence normally computes one token per step: its last token, whose logits give
the next one. With speculation it also feeds ``k`` *draft* tokens after it, so the step's
forward yields ``k + 1`` rows of logits for that sequence (its K/V for every drafted position
is written to its pages as for any other token). `ModelRunner.sample` then walks the rows in
order: row ``i`` gives a token exactly as a non-speculative step would (same processors,
penalties, ``min_tokens`` rule, and one uniform from the sequence's own generator); if that
token equals draft ``i`` the next row is valid too, otherwise the walk stops. A step thus
emits between 1 and ``k + 1`` tokens, and each of them is the token non-speculative decoding
would have produced at that point.

Why this is exact for sampled requests too: the drafts here are *deterministic* (a proposal
distribution q that is a point mass on the draft token d). Leviathan et al.'s rejection
sampling accepts d with probability min(1, p(d)/q(d)) = p(d) and otherwise draws from
norm(max(0, p - q)), which is p without d. Drawing t ~ p and accepting when t == d does both
at once: P(accept) = p(d), and a rejected step emits t ~ p | t != d. So the emitted sequence
has exactly the target distribution. With a seed it consumes the same uniforms as without
speculation (one per emitted token), so it is the same sequence up to float rounding: the
verification rows go through matmuls of more rows, whose last bits may differ, which can flip
a draw that falls within ~1e-6 of a boundary (seen once in ~300 tokens of a nearly flat
random model). Greedy outputs are identical (tests/test_speculative.py).

Proposers:
- `souverain.engine.draft.DraftModel` (``--speculative MODEL``): a smaller model with the same
  vocabulary drafts greedily for every decoding sequence at once, its K/V in the target's
  blocks; its cost per drafted token joins ``row_cost``;
- `NgramIndex` (prompt lookup, ``--speculative ngram``): the longest suffix of the sequence
  (``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens) that occurred earlier in the prompt or the
  text so far; the tokens that followed its latest earlier occurrence are the drafts. Costs
  no model at all: answers that copy spans of their input (RAG, extraction, code edits) are
  drafted well.

`SpecState` picks ``k`` per sequence with `best_k` (tokens a step emits for its acceptance
rate, over what the step costs with ``k`` more rows) and backs off (skips proposing for a
doubling number of steps) when no draft pays, so free generation pays almost nothing. The
engine stops proposing when more sequences decode at once than
``speculative_disable_batch_size``: a batch that large already uses the weights it reads, and
verification rows would only add compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``run`` (the machine may be shared): how the
    engine measures what a drafted token costs."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


class Proposer(Protocol):
    """Drafts for one sequence: ``propose(ids, k)`` -> at most ``k`` tokens to follow ``ids``
    (``k == 0``: only keep any incremental state current)."""

    def propose(self, ids: list[int], k: int) -> list[int]: ...


class NgramIndex:
    """Where each n-gram (``n_min <= n <= n_max``) of one sequence last ended.

    Built incrementally: each call indexes only the tokens added since the previous one. The
    n-grams ending at the sequence's last token are never indexed before a lookup, so a lookup
    of the current suffix finds an *earlier* occurrence."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self._ends: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(n_min, n_max + 1)}
        self._indexed = 1  # n-grams ending (exclusive) before this position are indexed

    def propose(self, ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest
        matching suffix of ``ids``; [] when no suffix of ``n_min`` tokens or more recurs."""
        length = len(ids)
        for end in range(self._indexed, length):  # ends < length: never the suffix itself
            for n, ends in self._ends.items():
                if end >= n:
                    ends[tuple(ids[end - n:end])] = end
        self._indexed = max(self._indexed, length)
        if k <= 0:
            return []
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            hit = self._ends[n].get(tuple(ids[length - n:]))
            if hit is not None:
                return ids[hit:hit + k]
        return []


@dataclass
class SpecStats:
    """Engine-wide counters (``LLMEngine.stats``, ``/metrics``)."""

    verify_steps: int = 0  # sequence-steps that verified at least one draft token
    draft_tokens: int = 0  # draft tokens proposed and verified
    accepted_tokens: int = 0  # draft tokens accepted
    emitted_tokens: int = 0  # tokens those steps produced (accepted + the one sampled after)


def best_k(alpha: float, row_cost: float, k_max: int) -> int:
    """The draft length that maximises tokens per unit of step cost.

    With a per-token acceptance probability ``alpha``, a step verifying ``k`` drafts emits
    ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average (the accepted run and the token after
    it) and costs ``1 + row_cost * k`` plain decode steps, ``row_cost`` being what one more row
    adds to a one-row forward (measured at engine start). 0 means drafting does not pay."""
    best, best_gain = 0, 1.0
    for k in range(1, k_max + 1):
        tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
        gain = tokens / (1 + row_cost * k)
        if gain > best_gain * 1.02:  # a longer draft must buy something
            best, best_gain = k, gain
    return best


@dataclass
class SpecState:
    """One sequence's proposer and its draft length, chosen by `best_k` from its own
    acceptance rate (decayed counts of accepted and rejected draft positions, prior 0.8)
    and the engine's measured ``row_cost``. When no draft pays, it proposes nothing for a
    doubling number of steps (up to 32), then tries one token again to re-measure."""

    proposer: Proposer | None  # None: a draft model proposes for the whole batch
    k_max: int
    row_cost: float = 0.0
    accepted: float = 0.0  # decayed count of accepted draft positions
    rejected: float = 0.0  # decayed count of rejected ones
    skip: int = 0  # steps left without proposing (backoff)
    backoff: int = 1

    @property
    def alpha(self) -> float:
        return (self.accepted + 1.6) / (self.accepted + self.rejected + 2.0)

    def length(self, room: int) -> int:
        """How many tokens to draft next: the best length, at most ``room`` (0: none)."""
        k = best_k(self.alpha, self.row_cost, self.k_max)
        if k == 0:
            if self.skip > 0:
                self.skip -= 1
                return 0
            self.skip, self.backoff = self.backoff, min(32, 2 * self.backoff)
            k = 1  # explore: the acceptance rate may have changed
        return max(0, min(k, room))

    def propose(self, ids: list[int], room: int) -> list[int]:
        """Draft tokens for the next step from this sequence's own proposer."""
        assert self.proposer is not None
        k = self.length(room)
        if k == 0:
            self.proposer.propose(ids, 0)  # keep any index current
            return []
        return self.proposer.propose(ids, k)

    def update(self, proposed: int, accepted: int) -> None:
        """After a verification of ``proposed`` drafts of which ``accepted`` were accepted
        (the walk stops at the first rejection)."""
        self.accepted = 0.8 * self.accepted + accepted
        self.rejected = 0.8 * self.rejected + (1 if accepted < proposed else 0)
        if accepted:
            self.backoff = 1
