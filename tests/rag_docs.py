"""Real test documents for the RAG tests, built in code: a Markdown handbook, and PDFs written
byte by byte (one text object per page, Helvetica, a correct xref table) so that pypdf reads
them exactly as it reads a PDF from a word processor."""

from __future__ import annotations

HANDBOOK_MD = """\
# Acme employee handbook

## Working hours

The standard working week is 37.5 hours, Monday to Friday. Core hours are 10:00 to 16:00.

## Notice period

An employee who resigns gives written notice to their manager. The notice period is one month
for junior staff, two months for engineers and three months for a senior engineer or any
manager. Notice starts on the first day of the month after the letter is received.

## Remote work

Remote work is allowed up to three days a week. It is approved by the team lead and recorded
in the HR portal.

## Annual leave

Full-time employees get 27 days of paid annual leave per calendar year, plus public holidays.
Up to five unused days can be carried over to the next year.
"""


# a two-page PDF (make_pdf) whose page 2 holds the fact the RAG tests ask for
TRAVEL_PAGES = [
    "Acme travel policy. Section 1: Booking. All trips are booked through the travel desk at "
    "least two weeks ahead. Economy class is the rule for flights under six hours.",
    "Section 2: Daily allowances. The per diem for a business trip to Lyon is 87 euros; for "
    "Paris it is 112 euros. Receipts are not required for the per diem.",
]


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _wrap(text: str, width: int = 90) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


def make_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one page of (wrapped) text per entry of `pages`."""
    objects: list[bytes] = []
    n_pages = len(pages)
    font_id = 3 + 2 * n_pages
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, text in enumerate(pages):
        content_id = 4 + 2 * i
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       f"/Resources << /Font << /F1 {font_id} 0 R >> >> "
                       f"/Contents {content_id} 0 R >>".encode())
        ops = ["BT", "/F1 11 Tf", "14 TL", "50 740 Td"]
        for line in _wrap(text):
            ops.append(f"({_escape(line)}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for num, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % num + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += (b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
            % (len(objects) + 1, xref))
    return bytes(out)


HANDBOOK_HTML = b"""<!doctype html><html><head><title>Handbook</title><style>p{color:red}</style>
</head><body><nav><a href="/">Home</a></nav><h1>Acme employee handbook</h1>
<h2>Notice period</h2><p>The notice period is <b>three months</b> for a senior engineer.</p>
<table><tr><th>Grade</th><th>Notice</th></tr><tr><td>Junior</td><td>one month</td></tr></table>
<ul><li>Written notice.</li><li>To the manager.</li></ul></body></html>"""


def make_docx(blocks: list[tuple[str, str]]) -> bytes:
    """A .docx written by python-docx; blocks: ("h1"|"h2"|"p", text)."""
    import io

    import docx

    document = docx.Document()
    for kind, text in blocks:
        if kind.startswith("h"):
            document.add_heading(text, level=int(kind[1]))
        else:
            document.add_paragraph(text)
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()
