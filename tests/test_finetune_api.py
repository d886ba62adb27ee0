"""Files + fine-tuning jobs: the store (SQLite, and PostgreSQL when its binaries are here), the
worker with the real trainer, and La Plateforme's `/v1/files` + `/v1/fine_tuning/jobs` on a
real `souverain serve` (tiny Llama checkpoint, so a training run takes about a second).

Files go through the official `mistralai` SDK (`client.files`); the SDK has no fine-tuning
jobs client, so jobs go through raw HTTP shaped as La Plateforme's spec.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess

from souverain.finetune.store import (
    CANCELLATION_REQUESTED,
    CANCELLED,
    FAILED_VALIDATION,
    QUEUED,
    RUNNING,
    STARTED,
    SUCCESS,
    VALIDATED,
    Conflict,
    JobStore,
    NotFound,
)
from souverain.finetune.worker import Worker, WorkerConfig

mistralai = pytest.importorskip("mistralai")
from mistralai.client import Mistral
from mistralai.client import errors as sdk_errors

REPO = Path(__file__).resolve().parents[1]


def conversation(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


def jsonl(objs: list[Any]) -> bytes:
    return ("\n".join(json.dumps(o) for o in objs) + "\n").encode()


GOOD = jsonl([conversation(i) for i in range(24)])


# -- the store (SQLite; PostgreSQL too when its binaries are installed) -----------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    s = JobStore(url, tmp_path)
    if url is not None:  # one cluster for the session: start each test from empty tables
        from souverain.finetune import jobs_db as store_mod

        with s.engine.begin() as c:
            for t in (store_mod.files_t, store_mod.jobs_t, store_mod.events_t,
                      store_mod.checkpoints_t):
                c.execute(t.delete())
    yield s
    s.close()


def _job(store: JobStore, **kw: Any):
    f = store.add_file(GOOD, "train.jsonl", "fine-tune", sample_type="instruct", num_lines=24)
    return store.create_job(model="tiny", model_path="/nowhere",
                            training_files=[{"file_id": f.id, "weight": 1.0}], **kw)


def test_store_files(store: JobStore) -> None:
    f = store.add_file(GOOD, "train.jsonl", "fine-tune", sample_type="instruct", num_lines=24)
    assert Path(f.path).read_bytes() == GOOD and f.bytes == len(GOOD)
    assert not list(Path(f.path).parent.glob(".partial-*"))  # the temp file was renamed
    assert store.get_file(f.id).sha256 == f.sha256
    store.add_file(b'{"custom_id": "1"}\n', "b.jsonl", "batch", sample_type="batch_request")
    files, total = store.list_files()
    assert total == 2 and {x.filename for x in files} == {"train.jsonl", "b.jsonl"}
    assert store.list_files(purpose="batch")[1] == 1
    assert store.list_files(search="trai")[0][0].id == f.id
    job = store.create_job(model="tiny", model_path="/m",
                           training_files=[{"file_id": f.id, "weight": 1.0}])
    with pytest.raises(Conflict, match="used by job"):
        store.delete_file(f.id)  # a queued job still needs it
    store.cancel(job.id)
    store.delete_file(f.id)
    assert not Path(f.path).exists()
    for bad in (f.id, "x\x00y"):
        with pytest.raises(NotFound):
            store.get_file(bad)
    with pytest.raises(NotFound):
        store.get_job("x\x00y")
    with pytest.raises(NotFound):
        store.create_job(model="tiny", model_path="/m",
                         training_files=[{"file_id": f.id, "weight": 1.0}])


def test_store_transitions(store: JobStore) -> None:
    job = _job(store, suffix="demo")
    assert job.status == QUEUED and job.fine_tuned_model is None
    claimed = store.claim_next(pid=111, host="h")
    assert claimed is not None and claimed.id == job.id and claimed.status == STARTED
    assert store.claim_next(pid=222, host="h") is None  # nothing else queued
    assert store.cancel(job.id).status == CANCELLATION_REQUESTED  # held: the worker stops it
    assert store.cancel(job.id).status == CANCELLATION_REQUESTED  # idempotent
    assert store.set_status(job.id, CANCELLED, expect=(CANCELLATION_REQUESTED,), event={})
    with pytest.raises(Conflict, match="already ended"):
        store.start(job.id)
    assert not store.set_status(job.id, SUCCESS, expect=(RUNNING,))  # never over a final state

    later = _job(store, auto_start=False)
    with pytest.raises(Conflict, match="already started"):
        store.start(_job(store).id)
    assert store.start(later.id).auto_start  # not validated yet: trains once validated
    assert store.cancel(later.id).status == CANCELLED  # QUEUED: cancelled at once
    names = [e.name for e in store.events(later.id)]
    assert names.count("status-updated") == 2


def test_store_claim_is_atomic(store: JobStore) -> None:
    ids = {_job(store).id for _ in range(12)}
    got: list[str] = []
    lock = threading.Lock()

    def claim(pid: int) -> None:
        while (j := store.claim_next(pid=pid, host="h")) is not None:
            with lock:
                got.append(j.id)

    threads = [threading.Thread(target=claim, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)  # each job claimed exactly once


def test_store_orphans_and_succeeded_models(store: JobStore) -> None:
    job = _job(store, suffix="s1")
    store.claim_next(pid=4242, host="here")
    store.set_status(job.id, RUNNING, expect=(STARTED,))
    assert store.orphans(stale_after=60, host="here", pid_alive=lambda p: True) == []
    dead = store.orphans(stale_after=60, host="here", pid_alive=lambda p: False)
    assert [j.id for j in dead] == [job.id]
    # another host's worker: only a stale heartbeat makes it an orphan
    assert store.orphans(stale_after=60, host="elsewhere", pid_alive=lambda p: False) == []
    assert store.orphans(stale_after=-1, host="elsewhere")[0].id == job.id
    assert store.adopt(dead[0], pid=5, host="here")
    assert not store.adopt(dead[0], pid=6, host="here")  # the owner changed: only one wins
    store.set_status(job.id, SUCCESS, expect=(RUNNING,), fine_tuned_model="ft:tiny:s1:x",
                     adapter_dir="/a")
    assert store.succeeded_models() == [("ft:tiny:s1:x", "tiny", "/a", job.id)]


# -- the worker, in this process, with the real validator and trainer --------------------------

@pytest.fixture(scope="module")
def model_dir(tiny_llama: dict) -> str:
    return str(tiny_llama["consolidated"])


BROKEN = b"\n".join(GOOD.splitlines()[:2] + [b'{"messages": [{"role": "user"'] +
                    GOOD.splitlines()[2:4]) + b"\n"


@pytest.mark.parametrize("data, words", [
    (BROKEN, "bad.jsonl line 3: not valid JSON"),  # what an upload refuses, were it let through
    (b"\n\n", "is empty"),
])
def test_worker_validation_errors_name_lines(tmp_path: Path, model_dir: str, data: bytes,
                                             words: str) -> None:
    store = JobStore(None, tmp_path)
    f = store.add_file(data, "bad.jsonl", "fine-tune")
    job = store.create_job(model="tiny", model_path=model_dir,
                           training_files=[{"file_id": f.id, "weight": 1.0}])
    assert Worker(store, WorkerConfig(threads=1)).run_once()
    job = store.get_job(job.id)
    assert job.status == FAILED_VALIDATION
    assert words in job.error, job.error
    ev = [e for e in store.events(job.id) if e.data.get("status") == FAILED_VALIDATION]
    assert ev and any(words in err for err in ev[0].data["errors"])


def test_worker_real_training_and_resume(tmp_path: Path, model_dir: str) -> None:
    """Stop mid-run (as a server shutdown does), then a new worker resumes from the last
    checkpoint and finishes: the steps continue, they do not start over."""
    store = JobStore(None, tmp_path)
    f = store.add_file(GOOD, "train.jsonl", "fine-tune", sample_type="instruct")
    job = store.create_job(model="tiny", model_path=model_dir,
                           training_files=[{"file_id": f.id, "weight": 1.0}],
                           validation_files=[f.id],
                           hyperparameters={"training_steps": 30, "seq_len": 128})
    first = Worker(store, WorkerConfig(threads=1))
    real_on_event = first._on_event

    def stop_after_step_12(job_: Any, ev: dict, state: dict) -> None:
        real_on_event(job_, ev, state)
        if ev.get("type") == "step" and ev["step"] == 12:
            first.stop()

    first._on_event = stop_after_step_12  # type: ignore[method-assign]
    first.run_once()
    paused = store.get_job(job.id)
    assert paused.status == RUNNING and paused.worker_pid is None  # released, not lost
    assert "paused" in [e.name for e in store.events(job.id)]

    Worker(store, WorkerConfig(threads=1)).run_once()
    done = store.get_job(job.id)
    assert done.status == SUCCESS, done.error
    assert done.fine_tuned_model == f"ft:tiny:{job.id[:8]}"
    events = store.events(job.id)
    resumed = [e for e in events if e.name == "status-updated" and e.data.get("resumed")]
    assert resumed and resumed[0].data["from_step"] >= 12
    after = events[events.index(resumed[0]):]
    steps = [e.data["step"] for e in after if e.name == "training-step"]
    assert steps and min(steps) > 12  # continued, not restarted
    cps = store.checkpoints(job.id)
    assert cps and all(c.metrics["valid_loss"] is not None for c in cps)
    assert done.trained_tokens and done.trained_tokens > 0
    from souverain.weights.adapter import load_adapter

    load_adapter(done.adapter_dir)


# -- the HTTP API on a real server ------------------------------------------------------------

def serve_args(model_dir: str, home: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    return ([model_dir, "--name", "tiny", "--no-libraries", "--embed-model", "none",
             "--no-audit", "--data-dir", str(home), "--max-file-mib", "1", *extra],
            {"SOUVERAIN_HOME": str(home)})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: str):
    home = tmp_path_factory.mktemp("ft-home")
    args, env = serve_args(model_dir, home)
    srv = ServerProcess(*args, env=env)
    srv.home = home
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Mistral:
    return Mistral(api_key="unused-on-loopback", server_url=server.url)


def upload(client: Mistral, data: bytes, name: str = "train.jsonl") -> str:
    return client.files.upload(file={"file_name": name, "content": data},
                               purpose="fine-tune").id


def create(server: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/fine_tuning/jobs", json={"model": "tiny", **body},
                      timeout=30)


def get(server: ServerProcess, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait(server: ServerProcess, job_id: str, statuses: tuple[str, ...],
         timeout: float = 240, check: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = get(server, job_id)
        if job["status"] in statuses and (check is None or check(job)):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}: {job.get('error')}"
        time.sleep(0.2)


def test_files_through_the_sdk(client: Mistral) -> None:
    created = client.files.upload(file={"file_name": "train.jsonl", "content": GOOD},
                                  purpose="fine-tune")
    assert created.object == "file" and created.size_bytes == len(GOOD)
    assert created.purpose == "fine-tune" and created.sample_type == "instruct"
    assert created.num_lines == 24 and created.source == "upload"
    got = client.files.retrieve(file_id=created.id)
    assert got.filename == "train.jsonl" and got.deleted is False
    listed = client.files.list()
    assert created.id in [f.id for f in listed.data] and listed.total >= 1
    assert client.files.download(file_id=created.id).read() == GOOD
    deleted = client.files.delete(file_id=created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(sdk_errors.SDKError) as e:
        client.files.retrieve(file_id=created.id)
    assert e.value.status_code == 404


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "is empty"),
    (b"\n  \n", 400, "is empty"),
    (GOOD.splitlines()[0] + b'\n{"messages": [\n', 400, "line 2 is not valid JSON"),
    (b'["a list"]\n', 400, "line 1 holds a JSON array"),
    (b'{"prompt_text": "x"}\n', 400, "line 1 is no training sample"),
    (GOOD.splitlines()[0] + b'\n{"text": "pretraining"}\n', 400, "line 2 is a pretrain"),
    (b"\xff\xfe{}\n", 400, "not UTF-8"),
    (b'{"text": "' + b"x" * (1 << 20) + b'"}\n', 413, "--max-file-mib"),
])
def test_bad_uploads_are_refused(client: Mistral, data: bytes, status: int,
                                 words: str) -> None:
    with pytest.raises(sdk_errors.SDKError) as e:
        client.files.upload(file={"file_name": "bad.jsonl", "content": data},
                            purpose="fine-tune")
    assert e.value.status_code == status
    assert words in json.loads(e.value.body)["message"], e.value.body


def check_fine_tuned_model_is_served(client: Mistral, server: ServerProcess, job: dict,
                                     model_dir: str) -> None:
    """The `ft:` model is listed at once and answers chat completions: greedy, its answer is
    the base engine's with the job's adapter (computed here, offline), and a base request in
    the same batch still answers as the base model."""
    from souverain import LLMEngine
    from souverain.engine.config import EngineConfig
    from souverain.engine.sampling import SamplingParams
    from souverain.weights.adapter import load_adapter

    ft = job["fine_tuned_model"]
    cards = {m.id: m for m in client.models.list().data}
    assert ft in cards and cards[ft].type == "fine-tuned"
    assert cards[ft].root == "tiny" and cards[ft].job == job["id"]
    assert client.models.retrieve(model_id=ft).id == ft
    jobs = JobStore(None, server.home)  # the server's own job store (SQLite)
    adapter_dir = [d for n, _, d, _ in jobs.succeeded_models() if n == ft][0]
    jobs.close()

    question = [{"role": "user", "content": "What is 7 plus 7?"}]
    served = {}
    for model in (ft, "tiny", ft):
        res = client.chat.complete(model=model, messages=question, temperature=0,
                                   max_tokens=12)
        served.setdefault(model, res.choices[0].message.content)
        assert res.choices[0].message.content == served[model]  # stable across requests

    eng = LLMEngine(model_dir, EngineConfig(dtype="float32", kv_cache_gib=0.05))
    params = SamplingParams(temperature=0, max_tokens=12)
    ids = eng.tokenizer.encode_chat(question)
    adapter = load_adapter(adapter_dir)
    assert all(b.abs().sum() > 0 for _, b in adapter.weights.values())  # trained: B moved off 0
    eng.add_lora(ft, adapter)
    outs = {}
    for name, lora in (("tiny", None), (ft, ft)):
        rid = eng.add_request(None, ids, params, lora=lora)
        while eng.has_unfinished():
            for out in eng.step():
                if out.request_id == rid and out.finished:
                    outs[name] = out.outputs[0].text
    assert served == outs, (served, outs)


def test_whole_flow(client: Mistral, server: ServerProcess, model_dir: str) -> None:
    train = upload(client, GOOD)
    valid = upload(client, jsonl([conversation(i) for i in range(100, 106)]), "valid.jsonl")
    r = create(server, training_files=[{"file_id": train, "weight": 1}],
               validation_files=[valid], suffix="sums",
               hyperparameters={"training_steps": 20, "learning_rate": 1e-3, "seq_len": 128})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "job" and job["status"] == QUEUED and job["auto_start"] is True
    assert job["training_files"] == [train] and job["validation_files"] == [valid]
    assert job["hyperparameters"]["training_steps"] == 20
    done = wait(server, job["id"], (SUCCESS, "FAILED", FAILED_VALIDATION))
    assert done["status"] == SUCCESS, done["error"]
    assert done["fine_tuned_model"] == f"ft:tiny:sums:{job['id'][:8]}"
    assert done["trained_tokens"] > 0
    seen = [e["data"]["status"] for e in done["events"] if e["name"] == "status-updated"]
    assert seen == [QUEUED, STARTED, "VALIDATING", VALIDATED, RUNNING, SUCCESS]
    assert any(e["name"] == "training-step" for e in done["events"])
    cps = done["checkpoints"]
    assert [c["step_number"] for c in cps] == [4, 8, 12, 16]
    for c in cps:
        assert c["metrics"]["train_loss"] > 0 and c["metrics"]["valid_loss"] > 0
        assert isinstance(c["created_at"], int)
    listed = httpx.get(server.url + "/v1/fine_tuning/jobs",
                       params={"status": SUCCESS, "model": "tiny"}, timeout=30).json()
    assert listed["object"] == "list" and job["id"] in [j["id"] for j in listed["data"]]
    assert "events" not in listed["data"][0]
    none = httpx.get(server.url + "/v1/fine_tuning/jobs", params={"model": "other"},
                     timeout=30).json()
    assert none["total"] == 0 and none["data"] == []
    page = httpx.get(server.url + "/v1/fine_tuning/jobs", params={"page_size": 1},
                     timeout=30).json()
    assert len(page["data"]) == 1
    check_fine_tuned_model_is_served(client, server, done, model_dir)
    with pytest.raises(sdk_errors.SDKError) as e:  # the finished job's file can go now
        client.files.delete(file_id="not-a-file")
    assert e.value.status_code == 404
    assert client.files.delete(file_id=valid).deleted


def test_bad_job_requests(client: Mistral, server: ServerProcess) -> None:
    train = upload(client, GOOD)
    cases = [
        ({"model": "nope", "training_files": [train]}, 404, "not served here"),
        ({"training_files": ["no-such-file"]}, 404, "No file"),
        ({"training_files": [train], "validation_files": ["missing"]}, 404, "No file"),
        ({"training_files": [train], "integrations": [{"type": "wandb", "project": "p"}]},
         400, "not supported here"),
        ({"training_files": [train], "repositories": [{"type": "github", "name": "x"}]},
         400, "not supported here"),
        ({"training_files": [train], "hyperparameters": {"training_steps": 5, "epochs": 1}},
         400, "both training_steps and epochs"),
        ({"training_files": [train], "hyperparameters": {"learning_rate": -1}}, 422,
         "learning_rate"),
        ({"training_files": [train], "hyperparameters": {"batch": 3}}, 422, "batch"),
        ({"training_files": []}, 422, "training_files"),
        ({"training_files": [{"file_id": train, "weight": 1}, {"file_id": train, "weight": 2}]},
         400, "weights"),
        ({"training_files": [train], "suffix": "a:b"}, 400, "suffix"),
    ]
    for body, status, words in cases:
        r = httpx.post(server.url + "/v1/fine_tuning/jobs", json={"model": "tiny", **body},
                       timeout=30)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["message"], (body, r.text)
    for path in ("/v1/fine_tuning/jobs/nope", "/v1/fine_tuning/jobs/nope/cancel",
                 "/v1/fine_tuning/jobs/nope/start"):
        call = httpx.get if path.endswith("nope") else httpx.post
        assert call(server.url + path, timeout=30).status_code == 404
    r = httpx.get(server.url + "/v1/fine_tuning/jobs", params={"status": "DONE"}, timeout=30)
    assert r.status_code == 422 and "QUEUED" in r.json()["message"]  # status is an enum


@pytest.mark.parametrize("lines, words", [
    ([conversation(0), {"messages": [{"role": "robot", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}]}],
     "line 2"),
    ([conversation(0), conversation(1),
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "and?"}]}],
     "line 3"),
])
def test_bad_data_fails_validation(client: Mistral, server: ServerProcess,
                                   lines: list[Any], words: str) -> None:
    train = upload(client, jsonl(lines))
    r = create(server, training_files=[train], hyperparameters={"training_steps": 3})
    assert r.status_code == 200, r.text
    job = wait(server, r.json()["id"], (FAILED_VALIDATION, SUCCESS, "FAILED"))
    assert job["status"] == FAILED_VALIDATION
    assert f"train.jsonl {words}" in job["error"], job["error"]
    assert job["fine_tuned_model"] is None and job["checkpoints"] == []
    failed = [e for e in job["events"] if e["data"].get("status") == FAILED_VALIDATION]
    assert any(words in err for err in failed[0]["data"]["errors"])


def test_auto_start_false_waits_for_start(client: Mistral, server: ServerProcess) -> None:
    train = upload(client, GOOD)
    r = create(server, training_files=[train], auto_start=False,
               hyperparameters={"training_steps": 4, "seq_len": 128})
    job = wait(server, r.json()["id"], (VALIDATED,))
    time.sleep(1.5)  # a poll of the worker later, it still waits
    assert get(server, job["id"])["status"] == VALIDATED
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/start", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == QUEUED
    assert wait(server, job["id"], (SUCCESS, "FAILED"))["status"] == SUCCESS
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/start", timeout=30)
    assert r.status_code == 409
    # a validated job cancelled before it starts
    r = create(server, training_files=[train], auto_start=False,
               hyperparameters={"training_steps": 4, "seq_len": 128})
    other = wait(server, r.json()["id"], (VALIDATED,))
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{other['id']}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == CANCELLED


def test_cancel_a_running_job(client: Mistral, server: ServerProcess) -> None:
    train = upload(client, GOOD)
    r = create(server, training_files=[train],
               hyperparameters={"training_steps": 100000, "seq_len": 128})
    job_id = r.json()["id"]
    wait(server, job_id, (RUNNING,),
         check=lambda j: any(e["name"] == "training-step" for e in j["events"]))
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["status"] in (CANCELLATION_REQUESTED, CANCELLED)
    t0 = time.monotonic()
    job = wait(server, job_id, (CANCELLED,), timeout=60)
    assert time.monotonic() - t0 < 30
    assert job["fine_tuned_model"] is None
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == CANCELLED  # idempotent
    # the worker is free again: the next job runs
    r = create(server, training_files=[train], hyperparameters={"training_steps": 2,
                                                                "seq_len": 128})
    assert wait(server, r.json()["id"], (SUCCESS, "FAILED"))["status"] == SUCCESS


def test_survives_worker_and_server_kills(tmp_path: Path, model_dir: str) -> None:
    """kill -9 the worker mid-training: the server starts a new one, which resumes the job
    from its last checkpoint; then kill -9 the server: a new server resumes it again, and the
    job succeeds with its steps continued, not restarted."""
    home = tmp_path / "home"
    args, env = serve_args(model_dir, home)
    db = JobStore(None, home)
    srv = ServerProcess(*args, env=env)
    try:
        client = Mistral(api_key="unused", server_url=srv.url)
        train = upload(client, GOOD)
        r = create(srv, training_files=[train],
                   hyperparameters={"training_steps": 240, "seq_len": 128})
        job_id = r.json()["id"]
        job = wait(srv, job_id, (RUNNING,), check=lambda j: len(j["checkpoints"]) >= 1)
        pid = db.get_job(job_id).worker_pid
        assert pid and job["status"] == RUNNING
        os.kill(pid, signal.SIGKILL)
        job = wait(srv, job_id, (RUNNING,), check=lambda j: any(
            e["name"] == "worker-lost" for e in j["events"]) and db.get_job(
            job_id).worker_pid not in (None, pid) and len(j["checkpoints"]) >= 2)
        srv.proc.kill()  # the server, -9: its worker notices and stops at the next step
        srv.proc.wait()
        srv.stop()
        srv = ServerProcess(*args, env=env)
        done = wait(srv, job_id, (SUCCESS, "FAILED", CANCELLED), timeout=600)
        assert done["status"] == SUCCESS, done["error"]
    finally:
        srv.stop()
    events = done["events"]
    resumed = [e for e in events if e["name"] == "status-updated" and "resumed" in e["data"]]
    assert len(resumed) >= 2 and all(e["data"]["resumed"] for e in resumed), resumed
    assert any(e["name"] == "worker-lost" for e in events)
    for ev in resumed:  # after each resume the steps go on from the checkpoint
        after = events[events.index(ev) + 1:]
        steps = [e["data"]["step"] for e in after if e["name"] == "training-step"]
        assert steps and steps[0] > ev["data"]["from_step"] >= 1
    assert sorted({c["step_number"] for c in done["checkpoints"]}) == \
        [c["step_number"] for c in done["checkpoints"]]


def test_store_bad_database_is_one_sentence(tmp_path: Path) -> None:
    from souverain.finetune.store import JobsError

    for url, words in [("postgresql+psycopg://u:secret@127.0.0.1:1/db", "Connection refused"),
                       ("nonsense", "sqlite:///PATH")]:
        with pytest.raises(JobsError, match=words) as e:
            JobStore(url, tmp_path)
        assert "secret" not in str(e.value)
