"""A batch's lines: the requests read from JSONL, the result lines written for them, and the
`Journal` that makes a job's progress durable.

Input: one JSON object per line, ``{"custom_id": "...", "body": {...}}`` (La Plateforme's and
OpenAI's batch input; OpenAI's ``method`` and ``url`` are accepted and ignored). Lines are read
with the JSONL rules of the files API (`souverain.finetune.jsonl`: ``\\n`` ends a line,
strict UTF-8 JSON). A line that cannot run (not JSON, not an object, no ``custom_id``, a
``custom_id`` an earlier line holds, no ``body`` object) becomes an error line; the others run.

Output (the shape of OpenAI's batch output, which La Plateforme's documentation shows and the
``mistralai`` SDK's ``extra.batch`` client parses): one line per request,

    {"id": "batch-<job8>-<line>", "custom_id": "...",
     "response": {"status_code": 200, "body": <the endpoint's JSON response>}, "error": null}

A request the endpoint refused keeps its response (``status_code`` 4xx and the API's error
body) and gets ``"error": {"code", "message"}``; a line that could not be run at all has
``"response": null``. Successes go to the output file and failures to the error file, in input
order. A line without a usable ``custom_id`` (none, or one already taken) gets ``null`` there,
so a ``custom_id`` names one line across both files; its message names the line number.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from souverain.finetune import jsonl

# the routes a batch line may run on (the server and `souverain batch run` take the same)
ENDPOINTS = ("/v1/chat/completions", "/v1/fim/completions", "/v1/completions",
             "/v1/embeddings")


@dataclass
class InputLine:
    """Request ``index`` (0-based over every non-blank line of the job's inputs)."""

    index: int
    where: str  # "requests.jsonl line 7", for messages
    custom_id: str | None
    body: dict[str, Any] | None
    problem: dict[str, Any] | None = None  # an error line, when the line cannot run


def read_lines(sources: Iterable[tuple[str, bytes]],
               max_line_bytes: int | None = None) -> list[InputLine]:
    """Every request of ``sources`` (``(name, JSONL bytes)``, in order), checked one by one.

    Total: any bytes give a list (a bad line is an `InputLine` with its ``problem``)."""
    out: list[InputLine] = []
    seen: dict[str, str] = {}
    for name, data in sources:
        try:
            for n, row in jsonl.lines(io.BytesIO(data), max_line_bytes):
                if jsonl.is_blank(row):
                    continue
                out.append(_check(len(out), f"{name} line {n}", row, n, seen))
        except jsonl.JSONLError as exc:  # a line over the limit: the rest of the file too
            out.append(InputLine(len(out), f"{name} line {exc.line}", None, None,
                                 _problem("invalid_line", f"{name} line {exc.line} "
                                                          f"{exc.reason}")))
    return out


def _check(index: int, where: str, row: bytes, n: int, seen: dict[str, str]) -> InputLine:
    try:
        obj = jsonl.parse(row, n)
    except jsonl.JSONLError as exc:
        return InputLine(index, where, None, None, _problem("invalid_json",
                                                            f"{where} {exc.reason}"))
    if not isinstance(obj, dict):
        return InputLine(index, where, None, None, _problem(
            "invalid_line", f"{where} is not a JSON object; write "
                            '{"custom_id": "...", "body": {...}} on each line'))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return InputLine(index, where, None, None, _problem(
            "missing_custom_id", f"{where} has no custom_id (a non-empty string); give each "
                                 "request its own custom_id to find its result"))
    if cid in seen:
        return InputLine(index, where, None, None, _problem(
            "duplicate_custom_id", f"{where}: custom_id {cid!r} is already used by "
                                   f"{seen[cid]}; custom_ids must be unique in a batch"))
    seen[cid] = where
    body = obj.get("body")
    if not isinstance(body, dict):
        return InputLine(index, where, cid, None, _problem(
            "missing_body", f"{where} (custom_id {cid!r}) has no body object; put the request "
                            "the endpoint takes in \"body\""))
    return InputLine(index, where, cid, body)


def _problem(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message.rstrip(".") + "."}


def result_line(job_id: str, line: InputLine, status: int | None,
                body: dict[str, Any] | None) -> tuple[bool, dict[str, Any]]:
    """``(succeeded, the output or error line)`` of one request: ``status``/``body`` are the
    endpoint's answer (None for a line that could not run)."""
    rid = f"batch-{job_id[:8]}-{line.index}"
    if line.problem is not None or status is None:
        problem = line.problem or _problem("not_run", f"{line.where} did not run")
        return False, {"id": rid, "custom_id": line.custom_id, "response": None,
                       "error": problem}
    response = {"status_code": status, "body": body}
    if status < 400:
        return True, {"id": rid, "custom_id": line.custom_id, "response": response,
                      "error": None}
    message = body.get("message") if isinstance(body, dict) else None
    fields = body if isinstance(body, dict) else {}
    error = {"code": fields.get("code") or fields.get("type") or str(status),
             "message": f"{line.where}: {message or f'HTTP {status}'}"}
    return False, {"id": rid, "custom_id": line.custom_id, "response": response,
                   "error": error}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class Journal:
    """The finished requests of one job: one line ``{"i": index, "ok": bool, "line": {...}}``
    per request, appended and fsync'd before the request counts as done. A job resumed after
    a crash (kill -9 included) skips the indexes already here and runs the others, so every
    request ends in exactly one output or error line: a request in flight at the crash was
    not journaled and runs again; a torn last line (the crash came mid-write) is cut off."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self.done: dict[int, bool] = {}  # index -> succeeded

    def recover(self) -> dict[int, bool]:
        """Read what an earlier run finished (cutting a torn tail); returns ``done``. Waits
        for an `append` in progress (on another thread) to end first."""
        with self._lock:
            return self._recover()

    def _recover(self) -> dict[int, bool]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        good = 0
        for row in data.splitlines(keepends=True):
            if not row.endswith(b"\n"):
                break
            try:
                entry = json.loads(row)
                index, ok = int(entry["i"]), bool(entry["ok"])
            except (ValueError, KeyError, TypeError):
                break
            if index not in self.done:
                self.done[index] = ok
            good += len(row)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return self.done

    def append(self, index: int, ok: bool, line: dict[str, Any]) -> None:
        """Record request ``index`` as finished, durably (write + fsync) before returning."""
        row = dumps({"i": index, "ok": ok, "line": line})
        with self._lock:
            if index in self.done:
                return
            with open(self.path, "ab") as f:
                f.write(row)
                f.flush()
                os.fsync(f.fileno())
            self.done[index] = ok

    def counts(self) -> tuple[int, int]:
        """``(finished, succeeded)`` so far."""
        with self._lock:
            return len(self.done), sum(self.done.values())

    def entries(self) -> Iterator[tuple[int, bool, dict[str, Any]]]:
        """Every finished request, in input order."""
        found: dict[int, tuple[bool, dict[str, Any]]] = {}
        with self._lock, open(self.path, "rb") as f:
            for row in f:
                if row.endswith(b"\n"):
                    e = json.loads(row)
                    found.setdefault(int(e["i"]), (bool(e["ok"]), e["line"]))
        for index in sorted(found):
            ok, line = found[index]
            yield index, ok, line

    def outputs(self) -> tuple[bytes, bytes, int, int]:
        """``(output JSONL, error JSONL, succeeded, failed)`` in input order."""
        good, bad = io.BytesIO(), io.BytesIO()
        ok_n = bad_n = 0
        for _, ok, line in self.entries():
            (good if ok else bad).write(dumps(line))
            ok_n, bad_n = ok_n + ok, bad_n + (not ok)
        return good.getvalue(), bad.getvalue(), ok_n, bad_n
