"""The LanceDB half of the document libraries: writing a document's chunks, and the indexes.

A document's chunks are written in ONE commit: chunked, embedded in batches of
`EMBED_BATCH` and streamed through a RecordBatchReader (bounded memory; a crash or Ctrl-C
leaves no partial document). A ``check`` callback runs before each batch and before the commit:
it raises to stop the ingestion of a document deleted meanwhile (nothing is committed). The full-text index (BM25 over ``embed_text``) is created on first
use and new rows are merged into it incrementally; an IVF-PQ vector index is built only for
large tables. The table itself (created lazily) and the lock around index maintenance are
`LibraryStore`'s.

Several processes may write the table at once (servers sharing a libraries folder): LanceDB
rebases concurrent appends, deletes and updates onto each other's commits itself (none is
lost), but gives up a compaction or an index build preempted by another commit ("Retryable
commit conflict"): `retry_conflicts` runs those again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

if TYPE_CHECKING:
    from souverain.rag.chunk import Chunk
    from souverain.rag.embed import Embedder
    from souverain.rag.library_db import DocumentInfo
    from souverain.rag.parse import ParsedDocument

# Small enough that an ingestion notices its document's deletion within about a second (one
# batch on two cores); MiniLM on CPU embeds as fast per chunk in batches of 16 as of 64.
EMBED_BATCH = 16
# New chunks are searched by brute force until merged into the full-text index; merge (an
# incremental `optimize`, not a rebuild) once this many are waiting (see benchmarks/rag_search.py).
FTS_MERGE_ROWS = 1_000
# Below this many chunks an exact (flat) vector scan is fast enough; above it `optimize` builds
# an IVF-PQ index (see benchmarks/rag_search.py).
VECTOR_INDEX_MIN_ROWS = 100_000
# A commit LanceDB gave up because another process committed first is tried this many times.
COMMIT_ATTEMPTS = 8

T = TypeVar("T")


def is_commit_conflict(exc: BaseException) -> bool:
    """LanceDB's "Retryable commit conflict" (another writer's commit preempted this one)."""
    text = str(exc).lower()
    return "commit conflict" in text or "retryable" in text


def retry_conflicts(op: Callable[[], T], attempts: int = COMMIT_ATTEMPTS) -> T:
    """``op()``, run again (after a short random pause) while LanceDB reports a commit
    conflict with another process's commit; the last conflict is raised."""
    for n in range(attempts):
        try:
            return op()
        except (RuntimeError, OSError, ValueError) as exc:
            if n == attempts - 1 or not is_commit_conflict(exc):
                raise
            time.sleep(random.uniform(0.02, 0.1) * (n + 1))
    raise AssertionError("unreachable")


def utc(value: datetime) -> datetime:
    return (
        value.replace(tzinfo=timezone.utc)
        if value.tzinfo is None
        else value.astimezone(timezone.utc)
    )


def sql_str(value: str) -> str:
    """``value`` as a string literal of LanceDB's SQL filters."""
    return "'" + value.replace("'", "''") + "'"


def sql_ts(value: datetime) -> str:
    """``value`` as a UTC timestamp literal of LanceDB's SQL filters."""
    return f"timestamp '{utc(value).strftime('%Y-%m-%dT%H:%M:%S.%f')}'"


# -- writing ----------------------------------------------------------------------------------


def write_chunks(
    table: Any,
    doc: DocumentInfo,
    parsed: ParsedDocument,
    embedder: Embedder,
    check: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Chunk, embed and add every chunk of ``doc`` in one commit; returns (chunks, embedder
    tokens). ``check("embed")`` runs before each batch and ``check("commit")`` after the
    last one, before the commit: what it raises stops the write. On any failure nothing is
    committed and the original exception is raised."""
    from souverain.rag.chunk import chunk_document

    schema = table.schema
    totals = [0, 0]  # chunks, tokens
    failure: list[BaseException] = []

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            chunks = chunk_document(parsed, embedder.tokenizer, embedder.max_tokens)
            for batch in _batched(chunks, EMBED_BATCH):
                if check is not None:
                    check("embed")
                result = embedder.embed([c.embed_text for c in batch], what="chunk")
                first = totals[0]
                totals[0] += len(batch)
                totals[1] += result.total_tokens
                yield _record_batch(schema, doc, first, batch, result.vectors, embedder.dim)
            if check is not None:
                check("commit")
        except BaseException as exc:  # LanceDB wraps it: keep the original
            failure.append(exc)
            raise

    try:
        table.add(pa.RecordBatchReader.from_batches(schema, batches()))
    except BaseException:
        if failure:
            raise failure[0] from None
        raise
    return totals[0], totals[1]


def _record_batch(
    schema: pa.Schema, doc: DocumentInfo, first: int, batch: list[Chunk], vectors: Any, dim: int
) -> pa.RecordBatch:
    """Rows of chunks ``first``.. of ``doc`` (ids ``<doc id>:<n>``) with their ``vectors``."""
    n = len(batch)
    return pa.RecordBatch.from_pydict(
        {
            "chunk_id": [f"{doc.id}:{first + i}" for i in range(n)],
            "library_id": [doc.library_id] * n,
            "document_id": [doc.id] * n,
            "document_name": [doc.name] * n,
            "text": [c.text for c in batch],
            "embed_text": [c.embed_text for c in batch],
            "page": [c.page for c in batch],
            "heading": [c.heading for c in batch],
            "start": [c.start for c in batch],
            "end": [c.end for c in batch],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "tags": [doc.tags] * n,
            "created_at": [utc(doc.created_at)] * n,
        },
        schema=schema,
    )


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# -- indexes (the caller holds the store's lock, except around `ensure_fts`) -------------------


def has_index(table: Any, column: str) -> bool:
    return any(column in idx.columns for idx in table.list_indices())


def create_fts(table: Any) -> None:
    from lancedb.index import FTS

    # Language-neutral: no stemming and no stop-word list (documents are French, English,
    # German...); accents folded so "ete" finds "été". BM25's IDF already discounts
    # frequent words.
    retry_conflicts(lambda: table.create_index(
        "embed_text",
        config=FTS(stem=False, remove_stop_words=False, ascii_folding=True, lower_case=True),
        replace=True,
    ))


def ensure_fts(table: Any, lock: AbstractContextManager[Any]) -> bool:
    """The full-text index exists (created now, under ``lock``, if the table has rows); False
    for an empty table without one, which has no text matches."""
    if has_index(table, "embed_text"):
        return True
    if table.count_rows() == 0:
        return False
    with lock:
        if not has_index(table, "embed_text"):
            create_fts(table)
    return True


def maintain_fts(table: Any) -> None:
    """Create the full-text index on first use; merge new rows into it once enough wait."""
    if not has_index(table, "embed_text"):
        create_fts(table)
        return
    name = next(i.name for i in table.list_indices() if "embed_text" in i.columns)
    stats = table.index_stats(name)
    if stats is not None and stats.num_unindexed_rows >= FTS_MERGE_ROWS:
        retry_conflicts(table.optimize)


def optimize(table: Any, dim: Callable[[], int], vector_index: bool | None) -> None:
    """Merge waiting rows into every index and compact the table's files; build (or rebuild)
    an IVF-PQ vector index when ``vector_index`` is True, or when it is None and the table
    holds at least VECTOR_INDEX_MIN_ROWS chunks and has none. ``dim()``: the embedding size,
    asked only when an index is built (it may load the embedder)."""
    if not has_index(table, "embed_text"):
        create_fts(table)
    rows = table.count_rows()
    has_vector = has_index(table, "vector")
    if vector_index or (vector_index is None and not has_vector and rows >= VECTOR_INDEX_MIN_ROWS):
        table.create_index(
            metric="cosine",
            vector_column_name="vector",
            index_type="IVF_PQ",
            num_partitions=max(1, int(rows**0.5)),
            num_sub_vectors=max(1, dim() // 8),
            replace=True,
        )
    retry_conflicts(table.optimize)
