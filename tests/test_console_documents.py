"""The console's Documents page, in a real headless Chromium against a real `souverain serve`
(bundled SmolLM2 + the bundled MiniLM embedder, libraries on, its own data folder).

Through the page only: create a library; upload a Markdown handbook, a two-page PDF and a
corrupt PDF at once through the page's file input (the corrupt one is refused with the API's
reason, the others reach "done"), and a text file dropped on the drop zone; ask a question, get an answer with numbered citations, and
click one: the cited passage opens beside the answer with the right document, page and text;
search the passages; delete a document and the library (each after a confirmation). The page
contacts no host but the server and logs no browser error; the page also speaks French.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from console_utils import (
    browser,
    console_errors,
    foreign_requests,
    screenshots,
    text_of,
    wait_for,
    write_files,
)
from rag_docs import HANDBOOK_MD, TRAVEL_PAGES, make_pdf
from server_utils import ServerProcess

CSS = "css selector"
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("console-documents")
    srv = ServerProcess("smollm2-135m-instruct", "--name", "smollm2", "--kv-cache-gib", "0.5",
                        "--data-dir", str(home), env={"SOUVERAIN_HOME": str(home)})
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    out = {"handbook.md": HANDBOOK_MD.encode(), "travel-policy.pdf": make_pdf(TRAVEL_PAGES),
           "broken.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage"}
    return write_files(folder, out)


@pytest.fixture(scope="module")
def driver(server: ServerProcess) -> Any:
    with browser() as d:
        yield d


def _status(d: Any, name: str) -> str | None:
    """The processing status the documents table shows for `name` (None: not listed)."""
    for badge in d.find_elements(CSS, "#documents .badge[data-status]"):
        if badge.get_attribute("data-doc") == name:
            return str(badge.get_attribute("data-status"))
    return None


def _row(d: Any, name: str) -> Any:
    """The documents table's row of `name`."""
    return next(tr for tr in d.find_elements(CSS, "#documents tbody tr")
                if tr.find_element(CSS, ".doc-name").text == name)


def test_create_a_library_and_upload_documents(driver: Any, server: ServerProcess,
                                               files: dict[str, Path]) -> None:
    d = driver
    d.get(server.url + "/#/documents")
    wait_for(lambda: "No library yet" in text_of(d, "#libraries"), 60, what="the empty list")
    d.find_element(CSS, "#library-create").click()  # no name: said, nothing sent
    wait_for(lambda: "Give the library a name" in text_of(d, "#library-form"), 10,
             what="the missing name")
    d.find_element(CSS, "#library-name").send_keys("Acme policies")
    d.find_element(CSS, "#library-description").send_keys("HR and travel rules")
    d.find_element(CSS, "#library-create").click()
    # straight into the new library
    wait_for(lambda: "library=" in d.current_url and d.find_elements(CSS, "#document-files"),
             30, what="the new library's page")
    assert "Acme policies" in text_of(d, "#page-documents h1")
    assert "HR and travel rules" in text_of(d, "#page-documents")
    libs = httpx.get(server.url + "/v1/libraries", timeout=30).json()["data"]
    assert [(x["name"], x["description"]) for x in libs] == [("Acme policies",
                                                               "HR and travel rules")]

    # three files at once through the file input (what the "Choose files" button opens)
    d.find_element(CSS, "#document-files").send_keys(
        "\n".join(str(files[n]) for n in ("handbook.md", "travel-policy.pdf", "broken.pdf")))
    wait_for(lambda: len(d.find_elements(CSS, "#uploads li")) == 3, 30, what="3 upload rows")
    # the corrupt PDF is refused with the API's own reason, in its row
    wait_for(lambda: "corrupt" in " ".join(
        li.text for li in d.find_elements(CSS, "#uploads li") if "broken.pdf" in li.text),
        60, what="the corrupt PDF's refusal")
    # the others are processed: todo -> in_progress -> done, followed by polling
    wait_for(lambda: _status(d, "handbook.md") == "done"
             and _status(d, "travel-policy.pdf") == "done", 180, what="both documents done")
    assert _status(d, "broken.pdf") is None
    rows = {li.find_element(CSS, ".upload-name").text: li
            for li in d.find_elements(CSS, "#uploads li")}
    wait_for(lambda: all(rows[n].find_element(CSS, ".badge").get_attribute("data-status")
                         == "done" for n in ("handbook.md", "travel-policy.pdf")), 30,
             what="the upload rows to say done")
    assert "Ready" in rows["travel-policy.pdf"].text
    assert _row(d, "travel-policy.pdf").find_element(CSS, "td[data-label=Pages]").text == "2"
    # drag and drop onto the drop zone (a drop event carrying a file, as a file manager sends)
    d.execute_script("""
        const zone = document.querySelector('.dropzone');
        const data = new DataTransfer();
        data.items.add(new File(['Visitors sign in at the front desk and wear a badge.'],
                                'visitors.txt', {type: 'text/plain'}));
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: data, bubbles: true,
                                                      cancelable: true}));
        window.__over = zone.classList.contains('over');
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true,
                                                  cancelable: true}));""")
    assert d.execute_script("return window.__over") is True
    assert not d.find_element(CSS, ".dropzone").get_attribute("class").endswith("over")
    wait_for(lambda: _status(d, "visitors.txt") == "done", 120, what="the dropped file done")
    assert len(d.find_elements(CSS, "#uploads li")) == 4
    # the only browser errors so far: the refused upload's 400
    errors = console_errors(d)
    assert errors and all("400" in e for e in errors), errors


def test_ask_answers_with_citations_that_open_the_passage(driver: Any,
                                                         server: ServerProcess) -> None:
    d = driver
    assert [o.text for o in d.find_elements(CSS, "#documents-model option")] == ["smollm2"]
    d.find_element(CSS, "#ask-question").send_keys(
        "How much is the per diem for a business trip to Lyon?")
    d.find_element(CSS, "#ask-button").click()
    wait_for(lambda: d.find_elements(CSS, "#sources"), 180, what="the answer and its sources")
    answer = text_of(d, "#answer-text")
    assert answer and "Sources:" not in answer  # the server's list is drawn as buttons
    citations = d.find_elements(CSS, "#answer button.citation")
    assert citations, text_of(d, "#answer")
    # the first passage given is the PDF's second page (retrieval, not the model, decides)
    first = d.find_element(CSS, "#sources li")
    assert "travel-policy.pdf" in first.text and "page 2" in first.text
    first.find_element(CSS, "button.citation").click()
    wait_for(lambda: d.find_elements(CSS, "#passage .passage-text"), 10, what="the passage")
    assert text_of(d, "#passage .passage-doc") == "travel-policy.pdf"
    assert text_of(d, "#passage .passage-page") == "2"
    assert "87 euros" in text_of(d, "#passage .passage-text")
    assert first.find_element(CSS, "button.citation").get_attribute("aria-pressed") == "true"

    # passage search: the handbook's notice period section, with its heading
    d.find_element(CSS, "#search-query").send_keys("notice period of a senior engineer")
    d.find_element(CSS, "#search-button").click()
    wait_for(lambda: d.find_elements(CSS, "#search-results .search-hit"), 120,
             what="search results")
    hit = d.find_element(CSS, "#search-results .search-hit")
    assert hit.find_element(CSS, ".hit-doc").text == "handbook.md"
    assert "Notice period" in hit.find_element(CSS, ".hit-heading").text
    assert "three months for a senior engineer" in hit.find_element(CSS, ".passage-text").text
    screenshots(d, "documents")


def test_delete_a_document_and_the_library(driver: Any, server: ServerProcess) -> None:
    d = driver

    def row(name: str) -> Any:
        return _row(d, name)

    row("travel-policy.pdf").find_element(CSS, ".confirm button.danger").click()
    assert "Delete “travel-policy.pdf”?" in row("travel-policy.pdf").text
    row("travel-policy.pdf").find_element(CSS, ".confirm button.secondary").click()  # cancel
    assert _status(d, "travel-policy.pdf") == "done"
    row("travel-policy.pdf").find_element(CSS, ".confirm button.danger").click()
    row("travel-policy.pdf").find_element(CSS, ".confirm button.danger").click()  # yes
    wait_for(lambda: _status(d, "travel-policy.pdf") is None, 30, what="the row to go")
    assert _status(d, "handbook.md") == "done" and _status(d, "visitors.txt") == "done"
    lib_id = d.current_url.split("library=")[1]
    docs = httpx.get(f"{server.url}/v1/libraries/{lib_id}/documents", timeout=30).json()
    assert sorted(x["name"] for x in docs["data"]) == ["handbook.md", "visitors.txt"]

    d.execute_script("window.scrollTo(0, 0)")  # the link is under the sticky header otherwise
    d.find_element(CSS, "#libraries-back").click()
    wait_for(lambda: "Acme policies" in text_of(d, "#libraries"), 30, what="the library list")
    assert text_of(d, "#libraries td[data-label=Documents]") == "2"  # two documents left
    d.find_element(CSS, "#libraries .confirm button.danger").click()
    assert "with its documents (2)" in text_of(d, "#libraries .confirm")
    d.find_element(CSS, "#libraries .confirm button.danger").click()
    wait_for(lambda: "No library yet" in text_of(d, "#libraries"), 30, what="the empty list")
    assert httpx.get(server.url + "/v1/libraries", timeout=30).json()["data"] == []
    assert foreign_requests(d, server.url) == []
    assert console_errors(d) == []


def test_in_french(server: ServerProcess) -> None:
    with browser("fr-FR") as d:
        d.get(server.url + "/#/documents")
        wait_for(lambda: "Aucune bibliothèque" in text_of(d, "#libraries"), 60,
                 what="the French page")
        page = text_of(d, "#page-documents")
        assert "Bibliothèques" in page and "Nouvelle bibliothèque" in page
        assert foreign_requests(d, server.url) == []
        assert console_errors(d) == []
