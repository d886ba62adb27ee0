"""Batch jobs (La Plateforme's ``client.batch.jobs``): the official `mistralai` SDK against a
real `souverain serve` (tiny Llama checkpoint), the durability of a job across a kill -9,
the offline `souverain batch run`, and the scheduler's priority that puts batch lines behind
interactive requests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess

from souverain.batch.lines import Journal, read_lines
from souverain.batch.store import BatchStore, batch_jobs_t
from souverain.engine.block_manager import BlockManager
from souverain.engine.sampling import BATCH, INTERACTIVE, SamplingParams, default_priority
from souverain.engine.scheduler import Scheduler
from souverain.engine.sequence import Sequence
from souverain.finetune.store import JobStore

mistralai = pytest.importorskip("mistralai")
from mistralai.client import Mistral
from mistralai.client import errors as sdk_errors

TINY = "tiny"
CHAT = "/v1/chat/completions"
TERMINAL = ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED")


def chat_line(cid: str, question: str, max_tokens: int = 6) -> dict[str, Any]:
    return {"custom_id": cid, "body": {"messages": [{"role": "user", "content": question}],
                                       "max_tokens": max_tokens, "temperature": 0}}


def jsonl(objs: list[Any]) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def serve_args(model_dir: str, home: Path, *extra: str, audit: bool = False
               ) -> tuple[list[str], dict[str, str]]:
    # one torch thread: on a busy 2-core machine, threads spinning for a core stall the
    # tiny model's steps for seconds
    return ([model_dir, "--name", TINY, "--no-libraries", "--embed-model", "none",
             *([] if audit else ["--no-audit"]), "--dtype", "float32", "--threads", "1",
             "--data-dir", str(home), *extra], {"SOUVERAIN_HOME": str(home)})


@pytest.fixture(scope="module")
def model_dir(tiny_llama: dict) -> str:
    return str(tiny_llama["consolidated"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: str):
    home = tmp_path_factory.mktemp("batch-home")
    args, env = serve_args(model_dir, home)
    srv = ServerProcess(*args, env=env)
    srv.home = home
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Mistral:
    return Mistral(api_key="unused", server_url=server.url)


def upload(client: Mistral, data: bytes, name: str = "requests.jsonl",
           purpose: str = "batch") -> str:
    return client.files.upload(file={"file_name": name, "content": data}, purpose=purpose).id


def wait(client: Mistral, job_id: str, timeout: float = 90, until: tuple = TERMINAL) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.batch.jobs.get(job_id=job_id)
        if job.status in until:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.2)


def download(client: Mistral, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.download(file_id=file_id).read().splitlines()]


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    """A chat completion body without what differs between two calls (id, created)."""
    return {k: v for k, v in body.items() if k not in ("id", "created")}


# -- the API, through the official SDK -----------------------------------------------------------

def test_batch_file_to_success_matches_interactive_calls(client: Mistral) -> None:
    questions = {f"q{i}": f"Question number {i}: what comes next?" for i in range(6)}
    file_id = upload(client, jsonl([chat_line(c, q) for c, q in questions.items()]))
    created = client.batch.jobs.create(input_files=[file_id], endpoint=CHAT, model=TINY,
                                       metadata={"project": "docs"})
    assert created.object == "batch" and created.status in ("QUEUED", "RUNNING")
    assert created.total_requests == 6 and created.input_files == [file_id]
    job = wait(client, created.id)
    assert job.status == "SUCCESS", job
    assert (job.completed_requests, job.succeeded_requests, job.failed_requests) == (6, 6, 0)
    assert job.error_file is None and job.started_at and job.completed_at
    lines = download(client, job.output_file)
    assert [x["custom_id"] for x in lines] == list(questions)  # one each, in input order
    for x in lines:
        assert x["error"] is None and x["response"]["status_code"] == 200
        direct = client.chat.complete(model=TINY, temperature=0, max_tokens=6, messages=[
            {"role": "user", "content": questions[x["custom_id"]]}])
        assert without_ids(x["response"]["body"]) == without_ids(direct.model_dump(
            mode="json", exclude_unset=True)) | {}, x
    meta = client.files.retrieve(file_id=job.output_file)
    assert meta.purpose == "batch" and meta.num_lines == 6


def test_bad_lines_go_to_the_error_file_and_the_rest_run(client: Mistral) -> None:
    good = [chat_line("a", "Hello"), chat_line("b", "Bonjour")]
    bad = [
        {"body": chat_line("x", "no id")["body"]},  # no custom_id
        chat_line("a", "taken"),  # a duplicate custom_id
        {"custom_id": "neg", "body": {"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": -3}},  # the route refuses it (422)
        {"custom_id": "empty", "body": {"messages": []}},  # refused (4xx)
        {"custom_id": "other", "body": {"model": "nope", "messages": [
            {"role": "user", "content": "hi"}]}},  # another model than the job's
        {"custom_id": "nobody"},  # no body
    ]
    file_id = upload(client, jsonl([good[0], *bad[:3], good[1], *bad[3:]]))
    job = wait(client, client.batch.jobs.create(input_files=[file_id], endpoint=CHAT,
                                                model=TINY).id)
    assert job.status == "SUCCESS"
    assert (job.total_requests, job.succeeded_requests, job.failed_requests) == (8, 2, 6)
    assert [x["custom_id"] for x in download(client, job.output_file)] == ["a", "b"]
    errors = download(client, job.error_file)
    assert [x["custom_id"] for x in errors] == [None, None, "neg", "empty", "other", "nobody"]
    codes = [x["error"]["code"] for x in errors]
    assert codes[:2] == ["missing_custom_id", "duplicate_custom_id"] and codes[5] == "missing_body"
    assert "line 2" in errors[0]["error"]["message"]
    assert "already used by requests.jsonl line 1" in errors[1]["error"]["message"]
    assert errors[2]["response"]["status_code"] == 422
    assert "max_tokens" in errors[2]["error"]["message"]
    assert 400 <= errors[3]["response"]["status_code"] < 500
    assert errors[4]["response"]["status_code"] == 400 and "'nope'" in errors[4]["error"][
        "message"]
    for x in errors:
        assert x["id"].startswith("batch-") and set(x) == {"id", "custom_id", "response",
                                                           "error"}


def test_inline_requests(client: Mistral) -> None:
    job = client.batch.jobs.create(endpoint=CHAT, model=TINY, requests=[
        {"custom_id": "one", "body": chat_line("", "One?")["body"]},
        {"body": chat_line("", "Two?")["body"]}])
    assert job.input_files == [] and job.total_requests == 2
    job = wait(client, job.id)
    assert job.status == "SUCCESS"
    assert [x["custom_id"] for x in download(client, job.output_file)] == ["one", "1"]


def test_completions_endpoint(client: Mistral, server: ServerProcess) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    # (raw HTTP: the SDK's endpoint enum does not list OpenAI's legacy /v1/completions)
    r = httpx.post(server.url + "/v1/batch/jobs", timeout=30, json={
        "endpoint": "/v1/completions", "model": TINY,
        "requests": [{"custom_id": "c", "body": body}]})
    assert r.status_code == 200, r.text
    job = wait(client, r.json()["id"])
    assert job.status == "SUCCESS"
    [line] = download(client, job.output_file)
    direct = httpx.post(server.url + "/v1/completions", json={"model": TINY, **body},
                        timeout=60).json()
    assert line["response"]["body"]["choices"] == direct["choices"]


def test_list_and_get_filters(client: Mistral) -> None:
    job = client.batch.jobs.create(endpoint=CHAT, model=TINY, metadata={"team": "filters"},
                                   requests=[{"custom_id": "f", "body": chat_line(
                                       "", "Hi")["body"]}])
    wait(client, job.id)
    got = client.batch.jobs.get(job_id=job.id)
    assert got.id == job.id and got.metadata == {"team": "filters"}
    mine = client.batch.jobs.list(metadata={"team": "filters"})
    assert [j.id for j in mine.data] == [job.id] and mine.total == 1
    assert client.batch.jobs.list(metadata={"team": "nobody"}).total == 0
    done = client.batch.jobs.list(status=["SUCCESS"], model=TINY)
    assert job.id in [j.id for j in done.data]
    assert all(j.status == "SUCCESS" for j in done.data)
    assert client.batch.jobs.list(status=["QUEUED"], model="no-such-model").total == 0
    everything = client.batch.jobs.list(page_size=100)
    newest = [j.created_at for j in everything.data]
    assert newest == sorted(newest, reverse=True)
    oldest = client.batch.jobs.list(page_size=1, order_by="created")
    assert oldest.total == everything.total and len(oldest.data) == 1
    assert oldest.data[0].created_at == min(newest)
    with pytest.raises(sdk_errors.SDKError) as e:
        client.batch.jobs.get(job_id="no-such-job")
    assert e.value.status_code == 404 and "no-such-job" in json.loads(e.value.body)["message"]


def test_cancel_stops_a_running_job(client: Mistral) -> None:
    lines = [chat_line(f"c{i}", f"Count to {i}", max_tokens=40) for i in range(300)]
    job = client.batch.jobs.create(input_files=[upload(client, jsonl(lines))], endpoint=CHAT,
                                   model=TINY)
    running = wait(client, job.id, until=("RUNNING",) + TERMINAL)
    assert running.status == "RUNNING"
    while client.batch.jobs.get(job_id=job.id).completed_requests < 2:
        time.sleep(0.05)
    asked = client.batch.jobs.cancel(job_id=job.id)
    assert asked.status in ("CANCELLATION_REQUESTED", "CANCELLED")
    done = wait(client, job.id, timeout=30)
    assert done.status == "CANCELLED"
    # it stopped within a line or two of each of its (4) lines in flight
    assert done.completed_requests <= asked.completed_requests + 4 + 2
    kept = download(client, done.output_file)
    assert 2 <= len(kept) == done.succeeded_requests < 300  # what finished is kept
    # a queued job is cancelled at once; cancelling again changes nothing
    assert client.batch.jobs.cancel(job_id=job.id).status == "CANCELLED"


def test_bad_requests_are_4xx_naming_the_problem(client: Mistral, server: ServerProcess
                                                 ) -> None:
    ft_file = upload(client, jsonl([{"messages": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]}]),
                     purpose="fine-tune")
    good = {"endpoint": CHAT, "model": TINY, "requests": [chat_line("a", "hi")]}
    cases = [
        ({"endpoint": CHAT, "model": TINY, "input_files": ["nope"]}, 404, "nope"),
        ({"endpoint": CHAT, "model": TINY, "input_files": [ft_file]}, 400, "purpose=batch"),
        ({**good, "endpoint": "/v1/ocr"}, 422, "/v1/chat/completions"),
        ({**good, "model": "ghost"}, 404, "ghost"),
        ({**good, "timeout_hours": 0}, 422, "timeout_hours"),
        ({**good, "timeout_hours": 1000}, 422, "timeout_hours"),
        ({**good, "timeout_hours": "soon"}, 422, "timeout_hours"),
        ({"endpoint": CHAT, "model": TINY}, 400, "input_files"),
        ({**good, "input_files": [ft_file]}, 400, "not both"),
        ({**good, "requests": []}, 422, "requests"),
        ({"endpoint": CHAT, "requests": good["requests"]}, 422, "model"),
        ({**good, "agent_id": "a"}, 422, "agent_id"),
    ]
    for body, status, words in cases:
        r = httpx.post(server.url + "/v1/batch/jobs", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert r.json()["object"] == "error" and words in r.json()["message"], (body, r.text)
    with pytest.raises(sdk_errors.SDKError) as e:
        client.batch.jobs.create(input_files=["missing"], endpoint=CHAT, model=TINY)
    assert e.value.status_code == 404


def test_timeout_exceeded_keeps_what_finished(server: ServerProcess, client: Mistral) -> None:
    """A job past its deadline (created two hours ago with timeout_hours=1, straight in the
    server's database) ends TIMEOUT_EXCEEDED when its server takes it."""
    store = BatchStore(JobStore(None, server.home))
    job = store.create(model=TINY, served_model=TINY, endpoint=CHAT, input_files=[],
                       total_requests=1, inline=jsonl([chat_line("late", "hi")]),
                       timeout_hours=1)
    with store.jobs.write() as c:
        c.execute(batch_jobs_t.update().where(batch_jobs_t.c.id == job.id)
                  .values(created_at=time.time() - 7200))
    done = wait(client, job.id)
    assert done.status == "TIMEOUT_EXCEEDED" and done.completed_requests == 0


def test_a_server_leaves_other_models_jobs_alone(server: ServerProcess, client: Mistral
                                                 ) -> None:
    store = BatchStore(JobStore(None, server.home))
    other = store.create(model="other", served_model="other", endpoint=CHAT, input_files=[],
                         total_requests=1, inline=jsonl([chat_line("o", "hi")]))
    mine = client.batch.jobs.create(endpoint=CHAT, model=TINY,
                                    requests=[{"custom_id": "m", "body": chat_line(
                                        "", "Hi")["body"]}])
    assert wait(client, mine.id).status == "SUCCESS"  # created after `other`, run first
    assert client.batch.jobs.get(job_id=other.id).status == "QUEUED"
    assert store.get(other.id).worker_token is None
    client.batch.jobs.cancel(job_id=other.id)


# -- a kill -9 in the middle of a job -------------------------------------------------------------

def test_kill_9_mid_job_then_restart_every_line_once(tmp_path: Path, model_dir: str) -> None:
    home = tmp_path / "home"
    args, env = serve_args(model_dir, home, "--batch-concurrency", "2", audit=True)
    srv = ServerProcess(*args, env=env)
    n = 200
    try:
        client = Mistral(api_key="unused", server_url=srv.url)
        ids = [f"k{i}" for i in range(n)]
        file_id = upload(client, jsonl([chat_line(c, f"Tell me about {c}", max_tokens=24)
                                        for c in ids]))
        job = client.batch.jobs.create(input_files=[file_id], endpoint=CHAT, model=TINY)
        while client.batch.jobs.get(job_id=job.id).completed_requests < 5:
            time.sleep(0.02)
        srv.proc.kill()  # -9: lines in flight are lost with the process, the journal stays
        srv.proc.wait()
        srv.stop()
        before = BatchStore(JobStore(None, home)).get(job.id)
        assert before.status == "RUNNING" and 5 <= before.completed_requests < n
        srv = ServerProcess(*args, env=env)
        client = Mistral(api_key="unused", server_url=srv.url)
        done = wait(client, job.id, timeout=120)
        assert done.status == "SUCCESS", done
        lines = download(client, done.output_file)
        assert [x["custom_id"] for x in lines] == ids  # every line exactly once, in order
        assert (done.completed_requests, done.succeeded_requests) == (n, n)
        assert "resuming" in srv.log()
    finally:
        srv.stop()
    # every line is in the audit log, by job and line, with its model and tokens
    records = [json.loads(x) for f in sorted((home / "audit").glob("audit-*.jsonl"))
               for x in f.read_text().splitlines()]
    lines_audited = [r for r in records if r["request_id"].startswith(f"batch-{job.id}-")]
    ok = {r["request_id"] for r in lines_audited if r["status"] == 200}
    assert len(ok) >= n, len(ok)
    assert all(r["route"] == CHAT and r["model"] == TINY and r["completion_tokens"]
               for r in lines_audited if r["status"] == 200)


# -- offline: souverain batch run -----------------------------------------------------------------

def test_offline_batch_run_gives_the_servers_lines(tmp_path: Path, model_dir: str,
                                                   client: Mistral) -> None:
    lines = [chat_line(f"o{i}", f"Offline question {i}") for i in range(4)]
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl(lines[:2]) + b"{not json\n" + jsonl(lines[2:]))
    out = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, "-m", "souverain.cli", "batch", "run", str(requests),
                        "--model", model_dir, "--name", TINY, "--dtype", "float32",
                        "--threads", "1", "-o", str(out)], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    offline = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in offline] == ["o0", "o1", None, "o2", "o3"]
    assert offline[2]["error"]["code"] == "invalid_json" and offline[2]["response"] is None
    served = wait(client, client.batch.jobs.create(
        endpoint=CHAT, model=TINY, requests=lines).id)
    by_id = {x["custom_id"]: x for x in download(client, served.output_file)}
    for x in offline:
        if x["custom_id"] is not None:
            assert without_ids(x["response"]["body"]) == without_ids(
                by_id[x["custom_id"]]["response"]["body"])
    assert "4 succeeded, 1 failed" in " ".join(r.stderr.split())


@pytest.mark.parametrize("args, words", [
    (["missing.jsonl", "--model", "x"], "missing.jsonl"),
    (["REQ", "--endpoint", "/v1/ocr"], "/v1/chat/completions"),
])
def test_offline_batch_run_bad_input_exit_2(tmp_path: Path, model_dir: str, args: list[str],
                                            words: str) -> None:
    req = tmp_path / "r.jsonl"
    req.write_bytes(jsonl([chat_line("a", "hi")]))
    args = [str(req) if a == "REQ" else a for a in args]
    if "--model" not in args:
        args += ["--model", model_dir]
    r = subprocess.run([sys.executable, "-m", "souverain.cli", "batch", "run", *args, "-o",
                        str(tmp_path / "o.jsonl")], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert words in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


# -- the pieces --------------------------------------------------------------------------------

def test_journal_cuts_a_torn_tail_and_keeps_the_rest(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.jsonl")
    j.recover()
    j.append(0, True, {"custom_id": "a"})
    j.append(1, False, {"custom_id": "b"})
    with open(j.path, "ab") as f:
        f.write(b'{"i": 2, "ok": tr')  # the crash came mid-write
    again = Journal(j.path)
    assert again.recover() == {0: True, 1: False}
    again.append(2, True, {"custom_id": "c"})
    again.append(2, True, {"custom_id": "c"})  # a second append of a line is ignored
    good, bad, ok, failed = again.outputs()
    assert (ok, failed) == (2, 1) and bad.count(b"\n") == 1
    assert [json.loads(x)["custom_id"] for x in good.splitlines()] == ["a", "c"]


def test_read_lines_is_total() -> None:
    data = b'{"custom_id": "a", "body": {}}\n\xff\xfe\n[1]\n\n{"custom_id": 3, "body": {}}\n'
    lines = read_lines([("f.jsonl", data)])
    assert [x.problem["code"] if x.problem else None for x in lines] == [
        None, "invalid_json", "invalid_line", "missing_custom_id"]
    assert lines[3].where == "f.jsonl line 5"


def _seq(i: int, priority: int) -> Sequence:
    prompt = [100 + 10 * i + k for k in range(4)]
    return Sequence(i, f"r{i}", 0, prompt, SamplingParams(priority=priority), None, set(), 64,
                    0.0)


def _step(sched: Scheduler, grow: int = 1) -> list[str]:
    """One step: schedule, mark what ran as computed, give each running sequence ``grow``
    new tokens (as decoding does); returns the scheduled request ids."""
    out = sched.schedule()
    for s in out:
        s.seq.num_computed += s.num_new
    for seq in sched.running:
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.extend([7] * grow)
    return [s.seq.request_id for s in out]


def test_scheduler_admits_interactive_before_batch_and_preempts_batch_first() -> None:
    sched = Scheduler(BlockManager(num_blocks=4, block_size=4), max_num_seqs=2,
                      max_num_batched_tokens=64)
    b0, b1, i0 = _seq(0, BATCH), _seq(1, BATCH), _seq(10, INTERACTIVE)
    sched.add(b0)
    assert _step(sched) == ["r0"]
    sched.add(b1)
    sched.add(i0)  # arrives after b1, admitted before it
    assert [s.request_id for s in sched.waiting] == ["r10", "r1"]
    assert _step(sched, grow=7) == ["r0", "r10"]
    assert sched.running == [i0, b0]  # interactive first, whatever the admission order
    # i0 needs 3 blocks of the 4: the older batch sequence is preempted, not the newer i0
    assert _step(sched)[0] == "r10"
    assert sched.num_preemptions == 1 and i0 in sched.running
    assert b0.num_computed < b0.num_tokens and sched.waiting[-1] is b1
    with default_priority(BATCH):
        assert SamplingParams().priority == BATCH
    assert SamplingParams().priority == INTERACTIVE
