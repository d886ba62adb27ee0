"""Deleted means gone (issue 15): erasure of documents and libraries, provable.

- A property test deletes a document (or its library) at a random point of its ingestion,
  paused there through `LibraryStore.on_stage` right after the ingestion checked that its
  document still exists (the worst moment: the next write races the deletion), and checks
  that search never returns it, no chunk row nor file is left, `verify()` is clean, the
  ingestion did nothing more after the deletion, and the next document is processed.
- `verify` finds planted orphans of every kind and `--fix` clears them (store and CLI).
- A real server: the issue's requests (upload, DELETE while in progress -> 204, then search,
  list and verify show nothing; the erasure in the audit log), the page overflow (422), and a
  kill -9 mid-ingest followed by a restart that finishes the document without any request.

The embedder is the real bundled MiniLM.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from datetime import timedelta
from itertools import count
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server_utils import ServerProcess
from souverain.rag import chunk_table
from souverain.rag.embed import get_embedder
from souverain.rag.library_db import DocumentInfo
from souverain.rag.parse import parse_document
from souverain.rag.search import text_candidates
from souverain.rag.store import STAGES, LibraryStore
from souverain.server.libraries import LibraryService

WAIT = 120.0  # generous bound for anything the worker does (2 busy cores in CI)


def wait_for(what: str, condition, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def document_text(word: str, paragraphs: int) -> bytes:
    """A document of ``paragraphs`` paragraphs (about one chunk each) that all mention
    ``word``, a token found nowhere else."""
    body = []
    for i in range(paragraphs):
        body.append(
            f"Paragraph {i} of the {word} report. " + " ".join(
                f"The {word} budget line {i}.{j} covers travel, housing and meals for the "
                "team during the spring audit of the northern warehouses." for j in range(7)))
    return "\n\n".join(body).encode()


def leftovers(store: LibraryStore, doc_id: str, word: str | None = None) -> dict:
    """Everything of a document still on disk, in the chunk table or (given a ``word`` of
    its text) in the full-text index, which is queried here without the metadata filter."""
    table = store._chunks(create=False)
    rows = table.count_rows(f"document_id = '{doc_id}'") if table is not None else 0
    files = sorted(p.name for p in store.files.iterdir() if doc_id in p.name)
    fts = []
    if word is not None and table is not None and chunk_table.ensure_fts(table, store._lock):
        fts = [r["document_id"] for r in text_candidates(table, word, "true", 100)
               if r["document_id"] == doc_id]
    found = {"chunk rows": rows, "files": files, "full-text hits": fts}
    return {k: v for k, v in found.items() if v}


# -- delete at a random point of an ingestion (property test) ---------------------------------


class Pause:
    """`LibraryStore.on_stage` hook: pauses the ingestion of ``doc_id`` at ``stage`` (the
    ``nth`` time it reaches it) until released; records every stage each document reaches."""

    def __init__(self, doc_id: str, stage: str, nth: int = 0):
        self.doc_id, self.stage, self.nth = doc_id, stage, nth
        self.seen: list[tuple[str, str]] = []
        self.paused, self.release = threading.Event(), threading.Event()
        self._n = 0

    def __call__(self, stage: str, doc_id: str) -> None:
        self.seen.append((stage, doc_id))
        if doc_id == self.doc_id and stage == self.stage:
            self._n += 1
            if self._n == self.nth + 1:
                self.paused.set()
                assert self.release.wait(WAIT), "the test never released the ingestion"

    def stages_of(self, doc_id: str) -> list[str]:
        return [s for s, d in self.seen if d == doc_id]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    """One server-side library service (its worker thread, the real embedder) for every
    example; embedding batches of 2 chunks so that a small document has several."""
    get_embedder()  # loaded once, outside the timed waits
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk_table, "EMBED_BATCH", 2)
        svc = LibraryService(tmp_path_factory.mktemp("erasure") / "libraries")
        svc.start().join()
        yield svc
        svc.shutdown()


_libraries = count()

# before the worker picks it up, at each stage of process_document, after it is done
STAGE = st.sampled_from(["queued", *STAGES, "done"])


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(stage=STAGE, nth=st.integers(0, 2), whole_library=st.booleans())
@example(stage="queued", nth=0, whole_library=False)
@example(stage="parse", nth=0, whole_library=False)
@example(stage="embed", nth=1, whole_library=False)
@example(stage="commit", nth=0, whole_library=False)
@example(stage="committed", nth=0, whole_library=False)
@example(stage="text", nth=0, whole_library=True)
@example(stage="done", nth=0, whole_library=False)
def test_delete_at_any_point_of_an_ingestion(service: LibraryService, stage: str, nth: int,
                                             whole_library: bool) -> None:
    store = service.store
    n = next(_libraries)
    lib = store.create_library(f"erase-{n}")
    word = f"zorblax{n}q"
    doc = store.register_document(lib.id, document_text(word, 6), f"report-{n}.txt")
    blocker = None
    if stage == "queued":  # the worker is busy with another document when the deletion comes
        blocker = store.register_document(lib.id, b"A short note about lunch.", "note.txt")
        pause = Pause(blocker.id, "parse")
        store.on_stage = pause
        service.schedule(lib.id, blocker.id, store)
    else:
        # nth: which embedding batch (9 chunks, batches of 2); the other stages come once
        pause = Pause(doc.id, "embed" if stage == "done" else stage,
                      nth if stage == "embed" else 0)
        store.on_stage = pause
    service.schedule(lib.id, doc.id, store)
    try:
        if stage == "done":
            pause.release.set()
            wait_for("the document done", lambda: store._meta.status(doc.id) == "done")
        else:
            assert pause.paused.wait(WAIT), f"the ingestion never reached {stage}"
        before = len(pause.stages_of(doc.id))
        erasure = (service.delete_library(lib.id) if whole_library
                   else service.delete_document(lib.id, doc.id))
        assert doc.id in erasure.document_ids and erasure.bytes >= doc.size
    finally:
        pause.release.set()

    # the next document is processed, so the deleted one's ingestion is over
    other = store.create_library(f"next-{n}") if whole_library else lib
    nxt = store.register_document(other.id, document_text(f"next{n}", 1), "next.txt")
    service.schedule(other.id, nxt.id, store)
    wait_for("the next document done", lambda: store._meta.status(nxt.id) == "done")
    store.on_stage = None

    # nothing more happened to the deleted document after its deletion
    assert len(pause.stages_of(doc.id)) == before, pause.stages_of(doc.id)
    assert store._meta.status(doc.id) is None
    assert leftovers(store, doc.id, word) == {}
    for mode in ("hybrid", "vector", "text"):
        hits = store.search([other.id], f"{word} report budget", k=10, mode=mode)
        assert all(h.document_id != doc.id for h in hits), mode
    report = store.verify()
    assert report.consistent, report
    if blocker is not None and not whole_library:
        assert store._meta.status(blocker.id) == "done"


def test_erasure_counts_the_upload_when_the_ingestion_notices_first(
        service: LibraryService) -> None:
    """The race CI met: the deletion drops the row, the ingestion's next check sees it gone
    and cleans up before the deletion removes the files. The upload is the erasure's to
    remove, so the audit's byte count is never 0."""
    store = service.store
    lib = store.create_library(f"erase-race-{next(_libraries)}")
    doc = store.register_document(lib.id, document_text("raceword", 6), "race.txt")
    pause = Pause(doc.id, "embed", 1)
    store.on_stage = pause
    service.schedule(lib.id, doc.id, store)
    try:
        assert pause.paused.wait(WAIT), "the ingestion never reached embed"
        store._meta.delete_document(doc.id)  # the first half of delete_document
    finally:
        pause.release.set()
    nxt = store.register_document(lib.id, b"Dinner is at seven.", "dinner.txt")
    service.schedule(lib.id, nxt.id, store)
    wait_for("the next document done", lambda: store._meta.status(nxt.id) == "done")
    store.on_stage = None
    assert (store.files / doc.id).exists()  # the stopped ingestion left the upload alone
    chunks, nbytes = store._erase([("document", doc.id, lib.id)])  # the second half
    assert nbytes >= doc.size
    assert leftovers(store, doc.id, "raceword") == {}
    assert store.verify().consistent


def test_interrupted_erasure_is_finished_at_start(tmp_path: Path) -> None:
    """A crash between the rows' deletion and the chunks' (simulated: the rows and the
    erasure record go, the chunks and files stay): the next start finishes it."""
    root = tmp_path / "libraries"
    store = LibraryStore(root, get_embedder())
    store.create_library("lib")
    doc = store.add_document("lib", document_text("quillfeather", 2), "a.txt")
    keep = store.add_document("lib", b"Unrelated text about bicycles.", "b.txt")
    store._meta.delete_document(doc.id)  # ... and the process dies here
    assert leftovers(store, doc.id) and not store.verify().consistent
    assert all(h.document_id != doc.id for h in store.search(["lib"], "quillfeather", k=5))
    store.close()

    service = LibraryService(root)
    service.start().join()
    assert leftovers(service.store, doc.id) == {}
    assert service.store.verify().consistent
    assert service.store.get_document("lib", keep.id).status == "done"
    service.shutdown()


def test_shutdown_stops_a_running_ingestion_and_leaves_it_queued(tmp_path: Path) -> None:
    """A server stopping does not wait for an ingestion: it stops at its next check, drops
    what it wrote and stays 'todo', for the next start to process it."""
    service = LibraryService(tmp_path / "libraries")
    service.start().join()
    store = service.store
    lib = store.create_library("lib")
    doc = store.register_document(lib.id, document_text("stopword", 6), "a.txt")
    pause = Pause(doc.id, "commit")
    store.on_stage = pause
    service.schedule(lib.id, doc.id, store)
    assert pause.paused.wait(WAIT)
    service.shutdown()
    pause.release.set()
    wait_for("back to todo", lambda: store._meta.status(doc.id) == "todo")
    assert leftovers(store, doc.id) == {"files": [doc.id]}  # its bytes, nothing else

    again = LibraryService(tmp_path / "libraries")
    again.start().join()
    wait_for("done at the next start", lambda: again.store._meta.status(doc.id) == "done")
    assert again.store.verify().consistent
    again.shutdown()


def test_search_never_returns_chunks_without_a_done_document(tmp_path: Path) -> None:
    """Chunk rows whose document is gone or not done (a stale index row) never come back,
    and do not starve the hits of the documents that are done."""
    embedder = get_embedder()
    store = LibraryStore(tmp_path / "libraries", embedder)
    lib = store.create_library("lib")
    good = [store.add_document("lib", f"Owls hunt mice at night, note {i}.".encode(),
                               f"owls-{i}.txt") for i in range(4)]
    ghost = DocumentInfo(str(uuid.uuid4()), lib.id, "ghost.txt", "text/plain", ".txt", 1, "x",
                         good[0].created_at, good[0].created_at, "done", None, None, 0, 0)
    text = "\n\n".join(f"# Owls {i}\n\nOwls hunt mice at night, ghost note {i}."
                       for i in range(40))
    parsed = parse_document(text.encode(), "g.md")
    assert chunk_table.write_chunks(store._chunks(), ghost, parsed, embedder)[0] >= 40
    # (no document row at all for those)
    pending = store.register_document(lib.id, b"Owls hunt mice at night, pending.", "p.txt")
    chunk_table.write_chunks(store._chunks(), pending,
                             parse_document(b"Owls hunt mice at night, pending.", "p.txt"),
                             embedder)  # committed, but the document is still 'todo'
    for mode in ("hybrid", "vector", "text"):
        hits = store.search(["lib"], "owls hunt mice at night", k=4, mode=mode)
        assert {h.document_id for h in hits} == {d.id for d in good}, mode


def test_purge_leaves_no_trace_on_disk(tmp_path: Path) -> None:
    """After the erasure and a purge, no file under the libraries folder holds the deleted
    document's text or name (LanceDB's old versions and SQLite's WAL included)."""
    root = tmp_path / "libraries"
    store = LibraryStore(root, get_embedder())
    store.create_library("lib")
    store.add_document("lib", b"Bicycles are parked in the basement.", "keep.txt")
    doc = store.add_document("lib", b"The vault code of Quintessaflorp is 7781.",
                             "Quintessaflorp-cv.txt")
    store.optimize()

    def traces() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                      and b"quintessaflorp" in p.read_bytes().lower())

    assert traces()  # the text, the bytes, the chunk table
    erasure = store.delete_document("lib", doc.id)
    assert (erasure.chunks, erasure.bytes) == (1, doc.size + len(b"The vault code of "
                                                                 b"Quintessaflorp is 7781."))
    store.purge(keep=timedelta(0))
    assert traces() == []
    assert [h.document_name for h in store.search(["lib"], "vault code", k=5)] == ["keep.txt"]


# -- verify ---------------------------------------------------------------------------------


def plant_orphans(store: LibraryStore) -> dict:
    """One inconsistency of each kind; returns what was planted."""
    embedder = store.embedder
    lib = store.create_library("planted")
    docs = [store.add_document("planted", document_text(f"plant{i}", 1), f"d{i}.txt")
            for i in range(4)]
    ghost = DocumentInfo(str(uuid.uuid4()), lib.id, "ghost.txt", "text/plain", ".txt", 1, "x",
                         docs[0].created_at, docs[0].created_at, "done", None, None, 0, 0)
    chunk_table.write_chunks(store._chunks(), ghost,
                             parse_document(b"Ghost text.", "g.txt"), embedder)
    orphan = store.files / str(uuid.uuid4())
    orphan.write_bytes(b"left behind")
    old = time.time() - 3600
    import os

    os.utime(orphan, (old, old))
    store._meta.update_document(docs[0].id, nb_chunks=docs[0].nb_chunks + 3)  # miscounted
    (store.files / f"{docs[1].id}.txt").unlink()  # extracted text lost
    store._meta.delete_document(docs[2].id)  # an erasure interrupted by a crash
    return {"ghost": ghost.id, "orphan": orphan.name, "miscounted": docs[0].id,
            "no_text": docs[1].id, "erased": docs[2].id, "fine": docs[3].id}


def test_verify_finds_every_planted_orphan_and_fix_clears_them(tmp_path: Path) -> None:
    store = LibraryStore(tmp_path / "libraries", get_embedder())
    assert store.verify().consistent  # empty
    planted = plant_orphans(store)
    fine = store.get_document("planted", planted["fine"])
    (store.files / fine.id).unlink()  # its bytes lost: reported, cannot be fixed
    report = store.verify()
    assert not report.consistent
    assert set(report.orphan_chunks) == {planted["ghost"], planted["erased"]}
    assert report.orphan_files == [planted["orphan"]]
    assert [m[1] for m in report.miscounted] == [planted["miscounted"]]
    assert [m[1] for m in report.missing_text] == [planted["no_text"]]
    assert [m[1] for m in report.missing_bytes] == [fine.id]
    assert report.pending_erasures == 1
    assert {p[0] for p in report.problems()} == {
        "chunks without a document", "done documents with wrong chunks",
        "done documents without their text", "documents whose stored file is missing",
        "files without a document", "interrupted erasures"}

    fixed = store.verify(fix=True)
    assert {d for _, d in fixed.reprocess} == {planted["miscounted"], planted["no_text"]}
    for lib_id, doc_id in fixed.reprocess:
        assert store.process_document(lib_id, doc_id).status == "done"
    after = store.verify()
    assert not after.orphan_chunks and not after.orphan_files and not after.miscounted
    assert not after.missing_text and not after.pending_erasures
    assert [m[1] for m in after.missing_bytes] == [fine.id] and not after.consistent
    assert leftovers(store, planted["erased"]) == {}
    store.delete_document("planted", fine.id)
    assert store.verify().consistent


def test_cli_verify_remove_delete(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from souverain.cli import app

    home = tmp_path / "home"
    store = LibraryStore(home / "libraries", get_embedder())
    planted = plant_orphans(store)
    store.close()
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["library", *args, "--data-dir", str(home)])

    r = run("verify")
    assert r.exit_code == 1, r.output
    assert "chunks without a document" in r.output and "--fix" in r.output
    r = run("verify", "--fix")
    assert r.exit_code == 0, r.output
    assert "consistent" in r.output
    assert run("verify").exit_code == 0
    assert "Exit code: 0 when everything agrees" in run("verify", "--help").output

    # remove / delete say what they erased and leave it in the audit log
    r = run("remove", "planted", planted["fine"])
    assert r.exit_code == 0 and "passages" in r.output, r.output
    r = run("delete", "planted", "--yes")
    assert r.exit_code == 0 and "2 documents" in r.output, r.output
    assert run("verify").exit_code == 0
    records = [json.loads(line) for f in sorted((home / "audit").glob("audit-*.jsonl"))
               for line in f.read_text().splitlines()]
    erased = [r for r in records if r.get("method") == "CLI"]
    assert [r["route"] for r in erased] == ["souverain library remove",
                                           "souverain library delete"]
    assert erased[0]["erased"]["document_ids"] == [planted["fine"]]
    assert erased[0]["erased"]["bytes"] > 0 and erased[0]["erased"]["chunks"] >= 1
    assert sorted(erased[1]["erased"]["document_ids"]) == sorted(
        [planted["miscounted"], planted["no_text"]])


# -- a real server ----------------------------------------------------------------------------


def serve(home: Path) -> ServerProcess:
    """A server whose model is never loaded (lazy): only its libraries are used."""
    return ServerProcess("smollm2-135m-instruct", "--lazy", "--no-finetune",
                         "--data-dir", str(home), env={"SOUVERAIN_HOME": str(home)})


def big_document(word: str) -> bytes:
    """About 120 chunks: long enough to be caught in progress."""
    return document_text(word, 120)


def status_in_db(home: Path, doc_id: str) -> str | None:
    """A document's status read straight from meta.sqlite (no request to the server)."""
    con = sqlite3.connect(home / "libraries" / "meta.sqlite", timeout=30)
    try:
        row = con.execute("SELECT status FROM documents WHERE id = ?", (doc_id,)).fetchone()
    finally:
        con.close()
    return None if row is None else row[0]


def test_api_delete_while_in_progress_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    srv = serve(home)
    http = httpx.Client(base_url=srv.url, timeout=120)
    try:
        lib = http.post("/v1/libraries", json={"name": "erasure"}).json()
        url = f"/v1/libraries/{lib['id']}/documents"
        doc = http.post(url, files={"file": ("budget.txt", big_document("vexillo"))}).json()
        wait_for("in progress", lambda: http.get(f"{url}/{doc['id']}/status").json()[
            "process_status"] == "in_progress")
        r = http.delete(f"{url}/{doc['id']}")
        assert r.status_code == 204, r.text
        assert http.get(f"{url}/{doc['id']}").status_code == 404
        nxt = http.post(url, files={"file": ("next.txt", b"Lunch is served at noon.")}).json()
        wait_for("the next document done", lambda: http.get(f"{url}/{nxt['id']}/status").json()[
            "process_status"] == "done")
        listed = http.get(url).json()
        assert [d["id"] for d in listed["data"]] == [nxt["id"]]

        # the page overflow: a 422 naming `page`, not a 500
        r = http.get(f"{url}?page=9223372036854775807")
        assert r.status_code == 422, r.text
        assert r.json()["object"] == "error" and "page" in r.json()["message"], r.text
        assert http.get(f"{url}?page=1000000000").status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()

    store = LibraryStore(home / "libraries", get_embedder())
    assert leftovers(store, doc["id"]) == {}
    hits = store.search(["erasure"], "vexillo budget line", k=10)
    assert hits and all(h.document_id == nxt["id"] for h in hits)
    assert store.verify().consistent
    records = [json.loads(line) for f in sorted((home / "audit").glob("audit-*.jsonl"))
               for line in f.read_text().splitlines()]
    deletes = [r for r in records if r["method"] == "DELETE"]
    assert len(deletes) == 1 and deletes[0]["status"] == 204, deletes
    assert deletes[0]["erased"]["document_ids"] == [doc["id"]]
    assert deletes[0]["erased"]["library_id"] == lib["id"]
    assert deletes[0]["erased"]["bytes"] >= len(big_document("vexillo"))


def test_kill_mid_ingest_then_restart_finishes_without_a_request(tmp_path: Path) -> None:
    home = tmp_path / "home"
    srv = serve(home)
    try:
        http = httpx.Client(base_url=srv.url, timeout=120)
        lib = http.post("/v1/libraries", json={"name": "crash"}).json()
        doc = http.post(f"/v1/libraries/{lib['id']}/documents",
                        files={"file": ("budget.txt", big_document("crashword"))}).json()
        wait_for("in progress", lambda: status_in_db(home, doc["id"]) == "in_progress")
    finally:
        srv.proc.kill()  # kill -9: no shutdown, the document stays in_progress
        srv.proc.wait()
        srv.stop()
    assert status_in_db(home, doc["id"]) == "in_progress"

    srv = serve(home)  # waits for /health only: no libraries request
    try:
        wait_for("done after the restart", lambda: status_in_db(home, doc["id"]) == "done",
                 timeout=300)
    finally:
        assert srv.stop() == 0, srv.log()
    store = LibraryStore(home / "libraries", get_embedder())
    assert store.verify().consistent
    assert store.get_document("crash", doc["id"]).nb_chunks > 100
