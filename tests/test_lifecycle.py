"""Model lifecycle through the official SDK against real servers on 127.0.0.1: deprecate (the
card, the Deprecation/Sunset headers), withdraw (410 naming the replacement, or the
replacement with fallback), restore; a fine-tuned model's archive/unarchive/update/delete
(files erased, 404 after); the state shared by two servers on one jobs database; the audit
records; `souverain models` (its changes applied by a running server, its bad input exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import mistralai.client.errors
import pytest
from mistralai.client import Mistral
from server_utils import ServerProcess
from test_multi_lora import random_adapter

from souverain.finetune.lifecycle import LifecycleError, LifecycleStore
from souverain.finetune.store import RUNNING, STARTED, SUCCESS, JobStore
from souverain.server.auth import add_key
from souverain.server.keyfile import ConfigError, parse_line
from souverain.weights import load
from souverain.weights.adapter import save_adapter

MSG = [{"role": "user", "content": "hello"}]


def _fine_tuned(home: Path, model_dir: str) -> tuple[str, Path]:
    """A SUCCESS job with a random adapter in the jobs database under ``home`` (what the
    worker leaves after training, without the minutes of training)."""
    store = JobStore(root=home)
    f = store.add_file(b'{"messages": [{"role": "user", "content": "a"}, '
                       b'{"role": "assistant", "content": "b"}]}\n', "t.jsonl", "fine-tune",
                       sample_type="instruct", num_lines=1)
    job = store.create_job(model="tiny", model_path=model_dir,
                           training_files=[{"file_id": f.id, "weight": 1.0}], suffix="lc")
    store.claim_next(pid=1, host="test")
    store.set_status(job.id, RUNNING, expect=(STARTED,))
    adapter_dir = store.runs_dir / job.id / "checkpoints" / "final"
    save_adapter(random_adapter(load(model_dir).args, 2, seed=3), adapter_dir)
    name = f"ft:tiny:lc:{job.id[:8]}"
    store.set_status(job.id, SUCCESS, expect=(RUNNING,), fine_tuned_model=name,
                     adapter_dir=str(adapter_dir))
    store.close()
    return name, adapter_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_llama: dict):
    home = tmp_path_factory.mktemp("lifecycle-home")
    model_dir = str(tiny_llama["consolidated"])
    ft, adapter_dir = _fine_tuned(home, model_dir)
    srv = ServerProcess(model_dir, "--name", "tiny", "--model", f"tiny2={model_dir}",
                        "--no-libraries", "--embed-model", "none", "--lazy",
                        "--data-dir", str(home), env={"SOUVERAIN_HOME": str(home)})
    yield srv, home, model_dir, ft, adapter_dir
    assert srv.stop() == 0, srv.log()


def _post(srv: ServerProcess, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(srv.url + path, json=body or {}, timeout=30)


def _chat(srv: ServerProcess, model: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": MSG, "max_tokens": 2})


def _audit(home: Path) -> list[dict[str, Any]]:
    time.sleep(0.5)  # the writer thread
    return [json.loads(line) for p in sorted((home / "audit").glob("audit-*.jsonl"))
            for line in p.read_text().splitlines() if '"lifecycle"' in line]


def test_deprecate_withdraw_fallback_restore(setup) -> None:
    srv, home, model_dir, _, _ = setup
    client = Mistral(api_key="unused-on-loopback", server_url=srv.url)
    assert client.models.retrieve(model_id="tiny").deprecation is None

    r = _post(srv, "/v1/models/tiny/deprecate", {"replacement": "tiny2", "date": "2027-06-30"})
    assert r.status_code == 200, r.text
    card = client.models.retrieve(model_id="tiny")
    assert card.deprecation is not None and card.deprecation.date().isoformat() == "2027-06-30"
    assert card.deprecation_replacement_model == "tiny2"
    listed = {m.id: m for m in client.models.list().data}
    assert listed["tiny"].deprecation_replacement_model == "tiny2"
    assert listed["tiny2"].deprecation is None
    r = _chat(srv, "tiny")  # deprecated: still served, with the headers
    assert r.status_code == 200, r.text
    assert r.headers["Deprecation"].startswith("@")
    assert r.headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert "tiny2" in r.headers["Link"]
    assert "Deprecation" not in _chat(srv, "tiny2").headers

    assert _post(srv, "/v1/models/tiny/withdraw").status_code == 200
    with pytest.raises(mistralai.client.errors.SDKError) as err:
        client.chat.complete(model="tiny", messages=MSG, max_tokens=2)
    assert err.value.status_code == 410
    body = json.loads(err.value.body)
    assert body["code"] == "model_withdrawn" and "use tiny2 instead" in body["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "a",
                                                      "max_tokens": 1}, timeout=60)
    assert r.status_code == 410 and r.json()["code"] == "model_withdrawn"
    assert _chat(srv, "tiny2").status_code == 200  # its replacement is untouched

    # fallback for this model: served by the replacement, and the response says so
    assert _post(srv, "/v1/models/tiny/withdraw", {"fallback": True}).status_code == 200
    r = _chat(srv, "tiny")
    assert r.status_code == 200, r.text
    assert r.headers["x-souverain-model-replaced"] == "tiny -> tiny2"
    assert r.json()["model"] == "tiny2"

    assert _post(srv, "/v1/models/tiny/restore").status_code == 200
    r = _chat(srv, "tiny")
    assert r.status_code == 200 and "x-souverain-model-replaced" not in r.headers
    assert client.models.retrieve(model_id="tiny").deprecation is None

    # bad changes: one sentence naming the fix
    r = _post(srv, "/v1/models/tiny/deprecate", {"date": "30/06/2027"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "date"
    assert _post(srv, "/v1/models/tiny/deprecate").status_code == 422  # no date
    r = _post(srv, "/v1/models/tiny/withdraw", {"replacement": "nope"})
    assert r.status_code == 404 and "replacement 'nope'" in r.json()["message"]
    r = _post(srv, "/v1/models/tiny/withdraw", {"replacement": "tiny"})
    assert r.status_code == 409 and "itself" in r.json()["message"]
    assert _post(srv, "/v1/models/nope/withdraw").status_code == 404

    records = _audit(home)
    actions = [(r["lifecycle"]["action"], r["lifecycle"]["old"]["state"],
                r["lifecycle"]["new"]["state"]) for r in records if r["model"] == "tiny"
               and "action" in r["lifecycle"]]
    assert actions[:4] == [("deprecate", "active", "deprecated"),
                           ("withdraw", "deprecated", "withdrawn"),
                           ("withdraw", "withdrawn", "withdrawn"),
                           ("restore", "withdrawn", "active")]


def test_shared_by_servers_on_one_jobs_database(setup, tmp_path: Path) -> None:
    """A second server on the same jobs database, with --withdrawn-fallback, sees the
    first's withdrawal; the CLI's change is applied by both."""
    srv, home, model_dir, _, _ = setup
    jobs_db = f"sqlite:///{home / 'finetune' / 'jobs.sqlite'}"
    keys = tmp_path / "keys.txt"
    _, user_key = add_key(keys, "user")
    _, admin_key = add_key(keys, "ops", admin=True)
    other = ServerProcess(model_dir, "--name", "tiny", "--model", f"tiny2={model_dir}",
                          "--no-libraries", "--embed-model", "none", "--lazy",
                          "--jobs-db", jobs_db, "--withdrawn-fallback", "--api-keys-file",
                          str(keys), "--data-dir", str(tmp_path),
                          env={"SOUVERAIN_HOME": str(tmp_path)})
    try:
        # with keys, only a key with scopes=admin administers
        r = httpx.post(other.url + "/v1/models/tiny2/withdraw", json={"replacement": "tiny"},
                       headers={"Authorization": f"Bearer {user_key}"}, timeout=30)
        assert r.status_code == 403 and "scopes=admin" in r.json()["message"]
        r = httpx.post(other.url + "/v1/models/tiny2/withdraw", json={"replacement": "tiny"},
                       headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        assert r.status_code == 200, r.text
        time.sleep(1.1)  # the first server's cache of the rows
        assert _chat(srv, "tiny2").status_code == 410
        r = httpx.post(other.url + "/v1/chat/completions", timeout=120,
                       headers={"Authorization": f"Bearer {user_key}"},
                       json={"model": "tiny2", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-souverain-model-replaced"] == \
            "tiny2 -> tiny"
        cli = subprocess.run([sys.executable, "-m", "souverain.cli", "models", "restore",
                              "tiny2", "--data-dir", str(home)], capture_output=True,
                             text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        time.sleep(1.1)
        assert _chat(srv, "tiny2").status_code == 200
    finally:
        assert other.stop() == 0, other.log()
    cli_records = [r for r in _audit(home) if r.get("source") == "cli"]
    assert cli_records[-1]["lifecycle"]["new"]["state"] == "active"
    admin_records = [r for r in _audit(tmp_path) if r["lifecycle"].get("action")]
    assert admin_records[-1]["key_name"] == "ops"  # who made the change


def test_fine_tuned_archive_update_delete(setup) -> None:
    srv, home, _, ft, adapter_dir = setup
    client = Mistral(api_key="unused-on-loopback", server_url=srv.url)
    assert _chat(srv, ft).status_code == 200  # its adapter loaded
    assert client.models.archive(model_id=ft).archived is True
    assert client.models.retrieve(model_id=ft).archived is True
    assert client.models.unarchive(model_id=ft).archived is False
    updated = client.models.update(model_id=ft, name="Sums", description="adds numbers")
    assert updated.name == "Sums" and updated.description == "adds numbers"
    card = client.models.retrieve(model_id=ft)
    assert card.name == "Sums" and card.archived is False
    with pytest.raises(mistralai.client.errors.SDKError) as err:
        client.models.delete(model_id="tiny")  # a base model: withdraw it instead
    assert err.value.status_code == 400 and "withdraw" in err.value.body

    assert adapter_dir.is_dir()
    deleted = client.models.delete(model_id=ft)
    assert deleted.id == ft and deleted.deleted is True
    assert not adapter_dir.exists()
    assert ft not in {m.id for m in client.models.list().data}
    r = _chat(srv, ft)
    assert r.status_code == 404, r.text
    assert httpx.get(f"{srv.url}/v1/models/{ft}", timeout=30).status_code == 404
    erased = [r for r in _audit(home) if r["lifecycle"].get("action") == "delete"]
    assert erased and erased[-1]["erased"]["files"] > 0 and erased[-1]["key_id"] is None


def test_cli_bad_input_exit_2(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "souverain.cli", "models", *args,
                               "--data-dir", str(tmp_path)], capture_output=True, text=True,
                              timeout=60)

    bad = run("deprecate", "m", "--date", "2027-02-30")
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert run("deprecate", "m").returncode == 2  # no date
    assert run("withdraw", "m", "--replacement", "m").returncode == 2  # itself
    assert run("withdraw", "m", "--fallback").returncode == 2  # fallback without replacement
    ok = run("withdraw", "m", "--replacement", "n")
    assert ok.returncode == 0 and "active -> withdrawn" in ok.stdout
    shown = run("show")
    assert json.loads(shown.stdout.strip().splitlines()[-1])["state"] == "withdrawn"


def test_admin_scope_in_the_keys_file() -> None:
    h = "sha256:" + "a" * 64
    assert parse_line(f"k1 ops {h} scopes=admin", 1, "f").info.scopes == {"admin"}
    both = parse_line(f"k1 ops {h} models=a,b scopes=admin", 1, "f").info
    assert both.models == {"a", "b"} and both.scopes == {"admin"}
    assert parse_line(f"k1 ops {h}", 1, "f").info.scopes == frozenset()
    for bad in ("scopes=root", "scopes=", "models=a models=b", "other=1"):
        with pytest.raises(ConfigError, match="line 1"):
            parse_line(f"k1 ops {h} {bad}", 1, "f")


def test_store_transitions(tmp_path: Path) -> None:
    store = LifecycleStore(root=tmp_path)
    old, new = store.apply("deprecate", "m", "k", date="2027-01-31", replacement="n")
    assert (old.state, new.state, new.deprecation) == ("active", "deprecated", "2027-01-31")
    _, new = store.apply("withdraw", "m", "k")
    assert new.state == "withdrawn" and new.replacement == "n"  # kept from the deprecation
    assert new.deprecation == "2027-01-31"
    _, new = store.apply("restore", "m", "k")
    assert new.state == "active" and new.replacement is None
    store.change("m", "k", deleted_at=1.0)
    with pytest.raises(LifecycleError, match="deleted"):
        store.apply("withdraw", "m", "k")
    store.close()
    assert LifecycleStore(root=tmp_path).get("m").state == "deleted"  # durable


def test_an_interrupted_deletion_is_finished_at_start(tmp_path: Path) -> None:
    """The row is written before the files are erased: a server that starts with a deleted
    model's adapter still on disk erases it (its run folder with it)."""
    from souverain.server.lifecycle import LifecycleService

    run = tmp_path / "finetune" / "runs" / "job1"
    (run / "checkpoints" / "final").mkdir(parents=True)
    (run / "checkpoints" / "final" / "lora.safetensors").write_bytes(b"x" * 10)
    (run / "events.jsonl").write_text("{}\n")
    service = LifecycleService(LifecycleStore(root=tmp_path))
    rows = [("ft:t:a:1", "t", str(run / "checkpoints" / "final"), "job1")]
    assert service.finish_deletions(lambda: rows) == 0 and run.exists()  # not deleted
    service.store.change("ft:t:a:1", "k", deleted_at=1.0)
    service.invalidate()
    assert service.finish_deletions(lambda: rows) == 1
    assert not run.exists() and (tmp_path / "finetune" / "runs").is_dir()
