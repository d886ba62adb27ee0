"""`TemplateTokenizer`: a `tokenizers` BPE plus a Jinja chat template (GGUF and Hugging Face models).

Encoding a chat = render the template to text, then tokenize that text with special tokens
matched, exactly as transformers' ``apply_chat_template(..., tokenize=True)`` does. One thing
is done better by default: control-token strings that appear inside the user's own strings
(``"<|im_end|>"`` typed in a message) are encoded as plain text, so a message cannot forge a
turn boundary (transformers' ``sanitize_control_tokens=True``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers

from souverain.errors import TokenizerError
from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.chat_template import render_chat, template_literal_text
from souverain.tokenizer.toolcalls import split_mistral_tool_calls, split_tagged_tool_calls

# Tokens that end a turn in the common chat formats. A model's declared EOS is often not the
# one its template writes (SmolLM2 GGUFs exported with eos=<|im_start|> exist), so every one of
# these that the template writes and the vocabulary has also stops generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<|return|>",
    "<|call|>",
)

# Private-use code points that wrap control tokens found in user strings (same as transformers).
_MARK_START = "\U000f0000"
_MARK_END = "\U000f0001"


def end_of_turn_ids(
    backend: tokenizers.Tokenizer, chat_template: str | None, declared: Iterable[int | None]
) -> list[int]:
    """Declared stop ids (EOS, EOT, ...) plus the end-of-turn tokens the template writes."""
    ids: list[int] = []
    for i in declared:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if chat_template:
        literals = template_literal_text(chat_template)
        for token in END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is not None and token in literals and token_id not in ids:
                ids.append(token_id)
    return ids


class TemplateTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with BOS/EOS conventions and an optional Jinja chat template.

    ``add_bos`` is the model's own convention (``tokenizer.ggml.add_bos_token`` /
    ``add_bos_token``): `encode(text, bos=True)` prepends BOS only when it is set, which is what
    the reference tokenizer does by default. ``eos=True`` always appends the EOS id.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        kind: str,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        special_tokens: dict[str, str],
        extra_eos_ids: Iterable[int | None] = (),
        dummy_prefix: bool = False,
    ) -> None:
        self.backend = backend
        self.kind = kind
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template or None
        # bos_token/eos_token/... as the template sees them (transformers' special_tokens_map).
        self.special_tokens = dict(special_tokens)
        # SentencePiece's "▁" before the text: the backend's Metaspace pre-tokenizer adds it,
        # except to text that already starts with a space, where SentencePiece still adds it.
        self.dummy_prefix = dummy_prefix
        self.eos_ids = end_of_turn_ids(backend, self.chat_template, [eos_id, *extra_eos_ids])
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added = added
        self._plain_backend: tokenizers.Tokenizer | None = None
        self._lock = threading.Lock()
        self._control_re, self._marks_re = self._control_token_patterns()

    # -- plain text ---------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._encode_text(text)
        if bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if self.dummy_prefix and text.startswith((" ", "\u2581")):
            text = "\u2581" + text  # "  x" -> "▁▁▁x" as SentencePiece does, not "▁▁x"
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        if not self.chat_template:
            raise TokenizerError(
                f"This {self.kind} tokenizer has no chat template, so it cannot encode a chat; "
                "use the completions endpoint with a plain prompt, or a model that ships a template."
            )
        if not messages:
            raise TokenizerError("The conversation is empty; send at least one message.")
        last = messages[-1]
        continue_final = (
            isinstance(last, dict) and last.get("role") == "assistant" and bool(last.get("prefix"))
        )
        messages = [self._mark(m) for m in messages]
        rendered = render_chat(
            self.chat_template,
            [{k: v for k, v in m.items() if k != "prefix"} for m in messages],
            self._mark(tools) if tools else None,
            add_generation_prompt and not continue_final,
            self.special_tokens,
            continue_final_message=continue_final,
        )
        return self._encode_rendered(rendered)

    def _control_token_patterns(self) -> tuple[re.Pattern[str], re.Pattern[str]]:
        # Control tokens: every special added token, plus the non-special added tokens the
        # template itself writes (transformers' default rule).
        literals = template_literal_text(self.chat_template) if self.chat_template else ""
        tokens = {
            t.content
            for t in self._added.values()
            if t.special or (t.content in literals and not t.content.isspace())
        }
        longest_first = sorted(tokens, key=len, reverse=True)
        control = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        marks = re.compile(
            f"{_MARK_START}({control.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]"
        )
        return control, marks

    def _mark(self, obj: Any) -> Any:
        """Wrap control tokens in user-supplied strings with markers (dict keys are left alone)."""
        if isinstance(obj, str):
            obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")  # no forged markers
            return self._control_re.sub(f"{_MARK_START}\\g<0>{_MARK_END}", obj)
        if isinstance(obj, dict):
            return {k: self._mark(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self._mark(v) for v in obj]
        return obj

    def _encode_rendered(self, rendered: str) -> list[int]:
        # split() gives [text, marked token, text, ...], None for a lone marker (a template
        # string method can separate a marker from its token: drop it but keep the break).
        pieces = self._marks_re.split(rendered)
        ids = self._encode_text(pieces[0])
        newline = self.backend.encode("\n", add_special_tokens=False).ids
        for index, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = index % 2 == 1
            ids += self._encode_piece(piece, as_text, newline)
        return ids

    def _encode_piece(self, piece: str, as_text: bool, newline: list[int]) -> list[int]:
        backend = self._plain() if as_text else self.backend
        # Encode after a newline so a SentencePiece tokenizer does not add the prefix space it
        # adds at the start of a text, then drop the newline's ids again.
        ids = backend.encode("\n" + piece, add_special_tokens=False).ids
        if ids[: len(newline)] == newline:
            return ids[len(newline) :]
        return backend.encode(piece, add_special_tokens=False).ids

    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token strings as ordinary text."""
        with self._lock:
            if self._plain_backend is None:
                plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
                plain.encode_special_tokens = True
                self._plain_backend = plain
            return self._plain_backend

    # -- FIM, tools ----------------------------------------------------------------------------

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        raise TokenizerError(
            f"Fill-in-the-middle is only supported with Mistral tokenizers, not this {self.kind} "
            "one; use a Codestral model with its tokenizer.model.v3 or tekken.json."
        )

    def control_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def parse_tool_calls(self, ids: Sequence[int]) -> tuple[str, list[dict[str, Any]]]:
        ids = [int(i) for i in ids]
        tool_calls_id = self.control_id("[TOOL_CALLS]")
        if tool_calls_id is not None and tool_calls_id in ids:
            # A Mistral model in GGUF or Hugging Face form emits the same ids as with mistral-common.
            parsed = split_mistral_tool_calls(
                ids,
                self.decode,
                tool_calls_id,
                args_id=self.control_id("[ARGS]"),
                call_id_id=self.control_id("[CALL_ID]"),
            )
            return parsed if parsed is not None else (self.decode(ids), [])
        return split_tagged_tool_calls(self.decode(ids))
