"""The rules of one training sample (a JSONL line), before any tokenization.

Each check raises `LineProblem` with one sentence naming what is wrong in the line and how to
fix it; `data.validate_file` turns it into a `LineError` with the line's number. The sample
formats are described in data.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["pretrain", "instruct", "function_calling", "preference"]
_TOOL_CALL_ID = re.compile(r"^[A-Za-z0-9]{9}$")
_ROLES = ("system", "user", "assistant", "tool")


class LineProblem(Exception):
    """What is wrong with one line (the message names it and the fix)."""


def kind_of(obj: dict[str, Any]) -> Kind:
    """The sample kind an object's keys say it is."""
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "function_calling" if obj.get("tools") else "instruct"
    if "text" in obj:
        return "pretrain"
    raise LineProblem(
        f"object with keys {sorted(obj)[:5]} is no known sample; write "
        '{"text": ...} (pretrain), {"messages": [...]} (instruct) or '
        '{"prompt", "chosen", "rejected"} (preference)'
    )


def check_keys(obj: dict[str, Any], allowed: set[str]) -> None:
    extra = set(obj) - allowed
    if extra:
        raise LineProblem(
            f"unknown key(s) {', '.join(sorted(extra))}; allowed here: {', '.join(sorted(allowed))}"
        )


def check_tools(tools: Any) -> set[str]:
    """The tool names of a ``tools`` list."""
    if not isinstance(tools, list) or not tools:
        raise LineProblem(
            '"tools" must be a non-empty list of {"type": "function", '
            '"function": {"name", "description", "parameters"}}'
        )
    names = set()
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise LineProblem(
                f'tools[{j}] must be {{"type": "function", "function": '
                '{"name": ..., "parameters": {...}}}'
            )
        names.add(fn["name"])
    return names


def fits(n_tokens: int, seq_len: int, what: str) -> None:
    if n_tokens > seq_len:
        raise LineProblem(
            f"the {what} is {n_tokens} tokens, over seq_len {seq_len}; it is "
            "not truncated: raise seq_len or shorten/split the sample"
        )


def answer_message(value: Any, name: str) -> dict[str, Any]:
    """The ``chosen`` / ``rejected`` answer of a preference pair as an assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value:
        return {"role": "assistant", "content": value}
    if (
        isinstance(value, dict)
        and value.get("role", "assistant") == "assistant"
        and (isinstance(value.get("content"), str) and value["content"])
    ):
        return {"role": "assistant", "content": value["content"]}
    raise LineProblem(f'"{name}" must be a non-empty string or one assistant message')


# -- conversations ------------------------------------------------------------------------------


@dataclass
class _Turns:
    """What checking the next message needs to know of the ones before it."""

    tool_names: set[str] | None
    prev: str | None = None  # the previous message's role
    pending: list[str] = field(default_factory=list)  # tool-call ids not answered yet
    seen_ids: set[str] = field(default_factory=set)


def check_messages(messages: Any, tool_names: set[str] | None, *, final: str) -> list[bool]:
    """Validate roles, order, weights and tool calls; return the per-message trained flags.
    ``final``: "assistant" (instruct) or "prompt" (the prompt of a preference pair)."""
    if not isinstance(messages, list) or not messages:
        raise LineProblem('"messages" must be a non-empty list of {"role", "content"} objects')
    turns = _Turns(tool_names)
    trained: list[bool] = []
    for i, m in enumerate(messages, start=1):
        role = _role_and_weight(m, i)
        _BY_ROLE[role](m, i, turns)
        if role in ("system", "user", "tool") and not isinstance(m.get("content"), str):
            raise LineProblem(f'message {i} ({role}) needs a string "content"')
        trained.append(role == "assistant" and m.get("weight", 1) == 1)
        turns.prev = role
    _check_end(turns, trained, final)
    return trained


def _role_and_weight(m: Any, i: int) -> str:
    if not isinstance(m, dict) or m.get("role") not in _ROLES:
        raise LineProblem(
            f"message {i} must be an object whose role is one of {', '.join(_ROLES)}"
        )
    role: str = m["role"]
    if "weight" in m:
        if role != "assistant":
            raise LineProblem(
                f'message {i} ({role}) has a "weight"; only assistant messages have one'
            )
        if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
            raise LineProblem(f'message {i}: "weight" must be 0 or 1, not {m["weight"]!r}')
    return role


def _system(m: dict[str, Any], i: int, turns: _Turns) -> None:
    if i != 1:
        raise LineProblem(
            f"message {i} is a system message; only one is allowed, and it must come first"
        )


def _user(m: dict[str, Any], i: int, turns: _Turns) -> None:
    if turns.prev not in (None, "system", "assistant"):
        raise LineProblem(
            f"message {i} (user) follows a {turns.prev} message; a user turn "
            "follows the system prompt or an assistant answer"
        )
    if turns.pending:
        raise LineProblem(
            f"message {i} (user) comes before the tool results of "
            f"call(s) {', '.join(turns.pending)}; add the tool messages first"
        )


def _assistant(m: dict[str, Any], i: int, turns: _Turns) -> None:
    prev = turns.prev
    if prev not in ("user", "tool"):
        raise LineProblem(
            f"message {i} (assistant) follows "
            f"{'nothing' if prev is None else 'a ' + prev + ' message'}"
            "; an assistant answers a user or tool message"
        )
    if turns.pending:
        raise LineProblem(
            f"message {i} (assistant) comes before the tool results "
            f"of call(s) {', '.join(turns.pending)}; add the tool messages"
        )
    calls = m.get("tool_calls")
    if calls is None:
        content = m.get("content")
        if not isinstance(content, str) or not content:
            raise LineProblem(
                f'message {i} (assistant) needs a non-empty string "content" (or "tool_calls")'
            )
        return
    if turns.tool_names is None:
        raise LineProblem(
            f'message {i} has "tool_calls" but the sample has no '
            'top-level "tools" list; add the tool definitions'
        )
    if not isinstance(calls, list) or not calls:
        raise LineProblem(f'message {i}: "tool_calls" must be a non-empty list')
    for call in calls:
        _check_call(call, i, turns.tool_names, turns.seen_ids)
        turns.pending.append(call["id"])


def _tool(m: dict[str, Any], i: int, turns: _Turns) -> None:
    if turns.prev not in ("assistant", "tool"):
        raise LineProblem(
            f"message {i} (tool) must follow an assistant message with tool_calls"
        )
    tid = m.get("tool_call_id")
    if tid not in turns.pending:
        where = "was already answered" if tid in turns.seen_ids else "matches no earlier call"
        raise LineProblem(
            f"message {i} (tool): tool_call_id {tid!r} {where}; give "
            "the id of the assistant's tool call it answers"
        )
    turns.pending.remove(tid)


_BY_ROLE: dict[str, Callable[[dict[str, Any], int, _Turns], None]] = {
    "system": _system,
    "user": _user,
    "assistant": _assistant,
    "tool": _tool,
}


def _check_end(turns: _Turns, trained: list[bool], final: str) -> None:
    """A training conversation ends with an answer to learn; a preference prompt ends with
    the turn the answers reply to."""
    if final == "assistant":
        if turns.prev != "assistant":
            raise LineProblem(
                f"the last message is a {turns.prev} message; a training "
                "conversation ends with the assistant answer to learn"
            )
        if not any(trained):
            raise LineProblem(
                'every assistant message has "weight": 0, so there is '
                "nothing to learn; set weight 1 on at least one"
            )
    elif turns.prev not in ("user", "tool") or turns.pending:
        raise LineProblem(
            "the prompt of a preference pair must end with a user (or tool) "
            "message that the chosen/rejected answers reply to"
        )


def _check_call(call: Any, i: int, tool_names: set[str], seen: set[str]) -> None:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise LineProblem(
            f'message {i}: each tool call is {{"id", "type": "function", '
            '"function": {"name", "arguments"}}'
        )
    cid = call.get("id")
    if not isinstance(cid, str) or not _TOOL_CALL_ID.match(cid):
        raise LineProblem(
            f"message {i}: tool call id {cid!r} must be exactly 9 letters or "
            'digits (e.g. "a1B2c3D4e")'
        )
    if cid in seen:
        raise LineProblem(f"message {i}: tool call id {cid!r} is used twice; ids are unique")
    seen.add(cid)
    if fn["name"] not in tool_names:
        raise LineProblem(
            f"message {i}: tool call to {fn['name']!r}, which is not in "
            f'"tools" ({", ".join(sorted(tool_names))})'
        )
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise LineProblem(
                f"message {i}: the arguments of {fn['name']!r} are not valid JSON"
            ) from None
    if not isinstance(args, dict):
        raise LineProblem(f"message {i}: the arguments of {fn['name']!r} must be a JSON object")
