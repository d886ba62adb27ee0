"""Structure-aware chunking: sections -> passages the embedder can read whole.

Within one `Section` (same heading path, same page) text is cut at paragraph boundaries, a
paragraph too long for a chunk at sentence boundaries, and a sentence too long for a chunk at
word boundaries. Chunks hold about `target_tokens` tokens; consecutive chunks of a section share
about `overlap_tokens` (whole trailing sentences when they fit, else trailing words), so an
answer straddling a cut is still found whole in one of them. Chunks never cross sections.

Token counts are the embedder's own (its tokenizer's offsets over the section), and every
chunk's embedded text (heading path + blank line + text) is checked against
``max_tokens`` special tokens included; one that is still too long is halved until it fits, so
the embedder never refuses a chunk.
"""

from __future__ import annotations

import itertools
import re
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from souverain.rag.parse import ParsedDocument, Section

TARGET_TOKENS = 200
OVERLAP_TOKENS = 40
MAX_HEADING_TOKENS = 48
_SLAB_CHARS = 200_000  # a huge section is tokenized in slabs of this many chars (bounded memory)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’»)\]]*\s+")


class HFTokenizer(Protocol):
    """The embedder's Hugging Face tokenizer, as far as chunking calls it (`Embedder.tokenizer`;
    souverain's `Tokenizer` is a generation model's, with another interface)."""

    def __call__(self, text: str | list[str], **kwargs: Any) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Chunk:
    """A passage with its place in the document. `text` is shown to people, `embed_text`
    (heading path prepended) is what is embedded and full-text indexed."""

    text: str
    embed_text: str
    page: int | None
    heading: str | None
    start: int  # char offsets of `text` in ParsedDocument.text
    end: int
    tokens: int  # embedder tokens of embed_text, special tokens included


class _Span:
    """Token counts of any char span of one text, from one tokenizer pass with offsets."""

    def __init__(self, text: str, tokenizer: HFTokenizer):
        enc = tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, truncation=False
        )
        self.text = text
        self.starts = [s for s, _ in enc["offset_mapping"]]

    def ntok(self, a: int, b: int) -> int:
        return bisect_left(self.starts, b) - bisect_left(self.starts, a)

    def word_start_at_token(self, a: int, b: int, from_end: int) -> int:
        """Char offset of a word start roughly `from_end` tokens before `b` (>= a)."""
        hi = bisect_left(self.starts, b)
        idx = max(bisect_left(self.starts, a), hi - from_end)
        pos = self.starts[idx] if idx < len(self.starts) else b
        while pos < b and pos > a and not self.text[pos - 1].isspace():
            pos += 1  # inside a word (sub-word token): move to the next word
        return pos if pos < b else a

    def cut_by_tokens(self, a: int, b: int, size: int) -> list[tuple[int, int]]:
        """[a, b) cut every `size` tokens, at word starts when there is one nearby."""
        lo, hi = bisect_left(self.starts, a), bisect_left(self.starts, b)
        cuts = [a]
        for idx in range(lo + size, hi, size):
            pos = self.starts[idx]
            back = pos
            while back > cuts[-1] + 1 and not self.text[back - 1].isspace() and pos - back < 40:
                back -= 1
            pos = back if self.text[back - 1].isspace() else pos
            if pos > cuts[-1]:
                cuts.append(pos)
        cuts.append(b)
        return [(x, y) for x, y in itertools.pairwise(cuts) if y > x]


def _split(text: str, a: int, b: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    spans, pos = [], a
    for m in pattern.finditer(text, a, b):
        if m.start() > pos:
            spans.append((pos, m.start()))
        pos = m.end()
    if pos < b:
        spans.append((pos, b))
    return spans


def _slabs(text: str) -> Iterator[tuple[int, int]]:
    """[0, len) in pieces of at most ~_SLAB_CHARS, cut at a paragraph break, else a space."""
    pos = 0
    while len(text) - pos > _SLAB_CHARS:
        end = pos + _SLAB_CHARS
        cut = text.rfind("\n\n", pos + _SLAB_CHARS // 2, end)
        if cut < 0:
            cut = text.rfind(" ", pos + _SLAB_CHARS // 2, end)
        cut = end if cut < 0 else cut + 1
        yield pos, cut
        pos = cut
    yield pos, len(text)


def _heading_prefix(heading: str | None, tokenizer: HFTokenizer, max_heading_tokens: int) -> str:
    if not heading:
        return ""
    enc = tokenizer(
        heading, add_special_tokens=False, return_offsets_mapping=True, truncation=False
    )
    offsets = enc["offset_mapping"]
    if len(offsets) > max_heading_tokens:
        heading = heading[: offsets[max_heading_tokens - 1][1]] + "…"
    return heading + "\n\n"


def chunk_section(
    section: Section,
    tokenizer: HFTokenizer,
    *,
    target_tokens: int = TARGET_TOKENS,
    overlap_tokens: int = OVERLAP_TOKENS,
) -> Iterator[tuple[int, int]]:
    """Char spans [a, b) of `section.text`, one per chunk (before any length check)."""
    overlap_tokens = min(overlap_tokens, target_tokens // 4)
    unit_max = target_tokens - overlap_tokens  # a unit always fits after an overlap
    for s0, s1 in _slabs(section.text):
        span = _Span(section.text[s0:s1], tokenizer)
        text = span.text
        units: list[tuple[int, int]] = []
        for pa, pb in _split(text, 0, len(text), _PARAGRAPH_BREAK):
            if span.ntok(pa, pb) <= unit_max:
                units.append((pa, pb))
                continue
            for sa, sb in _split(text, pa, pb, _SENTENCE_END):
                if span.ntok(sa, sb) <= unit_max:
                    units.append((sa, sb))
                else:
                    units.extend(span.cut_by_tokens(sa, sb, unit_max))
        start: int | None = None
        end = 0
        for a, b in units:
            if start is None:
                start, end = a, b
            elif span.ntok(start, b) <= target_tokens:
                end = b
            else:
                yield s0 + start, s0 + end
                start, end = _overlap_start(span, start, end, overlap_tokens, a), b
        if start is not None:
            yield s0 + start, s0 + end


def _overlap_start(span: _Span, a: int, b: int, overlap: int, fallback: int) -> int:
    """Where the next chunk starts: trailing whole sentences of [a, b) worth <= `overlap`
    tokens (at least half of it), else trailing words worth ~`overlap` tokens."""
    if overlap <= 0:
        return fallback
    best = None
    for sa, _ in reversed(_split(span.text, a, b, _SENTENCE_END)):
        if span.ntok(sa, b) > overlap:
            break
        best = sa
    if best is not None and best > a and span.ntok(best, b) >= overlap // 2:
        return best
    pos = span.word_start_at_token(a, b, overlap)
    return pos if pos > a else fallback


def chunk_document(
    doc: ParsedDocument,
    tokenizer: HFTokenizer,
    max_tokens: int,
    *,
    target_tokens: int = TARGET_TOKENS,
    overlap_tokens: int = OVERLAP_TOKENS,
    max_heading_tokens: int = MAX_HEADING_TOKENS,
) -> Iterator[Chunk]:
    """The document's chunks in order (a generator: a long document is never all in memory).

    `tokenizer` is the embedder's Hugging Face tokenizer and `max_tokens` its window, special
    tokens included; every `Chunk.embed_text` fits in it."""
    max_heading_tokens = min(max_heading_tokens, max(4, (max_tokens - target_tokens) // 2))
    target_tokens = min(target_tokens, max_tokens - max_heading_tokens - 4)
    if target_tokens < 8:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for a chunk")
    for section in doc.sections:
        prefix = _heading_prefix(section.heading, tokenizer, max_heading_tokens)
        pending = list(
            chunk_section(
                section, tokenizer, target_tokens=target_tokens, overlap_tokens=overlap_tokens
            )
        )
        pending.reverse()
        while pending:
            batch = [pending.pop() for _ in range(min(64, len(pending)))]
            spans, texts = [], []
            for a, b in batch:
                raw = section.text[a:b]
                lead = len(raw) - len(raw.lstrip())
                raw = raw.strip()
                if raw:
                    spans.append((a + lead, a + lead + len(raw)))
                    texts.append(raw)
            if not texts:
                continue
            counts = [
                len(ids)
                for ids in tokenizer(
                    [prefix + t for t in texts], add_special_tokens=True, truncation=False
                )["input_ids"]
            ]
            too_long = []
            for (a, b), raw, n in zip(spans, texts, counts):
                if n > max_tokens:
                    too_long.append((a, b))
                    continue
                yield Chunk(
                    raw,
                    prefix + raw,
                    section.page,
                    section.heading,
                    section.start + a,
                    section.start + b,
                    n,
                )
            for a, b in too_long:  # rare (tokenization differs at a cut): halve and retry
                mid = section.text.rfind(" ", a, (a + b) // 2 + 1)
                mid = (a + b) // 2 if mid <= a else mid
                pending.extend([(mid, b), (a, mid)])
            # keep document order: a halved chunk goes before the rest of the batch's successors
            if too_long:
                pending.sort(key=lambda s: -s[0])
