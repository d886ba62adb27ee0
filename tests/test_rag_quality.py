"""Retrieval quality on a labelled set built from public-domain text.

tests/data/rag/amendments.md holds 24 amendments to the U.S. Constitution (a work of the U.S.
government, public domain), one section each; questions.jsonl asks 28 questions in everyday
words (little vocabulary shared with the legal text), each labelled with the section that
answers it. We report recall@5 and MRR@10 for the vector, full-text and hybrid searches and
assert floors on hybrid, the mode the server and `souverain ask` use; off-topic questions must
find nothing above the relevance floor, so that the answer is "not found", not an invention.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from souverain.rag.answer import RELEVANCE_FLOOR, ground
from souverain.rag.embed import get_embedder
from souverain.rag.store import LibraryStore

DATA = Path(__file__).parent / "data" / "rag"
OFF_TOPIC = [
    "What is the recipe for a chocolate souffle?",
    "How do I change the oil filter of a diesel engine?",
    "Which football club won the 1998 world cup final?",
    "What is the half-life of carbon-14?",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LibraryStore:
    s = LibraryStore(tmp_path_factory.mktemp("quality"), get_embedder())
    lib = s.create_library("constitution")
    doc = s.add_document(lib.id, (DATA / "amendments.md").read_bytes(), "amendments.md")
    assert doc.status == "done", doc.error
    return s


def section(hit) -> str:
    return (hit.heading or "").split(" > ")[-1]


def evaluate(store: LibraryStore, mode: str) -> tuple[float, float, list[str]]:
    questions = [json.loads(x) for x in (DATA / "questions.jsonl").read_text().splitlines()]
    hits5 = 0
    rr = 0.0
    misses = []
    for q in questions:
        hits = store.search(["constitution"], q["q"], k=10, mode=mode)
        ranks = [i for i, h in enumerate(hits, start=1) if section(h) == q["a"]]
        if ranks and ranks[0] <= 5:
            hits5 += 1
        else:
            misses.append(f"{q['q']} -> {[section(h) for h in hits[:5]]}")
        rr += 1.0 / ranks[0] if ranks else 0.0
    return hits5 / len(questions), rr / len(questions), misses


def test_retrieval_quality(store: LibraryStore, capsys: pytest.CaptureFixture) -> None:
    results = {mode: evaluate(store, mode) for mode in ("vector", "text", "hybrid")}
    with capsys.disabled():
        print("\nretrieval on tests/data/rag (28 questions, 24 sections):")
        for mode, (recall, mrr, _) in results.items():
            print(f"  {mode:7s} recall@5 {recall:.3f}  MRR@10 {mrr:.3f}")
    recall, mrr, misses = results["hybrid"]
    assert recall >= 0.9, misses
    assert mrr >= 0.9, misses
    # hybrid must not be worse than either search alone by more than one question
    assert recall >= max(results["vector"][0], results["text"][0]) - 1 / 28


def test_relevance_floor_separates_on_and_off_topic(store: LibraryStore) -> None:
    for q in OFF_TOPIC:
        g = ground(store, ["constitution"], q)
        assert not g.found, (q, [(section(p.hit), p.hit.vector_score) for p in g.passages])
    questions = [json.loads(x) for x in (DATA / "questions.jsonl").read_text().splitlines()]
    found = sum(ground(store, ["constitution"], q["q"]).found for q in questions)
    assert found >= len(questions) - 1, f"only {found} on-topic questions over {RELEVANCE_FLOOR}"
