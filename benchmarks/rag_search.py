"""Search latency of `LibraryStore.search` at 1k, 10k and 100k chunks (vector, text, hybrid),
with and without an IVF-PQ vector index, plus the cost of keeping the full-text index current.

The chunks are synthetic (Zipf-distributed words from a 20k-word vocabulary, ~150 words each)
with random unit vectors, written straight into the store's LanceDB table: embedding 100k real
passages would take many minutes and measures the embedder, not the store. The query embedding
is stubbed for the same reason; its own cost is printed once (real MiniLM, one query).

    .venv/bin/python benchmarks/rag_search.py [--sizes 1000,10000,100000] [--queries 50]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from souverain.rag.store import LibraryStore, chunk_schema

DIM = 384


TOPICS = np.random.default_rng(1).standard_normal((500, DIM)).astype(np.float32)


def clustered(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around 500 topic centroids: real embeddings cluster by topic, and uniform
    random vectors would make any approximate index look worse than it is."""
    v = TOPICS[rng.integers(0, len(TOPICS), n)] + 0.9 * rng.standard_normal((n, DIM))
    v = v.astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class StubEmbedder:
    """Clustered unit query vectors (the store only needs .dim and .embed_query to search)."""

    dim = DIM
    max_tokens = 256

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def embed_query(self, text: str) -> np.ndarray:
        return clustered(1, self.rng)[0]


def vocabulary(n: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 11, n)
    return np.array(["".join(rng.choice(letters, k)) for k in lengths])


def write_chunks(
    store: LibraryStore,
    library_id: str,
    start: int,
    n: int,
    vocab: np.ndarray,
    rng: np.random.Generator,
) -> None:
    table = store._chunks()
    schema = chunk_schema(DIM)
    now = datetime.now(timezone.utc)
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    for b0 in range(start, start + n, 10_000):
        m = min(10_000, start + n - b0)
        words = rng.choice(vocab, size=(m, 150), p=p)
        texts = [" ".join(row) for row in words]
        vecs = clustered(m, rng)
        doc_ids = [f"{library_id}:doc-{(b0 + i) // 20}" for i in range(m)]
        batch = pa.RecordBatch.from_pydict(
            {
                "chunk_id": [f"c{b0 + i}" for i in range(m)],
                "library_id": [library_id] * m,
                "document_id": doc_ids,
                "document_name": [d.split(":")[1] + ".pdf" for d in doc_ids],
                "text": texts,
                "embed_text": texts,
                "page": [(b0 + i) % 20 + 1 for i in range(m)],
                "heading": ["Section"] * m,
                "start": [0] * m,
                "end": [len(t) for t in texts],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), DIM),
                "tags": [["bench"]] * m,
                "created_at": [now] * m,
            },
            schema=schema,
        )
        table.add(pa.Table.from_batches([batch]))
        done_rows(store, library_id, sorted({d.split(":")[1] for d in doc_ids}), now.isoformat())


def done_rows(store: LibraryStore, library_id: str, doc_ids: list[str], now: str) -> None:
    """The synthetic documents' metadata rows, 'done': search returns only chunks whose
    document exists and is done in the metadata."""
    with store._meta.tx() as con:
        con.executemany(
            "INSERT OR IGNORE INTO documents (id, library_id, name, size, hash, created_at, "
            "updated_at, status) VALUES (?, ?, ?, 0, '', ?, ?, 'done')",
            [(f"{library_id}:{d}", library_id, d + ".pdf", now, now) for d in doc_ids],
        )


def timed(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    vocab = vocabulary(20_000, rng)
    queries = [
        " ".join(rng.choice(vocab[:5000], int(rng.integers(2, 6)))) for _ in range(args.queries)
    ]

    from souverain.rag.embed import get_embedder

    real = get_embedder()
    real.embed_query("warm up")
    p50, _ = timed(lambda: real.embed_query("what is the notice period for managers"), 20)
    print(f"query embedding (MiniLM-L6, CPU): p50 {p50:.1f} ms (not included below)\n")

    rows = []
    maint = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="rag-bench-"))
        try:
            store = LibraryStore(root, StubEmbedder())  # type: ignore[arg-type]
            lib = store.create_library("bench")
            other = store.create_library("other")
            t0 = time.perf_counter()
            write_chunks(store, lib.id, 0, n, vocab, rng)
            write_chunks(store, other.id, n, max(100, n // 10), vocab, rng)  # filtered out
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            store.optimize(vector_index=False)  # FTS index + compaction
            t_fts = time.perf_counter() - t0
            maint.append((n, "write chunks (no embedding)", t_write))
            maint.append((n, "build FTS index + compact", t_fts))

            def run(
                mode: str,
                exact: dict | None = None,
                store: LibraryStore = store,
                lib_id: str = lib.id,
            ) -> tuple[float, float, float | None]:
                it = iter(queries * 3)
                found: dict[str, list[str]] = {}

                def one() -> None:
                    q = next(it)
                    store._embedder.rng = np.random.default_rng(abs(hash(q)) % 2**32)
                    hits = store.search([lib_id], q, k=args.k, mode=mode)  # type: ignore[arg-type]
                    found[q] = [h.chunk_id for h in hits]

                one()  # warm caches
                p50, p95 = timed(one, len(queries))
                recall = None
                if exact is not None:
                    recall = float(
                        np.mean(
                            [
                                len(set(found[q]) & set(exact[q])) / args.k
                                for q in found
                                if q in exact
                            ]
                        )
                    )
                return p50, p95, (recall, found)  # type: ignore[return-value]

            exact: dict[str, dict] = {}
            for mode in ("vector", "text", "hybrid"):
                p50, p95, (_, found) = run(mode)
                exact[mode] = found
                rows.append((n, mode, "flat", p50, p95, None))
            if n >= 10_000:
                t0 = time.perf_counter()
                store.optimize(vector_index=True)
                maint.append((n, "build IVF-PQ vector index", time.perf_counter() - t0))
                for mode in ("vector", "hybrid"):
                    p50, p95, (recall, _) = run(mode, exact[mode])
                    rows.append((n, mode, "IVF-PQ", p50, p95, recall))
            # keeping FTS current: new rows are brute-forced until merged
            table = store._chunks()
            write_chunks(store, lib.id, 2 * n, min(5_000, n), vocab, rng)
            p50, p95, _ = run("text")
            rows.append((n, "text", f"+{min(5_000, n)} unindexed", p50, p95, None))
            t0 = time.perf_counter()
            table.optimize()
            maint.append(
                (n, f"merge {min(5_000, n)} new rows (optimize)", time.perf_counter() - t0)
            )
            store.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"search latency, k={args.k}, {args.queries} queries, library filter pushed down, "
        "query embedding excluded"
    )
    print(
        f"{'chunks':>8} {'mode':<7} {'vector index':<17} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'recall@k':>9}"
    )
    for n, mode, index, p50, p95, recall in rows:
        rec = f"{recall:.2f}" if recall is not None else "exact" if mode == "vector" else ""
        print(f"{n:>8} {mode:<7} {index:<17} {p50:>8.1f} {p95:>8.1f} {rec:>9}")
    print("\nindex maintenance")
    for n, what, secs in maint:
        print(f"{n:>8} {what:<40} {secs:>7.2f} s")


if __name__ == "__main__":
    main()
