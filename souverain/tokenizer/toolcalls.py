"""Reading tool calls back out of generated ids, in the formats models are trained to emit.

Mistral (mistral-common v2..v7): ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]``.
Mistral v11+: ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` (or without ``[CALL_ID]``), once per call.
Hermes / Qwen-style chat templates: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Every call comes back in the La Plateforme JSON shape
``{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}``.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def new_tool_call_id() -> str:
    """A fresh call id: 9 characters of [a-zA-Z0-9], the only form Mistral v3+ accepts back."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def make_tool_call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    """One call in the JSON shape; ``arguments`` may be a dict or an already-encoded string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not call_id or call_id == "null":
        call_id = new_tool_call_id()
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _calls_from_json(payload: Any) -> list[dict[str, Any]]:
    # v2..v7 emit a list; a single object is accepted too because small models often drop the [].
    items = payload if isinstance(payload, list) else [payload]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise TypeError("a tool call is not an object with a name")
        calls.append(make_tool_call(item["name"], item.get("arguments", {}), item.get("id")))
    return calls


def split_mistral_tool_calls(
    ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    tool_calls_id: int,
    args_id: int | None = None,
    call_id_id: int | None = None,
) -> tuple[str, list[dict[str, Any]]] | None:
    """``(content, calls)`` from Mistral-format ids, or None when the calls do not parse
    (e.g. generation stopped mid-JSON), so the caller can return everything as text instead."""
    ids = list(ids)
    if tool_calls_id not in ids:
        return decode(ids), []
    first = ids.index(tool_calls_id)
    content = decode(ids[:first])
    segments: list[list[int]] = []
    for token in ids[first:]:
        if token == tool_calls_id:
            segments.append([])
        else:
            segments[-1].append(token)
    calls: list[dict[str, Any]] = []
    try:
        for seg in segments:
            if args_id is not None and args_id in seg:
                # v11+: name[CALL_ID]id[ARGS]{json}
                cut = seg.index(args_id)
                head, args = seg[:cut], seg[cut + 1 :]
                call_id = None
                if call_id_id is not None and call_id_id in head:
                    at = head.index(call_id_id)
                    head, call_id = head[:at], decode(head[at + 1 :]).strip()
                arguments = json.loads(decode(args))
                calls.append(make_tool_call(decode(head).strip(), arguments, call_id))
            else:
                text = decode(seg).strip()
                if text:
                    calls.extend(_calls_from_json(json.loads(text)))
    except (ValueError, TypeError):
        return None
    return content, calls


def split_tagged_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``(content, calls)`` from ``<tool_call>{json}</tool_call>`` blocks in ``text``; a text
    with no block, or a block that is not valid JSON, comes back whole as content."""
    bodies = _TAGGED.findall(text)
    if not bodies:
        return text, []
    try:
        calls = [c for body in bodies for c in _calls_from_json(json.loads(body))]
    except (ValueError, TypeError):
        return text, []
    return _TAGGED.sub("", text).strip(), calls
