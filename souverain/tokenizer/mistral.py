"""Mistral tokenizers (v1, v2, v3, v7, v11+, tekken) through `mistral-common`.

Chat, tool and FIM encodings are produced by mistral-common itself, so they are exactly what
Mistral's own stack produces: we only translate the La Plateforme JSON shapes into its classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken
from pydantic import ValidationError

from souverain.errors import TokenizerError
from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.toolcalls import split_mistral_tool_calls

# What mistral-common (or our translation) raises for a conversation it cannot encode.
_REQUEST_ERRORS = (MistralCommonException, ValidationError, ValueError, TypeError, AssertionError)


class MistralCommonTokenizer(Tokenizer):
    """A mistral-common tokenizer file (``tokenizer.model.v3``, ``tekken.json``, ...).

    ``add_generation_prompt`` is ignored by `encode_chat`: in Mistral formats the generation
    prompt is part of the last user/tool turn (``...[/INST]``), and an assistant last message
    must carry ``"prefix": True`` to be continued (mistral-common rejects it otherwise).
    """

    def __init__(self, mistral: MistralTokenizer, path: Path) -> None:
        self.mistral = mistral
        self.path = path
        raw = mistral.instruct_tokenizer.tokenizer
        self._raw = raw
        self.version: TokenizerVersion = raw.version
        self._tekken = isinstance(raw, Tekkenizer)
        self.kind = (
            f"mistral {self.version.value} ({'tekken' if self._tekken else 'sentencepiece'})"
        )
        self.vocab_size = raw.n_words
        self.bos_id = raw.bos_id
        self.eos_ids = [raw.eos_id]
        self.chat_template = None
        self.special_ids = frozenset(int(i) for i in raw.special_ids)
        self.dummy_prefix = not self._tekken  # SentencePiece adds it, tekken does not

    # -- plain text ---------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return list(self._raw.encode(text, bos=bos, eos=eos))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        if self._tekken:
            return self._raw.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)
        return self._decode_spm_keeping_specials(ids)

    def _decode_spm_keeping_specials(self, ids: list[int]) -> str:
        # mistral-common's KEEP policy returns raw pieces for sentencepiece ("▁Hello"); we want
        # text, so decode each run of ordinary tokens and put the control tokens between them.
        # sentencepiece strips the leading "▁" of every decode call: give it back to runs that
        # do not start the text, as "<s>[INST] Hello[/INST]" shows it.
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = self._raw.decode(run, special_token_policy=SpecialTokenPolicy.IGNORE)
                if out and self._raw.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in ids:
            if i in self.special_ids:
                flush()
                out.append(self._raw.id_to_piece(i))
            else:
                run.append(i)
        flush()
        return "".join(out)

    # -- chat, tools, FIM -----------------------------------------------------------------------

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        try:
            request = ChatCompletionRequest(
                messages=[_to_mistral_message(m) for m in messages],
                tools=[_to_mistral_tool(t) for t in tools] if tools else None,
            )
            return list(self.mistral.encode_chat_completion(request).tokens)
        except _REQUEST_ERRORS as err:
            raise TokenizerError(
                f"The conversation cannot be encoded in the {self.kind} chat format "
                f"({_first_line(err)}); fix the messages (roles must alternate user/assistant, "
                "tool results must follow tool calls, and only a last assistant message with "
                '"prefix": true can be continued).'
            ) from err

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        if self.version == TokenizerVersion.v1:
            raise TokenizerError(
                f"The {self.kind} tokenizer has no fill-in-the-middle tokens; use a model whose "
                "tokenizer is v2 or later (e.g. Codestral, tokenizer.model.v3 or tekken.json)."
            )
        try:
            return list(self.mistral.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens)
        except _REQUEST_ERRORS as err:
            raise TokenizerError(
                f"The {self.kind} tokenizer cannot encode this fill-in-the-middle request "
                f"({_first_line(err)}); use a FIM-capable tokenizer such as Codestral's."
            ) from err

    def parse_tool_calls(self, ids: Sequence[int]) -> tuple[str, list[dict[str, Any]]]:
        tool_calls_id = self.control_id("[TOOL_CALLS]")
        if self.version == TokenizerVersion.v1 or tool_calls_id is None:
            return self.decode(ids), []
        parsed = split_mistral_tool_calls(
            ids,
            self.decode,
            tool_calls_id,
            args_id=self.control_id("[ARGS]"),
            call_id_id=self.control_id("[CALL_ID]"),
        )
        # Calls that do not parse (cut by max_tokens, invalid JSON) are returned as text, never lost.
        return parsed if parsed is not None else (self.decode(ids), [])

    def control_id(self, piece: str) -> int | None:
        try:
            token = int(self._raw.get_special_token(piece))
        except (ValueError, KeyError):
            return None
        # sentencepiece answers the <unk> id for a piece it does not know.
        return token if token in self.special_ids else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _content(message: dict[str, Any]) -> Any:
    content = message.get("content")
    # La Plateforme clients send content=None (or "") on assistant turns that only call tools.
    return content if content not in ("",) else None


def _to_mistral_message(message: dict[str, Any]) -> Any:
    """One La Plateforme JSON message -> the mistral-common message class for its role.

    Only the fields that class knows are passed (clients add others, e.g. "name" on user
    messages), and pydantic validates their types.
    """
    if not isinstance(message, dict):
        raise TypeError(f"a message must be a JSON object, got {type(message).__name__}")
    role = message.get("role")
    if role == "system":
        return SystemMessage.model_validate({"content": message.get("content")})
    if role == "user":
        return UserMessage.model_validate({"content": message.get("content")})
    if role == "assistant":
        calls = message.get("tool_calls") or None
        return AssistantMessage.model_validate(
            {
                "content": _content(message),
                "tool_calls": [_to_mistral_call(c) for c in calls] if calls else None,
                "prefix": bool(message.get("prefix", False)),
            }
        )
    if role == "tool":
        return ToolMessage.model_validate(
            {
                "content": message.get("content"),
                "tool_call_id": message.get("tool_call_id"),
                "name": message.get("name"),
            }
        )
    raise ValueError(f"unknown role {role!r} (expected system, user, assistant or tool)")


def _to_mistral_call(call: dict[str, Any]) -> ToolCall:
    function = call.get("function") or {}
    return ToolCall(
        id=call.get("id") or "null",
        # model_validate: arguments may be a JSON string or a dict (mistral-common encodes both)
        function=FunctionCall.model_validate(
            {"name": function.get("name"), "arguments": function.get("arguments")}
        ),
    )


def _to_mistral_tool(tool: dict[str, Any]) -> Tool:
    function = tool.get("function") or {}
    return Tool(
        function=Function.model_validate(
            {
                "name": function.get("name"),
                "description": function.get("description") or "",
                "parameters": function.get("parameters") or {},
            }
        )
    )


def is_mistral_tokenizer_file(path: str | os.PathLike[str]) -> bool:
    """True for a file name mistral-common can load (tekken*.json, *.model, *.model.vN[mM])."""
    return is_tekken(Path(path)) or is_sentencepiece(Path(path))


def load_mistral_file(path: str | os.PathLike[str]) -> MistralCommonTokenizer:
    """Load one mistral-common tokenizer file; TokenizerError names the problem and the fix."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(
            f"Tokenizer file {path} does not exist; pass the path of a mistral-common tokenizer "
            "file such as tokenizer.model.v3 or tekken.json."
        )
    if not is_mistral_tokenizer_file(path):
        raise TokenizerError(
            f"{path.name} is not named like a mistral-common tokenizer (tekken*.json, "
            "tokenizer.model or *.model.vN); pass the right file or restore its original name."
        )
    try:
        mistral = MistralTokenizer.from_file(str(path))
    except Exception as err:  # sentencepiece, json and mistral-common all raise their own types
        raise TokenizerError(
            f"Tokenizer file {path} could not be read ({_first_line(err)}); it is corrupt or "
            "truncated: download it again."
        ) from err
    return MistralCommonTokenizer(mistral, path)
