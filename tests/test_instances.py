"""Instances that know their data: one `souverain serve` per data folder (a second one on the
same --data-dir exits 2 with one sentence; the lock dies with its holder, kill -9 included),
and servers that share a jobs database (each with its own data folder) run only the
fine-tuning jobs of the models they serve. Real `souverain serve` processes, tiny Llama.
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
from server_utils import ServerProcess, free_port

from souverain.finetune.store import QUEUED, RUNNING, STARTED, SUCCESS, JobStore
from souverain.paths import server_holding

GOOD = "".join(json.dumps({"messages": [
    {"role": "user", "content": f"What is {i} plus {i}?"},
    {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n"
    for i in range(24)).encode()
HYPER = {"training_steps": 4, "seq_len": 128}


@pytest.fixture(scope="module")
def model_dir(tiny_llama: dict) -> str:
    return str(tiny_llama["consolidated"])


def serve_args(model_dir: str, name: str, home: Path, *extra: str) -> list[str]:
    return [model_dir, "--name", name, "--no-libraries", "--embed-model", "none",
            "--data-dir", str(home), *extra]


def one_line(text: str) -> str:
    return " ".join(text.split())  # (the console wraps long sentences when piped)


# -- one server per data folder -----------------------------------------------------------------

def test_second_server_on_a_data_dir_refused_until_the_first_dies(tmp_path: Path,
                                                                  model_dir: str) -> None:
    home = tmp_path / "home"
    args = serve_args(model_dir, "tiny", home, "--no-finetune")  # (the audit log is here)
    first = ServerProcess(*args)
    try:
        assert server_holding(home) == f"pid {first.proc.pid}, {first.url}"
        second = subprocess.run(
            [sys.executable, "-m", "souverain.cli", "serve", *args, "--port", str(free_port())],
            capture_output=True, text=True, timeout=300, check=False)
        said = one_line(second.stderr)
        assert second.returncode == 2, said
        assert f"Another souverain server (pid {first.proc.pid}, {first.url}) already uses " \
               f"the data folder {home}" in said, said
        assert "own --data-dir" in said and "Traceback" not in said
        assert httpx.get(first.url + "/health", timeout=10).status_code == 200  # untouched
        first.proc.kill()  # -9: no clean-up ran, the lock file stays, the flock is gone
        first.proc.wait()
        assert (home / "server.lock").exists() and server_holding(home) is None
        third = ServerProcess(*args)
        assert server_holding(home) == f"pid {third.proc.pid}, {third.url}"
        assert third.stop() == 0, third.log()
        assert server_holding(home) is None
    finally:
        first.stop()


# -- servers sharing a jobs database ----------------------------------------------------------

def test_store_claims_and_adopts_only_jobs_of_given_models(tmp_path: Path) -> None:
    store = JobStore(None, tmp_path)
    f = store.add_file(GOOD, "train.jsonl", "fine-tune")
    files = [{"file_id": f.id, "weight": 1.0}]
    a = store.create_job(model="a", model_path="/a", training_files=files)
    b = store.create_job(model="b", model_path="/b", training_files=files)
    assert store.claim_next(1, models=["c"]) is None
    got = store.claim_next(1, models=["b", "c"])
    assert got is not None and got.id == b.id and got.status == STARTED
    assert store.get_job(a.id).status == QUEUED
    store.set_status(b.id, RUNNING, expect=(STARTED,), worker_pid=None, worker_host=None)
    assert store.orphans(stale_after=60, models=["a"]) == []  # b's job: not for a's worker
    assert [j.id for j in store.orphans(stale_after=60, models=["b"])] == [b.id]
    got = store.claim_next(2)  # no filter: any job
    assert got is not None and got.id == a.id
    store.close()


def children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def job(srv: ServerProcess, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(srv: ServerProcess, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        j = job(srv, job_id)
        if j["status"] in (SUCCESS, "FAILED", "FAILED_VALIDATION", "CANCELLED"):
            return j
        assert time.monotonic() < deadline, f"job still {j['status']}:\n{srv.log()}"
        time.sleep(0.2)


def started_by(j: dict[str, Any]) -> int:
    """The pid of the worker that claimed the job (its STARTED event says host:pid)."""
    ev = [e for e in j["events"] if e["name"] == "status-updated"
          and e["data"].get("status") == STARTED and "worker" in e["data"]]
    assert len(ev) == 1, j["events"]
    return int(ev[0]["data"]["worker"].rsplit(":", 1)[1])


def test_shared_jobs_db_each_server_runs_only_its_models_jobs(tmp_path: Path,
                                                              model_dir: str) -> None:
    """Server B (serving b) shares server A's jobs database: a job for a, queued before B
    started (the oldest, so B's worker would take it first if it took any job), stays QUEUED
    while B trains its own job for b; then A starts and trains it."""
    db = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    store = JobStore(db, home_a)
    f = store.add_file(GOOD, "train.jsonl", "fine-tune", sample_type="instruct")
    job_a = store.create_job(model="a", model_path=model_dir, hyperparameters=HYPER,
                             training_files=[{"file_id": f.id, "weight": 1.0}])
    srv_b = ServerProcess(*serve_args(model_dir, "b", home_b, "--jobs-db", db))
    srv_a = None
    try:
        r = httpx.post(srv_b.url + "/v1/files", files={"file": ("train.jsonl", GOOD)},
                       data={"purpose": "fine-tune"}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(srv_b.url + "/v1/fine_tuning/jobs", timeout=30, json={
            "model": "b", "training_files": [r.json()["id"]], "hyperparameters": HYPER})
        assert r.status_code == 200, r.text
        done_b = wait_done(srv_b, r.json()["id"])
        assert done_b["status"] == SUCCESS, done_b
        assert started_by(done_b) in children(srv_b.proc.pid)
        waiting = job(srv_b, job_a.id)  # B sees it (one database) and leaves it alone
        assert waiting["status"] == QUEUED and store.get_job(job_a.id).worker_pid is None

        srv_a = ServerProcess(*serve_args(model_dir, "a", home_a, "--jobs-db", db))
        done_a = wait_done(srv_a, job_a.id)
        assert done_a["status"] == SUCCESS, done_a
        assert started_by(done_a) in children(srv_a.proc.pid)
        assert "jobs for b" in srv_b.log() and "jobs for a" in srv_a.log()
    finally:
        for srv in (srv_a, srv_b):
            if srv is not None:
                assert srv.stop() == 0, srv.log()
        store.close()

