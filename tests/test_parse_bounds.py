"""Bounded document parsing (issue 15, items 2 and 5), on real documents and real processes.

* Totality: for any bytes and every accepted type, `parse_document` returns a `ParsedDocument`
  or raises a `RAGError` (hypothesis: random bytes, and mutated valid documents).
* Archives: a .docx's members are checked before anything is inflated: total size, ratio,
  count, compression method, and a member bigger than its archive declares.
* The parse pool: a document over the memory budget or the time limit, or whose worker is
  killed, is refused with a sentence naming the limit, and the next document parses.
* A real server refusing a zip-bomb .docx (1 MB that inflates to 1 GiB), alone and three at
  once, grows by far less than 200 MB (measured with psutil while the requests run).
"""

from __future__ import annotations

import io
import os
import signal
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rag_docs import HANDBOOK_HTML, HANDBOOK_MD, make_docx, make_pdf
from server_utils import ServerProcess

from souverain.errors import RAGError
from souverain.rag.parse import MIME_TYPES, ParsedDocument, parse_document
from souverain.rag.parse_pool import Limits, ParsePool, close_default_pool

MiB = 1 << 20
GiB = 1 << 30
TYPES = [".txt", ".md", ".html", ".pdf", ".docx"]
DOCX_BLOCKS = [("h1", "Contract"), ("p", "Intro."), ("h2", "Notice"),
               ("p", "Three months notice.")]
VALID = {
    ".txt": HANDBOOK_MD.replace("#", "").encode(),
    ".md": HANDBOOK_MD.encode(),
    ".html": HANDBOOK_HTML,
    ".pdf": make_pdf(["Acme travel policy, page one.", "Per diem: 87 euros in Lyon."]),
    ".docx": make_docx(DOCX_BLOCKS),
}


@pytest.fixture(scope="module", autouse=True)
def short_parse_limit() -> Iterator[None]:
    """A 20 s parse limit: a parser that hangs shows as a refusal, not a stuck test run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOUVERAIN_PARSE_TIMEOUT_S", "20")
        close_default_pool()
        yield
        close_default_pool()


def assert_total(data: bytes, name: str, mime: str | None = None) -> ParsedDocument | None:
    """The contract: a well-formed `ParsedDocument`, or a `RAGError` naming the file."""
    try:
        doc = parse_document(data, name, mime)
    except RAGError as exc:
        assert name in str(exc), exc
        # inputs of a few KB: a refusal for time or a dead parser would be a hang or a crash
        assert "took longer than" not in str(exc) and "parser stopped" not in str(exc), exc
        return None
    assert isinstance(doc, ParsedDocument) and doc.text.strip()
    assert doc.extension in MIME_TYPES and doc.mime_type == MIME_TYPES[doc.extension]
    for s in doc.sections:
        assert doc.text[s.start : s.start + len(s.text)] == s.text
    return doc


# -- totality: property tests --------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("ext", TYPES)
@PROPERTY
@given(data=st.binary(max_size=4096))
def test_any_bytes_parse_or_refuse(ext: str, data: bytes) -> None:
    assert_total(data, f"random{ext}")


@pytest.mark.parametrize("ext", TYPES)
@PROPERTY
@given(data=st.binary(max_size=4096))
def test_any_bytes_without_extension_by_mime(ext: str, data: bytes) -> None:
    assert_total(data, "upload", MIME_TYPES[ext])
    assert_total(data, "upload")  # neither: the bytes decide


@st.composite
def mutations(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with a few bytes flipped, inserted or deleted, or cut short."""
    out = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        else:
            del out[at:]
    return bytes(out)


@pytest.mark.parametrize("ext", TYPES)
@PROPERTY
@given(data=st.data())
def test_mutated_documents_parse_or_refuse(ext: str, data: st.DataObject) -> None:
    assert_total(data.draw(mutations(VALID[ext])), f"mutated{ext}")


def _rezip(docx: bytes, replace: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(docx))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as out:
        for info in src.infolist():
            out.writestr(info.filename, replace.get(info.filename, src.read(info)))
        for name in replace.keys() - set(src.namelist()):
            out.writestr(name, replace[name])
    return buf.getvalue()


@PROPERTY
@given(data=st.data())
def test_docx_with_mutated_xml_parses_or_refuses(data: st.DataObject) -> None:
    """A sound zip around broken XML: python-docx's own parsing, not just the zip layer."""
    xml = zipfile.ZipFile(io.BytesIO(VALID[".docx"])).read("word/document.xml")
    mutated = _rezip(VALID[".docx"], {"word/document.xml": data.draw(mutations(xml))})
    assert_total(mutated, "mutated-xml.docx")


def test_valid_documents_still_parse() -> None:
    for ext, data in VALID.items():
        doc = assert_total(data, f"valid{ext}")
        assert doc is not None and doc.extension == ext
    docx = parse_document(VALID[".docx"], "c.docx")
    assert {s.heading: s.text for s in docx.sections} == {
        "Contract": "Intro.", "Contract > Notice": "Three months notice."}


def test_long_runs_of_blanks_are_linear() -> None:
    """Two regexes retried from every blank of a long run (quadratic: hours for 3 MB); now
    each parses well within the 20 s limit, where they were refused as timed out."""
    for data, name in [(b"# a" + b" " * 3_000_000 + b"x\n\nbody", "heading.md"),
                       (b"a" + b" " * 3_000_000 + b"x", "blanks.txt")]:
        doc = parse_document(data, name)
        assert doc.text.startswith("a") and doc.text.rstrip().endswith(("x", "body"))
    md = parse_document(b"# Title ##  \n\nBody.\n\n## # ##\n\nMore.", "t.md")
    assert [s.heading for s in md.sections] == ["Title", "Title > #"]


def test_deeply_nested_html_parses() -> None:
    """100,000 nested blocks: one walk (bs4's insert_before/after per tag was quadratic:
    minutes, refused as timed out)."""
    doc = assert_total(b"<div>" * 100_000 + b"deep text" + b"</div>" * 100_000, "deep.html")
    assert doc is not None and doc.text == "deep text"


# -- archives: checked before inflating ----------------------------------------------------------


def zip_bomb_docx(expanded: int = GiB) -> bytes:
    """A valid .docx whose word/document.xml really inflates to `expanded` bytes of text
    (~1 MB compressed for 1 GiB), written 1 MiB at a time: building it holds ~1 MB."""
    src = zipfile.ZipFile(io.BytesIO(VALID[".docx"]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for info in src.infolist():
            if info.filename != "word/document.xml":
                out.writestr(info.filename, src.read(info))
        head, _, tail = src.read("word/document.xml").partition(b"Intro.")
        with out.open("word/document.xml", "w") as member:
            member.write(head)
            spaces = b" " * MiB
            for _ in range(expanded // MiB):
                member.write(spaces)
            member.write(tail)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zip_bomb_docx()


def _declare(docx: bytes, member: str, size: int, crc: int) -> bytes:
    """`docx` with `member`'s declared size and CRC rewritten (local header and central
    directory): the archive lies about what the member inflates to."""
    info = zipfile.ZipFile(io.BytesIO(docx)).getinfo(member)
    out = bytearray(docx)
    struct.pack_into("<I", out, info.header_offset + 14, crc)
    struct.pack_into("<I", out, info.header_offset + 22, size)
    central = out.rfind(b"PK\x01\x02")
    while central >= 0:
        name_len = struct.unpack_from("<H", out, central + 28)[0]
        if bytes(out[central + 46 : central + 46 + name_len]) == member.encode():
            struct.pack_into("<I", out, central + 16, crc)
            struct.pack_into("<I", out, central + 24, size)
            return bytes(out)
        central = out.rfind(b"PK\x01\x02", 0, central)
    raise AssertionError(f"{member} not in the central directory")


def _refusal(data: bytes, name: str) -> str:
    with pytest.raises(RAGError) as exc:
        parse_document(data, name)
    return str(exc.value)


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_zip_bomb_refused_before_inflating(bomb: bytes) -> None:
    assert len(bomb) < 2 * MiB
    pool = ParsePool(Limits(workers=1))
    try:
        with pytest.raises(RAGError) as exc:
            pool.parse(bomb, "bomb.docx", ".docx")
        message = str(exc.value)
        assert "expands to 1.0 GiB, over the limit of 200 MiB" in message, message
        (pid,) = pool.pids()
        peak = _peak_rss(pid)
        print(f"parse worker peak RSS refusing the bomb: {peak / MiB:.0f} MiB")
        assert peak < 200 * MiB  # nothing was inflated: the central directory said enough
    finally:
        pool.close()


def test_member_ratio_limit() -> None:
    data = _rezip(VALID[".docx"], {"word/media/blob.bin": bytes(2 * MiB)})
    message = _refusal(data, "ratio.docx")
    assert "'word/media/blob.bin' expands 1," in message and "limit of 400:1" in message


def test_member_bigger_than_declared() -> None:
    real = b" " * (20 * MiB)
    data = _rezip(VALID[".docx"], {"word/media/blob.bin": real})
    lying = _declare(data, "word/media/blob.bin", 1000, zlib.crc32(real[:1000]))
    message = _refusal(lying, "lying.docx")
    assert "expands to more than the 1,000 bytes its archive declares" in message, message


def test_member_count_and_method_limits() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(10_001):
            z.writestr(f"x/{i}", b"")
    assert "holds 10,001 files, over the limit of 10,000" in _refusal(buf.getvalue(), "n.docx")
    bz = _rezip(VALID[".docx"], {}, method=zipfile.ZIP_BZIP2)
    assert "compression method 12" in _refusal(bz, "bzip2.docx")


def test_embedded_workbook_is_not_opened() -> None:
    """A chart's embedded workbook is a zip inside the zip: never inflated, so accepted."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("xl/workbook.xml", "<workbook/>")
    data = _rezip(VALID[".docx"],
                  {"word/embeddings/Microsoft_Excel_Sheet1.xlsx": inner.getvalue()})
    assert "Three months notice." in parse_document(data, "chart.docx").text


# -- the pool: memory budget, time limit, killed worker, recovery ---------------------------------

BIG_HTML = b"<html><body>" + b"<p>x</p>" * 1_000_000 + b"</body></html>"  # 8 MB, 1M elements


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RLIMIT_AS bound (Linux)")
def test_memory_budget_refuses_then_recovers() -> None:
    pool = ParsePool(Limits(workers=1, memory_mib=64, timeout_s=60))
    try:
        for _ in range(2):  # the pool recovers each time
            with pytest.raises(RAGError) as exc:
                pool.parse(BIG_HTML, "big.html", ".html")
            assert "big.html: the document needs more than 64 MiB to parse" in str(exc.value)
            assert "SOUVERAIN_PARSE_MEMORY_MIB" in str(exc.value)
            assert pool.parse(VALID[".html"], "ok.html", ".html").text.startswith("Acme")
    finally:
        pool.close()


def test_time_limit_refuses_then_recovers() -> None:
    pool = ParsePool(Limits(workers=1, timeout_s=0.2))  # 1M elements take seconds
    try:
        with pytest.raises(RAGError) as exc:
            pool.parse(BIG_HTML, "slow.html", ".html")
        assert "slow.html: parsing took longer than 0.2 s" in str(exc.value)
        assert "SOUVERAIN_PARSE_TIMEOUT_S" in str(exc.value)
        assert "three months" in pool.parse(VALID[".html"], "ok.html", ".html").text
    finally:
        pool.close()


def test_killed_worker_refuses_then_recovers() -> None:
    pool = ParsePool(Limits(workers=1, timeout_s=60))
    try:
        pool.parse(VALID[".md"], "warm.md", ".md")
        (pid,) = pool.pids()
        killer = threading.Timer(0.3, os.kill, (pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(RAGError) as exc:
            pool.parse(BIG_HTML * 3, "killed.html", ".html")
        killer.join()
        assert "killed.html: the parser stopped (killed by SIGKILL)" in str(exc.value)
        assert pool.parse(VALID[".pdf"], "ok.pdf", ".pdf").number_of_pages == 2
        assert pool.pids() and pool.pids() != [pid]
    finally:
        pool.close()


def test_text_limit_and_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ParsePool(Limits(workers=1, max_chars=100))
    try:
        with pytest.raises(RAGError) as exc:
            pool.parse(VALID[".md"], "long.md", ".md")
        assert "over the limit of 100 for one document" in str(exc.value)
    finally:
        pool.close()
    monkeypatch.setenv("SOUVERAIN_PARSE_MEMORY_MIB", "lots")
    with pytest.raises(RAGError) as exc:
        Limits.from_env()
    assert "SOUVERAIN_PARSE_MEMORY_MIB='lots' is not a valid setting" in str(exc.value)


def test_in_process_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """SOUVERAIN_PARSE_WORKERS=0 (debugging): the same results and refusals, no worker."""
    monkeypatch.setenv("SOUVERAIN_PARSE_WORKERS", "0")
    close_default_pool()
    try:
        for ext, data in VALID.items():
            assert_total(data, f"here{ext}")
        assert "over the limit of 200 MiB" in _refusal(zip_bomb_docx(300 * MiB), "b.docx")
        from souverain.rag.parse_pool import default_pool

        assert default_pool().pids() == []
    finally:
        close_default_pool()


def test_pool_bounds_concurrency() -> None:
    """Four callers, two workers: never more than two worker processes, every answer right."""
    pool = ParsePool(Limits(workers=2))
    seen: set[int] = set()
    results: list[str] = []

    def one(i: int) -> None:
        doc = pool.parse(f"# Doc {i}\n\nBody {i}.".encode(), f"d{i}.md", ".md")
        seen.update(pool.pids())
        results.append(doc.text)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == sorted(f"Doc {i}\n\nBody {i}." for i in range(8))
        assert 1 <= len(seen) <= 2
    finally:
        pool.close()


# -- a real server refusing zip bombs: RSS stays flat ---------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("parse-bounds-home")
    srv = ServerProcess("smollm2-135m-instruct", "--lazy", "--no-audit", "--threads", "1",
                        "--data-dir", str(home / "data"), "--max-upload-mib", "8",
                        env={"SOUVERAIN_HOME": str(home)})
    yield srv
    assert srv.stop() == 0, srv.log()


class RSSSampler:
    """Samples a process's RSS (and its children's) every 5 ms while the block runs."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.before = self.peak = self.proc.memory_info().rss
        self.children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            children = 0
            for child in self.proc.children(recursive=True):
                try:
                    children += child.memory_info().rss
                except psutil.Error:
                    pass
            self.children_peak = max(self.children_peak, children)
            time.sleep(0.005)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before


def _upload(server: ServerProcess, library_id: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/libraries/{library_id}/documents",
                      files={"file": (name, data)}, timeout=120)


@pytest.fixture(scope="module")
def library(server: ServerProcess) -> str:
    r = httpx.post(server.url + "/v1/libraries", json={"name": "bombs"}, timeout=60)
    assert r.status_code == 201, r.text
    lib = r.json()["id"]
    # warm up the upload path and start the parse worker: what is measured is the bomb
    r = _upload(server, lib, "corrupt.docx", b"PK\x03\x04 not really a zip")
    assert r.status_code == 400 and "corrupt" in r.json()["message"], r.text
    return lib


def _assert_bomb_refused(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["object"] == "error"
    assert "bomb.docx: the .docx expands to 1.0 GiB, over the limit of 200 MiB" in body["message"]


def test_server_refuses_zip_bomb_without_growing(server: ServerProcess, library: str,
                                                 bomb: bytes,
                                                 capsys: pytest.CaptureFixture) -> None:
    with RSSSampler(server.proc.pid) as rss:
        r = _upload(server, library, "bomb.docx", bomb)
    _assert_bomb_refused(r)
    with capsys.disabled():
        print(f"\n[zip bomb] {len(bomb) / MiB:.2f} MiB .docx inflating to 1 GiB: 400; server "
              f"RSS growth {rss.growth / MiB:.1f} MiB (from {rss.before / MiB:.0f} MiB), "
              f"parse worker peak {rss.children_peak / MiB:.0f} MiB")
    assert rss.growth < 200 * MiB
    docs = httpx.get(f"{server.url}/v1/libraries/{library}/documents", timeout=60).json()
    assert docs["pagination"]["total_items"] == 0  # nothing stored


def test_server_refuses_three_bombs_at_once(server: ServerProcess, library: str, bomb: bytes,
                                            capsys: pytest.CaptureFixture) -> None:
    replies: list[httpx.Response] = []
    with RSSSampler(server.proc.pid) as rss:
        threads = [threading.Thread(
            target=lambda: replies.append(_upload(server, library, "bomb.docx", bomb)))
            for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(replies) == 3
    for r in replies:
        _assert_bomb_refused(r)
    with capsys.disabled():
        print(f"\n[zip bomb x3 at once] server RSS growth {rss.growth / MiB:.1f} MiB "
              f"(from {rss.before / MiB:.0f} MiB), parse workers peak "
              f"{rss.children_peak / MiB:.0f} MiB")
    assert rss.growth < 200 * MiB
