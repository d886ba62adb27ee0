"""The JSONL rules every reader of a training or batch file shares: the upload check
(`souverain.server.finetuning.check_upload`) and `data.validate_file` read a file the same way,
so they agree on what a line is and on its number.

- A line ends at ``\\n`` only (a ``\\r`` before it is dropped: CRLF files work). ``\\x1c``-``\\x1e``,
  ``\\x85``, U+2028, U+2029 are characters inside a line, not line breaks (``str.splitlines``
  would split there, and an upload made only of them would look like blank lines).
- A blank line holds only JSON whitespace (space, tab, ``\\r``); it is skipped but counted.
- A UTF-8 BOM at the very start of the file is dropped (Windows editors write one).
- Each line is UTF-8 on its own and one JSON value as RFC 8259 says: ``NaN``, ``Infinity`` and
  numbers beyond float range (``1e309``), which Python's `json` accepts, are refused, as are
  integers over Python's digit limit and nesting deeper than `MAX_DEPTH`.
- With ``max_line_bytes``, a longer line is refused as soon as it is seen, without reading it
  whole (the server's per-line limit at upload).

Every problem is a `JSONLError` (a `ValueError`) carrying the 1-based line number and a
sentence without it; nothing else escapes (no `RecursionError`, no `StopIteration`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import IO, Any

from souverain import strictjson

MAX_DEPTH = 100  # arrays/objects inside each other; tool schemas nest a few levels
DEFAULT_MAX_LINE_BYTES = 1 << 20  # the server's default per-line limit at upload (1 MiB)
_JSON_SPACE = b" \t\r"
_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JSONLError(ValueError):
    """Line ``line`` (1-based) of a JSONL file is not acceptable; ``reason`` says why and
    what to do, without the line number."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def lines(f: IO[bytes], max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """``(number, line)`` for every line of the binary file ``f`` (1-based; blank lines
    included, line ends removed), one at a time. A line over ``max_line_bytes`` (line end
    excluded) raises `JSONLError` having read at most ``max_line_bytes + 2`` bytes of it."""
    cap = max_line_bytes + 2 if max_line_bytes is not None else -1
    n = 0
    while raw := f.readline(cap):
        n += 1
        ended = raw.endswith(b"\n")
        line = raw[:-1] if ended else raw
        if line.endswith(b"\r"):
            line = line[:-1]
        if n == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        if max_line_bytes is not None and len(line) > max_line_bytes:
            raise JSONLError(n, f"is longer than the limit of {_size(max_line_bytes)} per "
                                "line; split it into several samples, one per line")
        yield n, line


def is_blank(line: bytes) -> bool:
    return not line.strip(_JSON_SPACE)


def parse(line: bytes, n: int) -> Any:
    """The JSON value of line ``n``, or `JSONLError` saying what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONLError(n, f"is not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the "
                            "line); save the file as UTF-8") from None
    try:
        obj = strictjson.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONLError(n, f"is not valid JSON ({exc.msg} at column {exc.colno}); a JSONL "
                            "file holds one complete JSON value per line") from None
    except RecursionError:
        raise JSONLError(n, f"nests arrays or objects more than {MAX_DEPTH} deep; flatten "
                            "it") from None
    except ValueError as exc:  # NaN / Infinity / 1e309, or an integer with too many digits
        if "integer string conversion" in str(exc):
            raise JSONLError(n, "holds an integer of more than 4300 digits; write it as a "
                                "string") from None
        raise JSONLError(n, f"is not valid JSON: {exc}; write finite numbers (JSON has no "
                            "NaN or Infinity)") from None
    problem = _walk(obj, surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    if problem:
        raise JSONLError(n, problem)
    return obj


def _walk(obj: Any, surrogates: bool) -> str | None:
    """What is wrong with a parsed value: nesting over `MAX_DEPTH`, or (when the text has
    surrogate escapes) a string that is not Unicode text (a lone UTF-16 surrogate)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, dict):
            children: Any = o.values()
            strings: Any = o.keys()
        elif isinstance(o, list):
            children, strings = o, ()
        else:
            children, strings = (), (o,) if isinstance(o, str) else ()
        if surrogates and not all(_is_text(s) for s in strings):
            return ("holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                    "pair), which is not text; fix the string")
        if depth > MAX_DEPTH and isinstance(o, (dict, list)):
            return f"nests arrays or objects more than {MAX_DEPTH} deep; flatten it"
        stack.extend((c, depth + 1) for c in children)
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _size(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"
