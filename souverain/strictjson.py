"""JSON as RFC 8259 has it: Python's `json` also accepts ``NaN``, ``Infinity`` and numbers
beyond float range (``1e309`` -> inf), which no other JSON reader accepts and which cannot be
written back as JSON. `loads` refuses them with a `ValueError` naming the literal; everything
else is `json.loads` (a `json.JSONDecodeError`, a `RecursionError` when too deep, a
`ValueError` for an integer over Python's digit limit)."""

from __future__ import annotations

import json
import math
from typing import Any


def loads(text: str | bytes) -> Any:
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise ValueError(f"{shown} is out of the range of a 64-bit float")
    return value
