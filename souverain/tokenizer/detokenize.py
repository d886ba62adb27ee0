"""Streaming ids -> text without ever showing half a character.

Decoding one token at a time is wrong twice over: a byte-level or byte-fallback token can hold
part of a UTF-8 character (it decodes to U+FFFD until the rest arrives), and SentencePiece
decoders drop the leading space of whatever they are given first. So, as in vLLM/TGI, every
step decodes a short window of recent ids twice, with and without the new ones, and emits the
difference once it no longer ends in U+FFFD.

Worked example (SentencePiece): window ``[▁Hello]`` decodes to ``"Hello"``; adding ``▁world``
decodes ``[▁Hello, ▁world]`` to ``"Hello world"``, so the delta is ``" world"`` with its space,
which decoding ``[▁world]`` alone (``"world"``) would lose.
"""

from __future__ import annotations

from collections.abc import Sequence

from souverain.tokenizer.base import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt ids kept as decoding context: enough to cover a character split over several tokens.
_CONTEXT_IDS = 6


class IncrementalDetokenizer:
    """Text deltas of a generation, one token at a time.

    Concatenated deltas, once `flush` is called, equal ``tokenizer.decode(generated ids)`` when
    the prompt is empty or ends with a special token (every chat prompt). After a plain-text
    prompt they equal the text the generated ids add to the prompt: a SentencePiece ``▁Paris``
    after "The capital of France is" streams as ``" Paris"``, the way completion APIs return
    it, where ``decode([▁Paris])`` alone gives ``"Paris"``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = self._context(prompt_ids)
        self._ids: list[int] = context
        self._prefix = 0  # start of the decode window
        self._read = len(context)  # ids before this were emitted (or are prompt context)
        self._prefix_text: str | None = self._decode(context)
        self.text = ""
        """All text emitted so far."""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _context(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in prompt_ids]
        # Text after a control token starts afresh (as decode(generated) does); the context only
        # matters after plain text, where the first generated word may continue it.
        for k in range(len(ids) - 1, -1, -1):
            if ids[k] in self.tokenizer.special_ids:
                ids = ids[k + 1 :]
                break
        ids = ids[-_CONTEXT_IDS:]
        # A window that starts inside a character would decode to U+FFFD: drop those ids.
        while ids and _REPLACEMENT in self._decode(ids):
            ids = ids[1:]
        return ids

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        # Hold back while the tail is an incomplete character, or nothing new decoded yet
        # (a skipped special token, or a token whose text only shows with the next one).
        if new_text.endswith(_REPLACEMENT) or len(new_text) <= len(self._prefix_text):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """Everything still held back (call once generation has ended)."""
        if self._read >= len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(self._prefix_text):
            self._read = len(self._ids)
            return ""
        return self._emit(new_text)

    def _emit(self, new_text: str) -> str:
        assert self._prefix_text is not None
        delta = new_text[len(self._prefix_text) :]
        # Slide the window: the ids just emitted become the context of the next step.
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        self.text += delta
        return delta
