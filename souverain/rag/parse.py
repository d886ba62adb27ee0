"""Documents -> text with positions: plain text, Markdown, HTML, PDF and DOCX.

`parse_document` returns the whole text plus its `Section`s: runs of text under one heading
path ("Chapter 2 > Notice") and, for PDFs, on one page. `Section.start` is the offset of the
section's text in `ParsedDocument.text`, so a chunk can always be traced back to its place.

The type comes from the file name's extension (or the MIME type when the name has none) and is
checked against the leading bytes: a ``.pdf`` that does not start like a PDF is corrupt. Every
failure is a `RAGError` sentence naming the file; the parsing libraries' own exceptions never
leave this module: for any bytes and any type, `parse_document` returns a `ParsedDocument` or
raises a `RAGError`.

The parsing itself runs in a worker process with a memory budget and a time limit
(`souverain.rag.parse_pool`, settings there), so that no document can take the caller's memory
or hang it. A .docx is a zip archive: before anything is decompressed its members are checked
(`_check_archive`) against these limits, each named in the refusal:
  MAX_ARCHIVE_MEMBERS   10,000 members at most
  MAX_UNZIPPED_BYTES    200 MiB of contents in all (as declared, and then as really inflated)
  MAX_MEMBER_RATIO      400:1 at most between a member's size and its compressed size, for
                        members over RATIO_FLOOR_BYTES (1 MiB): Word's XML is about 10:1, a
                        generated report's big repetitive table up to ~200:1, while deflate's
                        ceiling, ~1030:1, is what a zip bomb uses
and each member is then inflated once, in bounded chunks, to prove it is no bigger than the
archive says (python-docx reads members whole, trusting the declared sizes). Archives inside
the archive (a chart's embedded workbook) are never opened, so they count at their own size.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from souverain.errors import RAGError

# extension -> canonical MIME type
MIME_TYPES: dict[str, str] = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}
SUPPORTED_EXTENSIONS = tuple(MIME_TYPES)
_EXT_BY_MIME = {
    "text/plain": ".txt",
    "text/markdown": ".md",
    "text/x-markdown": ".md",
    "text/html": ".html",
    "application/xhtml+xml": ".html",
    "application/pdf": ".pdf",
    MIME_TYPES[".docx"]: ".docx",
}
_SUPPORTED_SENTENCE = "supported types are .txt, .md, .html, .pdf and .docx"
_KINDS = {".txt": "text file", ".md": "Markdown file", ".html": "HTML file", ".pdf": "PDF",
          ".docx": ".docx"}

MiB = 1 << 20
MAX_ARCHIVE_MEMBERS = 10_000
MAX_UNZIPPED_BYTES = 200 * MiB
MAX_MEMBER_RATIO = 400
RATIO_FLOOR_BYTES = 1 * MiB


@dataclass(frozen=True)
class Section:
    """A run of text under one heading path, on one page (PDF) or page-less."""

    text: str
    page: int | None  # 1-based, PDFs only
    heading: str | None  # nearest heading path, e.g. "Chapter 2 > Notice"
    start: int  # char offset of `text` in ParsedDocument.text


@dataclass(frozen=True)
class ParsedDocument:
    text: str
    sections: list[Section] = field(default_factory=list)
    number_of_pages: int | None = None
    mime_type: str = "text/plain"
    extension: str = ".txt"


def detect_extension(data: bytes, name: str, mime_type: str | None = None) -> str:
    """The parser to use: from the name's extension, else the MIME type, else the bytes."""
    ext = PurePath(name).suffix.lower()
    if ext in MIME_TYPES:
        return ext
    if mime_type:
        base = mime_type.split(";")[0].strip().lower()
        if base in _EXT_BY_MIME:
            return _EXT_BY_MIME[base]
    if ext and ext not in MIME_TYPES:
        raise RAGError(
            f"{name}: unsupported file type {ext!r}; {_SUPPORTED_SENTENCE} "
            "(convert the file to one of them)."
        )
    head = data[:1024].lstrip()
    if head.startswith(b"%PDF-"):
        return ".pdf"
    if data.startswith(b"PK\x03\x04"):
        return ".docx"
    if re.match(rb"(?i)(<!doctype html|<html)", head):
        return ".html"
    if b"\x00" not in data[:8192]:
        return ".txt"
    raise RAGError(
        f"{name}: cannot tell the file type (no extension and not text); {_SUPPORTED_SENTENCE}."
    )


def parse_document(data: bytes, name: str, mime_type: str | None = None) -> ParsedDocument:
    """Extract the text and its sections from a document's bytes (see the module docstring):
    in a parse worker, within its memory and time limits."""
    ext = detect_extension(data, name, mime_type)
    from souverain.rag import parse_pool

    return parse_pool.parse(data, name, ext)


def parse_here(data: bytes, name: str, ext: str) -> ParsedDocument:
    """`parse_document` in this process, for a type `detect_extension` returned: what a parse
    worker runs. Total: a `ParsedDocument` or a `RAGError` (or `MemoryError`, which the caller
    words with its own budget), never a parsing library's exception."""
    try:
        return _parse_as(data, name, ext)
    except (RAGError, MemoryError):
        raise
    except Exception as exc:  # a parser bug on odd input (RecursionError included)
        kind = _KINDS.get(ext, "document")
        raise RAGError(
            f"{name}: the {kind} cannot be read ({type(exc).__name__}); it is corrupt or "
            "malformed: save it again from its source."
        ) from exc


def preload() -> None:
    """Import the parsing libraries (a parse worker does it once, before its memory limit)."""
    import docx  # noqa: F401
    import pypdf  # noqa: F401
    from bs4 import BeautifulSoup

    BeautifulSoup("<p>x</p>", "lxml")  # loads bs4's lxml tree builder


def _parse_as(data: bytes, name: str, ext: str) -> ParsedDocument:
    if ext == ".pdf":
        doc = _parse_pdf(data, name)
    elif ext == ".docx":
        doc = _parse_docx(data, name)
    elif ext in (".html", ".htm"):
        doc = _parse_html(_decode(data, name), name)
    elif ext in (".md", ".markdown"):
        doc = _parse_markdown(_decode(data, name))
    else:
        doc = _sections_from_blocks([(None, t) for t in [_decode(data, name)]])
    if not doc.text.strip():
        hint = (
            (
                " (a scanned PDF holds only images and souverain does not do OCR: export it "
                "with a text layer first)"
            )
            if ext == ".pdf"
            else ""
        )
        raise RAGError(f"{name}: the document has no extractable text{hint}.")
    return ParsedDocument(doc.text, doc.sections, doc.number_of_pages, MIME_TYPES[ext], ext)


# -- text ---------------------------------------------------------------------------------------


def _decode(data: bytes, name: str) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if b"\x00" in data[:8192]:
        raise RAGError(f"{name}: this is a binary file, not text; {_SUPPORTED_SENTENCE}.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # legacy Windows / Latin-1 files


def _normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    # the look-behind starts a match only at the start of a run of blanks: linear, where a
    # plain [ \t]+\n retries from every blank of a long run that no newline ends (quadratic)
    text = re.sub(r"(?<![ \t\f\v])[ \t\f\v]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _sections_from_blocks(
    blocks: list[tuple[str | None, str]],
    pages: list[int | None] | None = None,
    number_of_pages: int | None = None,
) -> ParsedDocument:
    """Join (heading path, body) blocks into one text; the heading line is written before its
    body (so the text reads like the document) but the section covers the body only."""
    parts: list[str] = []
    sections: list[Section] = []
    pos = 0
    last_heading: str | None = None
    for i, (heading, body) in enumerate(blocks):
        body = _normalise(body)
        page = pages[i] if pages else None
        if heading and heading != last_heading and pages is None:
            title = heading.rsplit(" > ", 1)[-1]
            parts.append(title + "\n\n")
            pos += len(title) + 2
        last_heading = heading
        if body:
            sections.append(Section(body, page, heading, pos))
            parts.append(body + "\n\n")
            pos += len(body) + 2
    text = "".join(parts)
    return ParsedDocument(text.removesuffix("\n\n"), sections, number_of_pages)


class _HeadingPath:
    def __init__(self) -> None:
        self.stack: list[tuple[int, str]] = []

    def push(self, level: int, title: str) -> str:
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, title))
        return self.path() or ""

    def path(self) -> str | None:
        return " > ".join(t for _, t in self.stack) or None


# -- Markdown -----------------------------------------------------------------------------------

# the closing #s are stripped after the match: a lazy (.+?)[ \t#]*$ is quadratic on a long line
_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+)$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _parse_markdown(text: str) -> ParsedDocument:
    blocks: list[tuple[str | None, str]] = []
    path = _HeadingPath()
    heading: str | None = None
    body: list[str] = []
    in_fence = False
    for line in text.replace("\r\n", "\n").split("\n"):
        if _MD_FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence else _MD_HEADING.match(line)
        if m:
            blocks.append((heading, "\n".join(body)))
            title = m.group(2)
            title = (title.rstrip(" \t#") or title[:1]).strip()
            heading, body = path.push(len(m.group(1)), title), []
        else:
            body.append(line)
    blocks.append((heading, "\n".join(body)))
    return _sections_from_blocks(blocks)


# -- HTML ---------------------------------------------------------------------------------------

_DROP_TAGS = ("script", "style", "nav", "noscript", "template", "svg", "iframe", "head", "form")
_BLOCK_TAGS = (
    "p",
    "div",
    "section",
    "article",
    "main",
    "header",
    "footer",
    "aside",
    "li",
    "ul",
    "ol",
    "table",
    "tr",
    "pre",
    "blockquote",
    "dt",
    "dd",
    "figure",
    "figcaption",
    "br",
    "hr",
    "td",
    "th",
)
_HEADING_MARK = "\x00"
_HTML_HEADING = re.compile(r"h[1-6]$")


def _parse_html(markup: str, name: str) -> ParsedDocument:
    from bs4 import BeautifulSoup

    try:
        soup = BeautifulSoup(markup.replace(_HEADING_MARK, ""), "lxml")
    except MemoryError:
        raise
    except Exception as exc:
        raise RAGError(f"{name}: the HTML cannot be read ({exc}); save it again as HTML.") from exc
    raw = _html_text(soup)
    # inline whitespace collapsed, block breaks kept
    raw = "\n".join(" ".join(line.split()).removesuffix(" |") for line in raw.split("\n"))
    blocks: list[tuple[str | None, str]] = []
    path = _HeadingPath()
    pieces = raw.split(_HEADING_MARK)
    blocks.append((None, pieces[0]))
    for i in range(1, len(pieces) - 2, 3):
        level, title, body = pieces[i], pieces[i + 1], pieces[i + 2]
        heading = path.push(int(level), title) if title else path.path()
        blocks.append((heading, body))
    return _sections_from_blocks(blocks)


def _html_text(soup: Any) -> str:
    """The page's text in one walk: dropped tags skipped, a blank line around each block, " | "
    after each cell, each heading as a marked line. (bs4's insert_before/after walk the tag's
    subtree each time: quadratic on a deeply nested page.)"""
    from bs4 import Tag

    keep = soup.interesting_string_types  # NavigableString and CData: not comments
    out: list[str] = []
    stack: list[Any] = [soup]  # nodes, and plain str to write once a tag's children are done
    while stack:
        node = stack.pop()
        if type(node) is str:
            out.append(node)
        elif not isinstance(node, Tag):
            if type(node) in keep:
                out.append(str(node))
        elif node.name in _DROP_TAGS:
            continue
        elif _HTML_HEADING.match(node.name):
            title = " ".join(" ".join(_html_strings(node, keep)).split())
            out.append(f"\n{_HEADING_MARK}{node.name[1]}{_HEADING_MARK}{title}{_HEADING_MARK}\n")
        else:
            if node.name in ("td", "th"):
                stack.append(" | ")
            elif node.name in _BLOCK_TAGS:
                out.append("\n\n")
                stack.append("\n\n")
            stack.extend(reversed(node.contents))
    return "".join(out)


def _html_strings(tag: Any, keep: Any) -> list[str]:
    """The text strings under `tag`, in order, outside dropped tags."""
    from bs4 import Tag

    found: list[str] = []
    stack: list[Any] = list(reversed(tag.contents))
    while stack:
        node = stack.pop()
        if isinstance(node, Tag):
            if node.name not in _DROP_TAGS:
                stack.extend(reversed(node.contents))
        elif type(node) in keep:
            found.append(str(node))
    return found


# -- PDF ----------------------------------------------------------------------------------------


def _parse_pdf(data: bytes, name: str) -> ParsedDocument:
    if not data[:1024].lstrip().startswith(b"%PDF-"):
        raise RAGError(
            f"{name}: the file is not a valid PDF (it does not start with %PDF-); "
            "it is corrupt or misnamed."
        )
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # repairs are not the user's concern
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                # many "protected" PDFs open with an empty password
                opened = bool(reader.decrypt(""))  # PasswordType.NOT_DECRYPTED is 0
            except Exception:
                opened = False
            if not opened:
                raise RAGError(
                    f"{name}: the PDF is encrypted with a password; save an "
                    "unprotected copy and add that."
                )
        texts = [page.extract_text() or "" for page in reader.pages]
        n_pages = len(reader.pages)
        outline = _pdf_outline(reader)
    except (RAGError, MemoryError):  # out of memory is the worker's to word
        raise
    except (
        PyPdfError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        AssertionError,
        RecursionError,
        OSError,
        zipfile.BadZipFile,
    ) as exc:
        raise RAGError(
            f"{name}: the PDF is corrupt and cannot be read ({type(exc).__name__}: "
            f"{exc}); export it again from its source."
        ) from exc
    except Exception as exc:
        raise RAGError(
            f"{name}: the PDF is corrupt and cannot be read ({type(exc).__name__}); "
            "export it again from its source."
        ) from exc
    headings: list[str | None] = []
    current: str | None = None
    for page in range(n_pages):
        current = outline.get(page, current)
        headings.append(current)
    blocks = list(zip(headings, texts))
    return _sections_from_blocks(blocks, pages=list(range(1, n_pages + 1)), number_of_pages=n_pages)


def _pdf_outline(reader: object) -> dict[int, str]:
    """Page index -> the last bookmark path starting on it (bookmarks act as headings)."""
    found: dict[int, str] = {}

    def walk(items: list, parents: list[str]) -> None:
        last: list[str] = parents
        for item in items:
            if isinstance(item, list):
                walk(item, last)
                continue
            title = " ".join(str(getattr(item, "title", "") or "").split())
            if not title:
                continue
            last = parents + [title]
            try:
                page = reader.get_destination_page_number(item)  # type: ignore[attr-defined]
            except Exception:
                continue
            if page is not None and page >= 0:
                found[page] = " > ".join(last)

    try:
        walk(list(reader.outline), [])  # type: ignore[attr-defined]
    except Exception:
        return {}
    return found


# -- DOCX ---------------------------------------------------------------------------------------


def _parse_docx(data: bytes, name: str) -> ParsedDocument:
    if data.startswith(b"\xd0\xcf\x11\xe0"):
        raise RAGError(
            f"{name}: this is an encrypted .docx or an old binary Word .doc; save it "
            "as an unprotected .docx first."
        )
    if not data.startswith(b"PK\x03\x04"):
        raise RAGError(
            f"{name}: the file is not a valid .docx (not a zip archive); it is corrupt or misnamed."
        )
    _check_archive(data, name)
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(io.BytesIO(data))
        blocks: list[tuple[str | None, str]] = []
        path = _HeadingPath()
        heading: str | None = None
        body: list[str] = []
        for child in document.element.body.iterchildren():
            tag = child.tag.rsplit("}", 1)[-1]
            if tag == "p":
                para = Paragraph(child, document)
                text = para.text.strip()
                level = _docx_heading_level(para)
                if level is not None and text:
                    blocks.append((heading, "\n\n".join(body)))
                    heading, body = path.push(level, " ".join(text.split())), []
                elif text:
                    body.append(text)
            elif tag == "tbl":
                table = Table(child, document)
                for row in table.rows:
                    cells = [" ".join(c.text.split()) for c in row.cells]
                    line = " | ".join(dict.fromkeys(c for c in cells if c))  # merged cells repeat
                    if line:
                        body.append(line)
        blocks.append((heading, "\n\n".join(body)))
    except (RAGError, MemoryError):  # out of memory is the worker's to word
        raise
    except Exception as exc:
        raise RAGError(
            f"{name}: the .docx is corrupt and cannot be read "
            f"({type(exc).__name__}); save it again from Word or LibreOffice."
        ) from exc
    return _sections_from_blocks(blocks)


def _check_archive(data: bytes, name: str) -> None:
    """Refuse a zip whose contents are too big, too many or too compressed, before any member
    is inflated whole (see the module docstring); then inflate each member once in bounded
    chunks, so that a member bigger than the archive declares is refused too."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except Exception as exc:  # BadZipFile, struct.error, ValueError, EOFError, ...
        raise RAGError(
            f"{name}: the .docx is corrupt and cannot be read ({type(exc).__name__}); save it "
            "again from Word or LibreOffice."
        ) from exc
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise RAGError(
            f"{name}: the .docx holds {len(infos):,} files, over the limit of "
            f"{MAX_ARCHIVE_MEMBERS:,}; this is not a word-processor document."
        )
    total = sum(info.file_size for info in infos)
    if total > MAX_UNZIPPED_BYTES:
        raise RAGError(
            f"{name}: the .docx expands to {_size(total)}, over the limit of "
            f"{_size(MAX_UNZIPPED_BYTES)} of contents for one document; split it into "
            "smaller files."
        )
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 and lzma members inflate without a bound in zipfile; OOXML uses deflate
            raise RAGError(
                f"{name}: the .docx member {info.filename!r} uses compression method "
                f"{info.compress_type}, where a .docx uses deflate or none; save it again "
                "from Word or LibreOffice."
            )
        if info.flag_bits & 0x1:
            raise RAGError(
                f"{name}: the .docx member {info.filename!r} is encrypted; save an "
                "unprotected copy and add that."
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR_BYTES and ratio > MAX_MEMBER_RATIO:
            raise RAGError(
                f"{name}: the .docx member {info.filename!r} expands {ratio:,.0f}:1 "
                f"({_size(info.compress_size)} to {_size(info.file_size)}), over the limit of "
                f"{MAX_MEMBER_RATIO}:1 for members over {_size(RATIO_FLOOR_BYTES)}; this is "
                "not a word-processor document."
            )
    for info in infos:
        _check_member_size(data, info, name)


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_INFLATE_CHUNK = 1 * MiB


def _check_member_size(data: bytes, info: zipfile.ZipInfo, name: str) -> None:
    """Inflate one member from its raw bytes, at most `_INFLATE_CHUNK` at a time, and refuse it
    as soon as more comes out than its declared size (zipfile's `read()` inflates a member
    whole before cutting it to that size)."""

    def corrupt(why: str) -> RAGError:
        return RAGError(
            f"{name}: the .docx is corrupt ({why} in member {info.filename!r}); save it again "
            "from Word or LibreOffice."
        )

    head = data[info.header_offset : info.header_offset + _LOCAL_HEADER.size]
    if len(head) < _LOCAL_HEADER.size:
        raise corrupt("a truncated header")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    if signature != b"PK\x03\x04":
        raise corrupt("a bad header")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    raw = memoryview(data)[start : start + info.compress_size]
    if len(raw) < info.compress_size:
        raise corrupt("truncated data")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise corrupt("a size that does not match its data")
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    produced = 0
    try:
        for offset in range(0, len(raw), _INFLATE_CHUNK):
            pending = bytes(raw[offset : offset + _INFLATE_CHUNK])
            while True:
                out = len(inflater.decompress(pending, _INFLATE_CHUNK))
                produced += out
                if produced > info.file_size:
                    raise RAGError(
                        f"{name}: the .docx member {info.filename!r} expands to more than "
                        f"the {_size(info.file_size)} its archive declares; this is not a "
                        "word-processor document."
                    )
                pending = inflater.unconsumed_tail
                # a full chunk out may leave output inside zlib even when no input is left
                if inflater.eof or (not pending and out < _INFLATE_CHUNK):
                    break
            if inflater.eof:
                break
    except zlib.error as exc:
        raise corrupt("bad compressed data") from exc
    if not inflater.eof or produced != info.file_size:
        raise corrupt("a size that does not match its data")


def _size(n: int) -> str:
    """Bytes for a sentence: '1.0 GiB', '200 MiB', '980 KiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{n:,} bytes"


def _docx_heading_level(para: object) -> int | None:
    try:
        style = para.style.name or ""  # type: ignore[attr-defined]
    except Exception:
        return None
    if style == "Title":
        return 0  # above Heading 1: "Title > Chapter"
    m = re.match(r"(?i)heading\s*(\d)", style)
    return int(m.group(1)) if m else None
