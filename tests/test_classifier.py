"""Classifier fine-tuning (``job_type: "classifier"``) and the classifiers API, end to end on a
real `souverain serve`: a generated, learnable dataset (texts built from word lists per label;
two targets, one multi-label) uploaded with the official SDK, a job trained on the bundled
embedding model through the jobs API (raw HTTP: the 3.x SDK has no fine-tuning client), its
``ft:`` model listed with the classification capability and answering
``client.classifiers.classify`` / ``classify_chat`` with >= 0.9 accuracy on a held-out split;
bad classifier files refused with their line numbers; a job resumed after ``kill -9`` of its
worker. The model classes themselves are checked in-process (save/load round trip).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess, free_port

from souverain.finetune.store import SUCCESS, JobStore

mistralai = pytest.importorskip("mistralai")
from mistralai.client import Mistral
from mistralai.client import errors as sdk_errors

TOPICS = {"sport": ["match", "goal", "team", "coach", "league", "stadium", "referee"],
          "finance": ["bank", "loan", "interest", "market", "stock", "budget", "invoice"],
          "health": ["doctor", "fever", "clinic", "vaccine", "nurse", "symptom", "therapy"]}
TONES = {"positive": ["great", "wonderful", "happy", "excellent", "love", "delighted"],
         "negative": ["terrible", "awful", "angry", "disappointed", "hate", "horrible"]}
FILLER = ["the", "a", "today", "we", "about", "really", "this", "was", "our", "new", "it"]


def make(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` lines: a tone (single-label) and one or two topics (multi-label) per text, each
    word drawn from its label's list, shuffled among filler words."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        tone = r.choice(sorted(TONES))
        topics = sorted(r.sample(sorted(TOPICS), r.choice([1, 1, 2])))
        words = [r.choice(TONES[tone]) for _ in range(2)] + \
            [r.choice(FILLER) for _ in range(4)] + \
            [r.choice(TOPICS[t]) for t in topics for _ in range(2)]
        r.shuffle(words)
        out.append({"text": " ".join(words), "labels": {"tone": tone, "topics": topics}})
    return out


def jsonl(objs: list[Any]) -> bytes:
    return ("\n".join(json.dumps(o) for o in objs) + "\n").encode()


TRAIN, HELD_OUT = make(240, 1), make(60, 2)


def serve_args(model_dir: str, home: Path) -> tuple[list[str], dict[str, str]]:
    return ([model_dir, "--name", "tiny", "--no-libraries", "--data-dir", str(home),
             "--max-file-mib", "1"], {"SOUVERAIN_HOME": str(home)})


@pytest.fixture(scope="module")
def model_dir(tiny_llama: dict) -> str:
    return str(tiny_llama["consolidated"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: str):
    home = tmp_path_factory.mktemp("cls-home")
    args, env = serve_args(model_dir, home)
    srv = ServerProcess(*args, env=env)
    srv.home = home  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Mistral:
    return Mistral(api_key="unused-on-loopback", server_url=server.url)


def upload(client: Mistral, data: bytes, name: str = "train.jsonl") -> str:
    return client.files.upload(file={"file_name": name, "content": data},
                               purpose="fine-tune").id


def create(server: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/fine_tuning/jobs",
                      json={"model": "mistral-embed", "job_type": "classifier", **body},
                      timeout=30)


def wait(server: ServerProcess, job_id: str, statuses: tuple[str, ...], timeout: float = 240,
         check: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=30)
        job = r.json()
        if job["status"] in statuses and (check is None or check(job)):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}: {job.get('error')}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def trained(server: ServerProcess, client: Mistral) -> dict[str, Any]:
    train = upload(client, jsonl(TRAIN))
    valid = upload(client, jsonl(HELD_OUT), "valid.jsonl")
    r = create(server, training_files=[{"file_id": train, "weight": 1}],
               validation_files=[valid], suffix="topics",
               hyperparameters={"epochs": 2, "learning_rate": 1e-3})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["job_type"] == "classifier" and job["status"] == "QUEUED"
    return wait(server, job["id"], (SUCCESS, "FAILED", "FAILED_VALIDATION"))


def test_upload_reports_sample_type_and_bad_lines(client: Mistral) -> None:
    f = client.files.upload(file={"file_name": "c.jsonl", "content": jsonl(TRAIN[:5])},
                            purpose="fine-tune")
    assert f.sample_type == "classifier" and f.num_lines == 5
    bad = [TRAIN[0], {"text": "no labels here", "labels": {}}, TRAIN[1]]
    with pytest.raises(sdk_errors.SDKError) as e:
        upload(client, jsonl(bad))
    assert e.value.status_code == 400 and "line 2" in e.value.body and "labels" in e.value.body
    mixed = [TRAIN[0], {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(sdk_errors.SDKError) as e:
        upload(client, jsonl(mixed))
    assert "line 2" in e.value.body and "line 1" in e.value.body


def test_job_refusals(server: ServerProcess, client: Mistral) -> None:
    train = upload(client, jsonl(TRAIN[:20]))
    r = create(server, training_files=[train], model="nope")
    assert r.status_code == 404
    r = create(server, training_files=[train], job_type="completion", model="tiny")
    assert r.status_code == 400 and "job_type" in r.json()["message"]
    r = create(server, training_files=[train],
               classifier_targets=[{"name": "tone", "labels": ["positive"]}])
    assert r.status_code == 400 and "at least 2" in r.json()["message"]


def test_validation_names_lines(server: ServerProcess, client: Mistral) -> None:
    """Lines that parse but break the job's targets fail the job's validation, by line."""
    lines = TRAIN[:10] + [{"text": "great match", "labels": {"tone": "neutral"}},
                          {"text": "great match", "labels": {"mood": "x"}},
                          {"text": "word " * 400, "labels": {"tone": "positive"}}]
    train = upload(client, jsonl(lines), "targets.jsonl")
    r = create(server, training_files=[train], classifier_targets=[
        {"name": "tone", "labels": ["positive", "negative"]},
        {"name": "topics", "labels": sorted(TOPICS), "loss_function": "multi_class"}])
    assert r.status_code == 200, r.text
    job = wait(server, r.json()["id"], ("FAILED_VALIDATION", "FAILED", SUCCESS))
    assert job["status"] == "FAILED_VALIDATION", job
    err = job["error"]
    assert "targets.jsonl line 11" in err and "'neutral'" in err
    assert "targets.jsonl line 12" in err and "mood" in err
    assert "targets.jsonl line 13" in err and "tokens long" in err


def test_trained_classifier_through_the_sdk(server: ServerProcess, client: Mistral,
                                            trained: dict[str, Any]) -> None:
    assert trained["status"] == SUCCESS, trained.get("error")
    name = trained["fine_tuned_model"]
    assert name.startswith("ft:souverain-embed:topics:")
    targets = {t["name"]: t for t in trained["classifier_targets"]}
    assert targets["tone"]["loss_function"] == "single_class"
    assert targets["topics"]["loss_function"] == "multi_class"
    assert targets["topics"]["labels"] == sorted(TOPICS)
    assert trained["checkpoints"] and any(e["name"] == "evaluation" for e in trained["events"])

    card = next(m for m in client.models.list().data if m.id == name)
    assert card.capabilities.classification and not card.capabilities.completion_chat
    assert card.type == "fine-tuned" and card.root == "souverain-embed"
    assert client.models.retrieve(model_id=name).capabilities.classification

    res = client.classifiers.classify(model=name, inputs=[ex["text"] for ex in HELD_OUT])
    assert res.model == name and len(res.results) == len(HELD_OUT)
    right = total = 0
    for ex, out in zip(HELD_OUT, res.results, strict=True):
        tone = out["tone"].scores
        assert set(tone) == set(TONES) and abs(sum(tone.values()) - 1) < 1e-4
        right += max(tone, key=tone.__getitem__) == ex["labels"]["tone"]
        topics = out["topics"].scores
        right += {t for t, p in topics.items() if p > 0.5} == set(ex["labels"]["topics"])
        total += 2
    assert right / total >= 0.9, right / total

    chat = client.classifiers.classify_chat(model=name, input=[
        {"messages": [{"role": "user", "content": "awful awful bank loan invoice"}]},
        {"messages": [{"role": "user", "content": "wonderful goal by the team"},
                      {"role": "assistant", "content": "great match indeed"}]}])
    assert len(chat.results) == 2
    assert chat.results[0]["tone"].scores["negative"] > 0.5
    assert chat.results[1]["topics"].scores["sport"] > 0.5

    deadline = time.monotonic() + 10  # the audit log is written by a thread
    while True:
        records = [json.loads(line) for p in (server.home / "audit").glob("audit-*.jsonl")
                   for line in p.read_text().splitlines()]
        rec = [r for r in records if r.get("route") == "/v1/chat/classifications"]
        if rec or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rec and rec[-1]["model"] == name and rec[-1]["status"] == 200, records[-3:]
    assert rec[-1]["classifications"][0]["tone"] == "negative"
    assert "awful" not in json.dumps(rec[-1])  # no content without --audit-content


def test_classify_refusals(server: ServerProcess, client: Mistral,
                           trained: dict[str, Any]) -> None:
    name = trained["fine_tuned_model"]

    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(server.url + "/v1/classifications", json=body, timeout=30)

    r = post({"model": name, "input": []})
    assert r.status_code == 400 and "empty" in r.json()["message"]
    r = post({"model": name, "input": ["fine", "   "]})
    assert r.status_code == 400 and "input[1]" in r.json()["message"]
    r = post({"model": "ft:souverain-embed:nope:12345678", "input": ["x"]})
    assert r.status_code == 404
    for other in ("tiny", "mistral-embed"):
        r = post({"model": other, "input": ["x"]})
        assert r.status_code == 400 and "not a classifier" in r.json()["message"], r.text
    r = post({"model": name, "input": ["word " * 400]})
    assert r.status_code == 400 and "tokens long" in r.json()["message"]
    with pytest.raises(sdk_errors.SDKError) as e:
        client.classifiers.classify(model=name, inputs=[])
    assert e.value.status_code == 400


def test_model_folder_round_trip(trained: dict[str, Any], server: ServerProcess) -> None:
    """`ClassifierModel.load(path).predict(texts)`: the interface moderation builds on."""
    from souverain.finetune.classifier import ClassifierModel

    folder = JobStore(None, server.home).get_job(trained["id"]).adapter_dir
    model = ClassifierModel.load(folder)
    out = model.predict(["horrible referee and awful stadium", "happy nurse at the clinic"])
    assert out[0]["tone"]["negative"] > 0.5 and out[0]["topics"]["sport"] > 0.5
    assert out[1]["tone"]["positive"] > 0.5 and out[1]["topics"]["health"] > 0.5
    assert set(out[1]["topics"]) == set(TOPICS)


def test_classifier_on_a_chat_model(server: ServerProcess, client: Mistral,
                                    trained: dict[str, Any]) -> None:
    """The other base: a served chat model's mean last hidden state (the tiny random Llama:
    the shapes and the serving path, not the quality)."""
    train = upload(client, jsonl(TRAIN[:48]))
    r = create(server, model="tiny", training_files=[train], suffix="llm",
               hyperparameters={"training_steps": 6, "learning_rate": 1e-2, "lora_rank": 4})
    assert r.status_code == 200, r.text
    job = wait(server, r.json()["id"], (SUCCESS, "FAILED", "FAILED_VALIDATION"))
    assert job["status"] == SUCCESS, job["error"]
    name = job["fine_tuned_model"]
    assert name.startswith("ft:tiny:llm:")
    res = client.classifiers.classify(model=name, inputs=["great goal", "awful loan"])
    assert len(res.results) == 2 and set(res.results[0]["topics"].scores) == set(TOPICS)
    assert abs(sum(res.results[1]["tone"].scores.values()) - 1) < 1e-4
    card = client.models.retrieve(model_id=name)
    assert card.capabilities.classification and card.root == "tiny"
    listed = [m for m in client.models.list().data if m.id == name]
    assert len(listed) == 1 and not listed[0].capabilities.completion_chat
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404, r.text  # a classifier is no chat model


def test_resumes_after_worker_kill(server: ServerProcess, client: Mistral) -> None:
    """kill -9 the worker after a checkpoint: the server starts a new worker, which resumes
    the job from that checkpoint (steps go on, not from 1) and finishes it."""
    train = upload(client, jsonl(TRAIN))
    r = create(server, training_files=[train], hyperparameters={
        "training_steps": 20, "learning_rate": 1e-3})
    job_id = r.json()["id"]
    db = JobStore(None, server.home)
    wait(server, job_id, ("RUNNING",), check=lambda j: len(j["checkpoints"]) >= 1)
    pid = db.get_job(job_id).worker_pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    done = wait(server, job_id, (SUCCESS, "FAILED", "CANCELLED"))
    assert done["status"] == SUCCESS, done["error"]
    events = done["events"]
    assert any(e["name"] == "worker-lost" for e in events)
    resumed = [e for e in events if e["name"] == "status-updated" and e["data"].get("resumed")]
    assert resumed, events
    after = events[events.index(resumed[0]) + 1:]
    steps = [e["data"]["step"] for e in after if e["name"] == "training-step"]
    assert steps and steps[0] > resumed[0]["data"]["from_step"] >= 1


def test_cli_lists_bad_lines(tmp_path: Path) -> None:
    """`souverain finetune classifier` checks every line before training: exit 2, each bad
    line named."""
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(TRAIN[:6] + [{"text": "x", "labels": {"tone": ["positive", 3]}}])
                    + b'{"text": "unterminated\n'
                    + jsonl([{"text": "great", "labels": "positive"}]))
    out = subprocess.run([sys.executable, "-m", "souverain.cli", "finetune", "classifier",
                          str(bad), "-o", str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "line 7" in out.stderr and "line 8" in out.stderr, out.stderr
    assert "line 9" in out.stderr and "labels" in out.stderr, out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_is_exact(tmp_path: Path) -> None:
    """A run stopped after step 5 (the last checkpoint at 4) and resumed ends with the same
    weights, bit for bit, as one that ran straight through."""
    import torch
    from safetensors.torch import load_file

    from souverain.finetune.classifier_data import infer_targets
    from souverain.finetune.classifier_train import (
        ClassifierTrainConfig,
        run_classifier_training,
    )

    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(TRAIN[:32]))
    targets = [t.to_dict() for t in infer_targets([str(data)])]

    def config(run: str) -> ClassifierTrainConfig:
        return ClassifierTrainConfig(model="souverain-embed", train_files=[str(data)],
                                     run_dir=str(tmp_path / run), targets=targets,
                                     max_steps=6, checkpoint_every=2, learning_rate=1e-3,
                                     lora_rank=4)

    straight = run_classifier_training(config("a"))
    seen: list[int] = []
    cut = run_classifier_training(
        config("b"), on_event=lambda e: seen.append(e["step"]) if e["type"] == "step" else None,
        should_stop=lambda: bool(seen) and seen[-1] >= 5)
    assert cut.status == "cancelled" and cut.final_dir.name == "step_000004"
    resumed = run_classifier_training(config("b"), resume=True)
    assert resumed.status == "completed" and resumed.steps == 6
    a = load_file(str(straight.final_dir / "classifier.safetensors"))
    b = load_file(str(resumed.final_dir / "classifier.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- a trained classifier as the moderation model (issue 17: "then used as the moderation model")

POLICY = {"health": TOPICS["health"], "financial": TOPICS["finance"],
          "safe": ["garden", "weather", "movie", "holiday", "music", "recipe", "bicycle"]}


def policy_lines(n: int, seed: int) -> list[dict[str, Any]]:
    """A team's own policy: texts asking for health or financial advice, or neither."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        label = r.choice(sorted(POLICY))
        words = [r.choice(POLICY[label]) for _ in range(3)] + [r.choice(FILLER) for _ in range(4)]
        r.shuffle(words)
        out.append({"text": " ".join(words), "labels": {"moderation": label}})
    return out


def test_trained_classifier_moderates(server: ServerProcess, client: Mistral, model_dir: str,
                                      tmp_path: Path) -> None:
    train = upload(client, jsonl(policy_lines(240, 3)), "policy.jsonl")
    r = create(server, training_files=[{"file_id": train, "weight": 1}], suffix="policy",
               hyperparameters={"epochs": 2, "learning_rate": 1e-3})
    assert r.status_code == 200, r.text
    job = wait(server, r.json()["id"], (SUCCESS, "FAILED", "FAILED_VALIDATION"))
    assert job["status"] == SUCCESS, job.get("error")
    name = job["fine_tuned_model"]

    # a second server (its own data folder) on the same jobs database moderates with it
    jobs_db = f"sqlite:///{server.home / 'finetune' / 'jobs.sqlite'}"
    home2 = tmp_path / "home2"
    moderator = ServerProcess(model_dir, "--name", "tiny", "--no-libraries", "--data-dir",
                              str(home2), "--jobs-db", jobs_db,
                              "--moderation-model", name, env={"SOUVERAIN_HOME": str(home2)})
    try:
        mc = Mistral(api_key="unused-on-loopback", server_url=moderator.url)
        held = policy_lines(30, 4)
        res = mc.classifiers.moderate(model="mistral-moderation-latest",
                                      inputs=[ex["text"] for ex in held])
        right = 0
        for ex, out in zip(held, res.results, strict=True):
            label = ex["labels"]["moderation"]
            flagged = {c for c, on in out.categories.items() if on}
            right += flagged == (set() if label == "safe" else {label})
        assert right / len(held) >= 0.9, right / len(held)
        card = next(m for m in mc.models.list().data if m.id == "mistral-moderation-latest")
        assert name in card.description and card.capabilities.moderation
        # ... and its guardrails block by the team's policy
        blocked = httpx.post(moderator.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 4,
            "messages": [{"role": "user", "content": "doctor fever clinic symptom therapy"}],
            "guardrails": [{"moderation_llm_v2": {"custom_category_thresholds": {"health": 0.5},
                                                  "ignore_other_categories": True,
                                                  "action": "block"}}]})
        assert blocked.status_code == 403, blocked.text
    finally:
        assert moderator.stop() == 0, moderator.log()


def test_moderation_model_must_be_a_category_classifier(server: ServerProcess, model_dir: str,
                                                        tmp_path: Path) -> None:
    """An ft: name that is no succeeded classifier job: the server refuses to start with a
    sentence, exit code 2. A classifier whose targets and labels name no category cannot
    moderate (checked before start)."""
    from souverain.moderation.classifier_backend import category_scores, check_targets

    jobs_db = f"sqlite:///{server.home / 'finetune' / 'jobs.sqlite'}"
    home2 = tmp_path / "home3"
    out = subprocess.run(
        [sys.executable, "-m", "souverain.cli", "serve", model_dir, "--name", "tiny",
         "--no-libraries", "--data-dir", str(home2), "--jobs-db", jobs_db,
         "--moderation-model", "ft:souverain-embed:nothing:0000", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SOUVERAIN_HOME": str(home2)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no succeeded classifier job" in out.stderr, out.stderr[-2000:]

    with pytest.raises(ValueError, match="moderation category"):
        check_targets([{"name": "tone", "labels": ["positive", "negative"]}], "ft:x")
    check_targets([{"name": "selfharm", "labels": ["no", "yes"]}], "ft:x")
    # a target named after a category: everything but its negative labels
    assert category_scores({"selfharm": {"no": 0.3, "yes": 0.7}}) == {"selfharm": 0.7}
    # labels named after categories (v1's dangerous_and_criminal_content counts as both)
    scores = category_scores({"policy": {"safe": 0.1, "pii": 0.6,
                                         "dangerous_and_criminal_content": 0.3}})
    assert scores == {"pii": 0.6, "dangerous": 0.3, "criminal": 0.3}
