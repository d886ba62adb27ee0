"""Files and fine-tuning jobs under bad input and faults (issue 15): every upload parser is
total, a line over the per-line limit is refused at upload, validation and training honour
cancel within seconds, reads never wait for SQLite's write lock, the query parameters accept
what /openapi.json says, a deleted file is erased (and audited), and a server killed with -9
resumes its interrupted job at start, even when the dead worker's pid names a live process.

`check_upload` is property-tested directly (many examples, both purposes) and through a real
server (fewer); the server is a tiny Llama checkpoint with fine-tuning on, its own data folder
and the audit log on.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import ServerProcess

from souverain.finetune import jsonl
from souverain.finetune.data import validate_file
from souverain.finetune.store import (
    CANCELLATION_REQUESTED,
    CANCELLED,
    RUNNING,
    VALIDATING,
    Busy,
    JobStore,
    WorkerLock,
)
from souverain.server.errors import APIError
from souverain.server.finetuning import check_upload, jobs_api_error


def conversation(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


def jsonl_bytes(objs: list[Any]) -> bytes:
    return ("\n".join(json.dumps(o) for o in objs) + "\n").encode()


GOOD = jsonl_bytes([conversation(i) for i in range(24)])
PURPOSES = ("fine-tune", "batch")


# -- check_upload is total ------------------------------------------------------------------

def _outcome(data: bytes, purpose: str, max_line_bytes: int | None = 4096
             ) -> tuple[str | None, int] | APIError:
    """The result of ``check_upload``, or its APIError: anything else fails the test."""
    try:
        return check_upload(data, "x.jsonl", purpose, max_line_bytes=max_line_bytes)
    except APIError as exc:
        assert exc.status == 400, exc.message
        assert exc.message.startswith("x.jsonl ") and exc.message.endswith("."), exc.message
        # the body must be JSON that a response can carry (no NaN, no lone surrogate)
        json.dumps(exc.message, allow_nan=False, ensure_ascii=False).encode("utf-8")
        return exc


_SAMPLES = [conversation(1), {"text": "plain text"}, {"prompt": "p", "chosen": "c",
                                                      "rejected": "r"},
            {"custom_id": "1", "body": {"messages": [], "temperature": 0.5, "n": 3}}]
_INSERTS = [b"\x00", b"\x1d", b"\x1c", b"\x1e", b"\x85", b"\xc2\x85", "\u2028".encode(),
            "\u2029".encode(), b"\r", b"\r\n", b"\n", b"\xef\xbb\xbf", b"\xff", b"\xc3",
            b"\xed\xa0\x80", b"NaN", b"-Infinity", b"Infinity", b"1e309", b"-1e400",
            b"9" * 5000, b"[" * 3000, b"{\"a\":" * 200, b'"\\ud800"', b'"\\udfff"', b"\t", b" ",
            b"\"", b"\\", b"}", b"]", b",", b":"]


@st.composite
def mutated_jsonl(draw: st.DrawFn) -> bytes:
    """Valid JSONL (one kind per file), then a few edits: bytes inserted (line separators of
    every kind, invalid UTF-8, BOM, NUL, non-finite and huge numbers, deep nesting, lone
    surrogates), a line cut short, CRLF line ends, a number swapped for NaN."""
    kind = draw(st.sampled_from(_SAMPLES))
    n = draw(st.integers(1, 5))
    text = "".join(json.dumps(kind) + draw(st.sampled_from(["\n", "\r\n"])) for _ in range(n))
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0:
            data[pos:pos] = draw(st.sampled_from(_INSERTS))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del data[pos:pos + draw(st.integers(1, 20))]
        else:
            data = bytearray(bytes(data).replace(b"0.5", draw(st.sampled_from(
                [b"NaN", b"Infinity", b"1e999", b"-0.0", b"5e-324"])), 1))
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), purpose=st.sampled_from(PURPOSES))
def test_check_upload_is_total_over_random_bytes(data: bytes, purpose: str) -> None:
    _outcome(data, purpose)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_jsonl(), purpose=st.sampled_from(PURPOSES))
def test_check_upload_is_total_over_mutated_jsonl(data: bytes, purpose: str) -> None:
    out = _outcome(data, purpose)
    if not isinstance(out, APIError):  # accepted: every non-blank line is a JSON object
        lines = [ln for _, ln in jsonl.lines(io.BytesIO(data)) if not jsonl.is_blank(ln)]
        assert out[1] == len(lines)
        assert all(isinstance(jsonl.parse(ln, 1), dict) for ln in lines)


@pytest.fixture(scope="module")
def model_dir(tiny_llama: dict) -> str:
    return str(tiny_llama["consolidated"])


@pytest.fixture(scope="module")
def tokenizer(model_dir: str):
    from souverain import weights

    return weights.load(model_dir).tokenizer


def test_upload_check_and_validation_read_lines_alike(tokenizer: Any, tmp_path: Path) -> None:
    """The upload check and the worker's validation share one reading of a JSONL file: what
    the upload refuses as not JSON (or not UTF-8) is refused by validation at the same line,
    and what it accepts has no such error there."""
    path = tmp_path / "f.jsonl"

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(data=mutated_jsonl())
    def check(data: bytes) -> None:
        path.write_bytes(data)
        report = validate_file(path, tokenizer, seq_len=256)
        syntax = {e.line for e in report.errors
                  if e.message.startswith(("not valid JSON", "not UTF-8", "nests", "holds a"))}
        out = _outcome(data, "fine-tune", max_line_bytes=None)
        if isinstance(out, APIError) and out.code == "invalid_jsonl" and "holds a JSON " \
                not in out.message:
            line = int(out.message.split(" line ", 1)[1].split()[0])
            assert line in syntax, (out.message, report.errors)
        elif not isinstance(out, APIError):
            assert not syntax, report.errors

    check()


@pytest.mark.parametrize("data, words", [
    (b"\x1d", "line 1 is not valid JSON"),  # issue 15 #3: str.splitlines() made it hang
    ("\u2028\n".encode(), "line 1 is not valid JSON"),  # (JSON whitespace is " \t\r\n")
    (b'{"text": "a"}\n\xc2\x85\n', "line 2 is not valid JSON"),  # U+0085 NEL
    (b"\n \t\r\n", "is empty"),
    (b'{"text": NaN}\n', "line 1 is not valid JSON: NaN"),
    (b'{"text": "a"}\n{"text": "b", "w": -Infinity}\n', "line 2 is not valid JSON: -Infinity"),
    (b'{"text": "a", "w": 1e309}\n', "1e309 is out of the range"),
    (b'{"text": "a", "w": ' + b"9" * 5000 + b"}\n", "more than 4300 digits"),
    (b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "more than 100 deep"),
    (b'{"text": "\\ud800"}\n', "lone UTF-16 surrogate"),
    (b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n', None),  # BOM + CRLF: fine
    (b'{"text": "caf\xe9"}\n', "line 1 is not UTF-8"),
    (b'{"text": "a"}\n{"text": "a\x00"}\n', "line 2 is not valid JSON"),
    (b'{"\\ud800": 1}\n', "lone UTF-16 surrogate"),
])
def test_check_upload_exact_cases(data: bytes, words: str | None) -> None:
    out = _outcome(data, "fine-tune", max_line_bytes=1 << 20)
    if words is None:
        assert not isinstance(out, APIError), out.message
        assert out[0] == "pretrain"
    else:
        assert isinstance(out, APIError) and words in out.message, out


def test_check_upload_line_limit_reads_no_more_than_the_limit() -> None:
    class Counting(io.BytesIO):
        read_bytes = 0

        def readline(self, size: int | None = -1) -> bytes:
            line = super().readline(size)
            Counting.read_bytes += len(line)
            return line

    data = b'{"text": "' + b"x" * (8 << 20) + b'"}\n'
    f = Counting(data)
    with pytest.raises(jsonl.JSONLError, match="longer than the limit of 1 MiB") as e:
        list(jsonl.lines(f, 1 << 20))
    assert e.value.line == 1 and Counting.read_bytes <= (1 << 20) + 2
    with pytest.raises(APIError, match="line 2 is longer than the limit of 1 KiB") as e2:
        check_upload(b'{"text": "a"}\n' + b'{"text": "' + b"y" * 1100 + b'"}\n', "t.jsonl",
                     "fine-tune", max_line_bytes=1024)
    assert e2.value.code == "line_too_long" and "--max-jsonl-line-kib" in e2.value.message


# -- the store: reads never wait for a writer; liveness by lock; the old schema -------------

def _hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another connection (as another process would) holding SQLite's write lock."""
    con = sqlite3.connect(db, isolation_level=None, timeout=1)
    con.execute("BEGIN IMMEDIATE")
    con.execute("UPDATE ft_jobs SET modified_at = modified_at")
    return con


def test_reads_do_not_wait_for_a_writer_and_writes_are_busy(tmp_path: Path) -> None:
    store = JobStore(None, tmp_path, busy_timeout_s=0.3)
    f = store.add_file(GOOD, "t.jsonl", "fine-tune", sample_type="instruct")
    job = store.create_job(model="tiny", model_path="/m",
                           training_files=[{"file_id": f.id, "weight": 1.0}])
    con = _hold_write_lock(tmp_path / "finetune" / "jobs.sqlite")
    try:
        t0 = time.monotonic()
        assert store.list_jobs()[1] == 1 and store.get_job(job.id).id == job.id
        assert store.list_files()[1] == 1 and store.events(job.id)
        assert time.monotonic() - t0 < 5  # (a read behind the lock would wait for the timeout)
        with pytest.raises(Busy) as e:
            store.cancel(job.id)
        err = jobs_api_error(e.value)
        assert err.status == 503 and err.headers == {"Retry-After": "2"}
        assert "try again" in err.message
    finally:
        con.rollback()
        con.close()
    assert store.cancel(job.id).status == CANCELLED
    store.close()


def test_a_database_of_the_previous_schema_gets_the_new_column(tmp_path: Path) -> None:
    JobStore(None, tmp_path).close()
    db = tmp_path / "finetune" / "jobs.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE ft_jobs DROP COLUMN worker_token")
    store = JobStore(None, tmp_path)
    f = store.add_file(GOOD, "t.jsonl", "fine-tune", sample_type="instruct")
    store.create_job(model="tiny", model_path="/m",
                     training_files=[{"file_id": f.id, "weight": 1.0}])
    assert store.claim_next(pid=1, host="h", token="abc").worker_token == "abc"
    store.close()


_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from souverain.finetune.store import WorkerLock
lock = WorkerLock(Path(sys.argv[1]))
print(lock.token, flush=True)
time.sleep(600)
"""


def test_a_dead_worker_is_known_by_its_lock_even_when_its_pid_lives(tmp_path: Path) -> None:
    """A job whose worker process was killed (-9) is an orphan at once, even though its pid now
    names a live process (pid reuse; a container restarted with the same pids), and a job
    whose worker lives is not, whatever its pid says."""
    store = JobStore(None, tmp_path)
    f = store.add_file(GOOD, "t.jsonl", "fine-tune", sample_type="instruct")
    job = store.create_job(model="tiny", model_path="/m",
                           training_files=[{"file_id": f.id, "weight": 1.0}])
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(store.workers_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        token = holder.stdout.readline().strip()
        store.claim_next(pid=os.getpid(), host="here", token=token)
        assert WorkerLock.held(store.workers_dir, token) is True
        assert store.orphans(stale_after=60, host="here", pid_alive=lambda p: False) == []
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        orphans = store.orphans(stale_after=60, host="here", pid_alive=lambda p: True)
        assert [j.id for j in orphans] == [job.id]
        assert not (store.workers_dir / f"{token}.lock").exists()  # cleaned up
    finally:
        holder.kill()
        holder.wait()
    assert WorkerLock.held(store.workers_dir, "../etc") is None  # (a token is a name only)
    store.close()


# -- a real server ----------------------------------------------------------------------------

def serve(model_dir: str, home: Path, *extra: str) -> ServerProcess:
    srv = ServerProcess(model_dir, "--name", "tiny", "--no-libraries", "--embed-model", "none",
                        "--data-dir", str(home), "--max-file-mib", "64", *extra,
                        env={"SOUVERAIN_HOME": str(home)})
    srv.home = home  # type: ignore[attr-defined]
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: str):
    srv = serve(model_dir, tmp_path_factory.mktemp("ft-robust"))
    yield srv
    assert srv.stop() == 0, srv.log()


def post_file(server: ServerProcess, data: bytes, purpose: str = "fine-tune",
              name: str = "train.jsonl", timeout: float = 60) -> httpx.Response:
    return httpx.post(server.url + "/v1/files", files={"file": (name, data)},
                      data={"purpose": purpose}, timeout=timeout)


def get_job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(server: ServerProcess, job_id: str, statuses: tuple[str, ...],
             timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(server, job_id)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}: {job.get('error')}"
        time.sleep(0.2)


def audit_records(server: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for p in sorted((server.home / "audit").glob("audit-*.jsonl")):  # type: ignore[attr-defined]
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def wait_audited(server: ServerProcess, route: str, method: str, count: int
                 ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        recs = [r for r in audit_records(server)
                if r.get("route") == route and r.get("method") == method]
        if len(recs) >= count or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def test_uploads_that_hung_answer_400_and_are_audited(server: ServerProcess) -> None:
    """Issue 15 #3 and #6, the exact requests: a fine-tune upload of the single byte 0x1d, of
    U+2028 + LF, and a 50 MB single-line training file; plus NaN in a line."""
    cases = [(b"\x1d", "train.jsonl line 1 is not valid JSON"),
             ("\u2028\n".encode(), "train.jsonl line 1 is not valid JSON"),
             (b'{"text": "' + b"x" * (50 * 10**6) + b'"}\n',
              "train.jsonl line 1 is longer than the limit of 1 MiB per line"),
             (GOOD + b'{"text": NaN}\n', "train.jsonl line 25 is not valid JSON: NaN")]
    for data, words in cases:
        r = post_file(server, data, timeout=60)
        assert r.status_code == 400, r.text[:500]
        assert words in r.json()["message"], r.text[:500]
    r = post_file(server, b" \n\r\n", purpose="batch")
    assert r.status_code == 400 and "is empty" in r.json()["message"]
    recs = wait_audited(server, "/v1/files", "POST", len(cases) + 1)
    assert [r["status"] for r in recs] == [400] * (len(cases) + 1)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200), mutated_jsonl()),
       purpose=st.sampled_from(PURPOSES))
def test_any_upload_answers_200_or_400(server: ServerProcess, data: bytes, purpose: str) -> None:
    r = post_file(server, data, purpose=purpose, timeout=30)
    assert r.status_code in (200, 400), r.text
    assert r.status_code == 200 or r.json()["message"].startswith("train.jsonl ")


def test_query_parameters_accept_what_the_schema_says(server: ServerProcess) -> None:
    """Issue 15 #9: ``status=`` (empty) on the jobs list was a 400 while the schema said any
    string. ``status`` is now the enum it always was (so an empty value is a 422, as the
    schema says); ``created_after`` a date-time; NUL in a filter matches nothing."""
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    params = {p["name"]: p for p in spec["paths"]["/v1/fine_tuning/jobs"]["get"]["parameters"]}
    enum = next(s["enum"] for s in params["status"]["schema"]["anyOf"] if "enum" in s)
    assert "QUEUED" in enum and "" not in enum
    created = next(s for s in params["created_after"]["schema"]["anyOf"] if "format" in s)
    assert created["format"] == "date-time"
    form = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = form["schema"]["$ref"].rsplit("/", 1)[1]
    assert spec["components"]["schemas"][ref]["properties"]["purpose"]["enum"] == [
        "fine-tune", "batch"]

    from typing import get_args

    from souverain.finetune.store import STATUSES
    from souverain.server.routers.files import JobStatus

    assert set(get_args(JobStatus)) == set(STATUSES) == set(enum)
    url = server.url + "/v1/fine_tuning/jobs"
    r = httpx.get(url + "?status=", timeout=30)
    assert r.status_code == 422 and "status" in r.json()["message"], r.text
    r = httpx.get(url, params={"status": "DONE"}, timeout=30)
    assert r.status_code == 422 and "QUEUED" in r.json()["message"], r.text
    for value in ("2024-01-01T00:00:00Z", "1700000000", "0001-01-01T00:00:00+05:00",
                  "9999-12-31T23:59:59-05:00"):
        r = httpx.get(url, params={"created_after": value}, timeout=30)
        assert r.status_code == 200, (value, r.text)
    assert httpx.get(url, params={"created_after": "yesterday"}, timeout=30).status_code == 422
    for q in ({"model": "a\x00b"}, {"suffix": "\x00"}):
        r = httpx.get(url, params=q, timeout=30)
        assert r.status_code == 200 and r.json()["data"] == [], r.text
    r = httpx.get(server.url + "/v1/files", params={"search": "\x00", "purpose": "x"},
                  timeout=30)
    assert r.status_code == 200 and r.json()["data"] == []
    r = post_file(server, GOOD, purpose="ocr")
    assert r.status_code == 422 and "purpose" in r.json()["message"]


def test_jobs_list_does_not_wait_for_a_writer(server: ServerProcess) -> None:
    """Issue 15 #6: ``GET /v1/fine_tuning/jobs`` answered 500 after 30 s (database is locked)
    while the worker wrote; a read never waits for the write lock now."""
    r = post_file(server, GOOD)
    assert r.status_code == 200, r.text
    con = _hold_write_lock(server.home / "finetune" / "jobs.sqlite")  # type: ignore[attr-defined]
    try:
        for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs?status=QUEUED",
                     "/v1/files", f"/v1/files/{r.json()['id']}"):
            got = httpx.get(server.url + path, timeout=10)  # (the lock's wait would be 30 s)
            assert got.status_code == 200, (path, got.text)
    finally:
        con.rollback()
        con.close()


def test_cancel_stops_a_slow_validation_within_seconds(server: ServerProcess) -> None:
    """Issue 15 #6: cancel was ignored for 9 minutes while a job validated. A 16 MB valid file
    (about a minute and a half of validation here) is cancelled mid-validation; the job is
    CANCELLED within seconds, and the worker takes the next job."""
    big = jsonl_bytes([conversation(i) for i in range(120_000)])
    r = post_file(server, big, name="big.jsonl", timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/fine_tuning/jobs", timeout=30, json={
        "model": "tiny", "training_files": [r.json()["id"]],
        "hyperparameters": {"training_steps": 2, "seq_len": 128}})
    job_id = r.json()["id"]
    wait_for(server, job_id, (VALIDATING,), timeout=120)
    time.sleep(8.0)  # the worker has loaded the tokenizer and is well into the file
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["status"] in (CANCELLATION_REQUESTED, CANCELLED)
    done = wait_for(server, job_id, (CANCELLED, "VALIDATED", "FAILED_VALIDATION", "SUCCESS"),
                    timeout=30)  # (the whole validation takes several times longer)
    assert done["status"] == CANCELLED, done
    assert not any(e["data"].get("status") == "VALIDATED" for e in done["events"])


def test_delete_file_erases_bytes_and_is_audited(server: ServerProcess) -> None:
    r = post_file(server, GOOD, name="erase-me.jsonl")
    file_id = r.json()["id"]
    stored = list((server.home / "finetune" / "files").glob(f"{file_id}*"))  # type: ignore
    assert len(stored) == 1 and stored[0].read_bytes() == GOOD
    r = httpx.delete(f"{server.url}/v1/files/{file_id}", timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not stored[0].exists()
    assert httpx.get(f"{server.url}/v1/files/{file_id}/content", timeout=30).status_code == 404
    recs = wait_audited(server, "/v1/files/{file_id}", "DELETE", 1)
    assert recs and recs[-1].get("erased") == {"file_id": file_id, "bytes": len(GOOD)}, recs


# -- kill -9 of the server and its worker: recovery at start ---------------------------------

def test_kill_9_then_restart_resumes_the_job_at_start(tmp_path: Path, model_dir: str) -> None:
    """Issue 15, proof "kill -9 mid-training, restart: recovery starts within seconds without
    any request". The server and its worker are killed with -9 mid-training, and the dead
    worker's pid is made to name a live process (as pid reuse or a restarted container does):
    the restarted server's worker adopts and resumes the job at start, well before the
    60-second heartbeat timeout, with no API request; the steps go on from the checkpoint."""
    home = tmp_path / "home"
    db = JobStore(None, home)
    srv = serve(model_dir, home)
    try:
        r = post_file(srv, GOOD)
        r = httpx.post(srv.url + "/v1/fine_tuning/jobs", timeout=30, json={
            "model": "tiny", "training_files": [r.json()["id"]],
            "hyperparameters": {"training_steps": 1000, "seq_len": 128}})
        job_id = r.json()["id"]
        deadline = time.monotonic() + 240
        while not (db.get_job(job_id).status == RUNNING and db.checkpoints(job_id)):
            assert time.monotonic() < deadline, db.get_job(job_id)
            time.sleep(0.2)
        worker_pid = db.get_job(job_id).worker_pid
        assert worker_pid
        os.kill(worker_pid, signal.SIGKILL)
        srv.proc.kill()
        srv.proc.wait()
    finally:
        srv.stop()
    with db.engine.begin() as c:  # the dead worker's pid now names a live process (this one)
        c.exec_driver_sql("UPDATE ft_jobs SET worker_pid = ? WHERE id = ?",
                          (os.getpid(), job_id))
    held = db.get_job(job_id)
    assert held.status == RUNNING and held.worker_token
    srv = serve(model_dir, home)
    try:
        started = time.monotonic()
        while True:  # the store, not the API: no request may be what starts the recovery
            job = db.get_job(job_id)
            if job.worker_pid not in (None, os.getpid()) and any(
                    e.name == "status-updated" and e.data.get("resumed") for e in
                    db.events(job_id)):
                break
            assert time.monotonic() - started < 45, (job, srv.log()[-3000:])
            time.sleep(0.2)
        resumed = [e for e in db.events(job_id) if e.data.get("resumed")][0]
        assert resumed.data["from_step"] >= 1
        deadline = time.monotonic() + 120
        while not [e for e in db.events(job_id)[db.events(job_id).index(resumed):]
                   if e.name == "training-step"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        after = db.events(job_id)
        steps = [e.data["step"] for e in after[after.index(resumed):]
                 if e.name == "training-step"]
        assert steps[0] > resumed.data["from_step"]  # continued, not restarted
        r = httpx.post(f"{srv.url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=30)
        assert r.status_code == 200
        assert wait_for(srv, job_id, (CANCELLED,), timeout=60)["status"] == CANCELLED
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
        db.close()
