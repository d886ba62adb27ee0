"""Document libraries and grounded chat through the official `mistralai` SDK and raw HTTP,
against a real `souverain serve` on 127.0.0.1 (bundled SmolLM2 + bundled MiniLM embedder).

The flow of the issue: libraries.create -> documents.upload (md and pdf) -> status done ->
a chat completion with the document_library tool answers citing the right document (and
page) -> documents.delete -> the passage is no longer retrieved. Plus the bad inputs: an
unsupported type, a corrupt PDF, an empty document, a 200 MB upload, an unknown library.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from rag_docs import HANDBOOK_MD, TRAVEL_PAGES, make_pdf
from server_utils import ServerProcess

# generous timeouts: CI machines are busy, and nothing here is latency-bound
http = httpx.Client(timeout=120)

mistralai = pytest.importorskip("mistralai")
from mistralai.client import Mistral  # noqa: E402
from mistralai.client import errors as sdk_errors  # noqa: E402

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("souverain-home")
    srv = ServerProcess("smollm2-135m-instruct", "--name", "smollm2", "--kv-cache-gib", "0.5",
                        "--max-upload-mib", "8", env={"SOUVERAIN_HOME": str(home)})
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Mistral:
    return Mistral(api_key="unused-on-loopback", server_url=server.url, timeout_ms=120_000)


def wait_done(client: Mistral, library_id: str, document_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = client.beta.libraries.documents.status(library_id=library_id,
                                                    document_id=document_id)
        if st.process_status in ("done", "error"):
            return st.process_status
        assert time.monotonic() < deadline, f"document {document_id} still {st.process_status}"
        time.sleep(0.2)


def ask(client: Mistral, library_id: str, question: str) -> str:
    """The answer text of a grounded chat completion, through the SDK."""
    res = client.chat.complete(model="smollm2", temperature=0, max_tokens=48,
                               messages=[{"role": "user", "content": question}],
                               tools=[{"type": "document_library",
                                       "library_ids": [library_id]}])
    text = res.choices[0].message.content
    assert isinstance(text, str)
    return text


def raw_ask(server: ServerProcess, library_ids: list[str], question: str,
            stream: bool = False) -> dict:
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 48, "stream": stream,
            "messages": [{"role": "user", "content": question}],
            "tools": [{"type": "document_library", "library_ids": library_ids}]}
    r = http.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json() if not stream else {"sse": r.text}


def test_sdk_library_flow(client: Mistral, server: ServerProcess) -> None:
    lib = client.beta.libraries.create(name="acme", description="Acme policies")
    assert lib.name == "acme" and lib.nb_documents == 0
    assert any(x.id == lib.id for x in client.beta.libraries.list().data)

    md = client.beta.libraries.documents.upload(
        library_id=lib.id, file={"file_name": "handbook.md", "content": HANDBOOK_MD.encode()})
    pdf = client.beta.libraries.documents.upload(
        library_id=lib.id, file={"file_name": "travel-policy.pdf",
                                 "content": make_pdf(TRAVEL_PAGES)})
    assert wait_done(client, lib.id, md.id) == "done"
    assert wait_done(client, lib.id, pdf.id) == "done"
    got = client.beta.libraries.documents.get(library_id=lib.id, document_id=pdf.id)
    assert got.number_of_pages == 2 and got.tokens_processing_total > 0
    listed = client.beta.libraries.documents.list(library_id=lib.id)
    assert listed.pagination.total_items == 2
    text = client.beta.libraries.documents.text_content(library_id=lib.id, document_id=pdf.id)
    assert "per diem for a business trip to Lyon is 87 euros" in text.text
    assert client.beta.libraries.get(library_id=lib.id).nb_documents == 2

    # grounded answers cite the right document (and the right page of the PDF)
    answer = ask(client, lib.id, "What is the notice period for a senior engineer?")
    assert "Sources:" in answer and "handbook.md" in answer.split("Sources:")[1]
    body = raw_ask(server, [lib.id], "How much is the daily allowance for a trip to Lyon?")
    refs = body["choices"][0]["message"]["references"]
    assert refs[0]["document_name"] == "travel-policy.pdf" and refs[0]["page"] == 2
    assert "87 euros" in refs[0]["text"]
    assert body["usage"]["prompt_tokens"] > 100  # the passages are in the prompt

    # the same through a stream: the last delta carries the sources and the references
    sse = raw_ask(server, ["acme"], "How much is the daily allowance for a trip to Lyon?",
                  stream=True)["sse"]
    assert '"references"' in sse and "travel-policy.pdf" in sse and sse.endswith(
        "data: [DONE]\n\n")

    # the passages themselves (souverain's search route, what the console's search uses)
    search = f"{server.url}/v1/libraries/{lib.id}/search"
    r = httpx.post(search, json={"query": "notice period of a senior engineer", "top_k": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert 1 <= len(hits) <= 3 and hits[0]["document_name"] == "handbook.md"
    assert "notice" in hits[0]["text"].lower() and -1 <= hits[0]["vector_score"] <= 1
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    r = httpx.post(search, json={"query": "Lyon", "mode": "text", "document_ids": [pdf.id]},
                   timeout=60)
    assert r.status_code == 200 and {h["document_id"] for h in r.json()["data"]} == {pdf.id}
    assert r.json()["data"][0]["page"] == 2
    for bad in ({"query": ""}, {"query": "x", "top_k": 0}, {"query": "x", "mode": "fuzzy"},
                {"query": "x", "extra": 1}):
        assert httpx.post(search, json=bad, timeout=30).status_code == 422, bad
    missing = httpx.post(f"{server.url}/v1/libraries/nope/search", json={"query": "x"},
                         timeout=30)
    assert missing.status_code == 404 and missing.json()["object"] == "error"

    # nothing relevant: said plainly, no invention
    body = raw_ask(server, [lib.id], "What is the boiling point of liquid nitrogen on Mars?")
    msg = body["choices"][0]["message"]
    assert msg["references"] == [] and "could not find" in msg["content"]

    # delete -> no longer retrieved
    client.beta.libraries.documents.delete(library_id=lib.id, document_id=pdf.id)
    body = raw_ask(server, [lib.id], "How much is the daily allowance for a trip to Lyon?")
    refs = body["choices"][0]["message"]["references"]
    assert all(r["document_name"] != "travel-policy.pdf" for r in refs)
    assert client.beta.libraries.get(library_id=lib.id).nb_documents == 1

    client.beta.libraries.delete(library_id=lib.id)
    with pytest.raises(sdk_errors.SDKError) as exc:
        client.beta.libraries.get(library_id=lib.id)
    assert exc.value.status_code == 404


def _upload(server: ServerProcess, library_id: str, name: str, data: bytes) -> httpx.Response:
    return http.post(f"{server.url}/v1/libraries/{library_id}/documents",
                      files={"file": (name, data)})


def test_bad_documents(server: ServerProcess) -> None:
    lib = http.post(server.url + "/v1/libraries", json={"name": "bad-inputs"}).json()
    # unsupported type, corrupt PDF, empty document: 400 with a sentence, nothing stored
    for name, data, words in [
        ("photo.exe", b"MZ\x90\x00binary", "supported"),
        ("broken.pdf", b"%PDF-1.7\nthis is not really a pdf", "broken.pdf"),
        ("empty.md", b"   \n\n  ", "empty"),
    ]:
        r = _upload(server, lib["id"], name, data)
        assert r.status_code == 400, (name, r.text)
        err = r.json()
        assert err["object"] == "error" and words in err["message"], err
    docs = http.get(f"{server.url}/v1/libraries/{lib['id']}/documents").json()
    assert docs["pagination"]["total_items"] == 0
    assert http.get(f"{server.url}/v1/libraries/{lib['id']}").json()["total_size"] == 0

    # a library that does not exist
    r = _upload(server, "no-such-library", "a.md", b"# A\ntext")
    assert r.status_code == 404 and "no-such-library" in r.json()["message"]
    r = raw_post(server, {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "document_library", "library_ids": ["nope"]}]})
    assert r.status_code == 404 and "nope" in r.json()["message"]


def raw_post(server: ServerProcess, body: dict) -> httpx.Response:
    return http.post(server.url + "/v1/chat/completions", json=body)


def test_200mb_upload_refused_before_reading(server: ServerProcess) -> None:
    lib = http.post(server.url + "/v1/libraries", json={"name": "big"}).json()
    head = (f"POST /v1/libraries/{lib['id']}/documents HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {200 * 1024 * 1024}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head + b"--x\r\n")
        reply = b""
        while b"}" not in reply:  # headers, then the JSON error body
            data = s.recv(65536)
            if not data:
                break
            reply += data
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "--max-upload-mib" in reply
    # and a chunked body over the limit (no Content-Length): cut off once it passes 8 MiB
    def body():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\n"
        for _ in range(20):
            yield b"a" * (1 << 20)
    r = http.post(f"{server.url}/v1/libraries/{lib['id']}/documents", content=body(),
                   headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    docs = http.get(f"{server.url}/v1/libraries/{lib['id']}/documents").json()
    assert docs["pagination"]["total_items"] == 0
