"""Grammars for structured output (JSON object / JSON schema) and for tool calls.

All grammars are llguidance Lark text; JSON parts are ``%json`` blocks compiled by llguidance
from the JSON schema itself. JSON is written in the `json.dumps` style (``", "`` and ``": "``
separators, no other whitespace): exactly what Mistral models saw in training for tool calls,
and one fixed layout, so that even a random-weight model never wanders off in whitespace.
With a SentencePiece tokenizer (dummy prefix) the output may start with one space.

Tool-call formats (what `Tokenizer.parse_tool_calls` reads back):

- Mistral v2..v7: ``[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`` (the list may
  start with one space: SentencePiece writes it so);
- Mistral v11+ (tokenizers with ``[ARGS]``): ``[TOOL_CALLS]f[ARGS]{...}`` once per call;
- every other tokenizer (Hermes / Qwen style): ``<tool_call>\\n{"name": "f", "arguments":
  {...}}\\n</tool_call>`` once per call (the newlines are optional).

``tool_choice="auto"``: the model may write free text, or calls, or text then calls, then
EOS. The free text can contain neither a control token nor (Hermes) the ``<tool_call>`` tag,
so once the model starts the tool-call format ([TOOL_CALLS], or the first ``<tool_call>``
through a lazy trigger) the rest must be valid calls: whatever the model writes, the parser
reads back either plain text or text plus valid calls, never a broken call. (Only a Mistral
tokenizer with no tool-call token, v1, gets None for "auto": nothing to constrain.)

Generated calls carry no call id (``[CALL_ID]`` / ``"id"``): the server assigns ids when it
parses them, as mistral-common's own grammars do.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from souverain.grammar.processor import GrammarError, GrammarProcessor
from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.mistral import MistralCommonTokenizer

JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TEXT = r"/(.|\n)+/"  # any text; control tokens are never matched by a regex
_HERMES_TEXT = r"/(.|\n)+/ & ~/(?s:.*)<tool_call>(?s:.*)/"


# -- JSON ---------------------------------------------------------------------------------------


def json_processor(tokenizer: Tokenizer, schema: dict[str, Any] | None, *,
                   vocab_size: int) -> GrammarProcessor:
    """Output = one JSON value valid against ``schema`` (None: any JSON object), then EOS."""
    what = "JSON schema" if schema is not None else "JSON object format"
    body = _json_block(schema if schema is not None else {"type": "object"}, "response_format")
    lead = '" "? ' if tokenizer.dummy_prefix else ""
    grammar = f"%llguidance {{}}\nstart: {lead}value\nvalue: {body}\n"
    return GrammarProcessor(tokenizer, grammar, vocab_size=vocab_size, what=what,
                            bound_numbers=True)


def _check_schema(schema: Any, where: str) -> dict[str, Any]:
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(
            f"The {where} JSON schema must be a JSON object, got {type(schema).__name__}; "
            'send a schema such as {"type": "object", "properties": {...}}.'
        )
    try:
        import jsonschema

        jsonschema.validators.validator_for(schema).check_schema(schema)
    except ImportError:  # pragma: no cover - jsonschema is a dependency
        pass
    except Exception as err:  # jsonschema.SchemaError, or an unknown $schema dialect
        message = getattr(err, "message", None) or str(err).splitlines()[0]
        raise GrammarError(
            f"The {where} JSON schema is invalid ({message}); fix it so that it is a valid "
            "JSON Schema (draft 2020-12 or the dialect its $schema names)."
        ) from err
    return schema


def _json_block(schema: Any, where: str) -> str:
    """A Lark ``%json`` block for ``schema`` with our whitespace options."""
    schema = copy.deepcopy(_check_schema(schema, where))
    options = dict(schema.get("x-guidance") or {}) if isinstance(schema.get("x-guidance"), dict) \
        else {}
    options.update(JSON_OPTIONS)
    schema["x-guidance"] = options
    return "%json " + json.dumps(schema, ensure_ascii=False)


# -- tool calls ---------------------------------------------------------------------------------


def tool_call_processor(tokenizer: Tokenizer, tools: list[dict[str, Any]], *, choice: str,
                        vocab_size: int, parallel: bool = True) -> GrammarProcessor | None:
    """Force the output to be tool calls in the model's own format (see the module docstring).

    ``choice``: ``"any"`` / ``"required"`` (one call, or one or more when ``parallel``),
    ``"auto"`` (free text or calls), or a function name (exactly one call of it).
    """
    functions = _functions(tools)
    if not isinstance(choice, str) or not choice:
        raise GrammarError(
            f"tool_choice={choice!r} is not understood; use \"auto\", \"any\", \"required\", "
            "\"none\" or the name of one of the tools."
        )
    if choice in ("any", "required", "auto"):
        chosen, many = functions, parallel
    else:
        chosen = [f for f in functions if f[0] == choice]
        if not chosen:
            names = ", ".join(repr(f[0]) for f in functions)
            raise GrammarError(
                f"tool_choice names the function {choice!r}, which is not among the tools "
                f"({names}); name one of them or use \"any\"."
            )
        many = False
    auto = choice == "auto"
    what = "tool definitions"
    form = _tool_format(tokenizer)
    if form is None:
        if auto:
            return None
        raise GrammarError(
            f"The {tokenizer.kind} tokenizer has no tool-call format (no [TOOL_CALLS] token); "
            "use a model with a v2 or later Mistral tokenizer, or leave tool_choice on auto."
        )
    kind, ids = form
    if kind == "hermes":
        grammar = _hermes_grammar(chosen, many, auto)
    elif kind == "v11":
        grammar = _mistral_v11_grammar(chosen, many, auto, ids)
    else:
        grammar = _mistral_list_grammar(chosen, many, auto, ids)
    # numbers are bounded where the whole answer is calls (free text may hold any number)
    return GrammarProcessor(tokenizer, grammar, vocab_size=vocab_size, what=what,
                            bound_numbers=not auto)


def _functions(tools: Any) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, parameters schema)]`` from La Plateforme tool definitions (validated)."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools must be a non-empty list of {\"type\": \"function\", "
                           "\"function\": {...}} objects; send at least one tool.")
    out: list[tuple[str, dict[str, Any]]] = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            raise GrammarError(
                f"tools[{index}] has no \"function\" object; write it as "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}.'
            )
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise GrammarError(
                f"tools[{index}] has the function name {name!r}; a name must be 1 to 64 "
                "letters, digits, underscores, dots or dashes."
            )
        if any(name == n for n, _ in out):
            raise GrammarError(f"Two tools are named {name!r}; give every function its own name.")
        params = function.get("parameters")
        if params is None or params == {}:
            params = {"type": "object"}
        params = _check_schema(params, f"parameters of function {name!r}")
        if "type" not in params:
            params = {**params, "type": "object"}  # arguments are always a JSON object
        out.append((name, params))
    return out


def _tool_format(tokenizer: Tokenizer) -> tuple[str, dict[str, int | None]] | None:
    """``("list" | "v11", special ids)`` for tokenizers with Mistral's tool-call tokens (any
    file format), ``("hermes", {})`` for the others, None for a mistral-common tokenizer
    without tool calls (v1)."""
    ids = {name: tokenizer.control_id(f"[{name}]") for name in ("TOOL_CALLS", "ARGS")}
    if ids["TOOL_CALLS"] is not None:
        return ("v11" if ids["ARGS"] is not None else "list"), ids
    if isinstance(tokenizer, MistralCommonTokenizer):
        return None
    return "hermes", {}


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _call_rules(functions: list[tuple[str, dict[str, Any]]], head: Any, tail: str,
                rule: str = "call") -> str:
    """``call: call_0 | call_1 ...`` with ``call_i: head(name) %json{params} tail``."""
    rules = [f"{rule}: " + " | ".join(f"{rule}_{i}" for i in range(len(functions)))]
    for i, (name, params) in enumerate(functions):
        rules.append(f"{rule}_{i}: {head(name)} {rule}_args_{i}{tail}")
        rules.append(f"{rule}_args_{i}: "
                     f"{_json_block(params, f'parameters of function {name!r}')}")
    return "\n".join(rules) + "\n"


def _name_and_arguments(name: str) -> str:
    return _lit('{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ')


def _mistral_list_grammar(functions, many: bool, auto: bool, ids: dict[str, int | None]) -> str:
    calls = 'call (", " call)*' if many else "call"
    return "\n".join([
        "%llguidance {}",
        f"start: TEXT? calls?\nTEXT: {_TEXT}" if auto else "start: calls",
        f'calls: <[{ids["TOOL_CALLS"]}]> " "? "[" {calls} "]"',
        _call_rules(functions, _name_and_arguments, ' "}"'),
    ])


def _mistral_v11_grammar(functions, many: bool, auto: bool, ids: dict[str, int | None]) -> str:
    tc, args = ids["TOOL_CALLS"], ids["ARGS"]
    return "\n".join([
        "%llguidance {}",
        f"start: TEXT? calls?\nTEXT: {_TEXT}" if auto else "start: calls",
        "calls: call+" if many else "calls: call",
        _call_rules(functions, lambda n: f"<[{tc}]> {_lit(n)} <[{args}]>", ""),
    ])


def _hermes_grammar(functions, many: bool, auto: bool) -> str:
    tail = ' "}" "\\n"? "</tool_call>"'

    def head(name: str) -> str:
        return _lit("<tool_call>") + ' "\\n"? ' + _name_and_arguments(name)

    more = ' ("\\n"? call)*' if many else ""
    if auto:
        # Free text cannot contain "<tool_call>"; the lazy trigger ends at its first
        # occurrence and valid calls must follow, then EOS: every tag opened is a valid call.
        return "\n".join([
            "%llguidance {}",
            f"start: TEXT? | trigger first{more}",
            'trigger[lazy]: ANY "<tool_call>"',
            "ANY: /(.|\\n)*/",
            f"TEXT: {_HERMES_TEXT}",
            _call_rules(functions, lambda n: '"\\n"? ' + _name_and_arguments(n), tail,
                        rule="first"),
            _call_rules(functions, head, tail),
        ])
    return "\n".join(["%llguidance {}", f"start: call{more}", _call_rules(functions, head, tail)])


# -- prompts ------------------------------------------------------------------------------------


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """A Hermes-style system prompt describing ``tools`` and the ``<tool_call>`` format, for
    chat templates that ignore the ``tools`` argument (the server prepends it)."""
    listed = []
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        entry = {
            "type": "function",
            "function": {
                "name": function.get("name"),
                "description": function.get("description") or "",
                "parameters": function.get("parameters") or {"type": "object", "properties": {}},
            },
        }
        listed.append(json.dumps(entry, ensure_ascii=False))
    return (
        "# Tools\n\n"
        "You may call one or more functions to answer the user. The available functions are "
        "described by JSON signatures inside <tools></tools> tags:\n"
        "<tools>\n" + "\n".join(listed) + "\n</tools>\n\n"
        "To call a function, answer with a JSON object holding its name and arguments inside "
        "<tool_call></tool_call> tags, one block per call:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n'
        "</tool_call>"
    )
