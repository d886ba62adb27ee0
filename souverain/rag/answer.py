"""Retrieval-augmented answers: retrieved passages in the prompt, numbered citations out.

One flow serves `souverain ask` and a chat completion that carries a
``{"type": "document_library", "library_ids": [...]}`` tool:

1. `ground()` searches the libraries with the question (hybrid search, see search.py) and keeps
   the passages whose similarity passes a floor and is within a margin of the best one. None
   pass -> `Grounding.found` is False, and the caller answers `not_found_text()` instead of
   letting the model invent.
2. `Grounding.fit()` keeps as many as fit the token budget; `Grounding.system_prompt()`
   numbers them ``[1]``, ``[2]``... with their document and position, in rank order. The
   passages go first in the prompt, so a repeated context is a prefix-cache hit.
3. `Grounding.sources_footer(answer)` lists the passages the answer cites (every passage given
   when it cites none) as ``[n] document, page p, § heading``; `Grounding.references(answer)`
   gives the same as JSON for the API's ``references`` field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from souverain.rag.search import Hit
    from souverain.rag.store import LibraryStore

# Cosine similarity (all-MiniLM-L6-v2, normalised vectors) under which a passage is taken as
# unrelated to the question. Measured on tests/data/rag: answering passages score 0.35 and up,
# the best passage for an off-topic question -0.05-0.18.
RELEVANCE_FLOOR = 0.25
# Passages much less similar than the best one are noise to a small model: kept only within
# this margin of the best passage's similarity.
RELEVANCE_MARGIN = 0.25
DEFAULT_PASSAGES = 5

_CITE = re.compile(r"\[(\d{1,3})\]")


@dataclass(frozen=True)
class Passage:
    n: int  # its number in the prompt, from 1
    hit: Hit

    def where(self) -> str:
        """``handbook.pdf, page 3, § Leave > Notice``"""
        parts = [str(self.hit.document_name)]
        if getattr(self.hit, "page", None):
            parts.append(f"page {self.hit.page}")
        if getattr(self.hit, "heading", None):
            parts.append(f"§ {self.hit.heading}")
        return ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        h = self.hit
        return {"id": self.n, "library_id": h.library_id, "document_id": h.document_id,
                "document_name": h.document_name, "page": h.page, "heading": h.heading,
                "start": h.start, "end": h.end, "text": h.text,
                "score": round(float(h.score), 6),
                "similarity": round(float(h.vector_score), 6)}


@dataclass
class Grounding:
    query: str
    library_names: list[str]
    passages: list[Passage] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.passages)

    def system_prompt(self) -> str:
        libs = ", ".join(f'"{n}"' for n in self.library_names)
        head = (f"Answer the user's question using only the numbered passages below, taken "
                f"from the document library {libs}. Cite every passage you use by its number "
                "in square brackets, like [1]. If the passages do not contain the answer, say "
                "that the library does not contain it; do not guess.")
        body = "\n\n".join(f"[{p.n}] ({p.where()})\n{p.hit.text.strip()}" for p in self.passages)
        return f"{head}\n\n{body}"

    def fit(self, budget_tokens: int, count_tokens: Callable[[str], int]) -> Grounding:
        """Keep the best passages whose system prompt fits `budget_tokens` (the first one is
        always kept: a prompt still too long is then refused by the context check)."""
        for n in range(2, len(self.passages) + 1):
            if count_tokens(Grounding(self.query, self.library_names,
                                      self.passages[:n]).system_prompt()) > budget_tokens:
                self.passages = self.passages[:n - 1]
                break
        return self

    def cited(self, answer: str) -> list[Passage]:
        nums = {int(m) for m in _CITE.findall(answer or "")}
        return [p for p in self.passages if p.n in nums]

    def sources_footer(self, answer: str) -> str:
        cited = self.cited(answer) or self.passages
        lines = "\n".join(f"[{p.n}] {p.where()}" for p in cited)
        return f"\n\nSources:\n{lines}"

    def references(self, answer: str) -> list[dict[str, Any]]:
        """Every passage given to the model, with ``cited`` saying whether the answer cites it."""
        cited = {p.n for p in self.cited(answer)}
        return [dict(p.as_json(), cited=p.n in cited) for p in self.passages]

    def not_found_text(self) -> str:
        libs = ", ".join(f'"{n}"' for n in self.library_names)
        return (f"I could not find this in the document library {libs}: no passage is "
                "relevant to the question, so I will not guess. Try other words, or add the "
                "documents that answer it.")


def ground(store: LibraryStore, library_ids: Sequence[str], query: str, *,
           k: int = DEFAULT_PASSAGES, floor: float = RELEVANCE_FLOOR) -> Grounding:
    """Search `library_ids` (ids or names) for `query`; keep the relevant passages (then
    `Grounding.fit` them to a token budget).

    Unknown libraries raise the store's `LibraryNotFound` (a `RAGError`)."""
    libs = [store.get_library(x) for x in library_ids]
    g = Grounding(query=query, library_names=[lib.name for lib in libs])
    if not query.strip():
        return g
    hits = store.search([lib.id for lib in libs], query, k=k)
    best = max((float(h.vector_score) for h in hits), default=0.0)
    kept = [h for h in hits if float(h.vector_score) >= max(floor, best - RELEVANCE_MARGIN)]
    g.passages = [Passage(n=i, hit=h) for i, h in enumerate(kept, start=1)]
    return g


def last_user_text(messages: Sequence[Any]) -> str:
    """The question a retrieval runs on: the text of the last user message."""
    for m in reversed(messages):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        if role != "user":
            continue
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for c in content:
                t = c.get("text") if isinstance(c, dict) else getattr(c, "text", None)
                if isinstance(t, str):
                    texts.append(t)
            return "\n".join(texts)
        return ""
    return ""
