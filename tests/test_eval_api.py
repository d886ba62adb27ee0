"""Evaluation runs through the server, in La Plateforme's observability shapes, and the
monitoring counters of /metrics, on a real `souverain serve` (tiny Llama checkpoint).

A run is made by the real `souverain eval run --upload` (the safety suite, 2 items, against
the server, with a policy) and recorded by ``POST /v1/observability/evaluation-runs_v2``; it
is read back over raw HTTP and through the official SDK's
``client.beta.observability.evaluations.runs`` (get, get_statistics, search_all), its HTML
report is served with a CSP that forbids external loads, and the model's card links it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess

mistralai = pytest.importorskip("mistralai")
from mistralai.client import Mistral  # noqa: E402

RUNS = "/v1/observability/evaluation-runs_v2"
POLICY = {"suites": ["safety"], "limit": 2,
          "thresholds": [{"suite": "safety", "metric": "over_refusal_rate", "max": 0.5},
                         {"suite": "safety", "metric": "harmful_refusal_rate", "min": 0.9}]}
REFUSAL = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="module")
def server(tiny_llama: dict, tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("eval-api-home")
    srv = ServerProcess(str(tiny_llama["consolidated"]), "--name", "tiny", "--no-libraries",
                        "--embed-model", "none", "--no-finetune", "--data-dir", str(home),
                        env={"SOUVERAIN_HOME": str(home)})
    srv.home = home  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Mistral:
    return Mistral(api_key="unused-on-loopback", server_url=server.url)


@pytest.fixture(scope="module")
def uploaded(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run `souverain eval run --upload` recorded, and its report.json."""
    out = tmp_path_factory.mktemp("eval-out")
    policy = out / "policy.json"
    policy.write_text(json.dumps(POLICY))
    done = subprocess.run(
        [sys.executable, "-m", "souverain.cli", "eval", "run", "--url", server.url,
         "-m", "tiny", "--base", "tiny", "--policy", str(policy), "--upload", "-o", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr  # 1: the policy failed (a tiny random model)
    report = json.loads((out / "report.json").read_text())
    return report


def test_record_get_statistics_report(server: ServerProcess, uploaded: dict[str, Any]) -> None:
    run_id = uploaded["id"]
    r = httpx.get(f"{server.url}{RUNS}/{run_id}", timeout=30)
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["id"] == run_id and run["status"] == "completed"
    assert run["system"]["name"] == "tiny" and run["tags"] == ["safety"]
    assert run["passed"] is uploaded["verdict"]["passed"]
    assert run["metadata"]["verdict"]["reasons"] == uploaded["verdict"]["reasons"]
    names = {e["name"] for e in run["evaluators"]}
    assert {"safety/over_refusal_rate", "safety/harmful_refusal_rate"} <= names
    cand = uploaded["suites"]["safety"]["candidate"]["metrics"]["over_refusal_rate"]
    stat = run["statistics"]["safety/over_refusal_rate"]
    assert stat["type"] == "numeric" and stat["avg"] == pytest.approx(cand["value"])
    values = {v["id"]: v["value"] for v in stat["values"]}
    assert values["ci95_low"] == pytest.approx(cand["low"])
    assert values["ci95_high"] == pytest.approx(cand["high"])
    assert values["delta_vs_base"] == pytest.approx(0.0)  # the base is the same model
    assert stat["count"] == cand["n"] == 1
    goal = run["goal_results"]["safety/harmful_refusal_rate"]
    harmful = uploaded["suites"]["safety"]["candidate"]["metrics"]["harmful_refusal_rate"]
    assert goal["passed"] is (harmful["value"] >= 0.9)
    assert goal["results"][0]["operator"] == ">=" and goal["results"][0]["target"] == 0.9

    s = httpx.get(f"{server.url}{RUNS}/{run_id}/statistics", timeout=30)
    assert s.status_code == 200
    assert s.json() == {"run_id": run_id, "statistics": run["statistics"],
                        "goal_results": run["goal_results"], "passed": run["passed"]}

    html = httpx.get(f"{server.url}{RUNS}/{run_id}/report", timeout=30)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    csp = html.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "http" not in csp
    assert run_id in html.text and "<img" in html.text

    # recorded once; a malformed run names the field
    again = httpx.post(f"{server.url}{RUNS}", json={"run": uploaded}, timeout=30)
    assert again.status_code == 409, again.text
    bad = httpx.post(f"{server.url}{RUNS}", json={"run": {**uploaded, "id": "run-1"}},
                     timeout=30)
    assert bad.status_code == 422 and "id" in json.dumps(bad.json()["detail"])
    missing = httpx.get(f"{server.url}{RUNS}/evr_{'0' * 24}", timeout=30)
    assert missing.status_code == 404 and "search" in missing.json()["message"]


def test_search_and_the_sdk(server: ServerProcess, client: Mistral,
                            uploaded: dict[str, Any]) -> None:
    other = dict(uploaded, id="evr_" + "a" * 24, candidate={"model": "other", "url": "x"},
                 created_at=uploaded["created_at"] + 5)
    r = httpx.post(f"{server.url}{RUNS}", json={"run": other}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["rendered_report"] is False  # recorded without its html
    page = httpx.get(f"{server.url}{RUNS}/{other['id']}/report", timeout=30)
    assert page.status_code == 200 and "recorded without its rendered report" in page.text
    assert "over_refusal_rate" in page.text and "<script" not in page.text

    runs = client.beta.observability.evaluations.runs
    got = runs.get(run_id=uploaded["id"])
    assert got.id == uploaded["id"] and got.passed is uploaded["verdict"]["passed"]
    stats = runs.get_statistics(run_id=uploaded["id"])
    assert stats.statistics["safety/over_refusal_rate"].avg == pytest.approx(
        uploaded["suites"]["safety"]["candidate"]["metrics"]["over_refusal_rate"]["value"])
    every = runs.search_all()
    assert every.runs.count == 2 and [x.id for x in every.runs.results or []] == [
        other["id"], uploaded["id"]]  # newest first
    mine = runs.search_all(evaluation_run_filter_input={
        "system": {"name": {"filters": [{"value": "tiny", "operator": "equals"}]}}})
    assert [x.id for x in mine.runs.results or []] == [uploaded["id"]]
    assert (mine.runs.results or [])[0].evaluation.slug == "souverain-eval"
    paged = runs.search_all(page_size=1, page=2)
    assert paged.runs.count == 2 and [x.id for x in paged.runs.results or []] == [uploaded["id"]]
    by_suite = httpx.post(f"{server.url}{RUNS}/search", timeout=30,
                          json={"tags": {"values": ["bias"]}}).json()
    assert by_suite["runs"]["count"] == 0
    either = httpx.post(f"{server.url}{RUNS}/search", timeout=30, json={"tags": {
        "values": ["bias", "safety"], "combinator": "or"}}).json()
    assert either["runs"]["count"] == 2
    contains = runs.search_all(evaluation_run_filter_input={"system": {"name": {"filters": [
        {"value": "oth", "operator": "contains"}]}}})
    assert [x.id for x in contains.runs.results or []] == [other["id"]]
    refused = httpx.post(f"{server.url}{RUNS}/search", timeout=30,
                         json={"score_filters": {"filters": []}})  # not supported here
    assert refused.status_code == 422 and "score_filters" in refused.text


def test_the_model_card_links_the_latest_run(server: ServerProcess, client: Mistral,
                                             uploaded: dict[str, Any]) -> None:
    card = client.models.retrieve(model_id="tiny")
    link = httpx.get(f"{server.url}/v1/models/tiny", timeout=30).json()["evaluation"]
    assert link == {"latest_run_id": uploaded["id"], "created_at": uploaded["created_at"],
                    "passed": uploaded["verdict"]["passed"],
                    "report_url": f"{RUNS}/{uploaded['id']}/report"}
    assert card.id == "tiny"
    listed = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert listed["tiny"]["evaluation"]["latest_run_id"] == uploaded["id"]


def _chat(server: ServerProcess, *, prefix: str | None = None, stream: bool = False,
          **extra: Any) -> httpx.Response:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Tell me about rivers."}]
    if prefix is not None:  # the answer starts with it (La Plateforme's assistant prefix)
        messages.append({"role": "assistant", "content": prefix, "prefix": True})
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "max_tokens": 6, "temperature": 0, "messages": messages,
        "stream": stream, **extra})


def test_metrics_count_answers_refusals_and_guardrail_flags(server: ServerProcess) -> None:
    answers = 'souverain_chat_answers_total{model="tiny"}'
    refusals = 'souverain_chat_refusals_total{model="tiny"}'
    flags = 'souverain_guardrail_flags_total{category="pii",model="tiny"}'
    before = server.metrics()
    assert _chat(server).status_code == 200
    assert _chat(server, prefix=REFUSAL).status_code == 200
    streamed = _chat(server, prefix=REFUSAL, stream=True)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert _chat(server, n=2).status_code == 200  # two answers
    fim = httpx.post(f"{server.url}/v1/fim/completions", timeout=60, json={
        "model": "tiny", "prompt": "def f(", "suffix": "return 1", "max_tokens": 4})
    assert fim.status_code == 200, fim.text  # FIM is no chat answer: not counted
    pii = {"moderation_llm_v2": {"custom_category_thresholds": {"pii": 0.9},
                                 "ignore_other_categories": True, "action": "none"}}
    flagged = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "max_tokens": 4, "temperature": 0, "guardrails": [pii],
        "messages": [{"role": "user", "content": "Mail me at jean.dupont@example.com"}]})
    assert flagged.status_code == 200, flagged.text
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(answers) == 6  # 1 + 1 + 1 (streamed) + 2 (n=2) + 1 (guarded)
    assert delta(refusals) == 2
    assert delta(flags) == 1  # the input's e-mail address (the answer has none)
    assert delta('souverain_guardrail_flags_total{category="pii",model="other"}') == 0
