"""`GrammarProcessor`: a logits processor that bans every token a grammar does not allow next."""

from __future__ import annotations

import re
import threading

import llguidance
import numpy as np
import torch

from souverain.errors import RequestError
from souverain.grammar.vocab import ll_tokenizer
from souverain.tokenizer.base import Tokenizer

_NEG_INF = float("-inf")
# mask byte -> the caps of its 8 tokens (bit k set: token 8*byte_index + k allowed)
_LUT = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                              bitorder="little").astype(bool),
                np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)


class GrammarError(RequestError):
    """A JSON schema, tool definition or grammar that cannot be enforced while decoding."""


class _Compiled:
    """What every copy of one processor shares: the compiled grammar (a pristine matcher that
    is only ever deep-copied), the llguidance tokenizer and the per-vocabulary constants."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, vocab_size: int, what: str) -> None:
        self.ll = ll_tokenizer(tokenizer)
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


class GrammarProcessor:
    """Logits processor ``(ids generated so far, logits row) -> row`` enforcing one grammar.

    It keeps an llguidance matcher and the ids it consumed; each call consumes the new ids
    (or rebuilds from scratch when ``ids`` does not extend them: another sequence, a restart),
    then sets the logits of every token the grammar forbids to ``-inf``. Once the grammar is
    complete only the tokenizer's EOS ids remain. A matcher in an error state (a token the
    grammar refused was forced in) ends the sequence with EOS and sets `error`.
    One processor serves one sequence at a time; `clone` gives an independent copy.
    """

    def __init__(self, tokenizer: Tokenizer, grammar: str, *, vocab_size: int,
                 what: str = "grammar") -> None:
        self._setup(_Compiled(tokenizer, grammar, vocab_size, what))

    def _setup(self, compiled: _Compiled) -> None:
        self._c = compiled
        self._matcher = compiled.matcher.deep_copy()
        self._consumed: list[int] = []
        self._bits = np.zeros(compiled.words, dtype=np.int32)
        self._cap = np.empty((compiled.words * 4, 8), dtype=np.float32)
        self._cap_flat = self._cap.reshape(-1)
        self._lock = threading.Lock()
        self.error: str | None = None

    @property
    def grammar(self) -> str:
        """The llguidance grammar (Lark text) this processor enforces."""
        return self._c.grammar

    def clone(self) -> GrammarProcessor:
        """A fresh processor (no ids consumed) sharing this one's compiled grammar."""
        other = object.__new__(GrammarProcessor)
        other._setup(self._c)
        return other

    def reset(self) -> None:
        self._matcher.reset()
        self._consumed = []
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
        head = row[:c.width]
        capped = torch.from_numpy(cap[:c.width])
        if head.is_contiguous() and head.dtype == torch.float32 and head.device.type == "cpu":
            torch.minimum(head, capped, out=head)
        else:
            head.copy_(torch.minimum(head, capped.to(head.device, head.dtype)))
        if row.numel() > c.width:
            row[c.width:] = _NEG_INF  # ids the tokenizer does not have
        return row

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
