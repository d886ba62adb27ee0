"""`SamplingParams`: how a request wants its tokens picked (validated where it enters), and
`TokenLogprob`: what it gets back about them. `souverain.engine.sampler` applies them to a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from souverain.errors import RequestError

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's _SAMPLING_EPS)
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts

INTERACTIVE, BATCH = 0, 1  # request priorities: lower is admitted first
_DEFAULT_PRIORITY: ContextVar[int] = ContextVar("souverain_default_priority",
                                                default=INTERACTIVE)


@contextlib.contextmanager
def default_priority(priority: int) -> Iterator[None]:
    """`SamplingParams` made inside this block (in this task, and in the tasks and threads it
    starts from here) get ``priority`` unless they name one. The batch runner wraps each line
    in ``default_priority(BATCH)`` around the same service code interactive requests go
    through, so its sequences queue behind interactive ones in the scheduler."""
    token = _DEFAULT_PRIORITY.set(priority)
    try:
        yield
    finally:
        _DEFAULT_PRIORITY.reset(token)


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
    # k: each prompt token after the first gets its logprob and the k most likely tokens
    # (`RequestOutput.prompt_logprobs`); such a request bypasses the prefix cache
    prompt_logprobs: int | None = None
    # the scheduler admits waiting sequences in priority order, lower first (FIFO within one
    # priority), and preempts the highest first: INTERACTIVE (0) before BATCH (1). Default:
    # the surrounding `default_priority` block's, else INTERACTIVE.
    priority: int = field(default_factory=_DEFAULT_PRIORITY.get)

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
        if self.prompt_logprobs is not None and not (
                _is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            fail(f"prompt_logprobs={self.prompt_logprobs!r} must be None or an integer in "
                 f"[0, {MAX_TOP_LOGPROBS}]")
        if not _is_int(self.priority):
            fail(f"priority={self.priority!r} must be an integer (lower runs first)")
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
class TokenLogprob:
    """The chosen token's logprob and the ``top_logprobs`` most likely tokens (best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
