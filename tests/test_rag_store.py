"""Document libraries: parsing positions, chunk bounds, store + search, ingestion, CLI.

Real documents are built here (a hand-written PDF with a correct xref table, a DOCX through
python-docx, HTML, Markdown) and embedded with the real bundled MiniLM model.
"""

from __future__ import annotations

import io
import itertools
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from souverain.errors import RAGError
from souverain.rag.chunk import chunk_document
from souverain.rag.embed import get_embedder
from souverain.rag.ingest import ingest_paths
from souverain.rag.parse import parse_document
from souverain.rag.store import DocumentNotFound, LibraryNotFound, LibraryStore

# -- test documents -----------------------------------------------------------------------------


def make_pdf(
    pages: list[str],
    *,
    outline: list[tuple[str, int]] = (),
    encrypt: bool = False,
    empty: bool = False,
) -> bytes:
    """A valid PDF, one text line per page (Helvetica); `outline` = (title, page index)
    bookmarks. Objects: 1 catalog, 2 pages, 3 font, then page/content pairs, then outline."""
    objs: dict[int, bytes] = {}
    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    first_outline = 4 + 2 * n
    for i, text in enumerate(pages):
        esc = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = b"" if empty else f"BT /F1 12 Tf 72 720 Td ({esc}) Tj ET".encode("latin-1")
        objs[page_ids[i]] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {page_ids[i] + 1} 0 R >>"
        ).encode()
        objs[page_ids[i] + 1] = (
            f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream"
        )
    catalog = "<< /Type /Catalog /Pages 2 0 R"
    if outline:
        items = list(range(first_outline + 1, first_outline + 1 + len(outline)))
        catalog += f" /Outlines {first_outline} 0 R"
        objs[first_outline] = (
            f"<< /Type /Outlines /First {items[0]} 0 R /Last {items[-1]} 0 R /Count {len(items)} >>"
        ).encode()
        for j, (title, page) in enumerate(outline):
            links = ""
            if j > 0:
                links += f" /Prev {items[j - 1]} 0 R"
            if j < len(items) - 1:
                links += f" /Next {items[j + 1]} 0 R"
            objs[items[j]] = (
                f"<< /Title ({title}) /Parent {first_outline} 0 R "
                f"/Dest [{page_ids[page]} 0 R /Fit]{links} >>"
            ).encode()
    objs[1] = (catalog + " >>").encode()
    objs[2] = (
        f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>"
    ).encode()
    objs[3] = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = {}
    for num in sorted(objs):
        offsets[num] = out.tell()
        out.write(f"{num} 0 obj\n".encode() + objs[num] + b"\nendobj\n")
    xref = out.tell()
    size = max(objs) + 1
    out.write(f"xref\n0 {size}\n0000000000 65535 f \n".encode())
    for num in range(1, size):
        out.write(f"{offsets[num]:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    data = out.getvalue()
    if encrypt:
        from pypdf import PdfReader, PdfWriter

        writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
        writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
        buf = io.BytesIO()
        writer.write(buf)
        data = buf.getvalue()
    return data


def make_docx(blocks: list[tuple[str, str]]) -> bytes:
    """blocks: ("h1"|"h2"|"p", text)."""
    import docx

    d = docx.Document()
    for kind, text in blocks:
        if kind.startswith("h"):
            d.add_heading(text, level=int(kind[1]))
        else:
            d.add_paragraph(text)
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


HTML = b"""<!doctype html><html><head><title>T</title><style>p{color:red}</style></head>
<body><nav><a href="/">Home</a> menu links</nav><script>var secret = 1;</script>
<h1>Travel policy</h1><p>Trains are preferred for trips under four hours.</p>
<h2>Expenses</h2><p>Meals are reimbursed up to <b>25 euros</b> per day.</p>
<ul><li>Keep receipts.</li><li>Submit within 30 days.</li></ul></body></html>"""

MD = b"""Intro line.

# Chapter 1

Everyone gets a laptop.

## Notice

The notice period for managers is three months.

# Chapter 2

## Benefits

Lunch vouchers are worth nine euros.
"""


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


@pytest.fixture()
def store(tmp_path: Path, embedder) -> LibraryStore:
    s = LibraryStore(tmp_path / "libs", embedder)
    yield s
    s.close()


# -- parsing ------------------------------------------------------------------------------------


def test_parse_pdf_pages_and_bookmarks():
    data = make_pdf(
        ["Alpha page one text.", "Bravo page two text.", "Charlie page three."],
        outline=[("Intro", 0), ("Terms", 2)],
    )
    doc = parse_document(data, "c.pdf")
    assert doc.number_of_pages == 3 and doc.extension == ".pdf"
    assert [(s.page, s.heading) for s in doc.sections] == [(1, "Intro"), (2, "Intro"), (3, "Terms")]
    for s in doc.sections:
        assert doc.text[s.start : s.start + len(s.text)] == s.text
    assert "Bravo" in doc.sections[1].text


def test_parse_markdown_html_docx_headings():
    md = parse_document(MD, "a.md")
    heads = {s.heading: s.text for s in md.sections}
    assert heads[None] == "Intro line."
    assert "three months" in heads["Chapter 1 > Notice"]
    assert "nine euros" in heads["Chapter 2 > Benefits"]
    for s in md.sections:
        assert md.text[s.start : s.start + len(s.text)] == s.text

    html = parse_document(HTML, "p.html")
    assert "secret" not in html.text and "menu links" not in html.text and "color" not in html.text
    heads = {s.heading: s.text for s in html.sections}
    assert "25 euros" in heads["Travel policy > Expenses"]
    assert "Keep receipts." in heads["Travel policy > Expenses"]

    dx = parse_document(
        make_docx(
            [("h1", "Contract"), ("p", "Intro."), ("h2", "Notice"), ("p", "Three months notice.")]
        ),
        "c.docx",
    )
    heads = {s.heading: s.text for s in dx.sections}
    assert heads == {"Contract": "Intro.", "Contract > Notice": "Three months notice."}


@pytest.mark.parametrize(
    "data, name, words",
    [
        (b"hello", "x.xlsx", "unsupported file type '.xlsx'"),
        (b"not a pdf at all", "x.pdf", "not a valid PDF"),
        (b"%PDF-1.4\n1 0 obj garbage", "x.pdf", "corrupt"),
        (b"PK\x03\x04garbage", "x.docx", "corrupt"),
        (b"plain text", "x.docx", "not a valid .docx"),
        (b"   \n\n  ", "x.txt", "no extractable text"),
        (make_pdf(["ignored"], empty=True), "scan.pdf", "OCR"),
        (make_pdf(["Confidential."], encrypt=True), "locked.pdf", "encrypted"),
    ],
)
def test_parse_errors_are_sentences(data, name, words):
    with pytest.raises(RAGError) as exc:
        parse_document(data, name)
    assert words in str(exc.value)
    assert name in str(exc.value)


# -- chunking -----------------------------------------------------------------------------------


def test_chunks_respect_token_bounds_and_overlap(embedder):
    para = " ".join(f"Clause {i} states that payment is due within {i} days." for i in range(60))
    long_word = "x" * 3000  # one "sentence" far over any budget
    text = f"# Big\n\n{para}\n\n{para}\n\n{long_word}\n\n## Small\n\nShort one.\n"
    doc = parse_document(text.encode(), "big.md")
    chunks = list(chunk_document(doc, embedder.tokenizer, embedder.max_tokens))
    counts = embedder.count_tokens([c.embed_text for c in chunks])
    assert max(counts) <= embedder.max_tokens
    assert [c.tokens for c in chunks] == counts
    body = [c for c in chunks if c.heading == "Big"]
    assert len(body) > 4
    assert all(c.tokens <= 260 for c in body)
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text
        assert c.embed_text == f"{c.heading}\n\n{c.text}"
    # consecutive chunks of a section overlap (the next starts before the previous ends)
    assert sum(b.start < a.end for a, b in itertools.pairwise(body)) >= len(body) // 2
    assert chunks[-1].heading == "Big > Small" and chunks[-1].text == "Short one."


# -- store --------------------------------------------------------------------------------------


def test_add_search_positions_and_modes(store: LibraryStore):
    store.create_library("hr", "HR")
    pages = [
        "Welcome to the handbook.",
        "The notice period for managers is three months.",
        "The office opens at nine.",
    ]
    pdf = make_pdf(pages, outline=[("Terms", 1)])
    d1 = store.add_document("hr", pdf, "handbook.pdf", tags=["policy"])
    d2 = store.add_document("hr", MD, "faq.md")
    d3 = store.add_document("hr", HTML, "travel.html", tags=["travel"])
    assert (d1.status, d1.number_of_pages, d1.nb_chunks) == ("done", 3, 3)
    assert d1.tokens_processing_total > 0 and len(d1.hash) == 64
    assert d2.status == d3.status == "done"
    for mode in ("hybrid", "vector", "text"):
        hits = store.search(["hr"], "notice period for managers", k=3, mode=mode)
        assert hits[0].document_id in (d1.id, d2.id), mode
        assert "notice period" in hits[0].text
        assert hits == sorted(hits, key=lambda h: -h.score)
    top = store.search(["hr"], "how are meals reimbursed when travelling", k=1)[0]
    assert top.document_name == "travel.html" and top.heading == "Travel policy > Expenses"
    assert -1.0 <= top.vector_score <= 1.0 and top.vector_score > 0.3
    pdf_hit = store.search(["hr"], "managers notice", k=5, document_ids=[d1.id])[0]
    assert (pdf_hit.page, pdf_hit.heading) == (2, "Terms")
    text = store.document_text("hr", d1.id)
    assert text[pdf_hit.start : pdf_hit.end] == pdf_hit.text
    lib = store.get_library("hr")
    assert lib.nb_documents == 3 and lib.total_size == len(pdf) + len(MD) + len(HTML)
    unrelated = store.search(["hr"], "quantum chromodynamics gluon", k=1)[0]
    assert unrelated.vector_score < top.vector_score


def test_filters_documents_tags_dates(store: LibraryStore):
    store.create_library("a")
    store.create_library("b")
    da = store.add_document("a", b"Vacation days: twenty five per year.", "a.txt", tags=["hr"])
    db = store.add_document("b", b"Vacation days: thirty per year.", "b.txt", tags=["x"])
    dc = store.add_document("a", b"Vacation days for interns: ten.", "c.txt", tags=["intern"])
    q = "vacation days"
    assert {h.document_id for h in store.search(["a"], q, k=10)} == {da.id, dc.id}
    assert {h.document_id for h in store.search(["a", "b"], q, k=10)} == {da.id, db.id, dc.id}
    assert {h.document_id for h in store.search(["a"], q, k=10, tags=["intern", "zz"])} == {dc.id}
    assert {h.document_id for h in store.search(["a"], q, k=10, document_ids=[da.id])} == {da.id}
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    assert store.search(["a"], q, since=later) == []
    assert {h.document_id for h in store.search(["a"], q, k=10, until=later)} == {da.id, dc.id}
    assert {h.document_id for h in store.search(["a"], q, k=10, since=dc.created_at)} == {dc.id}
    # tag changes reach the chunks
    store.update_document("a", da.id, tags=["intern"])
    assert {h.document_id for h in store.search(["a"], q, k=10, tags=["intern"])} == {da.id, dc.id}


def test_dedup_replace_and_delete(store: LibraryStore):
    store.create_library("lib")
    v1 = store.add_document("lib", b"The secret code word is pineapple.", "memo.txt")
    same = store.add_document("lib", b"The secret code word is pineapple.", "memo.txt")
    assert same == v1
    v2 = store.add_document("lib", b"The secret code word is watermelon.", "memo.txt")
    assert v2.id != v1.id and v2.status == "done"
    docs, total = store.list_documents("lib")
    assert total == 1 and docs[0].id == v2.id
    texts = " ".join(h.text for h in store.search(["lib"], "pineapple", k=10, mode="text"))
    assert "pineapple" not in texts
    assert "watermelon" in store.search(["lib"], "secret code word", k=1)[0].text
    with pytest.raises(DocumentNotFound):
        store.get_document("lib", v1.id)
    store.delete_document("lib", v2.id)
    assert store.search(["lib"], "secret code word", k=5) == []
    assert not (store.files / v2.id).exists()
    assert store.list_documents("lib") == ([], 0)


def test_bad_input_leaves_no_state(store: LibraryStore):
    store.create_library("lib")
    store.add_document("lib", b"Some good content about apples.", "ok.txt")
    with pytest.raises(RAGError, match="unsupported file type"):
        store.add_document("lib", b"xx", "sheet.xlsx")
    bad = store.add_document("lib", b"%PDF-1.4 broken", "broken.pdf")
    assert bad.status == "error" and "corrupt" in bad.error and "broken.pdf" in bad.error
    assert bad.nb_chunks == 0
    empty = store.add_document("lib", b"  \n ", "empty.txt")
    assert empty.status == "error" and "no extractable text" in empty.error
    ids = {h.document_id for h in store.search(["lib"], "apples content broken", k=20)}
    assert ids == {store.find_document("lib", "ok.txt").id}
    with pytest.raises(LibraryNotFound, match="souverain library list"):
        store.search(["nope"], "x")
    with pytest.raises(LibraryNotFound):
        store.add_document("nope", b"x", "x.txt")
    with pytest.raises(RAGError, match="already exists"):
        store.create_library("lib")
    with pytest.raises(RAGError, match="empty"):
        store.search(["lib"], "  ")


def test_failure_mid_write_leaves_no_chunk(store: LibraryStore, monkeypatch):
    store.create_library("lib")
    text = "\n\n".join(
        f"Paragraph {i} about the topic of gardening and roses." * 8 for i in range(200)
    ).encode()
    calls = {"n": 0}
    real = store.embedder.embed

    def flaky(texts, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(texts, **kw)

    monkeypatch.setattr(store.embedder, "embed", flaky)
    doc = store.add_document("lib", text, "garden.txt")
    assert doc.status == "error" and "disk on fire" in doc.error
    assert store._chunks().count_rows() == 0
    monkeypatch.setattr(store.embedder, "embed", real)
    doc = store.process_document("lib", doc.id)
    assert doc.status == "done" and store._chunks().count_rows() == doc.nb_chunks > 64


def test_threads_search_while_adding(store: LibraryStore):
    from concurrent.futures import ThreadPoolExecutor

    store.create_library("lib")
    store.add_document("lib", b"Seed text about owls.", "seed.txt")

    def add(i: int) -> str:
        return store.add_document(
            "lib", f"Document {i} is about owls number {i}.".encode(), f"d{i}.txt"
        ).status

    def search(_: int) -> int:
        return len(store.search(["lib"], "owls", k=3))

    with ThreadPoolExecutor(4) as pool:
        adds = [pool.submit(add, i) for i in range(6)]
        searches = [pool.submit(search, i) for i in range(6)]
        assert all(f.result() == "done" for f in adds)
        assert all(f.result() >= 1 for f in searches)
    assert store.list_documents("lib")[1] == 7


# -- ingestion ----------------------------------------------------------------------------------


def _tree(root: Path) -> Path:
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "a.md").write_bytes(MD)
    (root / "docs" / "b.txt").write_text("Bicycles are parked in the basement.")
    (root / "docs" / "sub" / "c.html").write_bytes(HTML)
    (root / "docs" / "sub" / "d.pdf").write_bytes(make_pdf(["Fire exits are on each floor."]))
    (root / "docs" / "sub" / "e.docx").write_bytes(
        make_docx([("h1", "Parking"), ("p", "Cars go outside.")])
    )
    (root / "docs" / ".hidden.txt").write_text("never")
    (root / "docs" / "image.png").write_bytes(b"\x89PNG")
    return root / "docs"


def test_ingest_folder_resume_update(store: LibraryStore, tmp_path: Path, monkeypatch):
    docs = _tree(tmp_path / "src")
    store.create_library("lib")
    import souverain.rag.parse as parse_mod

    real_parse = parse_mod.parse_document
    seen = []

    def dying_parse(data, name, mime_type=None):
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third file
        return real_parse(data, name, mime_type)

    monkeypatch.setattr(parse_mod, "parse_document", dying_parse)
    with pytest.raises(KeyboardInterrupt):
        ingest_paths(store, "lib", [docs])
    monkeypatch.setattr(parse_mod, "parse_document", real_parse)
    statuses = sorted(d.status for d in store.list_documents("lib")[0])
    assert statuses == ["done", "done", "in_progress"]
    report = ingest_paths(store, "lib", [docs], tags=["t"])
    assert len(report.unchanged) == 2 and len(report.added) == 3 and not report.failed
    names = sorted(d.name for d in store.list_documents("lib")[0])
    assert names == [
        "docs/a.md",
        "docs/b.txt",
        "docs/sub/c.html",
        "docs/sub/d.pdf",
        "docs/sub/e.docx",
    ]
    assert all(d.status == "done" for d in store.list_documents("lib")[0])
    # a changed file replaces its chunks; others are unchanged
    (docs / "b.txt").write_text("Scooters are parked on the roof.")
    report = ingest_paths(store, "lib", [docs])
    assert (len(report.updated), len(report.unchanged), len(report.added)) == (1, 4, 0)
    hits = store.search(["lib"], "where are vehicles parked", k=10)
    assert any("Scooters" in h.text for h in hits)
    assert not any("Bicycles" in h.text for h in hits)
    assert store.get_document("lib", "docs/b.txt").source_path == str((docs / "b.txt").resolve())


def test_ingest_roots_limits_and_failures(store: LibraryStore, tmp_path: Path):
    docs = _tree(tmp_path / "src")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("Outside secret.")
    os.symlink(outside / "x.txt", docs / "link.txt")
    store.create_library("lib")
    with pytest.raises(RAGError) as exc:
        ingest_paths(store, "lib", [outside / "x.txt"], allowed_roots=[tmp_path / "src"])
    assert "outside the allowed folders" in str(exc.value) and str(tmp_path / "src") in str(
        exc.value
    )
    with pytest.raises(RAGError, match="no such file"):
        ingest_paths(store, "lib", [tmp_path / "missing"])
    with pytest.raises(LibraryNotFound):
        ingest_paths(store, "nope", [docs])
    assert store.list_documents("lib") == ([], 0)
    (docs / "bad.pdf").write_bytes(b"%PDF-1.4 not really")
    (docs / "big.txt").write_text("y " * 50_000)
    report = ingest_paths(store, "lib", [docs], allowed_roots=[tmp_path / "src"], max_bytes=60_000)
    failed = {p.name: why for p, why in report.failed}
    assert set(failed) == {"link.txt", "bad.pdf", "big.txt"}
    assert "outside the allowed folders" in failed["link.txt"]
    assert "MiB limit" in failed["big.txt"] and "corrupt" in failed["bad.pdf"]
    assert len(report.added) == 5
    assert "Outside secret" not in " ".join(h.text for h in store.search(["lib"], "secret", k=20))


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_library_commands(tmp_path: Path):
    from typer.testing import CliRunner

    from souverain.cli import app

    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "home")]
    docs = _tree(tmp_path / "src")

    def run(*args: str):
        return runner.invoke(app, ["library", *args, *data])

    assert run("create", "kb", "--description", "test").exit_code == 0
    r = run("create", "kb")
    assert r.exit_code == 2 and "already exists" in r.output
    r = run("add", "kb", str(docs), "--tag", "t1")
    assert r.exit_code == 0, r.output
    assert "5 added" in r.output
    r = run("search", "kb", "fire exits", "-k", "2", "--json")
    assert r.exit_code == 0
    assert '"document": "docs/sub/d.pdf"' in r.output and '"page": 1' in r.output
    r = run("search", "kb", "fire exits")
    assert r.exit_code == 0 and "d.pdf" in r.output and "page 1" in r.output
    r = run("docs", "kb", "--json")
    assert r.exit_code == 0 and r.output.count('"status": "done"') == 5
    assert run("remove", "kb", "docs/sub/d.pdf").exit_code == 0
    r = run("remove", "kb", "docs/sub/d.pdf")
    assert r.exit_code == 2 and "No document" in r.output
    r = run("list", "--json")
    assert r.exit_code == 0 and '"nb_documents": 4' in r.output
    r = run("search", "nope", "x")
    assert r.exit_code == 2 and "souverain library list" in r.output
    outside = tmp_path / "elsewhere.md"
    outside.write_text("# Secret\n\nNot for this library.")
    r = run("add", "kb", str(outside), "--allowed-root", str(tmp_path / "src"))
    assert r.exit_code == 2 and "outside the allowed folders" in r.output
    assert run("docs", "kb", "--json").output.count('"status"') == 4  # nothing half-written
    (docs / "bad.pdf").write_bytes(b"junk")
    r = run("add", "kb", str(docs))
    assert r.exit_code == 1 and "not a valid PDF" in r.output and "4 unchanged" in r.output
    assert run("delete", "kb", "--yes").exit_code == 0
    assert run("search", "kb", "x").exit_code == 2
    assert (tmp_path / "home" / "libraries" / "meta.sqlite").is_file()
    con = sqlite3.connect(tmp_path / "home" / "libraries" / "meta.sqlite")
    assert con.execute("SELECT COUNT(*) FROM documents").fetchone()[0] == 0
