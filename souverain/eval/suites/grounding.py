"""The grounding suite: asked about a document library, does the answer cite a passage, and
does the cited passage hold the fact the answer states?

The set (data/suites/grounding.jsonl + data/suites/grounding/*.md, written for souverain):
five short documents about invented places (a harbour, an orchard cooperative, a museum, a
mountain railway, a library), each with distinct facts no model can know beforehand, and
twelve questions whose answer is in exactly one document. A question is ``{"id", "question",
"answer": [accepted forms of the fact], "document": "path of the document, relative to the
JSONL file"}``.

The run goes through the server's Libraries API, as a user's client would: create a library
(``POST /v1/libraries``), upload the documents the questions name, wait until each is
processed, ask each question as a chat completion with the ``document_library`` tool
(temperature 0), and delete the library at the end (also after a failure). With
``options.library_id`` the questions are asked of that existing library instead (nothing
uploaded, nothing deleted; ``document`` is then compared with the passages' document names).

The answer's ``references`` (souverain's extension: every passage given to the model, with
``cited`` = the answer cites it by number) are what is scored, not the ``Sources:`` footer the
server appends (it lists every passage when none is cited):
- ``citation_rate``: the answer cites at least one passage;
- ``faithfulness``: a cited passage from the expected document contains the fact, and the
  answer (footer removed) states it (one of the accepted forms, whole words,
  case-insensitive);
- ``correctness``: the answer states the fact, cited or not (a model that answers right but
  never writes "[n]" scores here and not on the two above);
- ``retrieval_rate``: a passage given to the model contains the fact (retrieval, apart from
  the model).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from souverain.eval import EvalError
from souverain.eval.metrics import metric_of
from souverain.eval.suite import Example, Metric, Progress, SuiteOptions, SuiteResult, Target
from souverain.eval.suites.dataset import (
    DATA,
    Item,
    clip,
    read_items,
    run_items,
    take_evenly,
    worst,
)

MAX_TOKENS = 96
INGEST_TIMEOUT_S = 300.0
RETRYABLE = (429, 502, 503)
_FOOTER = re.compile(r"\n+\s*Sources:\s*\n", re.IGNORECASE)


class LibraryClient:
    """The few calls of La Plateforme's Libraries API and grounded chat this suite makes, over
    the target's URL and key (JSON, and one multipart upload)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float = 300.0) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/v1") else base + "/v1"
        self.api_key = api_key
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None, *,
             body: bytes | None = None, content_type: str = "application/json") -> Any:
        endpoint = self.url + path
        headers = {"Accept": "application/json"}
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
        if body is not None:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(6):
            request = urllib.request.Request(endpoint, data=body, headers=headers,
                                             method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                if exc.code in RETRYABLE and attempt < 5:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                detail = exc.read().decode("utf-8", "replace")[:300]
                hint = (" (the server runs with --no-libraries: restart it without, or skip "
                        "the grounding suite)" if exc.code == 400 and "librar" in detail
                        else "")
                raise EvalError(f"{method} {endpoint} refused the request (HTTP {exc.code}: "
                                f"{detail}){hint}") from None
            except urllib.error.URLError as exc:
                raise EvalError(f"cannot reach {endpoint} ({exc.reason}); is the server "
                                f"running?") from None
        raise AssertionError("unreachable")

    def create_library(self, name: str) -> str:
        lib = self.call("POST", "/libraries", {"name": name, "description":
                                               "souverain eval grounding (temporary)"})
        return str(lib["id"])

    def upload(self, library_id: str, name: str, data: bytes) -> str:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{name}\"\r\nContent-Type: text/markdown\r\n\r\n").encode() \
            + data + f"\r\n--{boundary}--\r\n".encode()
        doc = self.call("POST", f"/libraries/{library_id}/documents", body=body,
                        content_type=f"multipart/form-data; boundary={boundary}")
        return str(doc["id"])

    def wait_processed(self, library_id: str, document_ids: dict[str, str],
                       timeout_s: float = INGEST_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        pending = dict(document_ids)
        while pending:
            for name, doc_id in list(pending.items()):
                status = self.call("GET", f"/libraries/{library_id}/documents/{doc_id}/status")
                state = status.get("process_status")
                if state == "done":
                    del pending[name]
                elif state == "error":
                    raise EvalError(f"the server could not process {name} "
                                    f"({status.get('error')}); check the document")
            if pending and time.monotonic() > deadline:
                raise EvalError(f"{', '.join(pending)} not processed within {timeout_s:g} s; "
                                f"is the server's ingest worker busy?")
            if pending:
                time.sleep(0.3)

    def delete_library(self, library_id: str) -> None:
        self.call("DELETE", f"/libraries/{library_id}")

    def ask(self, model: str, library_id: str, question: str) -> dict[str, Any]:
        answer = self.call("POST", "/chat/completions", {
            "model": model, "temperature": 0.0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": question}],
            "tools": [{"type": "document_library", "library_ids": [library_id]}]})
        try:
            message = answer["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise EvalError(f"{self.url}/chat/completions answered without choices[0].message"
                            ) from None
        return {"content": message.get("content") or "",
                "references": message.get("references") or []}


def _fact_pattern(forms: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(" ".join(f.split())) for f in sorted(forms, key=len,
                                                                             reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def holds(text: str, forms: list[str]) -> bool:
    return _fact_pattern(forms).search(" ".join(text.split())) is not None


def answer_body(content: str) -> str:
    """The answer without the ``Sources:`` footer the server appends."""
    return _FOOTER.split(content, maxsplit=1)[0]


def score(item: Item, reply: dict[str, Any]) -> dict[str, Any]:
    """citation, faithfulness and retrieval of one grounded answer (see the module docstring)."""
    forms = [str(f) for f in item["answer"]]
    expected_doc = Path(str(item.get("document") or "")).name
    references = [r for r in reply["references"] if isinstance(r, dict)]
    cited = [r for r in references if r.get("cited")]
    body = answer_body(reply["content"])
    from_doc = [r for r in cited if not expected_doc
                or Path(str(r.get("document_name") or "")).name == expected_doc]
    supported = any(holds(str(r.get("text") or ""), forms) for r in from_doc)
    states = holds(body, forms)
    return {"id": item["id"], "citation": 1.0 if cited else 0.0,
            "faithfulness": 1.0 if supported and states else 0.0,
            "retrieval": 1.0 if any(holds(str(r.get("text") or ""), forms)
                                    for r in references) else 0.0,
            "states": states, "supported": supported,
            "cited_documents": sorted({str(r.get("document_name")) for r in cited})}


class GroundingSuite:
    """Grounded answers over a document library: citations and faithfulness."""

    name = "grounding"
    description = ("answers over a document library cite a passage that holds the fact "
                   "they state (citation_rate, faithfulness)")

    def items(self, options: SuiteOptions) -> list[Item]:
        """The questions, each with ``_folder``: the folder its ``document`` is relative to
        (the JSONL file's)."""
        sources = ([(Path(p), Path(p).resolve().parent) for p in options.files]
                   or [(DATA / "grounding.jsonl", DATA)])
        items: list[Item] = []
        seen: set[str] = set()
        for path, folder in sources:
            for item in read_items(path, ("question", "answer"), suite=self.name):
                if item["id"] in seen:
                    raise EvalError(f"{path}: id {item['id']!r} is also in another file; ids "
                                    f"must be unique across the files of a run")
                seen.add(item["id"])
                if not isinstance(item["answer"], list) or not item["answer"]:
                    raise EvalError(f"grounding item {item['id']!r}: answer must be a "
                                    f"non-empty list of accepted forms of the fact")
                if options.library_id is None and not item.get("document"):
                    raise EvalError(f"grounding item {item['id']!r} names no document to "
                                    f"upload; add document (a path relative to its JSONL "
                                    f"file) or pass an existing library (--library-id)")
                items.append({**item, "_folder": str(folder)})
        return take_evenly(items, options.limit, lambda i: str(i.get("document") or ""))

    def size(self, options: SuiteOptions) -> int:
        return len(self.items(options))

    def run(self, target: Target, options: SuiteOptions,
            progress: Progress | None = None) -> SuiteResult:
        start = time.perf_counter()
        items = self.items(options)
        client = LibraryClient(target.url, getattr(target, "api_key", None),
                               float(getattr(target, "timeout_s", 300.0)))
        own = options.library_id is None
        notes = []
        if own:
            library_id = client.create_library(f"souverain-eval-{secrets.token_hex(4)}")
        else:
            library_id = str(options.library_id)
            notes.append(f"asked of the existing library {library_id} (nothing uploaded)")
        try:
            if own:
                documents = sorted({(i["_folder"], str(i["document"])) for i in items})
                ids = {}
                for folder, relative in documents:
                    path = Path(folder) / relative
                    try:
                        data = path.read_bytes()
                    except OSError as exc:
                        raise EvalError(f"cannot read the grounding document {path} "
                                        f"({exc.strerror}); fix its path in the JSONL") from None
                    ids[relative] = client.upload(library_id, path.name, data)
                client.wait_processed(library_id, ids)
                notes.append(f"uploaded {len(ids)} document(s) to a temporary library, "
                             f"deleted after the run")

            def ask(item: Item) -> dict[str, Any]:
                return client.ask(target.model, library_id, item["question"])

            replies = run_items(target, ask, items, options.concurrency, progress)
        except BaseException:
            if own:  # best effort: the error that stopped the run is the one to report
                with contextlib.suppress(EvalError):
                    client.delete_library(library_id)
            raise
        if own:
            client.delete_library(library_id)
        rows = [score(item, reply) for item, reply in zip(items, replies)]
        examples = [Example(
            item["id"], item["question"], clip(reply["content"]),
            (row["citation"] + row["faithfulness"]) / 2,
            expected=f"{item['answer'][0]} (from {Path(str(item.get('document'))).name}), "
                     f"cited",
            detail={k: row[k] for k in ("states", "supported", "retrieval",
                                        "cited_documents")})
            for item, reply, row in zip(items, replies, rows)]
        result = SuiteResult(self.name, target.model, metrics(rows), worst(examples, 20),
                             notes=notes + ["scored from the answer's references (cited "
                                            "passages), not its Sources: footer"],
                             settings={"max_tokens": MAX_TOKENS, "temperature": 0.0,
                                       "items": len(items)})
        result.duration_s = time.perf_counter() - start
        return result


def metrics(rows: list[dict[str, Any]]) -> dict[str, Metric]:
    return {
        "citation_rate": metric_of("citation_rate", {r["id"]: r["citation"] for r in rows},
                                   description="answers that cite at least one passage"),
        "faithfulness": metric_of(
            "faithfulness", {r["id"]: r["faithfulness"] for r in rows},
            description="answers stating the fact, backed by a cited passage that holds it"),
        "correctness": metric_of(
            "correctness", {r["id"]: 1.0 if r["states"] else 0.0 for r in rows},
            description="answers stating the fact, cited or not"),
        "retrieval_rate": metric_of(
            "retrieval_rate", {r["id"]: r["retrieval"] for r in rows},
            description="questions for which a passage given to the model holds the fact"),
    }
