"""Rendering Hugging Face / GGUF Jinja chat templates the way `transformers` does.

Templates come from model files, so they are untrusted code: they run in Jinja's immutable
sandbox. The environment mirrors transformers' (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a non-HTML-escaping ``tojson``, ``raise_exception``, ``strftime_now``, and the
``{% generation %}`` tag some templates use to mark assistant text) so that a template renders
here exactly as it renders in ``apply_chat_template``.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from souverain.errors import TokenizerError

# Appended to the content of a message to continue, to find where that content ends once
# rendered (the same trick as transformers' continue_final_message).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged (transformers uses it
    to build assistant masks; without the tag such templates would not even parse)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template (cached: the same template serves every request)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as err:
        raise TokenizerError(
            f"The model's chat template is not valid Jinja ({err}); fix tokenizer.chat_template "
            "in the model file or pass a template that parses."
        ) from err


@lru_cache(maxsize=16)
def template_literal_text(source: str) -> str:
    """Every literal string of the template, NUL-joined, to test which tokens it writes itself."""
    env = compile_chat_template(source).environment
    ast = env.parse(source)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(literals))


def prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A deep copy of La Plateforme messages in the shape chat templates expect.

    Keys whose value is None are dropped (templates test ``is defined``, and would print
    "None"), and tool-call ``arguments`` given as a JSON string become a dict, because templates
    write them with ``| tojson`` (vLLM does the same).
    """
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TokenizerError(
                f"A chat message must be a JSON object, got {type(message).__name__}; send "
                'messages like {"role": "user", "content": "..."}.'
            )
        m = {k: copy.deepcopy(v) for k, v in message.items() if v is not None}
        for call in m.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass  # not JSON: leave the string as the client sent it
        out.append(m)
    return out


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
    continue_final_message: bool = False,
) -> str:
    """The prompt text of a conversation, like transformers' ``apply_chat_template``."""
    template = compile_chat_template(source)
    messages = prepare_messages(messages)
    final = ""
    if continue_final_message:
        final = messages[-1].get("content") or ""
        if not isinstance(final, str):
            raise TokenizerError(
                "Only a text assistant message can be continued with prefix=true; send its "
                "content as a string."
            )
        messages[-1]["content"] = final + _CONTINUE_TAG
        add_generation_prompt = False
    try:
        rendered = template.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as err:
        raise TokenizerError(
            f"The model's chat template rejected the conversation ({err}); change the messages "
            "to what this model's template accepts (roles, order, tool fields)."
        ) from err
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if tag not in rendered:
            raise TokenizerError(
                "The chat template drops the content of the last assistant message, so it cannot "
                "be continued with prefix=true; send it without prefix."
            )
        at = rendered.rindex(tag)
        # A template that strips trailing spaces also ate the space of the tag: keep it stripped.
        if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:at]
        else:
            rendered = rendered[:at].rstrip()
    return rendered
