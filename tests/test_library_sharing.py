"""Several servers share one set of document libraries (issue 19, "past one machine"): the
metadata in one database (`--libraries-db`: SQLite by default, PostgreSQL to share), the
document bytes and the LanceDB chunk table in one folder (`--libraries-dir`).

- A data folder made by the old raw-sqlite3 code opens unchanged (its rows, WAL).
- Ownership: a document queued or under way in a live store is never taken by another; a
  store killed with -9 (a real process) leaves work that the next one takes over; erasures are
  taken over once; owners on another host are judged by their heartbeat.
- Two processes writing the one chunk table at once (appends, deletes, compactions) lose no
  row.
- Two real `souverain serve` processes on 127.0.0.1 (each its own --data-dir) sharing a
  PostgreSQL --libraries-db and a --libraries-dir, driven by the official `mistralai` SDK:
  created and uploaded through A, listed / read / searched through B, deleted through B and
  gone in A; `souverain library verify` on the shared libraries; a database the server cannot
  reach is one sentence and exit 2.

PostgreSQL is a throw-away cluster of scripts/postgres.sh (skipped without its binaries).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pytest

from souverain.errors import RAGError
from souverain.rag import library_db
from souverain.rag.library_db import LibraryDB
from souverain.rag.store import STALE_AFTER_S, DocumentBusy, LibraryStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'meta.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    db = LibraryDB(url)  # one cluster for the module: each test starts from empty tables
    with db.tx() as c:
        for t in (library_db.erasures_t, library_db.documents_t, library_db.libraries_t,
                  library_db.owners_t):
            c.execute(t.delete())
    db.close()
    return url


# -- the old data folder ------------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS libraries (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    library_id TEXT NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    name TEXT NOT NULL, mime_type TEXT, extension TEXT, size INTEGER NOT NULL,
    hash TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, number_of_pages INTEGER,
    tokens_processing_total INTEGER NOT NULL DEFAULT 0, nb_chunks INTEGER NOT NULL DEFAULT 0,
    tags TEXT NOT NULL DEFAULT '[]', source_path TEXT);
CREATE INDEX IF NOT EXISTS documents_by_name ON documents(library_id, name);
CREATE TABLE IF NOT EXISTS erasures (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('document', 'library')),
    library_id TEXT NOT NULL, requested_at TEXT NOT NULL);
"""


def test_a_data_folder_of_the_old_code_opens_unchanged(tmp_path: Path) -> None:
    """meta.sqlite as the raw-sqlite3 code made it (its schema, verbatim; WAL): every row
    reads as before, the new columns are added, and it works on."""
    root = tmp_path / "libraries"
    root.mkdir()
    con = sqlite3.connect(root / "meta.sqlite", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(OLD_SCHEMA)
    t0, t1 = "2025-01-02T03:04:05.000006+00:00", "2025-01-02T03:05:00+00:00"
    con.execute("INSERT INTO libraries VALUES ('L1', 'kb', 'old one', ?, ?)", (t0, t1))
    con.execute("INSERT INTO documents VALUES ('D1', 'L1', 'a.md', 'text/markdown', 'md', 42, "
                "'h1', ?, ?, 'done', NULL, NULL, 7, 3, '[\"hr\"]', '/src/a.md')", (t0, t1))
    con.execute("INSERT INTO documents VALUES ('D2', 'L1', 'b.txt', 'text/plain', 'txt', 5, "
                "'h2', ?, ?, 'todo', NULL, NULL, 0, 0, '[]', NULL)", (t1, t1))
    con.execute("INSERT INTO erasures VALUES ('D0', 'document', 'L1', ?)", (t0,))
    con.close()

    store = LibraryStore(root, "unused-embedder")  # (never loaded: no model is needed here)
    lib = store.get_library("kb")
    assert (lib.id, lib.description, lib.nb_documents, lib.total_size) == ("L1", "old one", 2,
                                                                            47)
    assert lib.created_at.isoformat() == t0
    d1 = store.get_document("kb", "a.md")
    assert (d1.id, d1.status, d1.tags, d1.nb_chunks, d1.tokens_processing_total,
            d1.source_path) == ("D1", "done", ["hr"], 3, 7, "/src/a.md")
    assert store.list_documents("kb", sort_by="name", descending=False)[0][0].id == "D1"
    assert store.unfinished() == [("L1", "D2")]  # nobody owns it: this store takes it
    assert store.interrupted_erasures() == 1 and store.finish_erasures() is not None
    assert store._meta.pending_erasures() == []
    assert store.delete_document("kb", "D2").document_ids == ["D2"]
    store.close()
    con = sqlite3.connect(root / "meta.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in con.execute("PRAGMA table_info(documents)")}
    assert {"owner", "tags", "source_path"} <= cols
    assert [r[0] for r in con.execute("SELECT id FROM documents")] == ["D1"]
    con.close()


def test_a_bad_database_is_one_sentence(tmp_path: Path) -> None:
    for url, words in [("nonsense", "sqlite:///PATH"),
                       ("postgresql+psycopg://u:secret@127.0.0.1:1/db", "--libraries-db")]:
        with pytest.raises(RAGError, match=words) as e:
            LibraryDB(url)
        assert "secret" not in str(e.value) and "\n" not in str(e.value)


# -- ownership between processes ----------------------------------------------------------------

REGISTER_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from souverain.rag.store import LibraryStore
    store = LibraryStore(Path(sys.argv[1]), "unused-embedder", db=sys.argv[2])
    doc = store.register_document("kb", b"Queued here, never processed.", "queued.txt")
    store._meta.delete_document(store.get_document("kb", "gone.txt").id, store.token)
    print(doc.id, store.token, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no clean-up at all
""")


def test_work_of_a_live_owner_is_left_alone_and_a_dead_ones_taken_over(
        tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "shared"
    a = LibraryStore(root, "unused-embedder", db=db_url)
    b = LibraryStore(root, "unused-embedder", db=db_url)
    lib = a.create_library("kb")
    doc = a.register_document(lib.id, b"Queued by A.", "a.txt")  # 'todo', owned by A
    assert b.unfinished() == []  # A is alive: its queue is its own
    with pytest.raises(DocumentBusy, match="another server"):
        b.process_document(lib.id, doc.id)
    assert b._meta.holder(doc.id) == ("todo", a.token)

    # an erasure A records is A's to finish while A lives; once, by one other store after
    a._meta.delete_document(a.register_document(lib.id, b"x", "x.txt").id, a.token)
    assert b.interrupted_erasures() == 0 and b.finish_erasures() is None
    assert a.finish_erasures(mine=False) is None  # (the periodic take-over: not its own)
    a.close()  # a clean stop: queued documents and erasures are anybody's
    assert b.unfinished() == [(lib.id, doc.id)]
    c = LibraryStore(root, "unused-embedder", db=db_url)
    assert b.finish_erasures() is not None  # taken by B ...
    assert c.finish_erasures() is None and c._meta.pending_erasures() == []  # ... only

    # a crash (kill -9 of a real process): the lock is free at once, its work taken over
    b.register_document(lib.id, b"Deleted by the crashing one.", "gone.txt")
    out = subprocess.run([sys.executable, "-c", REGISTER_AND_DIE, str(root), db_url],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == -signal.SIGKILL, out.stderr
    queued, dead = out.stdout.split()
    assert b._meta.holder(queued) == ("todo", dead)
    assert [p for p in b._meta.pending_erasures() if p[3] == dead]
    assert not b.alive(dead) and (lib.id, queued) in c.unfinished()
    assert c.interrupted_erasures() == 1
    assert c.finish_erasures() is not None and b.finish_erasures() is None
    assert c._meta.pending_erasures() == []
    c._claim(c.get_document(lib.id, queued))  # the compare-and-set: C owns it now
    assert c._meta.holder(queued) == ("in_progress", c.token)
    with pytest.raises(DocumentBusy):
        b._claim(b.get_document(lib.id, queued))

    # an owner on another host: its heartbeat says
    b._meta.register_owner("elsewhere1", "another-host", 1)
    assert b.alive("elsewhere1")
    with b._meta.tx() as conn:
        conn.execute(library_db.owners_t.update().values(
            heartbeat_at=time.time() - STALE_AFTER_S - 1))
    assert not b.alive("elsewhere1")
    for s in (b, c):
        s.close()


# -- one chunk table, two writing processes -----------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from datetime import datetime, timezone
    import numpy as np, pyarrow as pa
    from souverain.rag.store import LibraryStore, chunk_schema
    root, who, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    store = LibraryStore(root, "unused-embedder", db=f"sqlite:///{root / 'meta.sqlite'}")
    table = store._chunks(create=False)
    schema = chunk_schema(384)
    rng = np.random.default_rng(abs(hash(who)) % 1000)
    time.sleep(max(0.0, start - time.time()))  # both begin at the same moment
    for i in range(8):
        doc = f"{who}-{i}"
        n = 5
        batch = pa.record_batch({
            "chunk_id": [f"{doc}:{j}" for j in range(n)], "library_id": ["L"] * n,
            "document_id": [doc] * n, "document_name": [doc] * n,
            "text": [f"text {doc} {j}" for j in range(n)],
            "embed_text": [f"text {doc} {j}" for j in range(n)],
            "page": pa.array([None] * n, pa.int32()), "heading": [""] * n,
            "start": [0] * n, "end": [1] * n,
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.random(384 * n, dtype=np.float32)), 384),
            "tags": pa.array([[]] * n, pa.list_(pa.string())),
            "created_at": pa.array([datetime.now(timezone.utc)] * n,
                                   pa.timestamp("us", tz="UTC")),
        }, schema=schema)
        table.add(pa.RecordBatchReader.from_batches(schema, [batch]))
        if i % 4 == 0:
            table.delete(f"document_id = '{doc}'")  # as a re-ingestion drops leftovers
        if i % 2 == (who == "b"):
            # index merge + compaction, which the other's deletes preempt: retried
            store.optimize()
    print(who, "ok", flush=True)
""")


def test_two_processes_writing_one_chunk_table_lose_nothing(tmp_path: Path) -> None:
    import lancedb

    from souverain.rag.store import chunk_schema

    root = tmp_path / "libraries"
    lancedb.connect(root / "lance").create_table("chunks", schema=chunk_schema(384))
    start = time.time() + 3.0  # both interpreters ready by then
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), who, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "ok" in out, err[-3000:]
    table = lancedb.connect(root / "lance").open_table("chunks")
    kept = [i for i in range(8) if i % 4 != 0]
    assert table.count_rows("document_id LIKE 'a-%'") == 5 * len(kept)
    assert table.count_rows("document_id LIKE 'b-%'") == 5 * len(kept)
    ids = set(table.search().select(["chunk_id"]).limit(None).to_arrow()["chunk_id"]
              .to_pylist())
    assert ids == {f"{who}-{i}:{j}" for who in "ab" for i in kept for j in range(5)}


# -- two real servers sharing one set of libraries ----------------------------------------------

mistralai = pytest.importorskip("mistralai")
from mistralai.client import Mistral  # noqa: E402
from mistralai.client import errors as sdk_errors  # noqa: E402
from server_utils import ServerProcess  # noqa: E402

NOTE = (b"# Office notes\n\nThe quarterly offsite of the Zephyrine team is held in Annecy "
        b"every September; the budget per person is 240 euros.\n")


def wait_done(client: Mistral, library_id: str, document_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = client.beta.libraries.documents.status(library_id=library_id,
                                                    document_id=document_id)
        if st.process_status in ("done", "error"):
            return st.process_status
        assert time.monotonic() < deadline, f"document still {st.process_status}"
        time.sleep(0.2)


def search(srv: ServerProcess, library_id: str, query: str) -> list[dict]:
    r = httpx.post(f"{srv.url}/v1/libraries/{library_id}/search",
                   json={"query": query, "top_k": 3}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_two_servers_share_libraries_through_postgresql(tmp_path: Path, pg_url: str,
                                                        tiny_llama: dict) -> None:
    db = LibraryDB(pg_url)  # from empty tables (the cluster is the module's)
    with db.tx() as c:
        for t in (library_db.erasures_t, library_db.documents_t, library_db.libraries_t,
                  library_db.owners_t):
            c.execute(t.delete())
    db.close()
    shared = tmp_path / "shared-libraries"

    def serve(name: str) -> ServerProcess:
        return ServerProcess(str(tiny_llama["consolidated"]), "--name", "tiny", "--lazy",
                             "--no-finetune", "--data-dir", str(tmp_path / name),
                             "--libraries-db", pg_url, "--libraries-dir", str(shared))

    with ThreadPoolExecutor(2) as pool:  # both start at once (each waits for its /health)
        starting = [pool.submit(serve, name) for name in ("home-a", "home-b")]
        wait(starting)
    srv_a, srv_b = (f.result() if f.exception() is None else None for f in starting)
    try:
        for f in starting:
            assert f.exception() is None, f.exception()
        assert srv_a is not None and srv_b is not None
        a = Mistral(api_key="unused-on-loopback", server_url=srv_a.url, timeout_ms=120_000)
        b = Mistral(api_key="unused-on-loopback", server_url=srv_b.url, timeout_ms=120_000)

        lib = a.beta.libraries.create(name="offsite", description="shared")
        doc = a.beta.libraries.documents.upload(
            library_id=lib.id, file={"file_name": "notes.md", "content": NOTE})
        assert [x.id for x in b.beta.libraries.list().data] == [lib.id]
        assert wait_done(b, lib.id, doc.id) == "done"  # processed by A, seen done by B
        got = b.beta.libraries.documents.get(library_id=lib.id, document_id=doc.id)
        assert got.name == "notes.md" and got.tokens_processing_total > 0
        assert b.beta.libraries.documents.list(library_id=lib.id).pagination.total_items == 1
        text = b.beta.libraries.documents.text_content(library_id=lib.id, document_id=doc.id)
        assert "240 euros" in text.text  # the extracted text A wrote, read by B
        hits = search(srv_b, lib.id, "offsite budget per person")
        assert hits and hits[0]["document_id"] == doc.id and "Annecy" in hits[0]["text"]

        b.beta.libraries.documents.delete(library_id=lib.id, document_id=doc.id)
        with pytest.raises(sdk_errors.SDKError) as e:
            a.beta.libraries.documents.get(library_id=lib.id, document_id=doc.id)
        assert e.value.status_code == 404
        assert a.beta.libraries.documents.list(library_id=lib.id).pagination.total_items == 0
        assert search(srv_a, lib.id, "offsite budget per person") == []
        assert not [p for p in (shared / "files").iterdir() if doc.id in p.name]
        b.beta.libraries.delete(library_id=lib.id)
        assert a.beta.libraries.list().data == []
    finally:
        for srv in (srv_a, srv_b):
            if srv is not None:
                assert srv.stop() == 0, srv.log()

    from typer.testing import CliRunner

    from souverain.cli import app

    r = CliRunner().invoke(app, ["library", "verify", "--libraries-dir", str(shared),
                                 "--libraries-db", pg_url])
    assert r.exit_code == 0 and "consistent" in r.output, r.output


def test_serve_with_an_unreachable_libraries_db_exits_2(tmp_path: Path,
                                                        tiny_llama: dict) -> None:
    url = f"postgresql+psycopg://u:secret@127.0.0.1:1/db{uuid.uuid4().hex[:4]}"
    out = subprocess.run(
        [sys.executable, "-m", "souverain.cli", "serve", str(tiny_llama["consolidated"]),
         "--lazy", "--no-finetune", "--data-dir", str(tmp_path / "home"),
         "--libraries-db", url, "--port", "1"],
        capture_output=True, text=True, timeout=300, check=False)
    said = " ".join(out.stderr.split())
    assert out.returncode == 2, said
    assert "Cannot open the libraries database" in said and "--libraries-db" in said, said
    assert "secret" not in said and "Traceback" not in said
