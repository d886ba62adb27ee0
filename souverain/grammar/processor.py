"""`GrammarProcessor`: a logits processor that bans every token a grammar does not allow next."""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

import llguidance
import numpy as np
import torch

from souverain.errors import RequestError
from souverain.grammar.budget import Closer, JsonScan
from souverain.grammar.vocab import cached_token_table, ll_tokenizer
from souverain.tokenizer.base import Tokenizer

_NEG_INF = float("-inf")
ZONE = 24  # steer within this many tokens of the closing (grows with the largest jump seen)
RECHECK = 16  # far from the budget's end, the closing is measured every this many tokens
STEER_CANDIDATES = 8  # the model's best tokens checked one by one near the budget's end
# mask byte -> the caps of its 8 tokens (bit k set: token 8*byte_index + k allowed)
_LUT = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                              bitorder="little").astype(bool),
                np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)


class GrammarError(RequestError):
    """A JSON schema, tool definition or grammar that cannot be enforced while decoding."""


class _Compiled:
    """What every copy of one processor shares: the compiled grammar (a pristine matcher that
    is only ever deep-copied), the llguidance tokenizer and the per-vocabulary constants."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, vocab_size: int, what: str,
                 bound_numbers: bool) -> None:
        self.ll = ll_tokenizer(tokenizer)
        self.bound_numbers = bound_numbers
        self.grammar = grammar
        self.what = what
        # LLMatcher never raises for a bad grammar: it starts in an error state instead
        self.matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(
                f"The {what} cannot be enforced while decoding "
                f"({_short(self.matcher.get_error())}); fix it, or leave out the JSON-schema "
                "keywords and regex features it names."
            )
        self.vocab_size = int(vocab_size)  # the model's logits width
        self.ll_vocab = self.ll.vocab_size  # the tokenizer's: the mask covers these ids
        self.words = (self.ll_vocab + 31) // 32
        self.width = min(self.vocab_size, self.ll_vocab)  # ids the mask decides; the rest: banned
        eos = sorted({int(i) for i in tokenizer.eos_ids if 0 <= int(i) < self.width})
        if not eos:
            raise GrammarError(
                "The tokenizer declares no end-of-sequence token inside the model's vocabulary, "
                "so a constrained generation could never end; use a tokenizer with an EOS id."
            )
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.eos_np = np.array(eos, dtype=np.int64)
        self.table, self.special = cached_token_table(tokenizer)
        self.closer = _closer(tokenizer, self.table, self.special, eos, self.width)
        found = self.closer.closing(self.matcher.deep_copy(), JsonScan(),
                                    np.zeros(self.words, dtype=np.int32))
        # the fewest tokens of an answer this processor can guarantee (None: no bound found)
        self.shortest = len(found) if found is not None else None


_closers: weakref.WeakKeyDictionary[Tokenizer, dict[int, Closer]] = weakref.WeakKeyDictionary()
_closers_lock = threading.Lock()


def _closer(tokenizer: Tokenizer, table: list[bytes], special: set[int], eos: list[int],
            width: int) -> Closer:
    """One `Closer` per tokenizer and logits width, built once (a pass over the vocabulary)."""
    with _closers_lock:
        per_width = _closers.setdefault(tokenizer, {})
        found = per_width.get(width)
        if found is None:
            found = per_width[width] = Closer(table, special, eos, width)
        return found


class GrammarProcessor:
    """Logits processor ``(ids generated so far, logits row) -> row`` enforcing one grammar.

    It keeps an llguidance matcher and the ids it consumed; each call consumes the new ids
    (or rebuilds from scratch when ``ids`` does not extend them: another sequence, a restart),
    then sets the logits of every token the grammar forbids to ``-inf``. Once the grammar is
    complete only the tokenizer's EOS ids remain. A matcher in an error state (a token the
    grammar refused was forced in) ends the sequence with EOS and sets `error`.
    One processor serves one sequence at a time; `clone` gives an independent copy.

    With ``budget`` set (the most tokens the answer may have), it also keeps the answer
    closable in time (see `_steer` and grammar/budget.py): whatever the model prefers, the
    answer is complete when the budget runs out. JSON grammars also cap numbers' digits.
    """

    def __init__(self, tokenizer: Tokenizer, grammar: str, *, vocab_size: int,
                 what: str = "grammar", bound_numbers: bool = False) -> None:
        self._setup(_Compiled(tokenizer, grammar, vocab_size, what, bound_numbers))

    def _setup(self, compiled: _Compiled, budget: int | None = None) -> None:
        self._c = compiled
        self._matcher = compiled.matcher.deep_copy()
        self._consumed: list[int] = []
        self._bits = np.zeros(compiled.words, dtype=np.int32)
        self._scratch = np.zeros(compiled.words, dtype=np.int32)
        self._cap = np.empty((compiled.words * 4, 8), dtype=np.float32)
        self._cap_flat = self._cap.reshape(-1)
        self._lock = threading.Lock()
        self._scan = JsonScan()
        self._steerable = True
        self._zone = ZONE
        self._path: tuple[int, list[int]] | None = None  # (ids consumed then, closing path)
        # (ids consumed then, {token checked then: the closing path after it})
        self._candidates: tuple[int, dict[int, list[int]]] = (-1, {})
        self.budget = budget
        self.error: str | None = None

    @property
    def shortest(self) -> int | None:
        """The fewest tokens of an answer this processor can always close within (None: it
        found no closing, e.g. a regex it cannot steer): the smallest ``budget`` to accept."""
        return self._c.shortest

    @property
    def what(self) -> str:
        """What the grammar enforces, for messages ("JSON schema", "tool definitions"...)."""
        return self._c.what

    @property
    def grammar(self) -> str:
        """The llguidance grammar (Lark text) this processor enforces."""
        return self._c.grammar

    def clone(self) -> GrammarProcessor:
        """A fresh processor (no ids consumed) sharing this one's compiled grammar."""
        other = object.__new__(GrammarProcessor)
        other._setup(self._c, self.budget)
        return other

    def reset(self) -> None:
        self._matcher.reset()
        self._consumed = []
        self._path = None
        self._candidates = (-1, {})
        self._scan.reset()
        self._steerable = True
        self.error = None

    # -- the processor -----------------------------------------------------------------------
    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._advance(ids)
            return self._mask(logits)

    def _advance(self, ids: list[int]) -> None:
        n = len(self._consumed)
        if len(ids) < n or ids[:n] != self._consumed:
            self.reset()
            n = 0
        m = self._matcher
        for token in ids[n:]:
            token = int(token)
            self._consumed.append(token)
            if self.error is None and not m.consume_token(token):
                self.error = (_first_line(m.get_error()) or
                              f"token {token} is not allowed by the {self._c.what}")
            self._c.closer.feed(self._scan, token)

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        c, m = self._c, self._matcher
        row = logits.reshape(-1)
        if self.error is None and m.is_error():
            self.error = _first_line(m.get_error()) or f"the {c.what} matcher failed"
        if self.error is not None or m.is_stopped():
            return _only_eos(row, c.eos)
        bits = self._bits
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)  # releases the GIL
        accepting = m.is_accepting()
        if not (accepting or bits.any()):
            self.error = f"the {c.what} allows no next token"
            return _only_eos(row, c.eos)
        # bitmask -> per-token cap (+inf allowed, -inf banned), 8 tokens per mask byte through
        # a lookup table; min(logit, cap) bans without touching allowed logits (no NaN from
        # a +inf logit either)
        np.take(_LUT, bits.view(np.uint8), axis=0, out=self._cap)
        cap = self._cap_flat
        if accepting:
            cap[c.eos_np] = np.inf  # every EOS id, not only the ones llguidance knows
        if c.bound_numbers and self._scan.full():
            digits = cap[c.closer.digit_start]
            cap[c.closer.digit_start] = -np.inf  # one more digit would pass the number's cap
            if not (cap[:c.width] > 0).any():  # a schema that needs more digits: let it
                cap[c.closer.digit_start] = digits
        head = row[:c.width]
        capped = torch.from_numpy(cap[:c.width])
        if head.is_contiguous() and head.dtype == torch.float32 and head.device.type == "cpu":
            torch.minimum(head, capped, out=head)
        else:
            head.copy_(torch.minimum(head, capped.to(head.device, head.dtype)))
        if row.numel() > c.width:
            row[c.width:] = _NEG_INF  # ids the tokenizer does not have
        if self.budget is not None:
            self._steer(row, accepting)
        return row

    # -- the budget ------------------------------------------------------------------------------
    def _closing(self, matcher: Any, scan: JsonScan) -> list[int] | None:
        return self._c.closer.closing(matcher, scan, self._scratch)

    def _stored_path(self, n: int) -> list[int] | None:
        """The rest of the closing path stored at an earlier step, when the ids since then
        followed it (or were the candidate it was computed for)."""
        at, paths = self._candidates
        if at >= 0 and n == at + 1 and self._consumed[at] in paths:
            return paths[self._consumed[at]]
        if self._path is None:
            return None
        at, path = self._path
        done = self._consumed[at:n]
        return path[len(done):] if path[:len(done)] == done else None

    def _steer(self, row: torch.Tensor, accepting: bool) -> None:
        """Keep the answer closable within the budget. Invariant: a concrete token path that
        completes the answer (checked by the matcher) and fits in the tokens left is known.
        With ``left`` tokens left (this one included), a token is allowed only if a closing
        path of at most ``left - 1`` tokens follows it; the known path's next token always
        qualifies. Far from the end every token is allowed (no single token has moved the
        closing by more than the zone); near it the model's best few tokens are checked."""
        left = self.budget - len(self._consumed)  # type: ignore[operator]
        if left <= 0 or not self._steerable:
            return
        n = len(self._consumed)
        stored = self._stored_path(n)
        if stored is not None and self._path is not None and self._path[0] != n:
            # far from the end, the closing is measured again every RECHECK tokens only
            if n - self._path[0] < RECHECK and left - 1 >= 2 * (len(stored) + self._zone) + 64:
                return
        if self._path is None or self._path[0] != n:
            fresh = self._closing(self._matcher.deep_copy(), self._scan.copy())
            if fresh is not None and (stored is None or len(fresh) <= len(stored)):
                stored = fresh
            if stored is None:  # no closing found: the grammar alone decides from here on
                self._steerable = False
                return
            self._path = (n, stored)
        path = self._path[1]
        if left - 1 >= len(path) + self._zone:
            return
        c = self._c
        head = row[:c.width]
        count = int(torch.isfinite(head).sum())
        if count == 0:
            return
        order = torch.topk(head, min(STEER_CANDIDATES, count)).indices.tolist()
        keep: list[int] = []
        checked: dict[int, list[int]] = {}
        self._candidates = (n, checked)
        eos = set(c.eos_np.tolist())
        for t in order:
            if not bool(torch.isfinite(head[t])) or (path and t == path[0]):
                continue
            if t in eos:
                if accepting:
                    keep.append(t)
                continue
            m, scan = self._matcher.deep_copy(), self._scan.copy()
            if not m.consume_token(t):
                continue
            c.closer.feed(scan, t)
            after = self._closing(m, scan)
            if after is None:
                continue
            self._zone = max(self._zone, len(after) - len(path) + 2)
            if len(after) <= left - 1:
                keep.append(t)
                checked[t] = after
        if path:
            keep.append(path[0])  # the rest of the path is one shorter: within the budget
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long)
        values = row[idx].clone()
        row.fill_(_NEG_INF)
        row[idx] = torch.where(torch.isfinite(values), values, torch.zeros_like(values))

    def __repr__(self) -> str:
        return f"<GrammarProcessor {self._c.what}, {len(self._consumed)} ids consumed>"


def _only_eos(row: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    keep = row[eos]
    if not bool(torch.isfinite(keep).any()):
        keep = torch.zeros_like(keep)  # e.g. EOS masked for min_tokens: the grammar wins
    row.fill_(_NEG_INF)
    row[eos] = keep
    return row


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0] if text else ""


def _short(message: str) -> str:
    """A compiler message on one line, without its source excerpt and caret lines."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not re.match(r"^(\d+ \||\^+$)", line)]
    text = " ".join(" ".join(kept).split())
    text = re.sub(r"^at \d+\(\d+\): ", "", text)
    text = re.sub(r"^failed to compile JSON schema: ", "", text) or "unknown error"
    text = text.rstrip(".")
    return text if len(text) <= 300 else text[:297] + "..."
