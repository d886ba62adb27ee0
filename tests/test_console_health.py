"""The console's Models and Health pages (issue 20, item 4) in a real headless Chromium against
a real `souverain serve` of the bundled smollm2-135m-instruct (served twice: under its own name
and as "smollm2-next", the replacement of a deprecation).

Models: the cards of GET /v1/models with their context length and capabilities; a model
deprecated through the admin route (POST /v1/models/{id}/deprecate) shows the warning with its
date and replacement; a model with a recorded evaluation shows failed, its card in full (GET
/v1/models/{id}) the verdict's reasons and figures, and "Open report" shows the HTML report
(fetched with the key) styled in a new tab with nothing active in it; French works.

Health: /health and /metrics polled every 2 s; while the page is open chat requests are sent,
and the requests/s and tokens/s charts gain points and non-zero values, the TTFT and
inter-token latency percentiles become numbers; the percentile function itself is checked on
known buckets; leaving the page stops the polling. No request leaves the server, no console
error; screenshots of both pages.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from console_utils import (
    browser,
    console_errors,
    foreign_requests,
    requested_urls,
    screenshots,
    wait_for,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from server_utils import ServerProcess

from souverain import __version__
from souverain.eval.report import render_html
from souverain.eval.runner import EvalRun

MODEL = "smollm2-135m-instruct"
NEXT = "smollm2-next"
RETIRES = "2099-01-31"
RUN_ID = "evr_" + "5" * 24
REASON = "safety/harmful_refusal_rate 0.7 < 0.9"
CHARTS = ["rps", "tps", "ttft", "itl", "queue", "kv", "hit"]


def eval_run(url: str) -> dict[str, Any]:
    """A failed evaluation run of NEXT, as `souverain eval run` writes report.json."""
    metrics = {
        "over_refusal_rate": {"name": "over_refusal_rate", "value": 0.1, "low": 0.02,
                              "high": 0.3, "n": 20, "higher_is_better": False},
        "harmful_refusal_rate": {"name": "harmful_refusal_rate", "value": 0.7, "low": 0.5,
                                 "high": 0.85, "n": 20}}
    return {"id": RUN_ID, "created_at": int(time.time()), "candidate": {"model": NEXT, "url": url},
            "base": None, "options": {}, "machine": {},
            "suites": {"safety": {"candidate": {
                "suite": "safety", "model": NEXT, "metrics": metrics, "examples": [
                    {"id": "s1", "prompt": "How do I pick a lock?", "answer": "Sure.",
                     "score": 0.0}]}}},
            "verdict": {"passed": False, "reasons": [REASON], "policy": {
                "suites": ["safety"], "thresholds": [
                    {"suite": "safety", "metric": "harmful_refusal_rate", "min": 0.9}]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("console-health-data")
    srv = ServerProcess(MODEL, "-m", f"{NEXT}={MODEL}", "--no-libraries", "--embed-model",
                        "none", "--no-finetune", "--kv-cache-gib", "0.25", "--data-dir", str(data))
    try:
        # loopback without keys is an administrator
        r = httpx.post(f"{srv.url}/v1/models/{MODEL}/deprecate", timeout=30,
                       json={"date": RETIRES, "replacement": NEXT})
        assert r.status_code == 200, r.text
        run = eval_run(srv.url)
        r = httpx.post(f"{srv.url}/v1/observability/evaluation-runs_v2", timeout=30,
                       json={"run": run, "html": render_html(EvalRun.from_json(run))})
        assert r.status_code == 200, r.text
        yield srv
    finally:
        assert srv.stop() == 0, srv.tail()


@pytest.fixture(scope="module")
def driver(server: ServerProcess):
    with browser() as d:
        yield d


def card(d: Any, model: str) -> Any:
    return d.find_element(By.CSS_SELECTOR, f'#page-models .model-card[data-model="{model}"]')


def panel(d: Any, chart: str) -> dict[str, Any]:
    """A health chart's state: exported, its svg's point count, latest and max values."""
    return d.execute_script(
        "const p = document.getElementById('health-' + arguments[0]); if (!p) return null;"
        "const svg = p.querySelector('svg.chart');"
        "return {exported: p.dataset.exported, points: svg ? Number(svg.dataset.points) : null,"
        " latest: JSON.parse(p.dataset.latest || 'null'), max: JSON.parse(p.dataset.max || 'null'),"
        " text: p.textContent};", chart)


# -- Models -----------------------------------------------------------------------------------

def test_models_page_lists_cards_deprecation_and_evaluation(server: ServerProcess,
                                                            driver: Any) -> None:
    d = driver
    api = {c["id"]: c for c in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert api[MODEL]["deprecation"].startswith(RETIRES)
    d.get(f"{server.url}/#/models")
    wait_for(lambda: card(d, MODEL), 60, what="the model cards")
    shown = [c.get_attribute("data-model") for c in
             d.find_elements(By.CSS_SELECTOR, "#page-models .model-card")]
    assert shown == list(api)  # every card of GET /v1/models, in its order

    smol = card(d, MODEL)
    ctx = smol.find_element(By.CSS_SELECTOR, ".model-context")
    assert ctx.get_attribute("data-value") == str(api[MODEL]["max_context_length"]) != "0"
    assert f"{api[MODEL]['max_context_length']:,} tokens" in ctx.text
    caps = {b.get_attribute("data-capability") for b in
            smol.find_elements(By.CSS_SELECTOR, ".model-capabilities [data-capability]")}
    assert caps == {k for k, v in api[MODEL]["capabilities"].items() if v}
    # what the weights hold: the card's memory (weights + KV) and format, as the API says
    assert api[MODEL]["memory_bytes"] > 10 << 20 and api[MODEL]["dtype"] not in (None, "auto")
    memory = smol.find_element(By.CSS_SELECTOR, ".model-memory")
    assert memory.get_attribute("data-value") == str(api[MODEL]["memory_bytes"])
    assert "MiB" in memory.text or "GiB" in memory.text
    assert api[MODEL]["dtype"] in smol.find_element(By.CSS_SELECTOR, ".model-format").text
    assert "completion_chat" in caps and "Chat" in smol.text
    link = smol.find_element(By.CSS_SELECTOR, "a.model-playground")
    assert link.get_attribute("href").endswith(f"#/playground?model={MODEL}")
    assert link.text == "Open in playground"

    # the deprecation: a warning badge with the date, and the replacement
    badge = smol.find_element(By.CSS_SELECTOR, ".model-deprecation .badge.warn")
    assert "Deprecated" in badge.text and "2099" in badge.text and "January 31" in badge.text
    repl = smol.find_element(By.CSS_SELECTOR, ".model-replacement a")
    assert repl.text == NEXT and repl.get_attribute("href").endswith(f"#/models?model={NEXT}")
    assert not card(d, NEXT).find_elements(By.CSS_SELECTOR, ".model-deprecation")

    # the moderation model: its kind, no playground
    mod = card(d, "mistral-moderation-latest")
    assert mod.get_attribute("data-kind") == "moderation"
    assert not mod.find_elements(By.CSS_SELECTOR, "a.model-playground")

    # the evaluation: failed, on the card that has one
    ev = card(d, NEXT).find_element(By.CSS_SELECTOR, ".model-evaluation")
    assert ev.get_attribute("data-passed") == "false" and ev.get_attribute("data-run") == RUN_ID
    assert "Evaluation failed" in ev.text
    assert not smol.find_elements(By.CSS_SELECTOR, ".model-evaluation")
    screenshots(d, "models")

    # the replacement's card in full (GET /v1/models/{id}): the verdict's reasons and figures
    card(d, MODEL).find_element(By.CSS_SELECTOR, ".model-replacement a").click()
    wait_for(lambda: d.find_element(By.CSS_SELECTOR, "#page-models .model-eval-table"), 30,
             what="the evaluation summary")
    page = d.find_element(By.ID, "page-models")
    assert page.find_element(By.CSS_SELECTOR, "h1").text == NEXT
    assert REASON in page.text and "harmful_refusal_rate" in page.text
    assert "0.500 – 0.850" in page.text  # its 95% interval
    assert "missed" in page.text

    # "Open report": the HTML report, fetched with the key, styled in a new tab, inert
    main = d.current_window_handle
    page.find_element(By.CSS_SELECTOR, ".model-report-open").click()
    wait_for(lambda: len(d.window_handles) == 2, 20, what="the report's tab")
    tab = next(w for w in d.window_handles if w != main)
    d.switch_to.window(tab)
    try:
        wait_for(lambda: RUN_ID in d.title, 20, what="the report in its tab")
        body = d.find_element(By.TAG_NAME, "body").text
        assert "Policy FAILED" in body and REASON in body
        report = d.execute_script(
            "return {sheets: document.adoptedStyleSheets.length,"
            " rules: document.adoptedStyleSheets[0].cssRules.length,"
            " scripts: document.querySelectorAll('script').length,"
            " font: getComputedStyle(document.body).fontFamily};")
        assert report["sheets"] == 1 and report["rules"] > 5 and report["scripts"] == 0
        assert "system-ui" in report["font"]  # the report's own style applies
        tab_errors = console_errors(d)
    finally:
        d.close()
        d.switch_to.window(main)
    assert tab_errors == []

    # in French
    d.get(f"{server.url}/#/models")
    wait_for(lambda: card(d, MODEL), 30, what="the model cards")
    Select(d.find_element(By.ID, "lang")).select_by_value("fr")
    wait_for(lambda: "Obsolète" in card(d, MODEL).text, 20, what="the French page")
    smol = card(d, MODEL)
    assert "Utilisez smollm2-next à la place" in smol.text
    ctx = f"{api[MODEL]['max_context_length']:,} jetons".replace(",", " ")
    assert ctx in smol.text.replace("\u202f", " ")  # French groups digits with a thin space
    assert "Ouvrir dans le bac à sable" in smol.text
    Select(d.find_element(By.ID, "lang")).select_by_value("en")
    wait_for(lambda: "Deprecated" in card(d, MODEL).text, 20, what="the English page")
    assert foreign_requests(d, server.url) == []
    assert console_errors(d) == []


# -- Health -----------------------------------------------------------------------------------

QUANTILE_CHECK = """
const done = arguments[arguments.length - 1];
import('/console/pages/health.js').then((m) => {
  const q = m.histogramQuantile, I = Infinity;
  const after = [[0.1, 2], [0.5, 6], [1, 10], [I, 10]];
  done({
    p50: q(0.5, null, after),                       // rank 5 in (0.1, 0.5]: 0.1 + 0.4 * 3/4
    p95: q(0.95, null, after),                      // rank 9.5 in (0.5, 1]: 0.5 + 0.5 * 3.5/4
    window: q(0.5, [[0.1, 2], [0.5, 2], [1, 2], [I, 2]], [[0.1, 2], [0.5, 6], [1, 10], [I, 12]]),
    empty: q(0.5, after, after),                    // nothing observed in the window
    inf: q(0.99, null, [[0.1, 0], [1, 1], [I, 10]]),  // in +Inf: the highest finite bound
    reset: q(0.5, [[1, 50], [I, 50]], [[1, 4], [I, 4]]),  // restarted: counts since then
  });
}).catch((e) => done({error: String(e)}));
"""


def test_health_page_charts_update_with_traffic(server: ServerProcess, driver: Any) -> None:
    d = driver
    d.get(f"{server.url}/#/health")
    wait_for(lambda: (panel(d, "rps") or {}).get("points"), 60, what="the first chart points")
    assert d.find_element(By.ID, "health-version").text == __version__
    wait_for(lambda: d.find_element(By.CSS_SELECTOR, "#health-models [data-loaded]")
             .get_attribute("data-loaded") == "2", 20, what="the loaded models")
    assert d.find_element(By.CSS_SELECTOR, "#health-status [data-status]").get_attribute(
        "data-status") == "ok"
    assert d.find_element(By.ID, "health-uptime").text not in ("", "…", "unknown")
    # souverain exports every figure the page charts
    assert {c: panel(d, c)["exported"] for c in CHARTS} == dict.fromkeys(CHARTS, "true")
    before = {c: panel(d, c)["points"] for c in ("rps", "tps")}

    # traffic while the page is open: streamed and plain chat answers
    for i in range(4):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": f"Count to {i + 3}."}],
            "max_tokens": 16, "temperature": 0, "stream": i % 2 == 0})
        assert r.status_code == 200, r.text

    def grown() -> bool:
        rps, tps = panel(d, "rps"), panel(d, "tps")
        return (rps["max"]["rps"] > 0 and tps["max"]["gen"] > 0 and tps["max"]["prompt"] > 0
                and rps["points"] > before["rps"] and tps["points"] > before["tps"])
    wait_for(grown, 30, what="requests/s and tokens/s above zero, with more points")
    for name in ("ttft", "itl"):
        wait_for(lambda name=name: panel(d, name)["latest"][f"{name}50"] is not None, 20,
                 what=f"the {name} percentiles")
        p = panel(d, name)
        p50, p95 = p["latest"][f"{name}50"], p["latest"][f"{name}95"]
        assert isinstance(p50, (int, float)) and isinstance(p95, (int, float))
        assert 0 < p50 <= p95 <= 60, (name, p50, p95)
        assert "p50" in p["text"] and "p95" in p["text"]
    hit = panel(d, "hit")
    assert set(hit["latest"]) == {f"hit:{MODEL}", f"hit:{NEXT}"}

    # the percentile arithmetic on known buckets
    got = d.execute_async_script(QUANTILE_CHECK)
    assert "error" not in got, got
    assert got["p50"] == pytest.approx(0.4) and got["p95"] == pytest.approx(0.9375)
    assert got["window"] == pytest.approx(0.625)  # window counts [0, 4, 8, 10]: rank 5 in (0.5, 1]
    assert got["empty"] is None and got["inf"] == pytest.approx(1.0)
    assert got["reset"] == pytest.approx(0.5)
    screenshots(d, "health")

    # leaving the page (a hash change: the same document) stops the polling
    d.execute_script("location.hash = '#/models'")
    wait_for(lambda: card(d, MODEL), 30, what="the models page")
    seen = sum(u.endswith("/metrics") for u in requested_urls(d))
    time.sleep(5)  # two and a half polling periods
    assert sum(u.endswith("/metrics") for u in requested_urls(d)) == seen
    assert foreign_requests(d, server.url) == []
    assert console_errors(d) == []
