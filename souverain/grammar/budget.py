"""What keeps a constrained answer finite: the shortest closing we can force, and bounded numbers.

A grammar says what may come next, not how long the answer may grow: a small model can write
``"population": 1111111…`` until ``max_tokens`` cuts it, and the client gets broken JSON. So
the processor (`GrammarProcessor`) also knows the token budget and uses two tools from here:

- `Closer.closing`: from a matcher state, the length (in tokens) of a closing that we can force
  token by token: the forced bytes the grammar allows (keys of required properties...), else
  the token that closes most (in a string: ``"`` and the runs it starts; outside: runs of ``}``
  and ``]``), else a comma after a value (the next required key follows), else a minimal value (``0``, ``null``, ``false``, ``""``, ``[]``, ``{}``), else
  the longest allowed token (enum values, required text). Whether the state is in a string
  comes from `JsonScan`, which follows the answer's bytes. The policy depends only on the state, so taking its first token leaves a
  closing one token shorter: once the budget left equals the closing, forcing it ends the
  answer exactly on the last token, valid (and `finish_reason` says ``length``, as it must).
- `JsonScan` also bounds numbers: a JSON number has at most 16 digits before the point (2^53 has 16), 16 after
  it and 3 in the exponent; at the cap, tokens that would add a digit to that part are banned.
  Whitespace is already fixed by the JSON options (one layout, no free whitespace).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLOSING_CAP = 512
PROBE = 8  # allowed tokens tried for "completes the answer" at each end of the length order  # a closing longer than this (or none found) = no guarantee for this grammar
INT_DIGITS, FRAC_DIGITS, EXP_DIGITS = 16, 16, 3
_CLOSERS = frozenset(b'"}]')
_CAPS = {"int": INT_DIGITS, "frac": FRAC_DIGITS, "exp": EXP_DIGITS}
TAG = b"<tool_call>"
_MINIMAL = (b"0", b"null", b"false", b"true", b'""', b"[]", b"{}")


class Closer:
    """The closing policy over one vocabulary (shared by every processor of a tokenizer)."""

    def __init__(self, table: list[bytes], special: set[int], eos: list[int], width: int):
        self.width = width
        self.eos = set(eos)
        self.table, self.special = table, special
        closers, in_string, commas, minimal = [], [], [], []
        rank = {m: i for i, m in enumerate(_MINIMAL)}
        lengths = np.zeros(width, dtype=np.int32)
        for i in range(width):
            b = table[i] if i < len(table) else b""
            if i in self.eos:
                lengths[i] = -1  # a closing never picks EOS: it ends where EOS is allowed
                continue
            if i in special:
                lengths[i] = 1  # a control token (e.g. [TOOL_CALLS]) the grammar may force
                continue
            lengths[i] = len(b)
            core = b.strip(b" ")
            if b[:1] == b'"' and all(c in _CLOSERS for c in b) and b.count(b'"') == 1:
                in_string.append((-len(b), i))  # ends a string, then closes what it can
            elif core and all(c in b"}]" for c in core):
                closers.append((-len(core), len(b), i))
            elif core == b",":
                commas.append((len(b), i))
            if core in rank:
                minimal.append((rank[core], len(b), i))
        self.closers = np.array([i for *_, i in sorted(closers)], dtype=np.int64)
        self.string_closers = np.array([i for *_, i in sorted(in_string)], dtype=np.int64)
        self.commas = np.array([i for *_, i in sorted(commas)], dtype=np.int64)
        self.minimal = np.array([i for *_, i in sorted(minimal)], dtype=np.int64)
        self.lengths = lengths
        self.words = (width + 31) // 32
        self.digit_start = np.array(
            [i for i in range(min(width, len(table)))
             if i not in special and table[i][:1].isdigit()], dtype=np.int64)

    def first_allowed(self, bits8: np.ndarray, ids: np.ndarray) -> int | None:
        if not len(ids):
            return None
        hit = (bits8[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1
        j = int(np.argmax(hit))
        return int(ids[j]) if hit[j] else None

    def pick(self, matcher: Any, bits: np.ndarray, in_string: bool) -> int | None:
        """The closing policy's next token (the state's mask in ``bits``)."""
        bits8 = bits.view(np.uint8)
        # a comma only where a value just ended (it is not allowed where a value must start):
        # it ends a number that digits could extend forever
        for ids in ((self.string_closers,) if in_string
                    else (self.closers, self.commas, self.minimal)):
            t = self.first_allowed(bits8, ids)
            if t is not None:
                return t
        allowed = np.flatnonzero(np.unpackbits(bits8, bitorder="little")[:self.width])
        allowed = allowed[self.lengths[allowed] >= 0]
        if not len(allowed):
            return None
        order = allowed[np.argsort(-self.lengths[allowed], kind="stable")]
        # a token that completes the answer (e.g. the ">" of "</tool_call>") before one that
        # only goes on: among the longest and the shortest few
        for t in dict.fromkeys([*order[:PROBE].tolist(), *order[-PROBE:].tolist()]):
            if matcher.consume_token(t):
                done = matcher.is_accepting()
                matcher.rollback(1)
                if done:
                    return int(t)
        return int(order[0])

    def closing(self, matcher: Any, scan: JsonScan, bits: np.ndarray,
                cap: int = CLOSING_CAP) -> list[int] | None:
        """The policy's closing path from ``matcher``'s state, whose bytes ``scan`` has read
        (both are consumed: pass copies): the tokens that complete the answer, each accepted
        by the matcher; [] when it may end now, None when none is found within ``cap``."""
        path: list[int] = []
        while True:
            if matcher.is_error():
                return None
            if matcher.is_accepting():
                return path
            if matcher.is_stopped() or len(path) >= cap:
                return None
            forced = matcher.compute_ff_tokens()
            if forced:
                if not matcher.consume_tokens(forced):
                    return None
                path += forced
                for t in forced:
                    self.feed(scan, t)
                continue
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            t = self.pick(matcher, bits, scan.in_string)
            if t is None or not matcher.consume_token(t):
                return None
            path.append(t)
            self.feed(scan, t)

    def feed(self, scan: JsonScan, token: int) -> None:
        if token in self.special:
            scan.reset()  # [TOOL_CALLS], [ARGS]: the JSON of a call starts after it
        elif token < len(self.table):
            scan.feed(self.table[token])


class JsonScan:
    """Follows the answer's bytes: inside a JSON string or not, and whether the last lexeme
    is a number with how many digits in its current part. Bytes before the JSON (a tool-call
    tag) contain no quote or number, so they leave it at rest."""

    def __init__(self) -> None:
        self.reset()

    def copy(self) -> JsonScan:
        other = JsonScan.__new__(JsonScan)
        other.__dict__.update(self.__dict__)
        return other

    def reset(self) -> None:
        self.tail = b""
        self.in_string = self.escape = False
        self.prev = 0  # the last byte outside strings and numbers that is not a space
        self.part: str | None = None  # "int" / "frac" / "exp" while in a number
        self.digits = 0

    def feed(self, data: bytes) -> None:
        tail = self.tail + data
        at = tail.rfind(TAG)
        if at >= 0:  # a Hermes call starts: whatever free text came before is not JSON
            self.reset()
            data = tail[at + len(TAG):]
            tail = data
        self.tail = tail[-len(TAG):]
        for c in data:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == 0x5C:  # backslash
                    self.escape = True
                elif c == 0x22:
                    self.in_string = False
                    self.prev = c
                continue
            if self.part is not None:
                if 0x30 <= c <= 0x39:
                    self.digits += 1
                    continue
                if c == 0x2E and self.part == "int":
                    self.part, self.digits = "frac", 0
                    continue
                if c in (0x65, 0x45) and self.part in ("int", "frac"):
                    self.part, self.digits = "exp", 0
                    continue
                if c in (0x2B, 0x2D) and self.part == "exp" and self.digits == 0:
                    continue
                self.part = None
            if c == 0x22:
                self.in_string = True
            elif (c == 0x2D or 0x30 <= c <= 0x39) and self.prev in (0, 0x3A, 0x2C, 0x5B):
                self.part, self.digits = "int", int(c != 0x2D)
            elif c != 0x20:
                self.prev = c

    def full(self) -> bool:
        """True when one more digit would pass the cap of the number's current part."""
        cap = _CAPS.get(self.part or "")
        return cap is not None and self.digits >= cap
