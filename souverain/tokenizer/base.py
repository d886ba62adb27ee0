"""`Tokenizer`: the one interface every tokenizer kind (mistral-common, GGUF, Hugging Face) offers.

A `typing.Protocol`: code that takes a tokenizer types it ``Tokenizer`` and uses only what is
declared here. The two implementations (`MistralCommonTokenizer`, `TemplateTokenizer` for GGUF
and Hugging Face files) subclass it explicitly, so a missing method is an error when they are
built, and they inherit its defaults (`control_id`, ``__repr__``). Anything else an
implementation offers (its ``mistral`` or ``backend`` object) is reached after an
``isinstance`` check on that class.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """Text <-> token ids, plus the chat, tool-call and fill-in-the-middle formats of a model.

    Messages and tools use the La Plateforme / OpenAI JSON shapes:
    ``{"role": "system"|"user"|"assistant"|"tool", "content": str, "tool_calls": [...],
    "tool_call_id": str, "name": str, "prefix": bool}`` and
    ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.

    ``bos=True`` in `encode` means "this text starts a sequence": the BOS id is added when the
    tokenizer's own convention adds one (always for Mistral; for GGUF and Hugging Face
    tokenizers only when their metadata says ``add_bos_token``), so that `encode(text)` gives
    what the reference tokenizer gives for the same text.
    """

    kind: str
    """Human-readable kind for `souverain inspect`, e.g. ``"mistral v3 (sentencepiece)"``."""
    vocab_size: int
    bos_id: int | None
    eos_ids: list[int]
    """Every id that ends generation (EOS plus the end-of-turn tokens of the chat format)."""
    chat_template: str | None
    """Jinja source when `encode_chat` renders a template, else None."""
    special_ids: frozenset[int]
    """Ids of control tokens (BOS, [INST], <|im_start|>...): never text the user typed."""
    dummy_prefix: bool
    """True when encoding writes a space (SentencePiece's ``▁``) before text that starts a
    sequence or a turn, so that generated text may start with one."""

    @abstractmethod
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of plain ``text`` (special-token strings in it are matched as in the
        reference tokenizer: never for Mistral, yes for GGUF/Hugging Face)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; control tokens are dropped unless ``skip_special_tokens`` is False."""

    @abstractmethod
    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids of a conversation in the model's chat format."""

    @abstractmethod
    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        """Prompt ids for fill-in-the-middle (code between ``prompt`` and ``suffix``)."""

    def control_id(self, piece: str) -> int | None:
        """The id of control token ``piece`` (e.g. ``"[TOOL_CALLS]"``), or None when this
        vocabulary has no such token."""
        return None

    @abstractmethod
    def parse_tool_calls(self, ids: Sequence[int]) -> tuple[str, list[dict[str, Any]]]:
        """Split generated ids into ``(content text, tool calls in the JSON shape)``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}, vocab {self.vocab_size}>"
