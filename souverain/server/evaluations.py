"""`EvaluationService`: evaluation runs and the release gate, as the server applies them.

* **Held models.** A fine-tuning job with an ``evaluation`` policy holds its ``ft:`` model
  after training until its gate passes (`souverain.finetune.release_gate`). `check_released`
  is called by `access.check_model` (the one model resolution point of every route): an
  ordinary key gets 403 ``model_not_released`` naming the job, the gate's status and reasons
  and how an administrator overrides; the gate keeper's own per-process key (`GATE_KEY`) and
  administrators (``scopes=admin``; without keys, clients on this machine) are served, so the
  gate can evaluate the model through the API like any client. Held models are not listed.
* **The gate keeper** runs in the eval layer (`souverain.eval.gate`), which the server may not
  import: `souverain serve` builds it and hands it over as a `GateKeeper` (this protocol);
  the app's lifespan starts and stops it.
* **Evaluation runs** (`souverain.finetune.eval_runs`) in the shapes of La Plateforme's
  observability API (``client.beta.observability.evaluations.runs`` of the mistralai SDK):
  `run_json` is its ``EvaluationRunV2Response`` (one evaluator per suite metric, ``statistics``
  with the 95% interval and the paired delta against the base, ``goal_results`` from the
  policy's thresholds, ``passed`` = the verdict), `statistics_json` its
  ``RunStatisticsResponse``. A model's card links its latest run (`card_field`).
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
import threading
import time
from typing import Any, Literal, Protocol

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from souverain.finetune.eval_runs import RUN_ID, EvalRunStore, RunRecord
from souverain.finetune.release_gate import GateRows, Held
from souverain.server import state
from souverain.server.auth import is_loopback
from souverain.server.errors import APIError
from souverain.server.keyfile import KeyInfo, key_digest

GATE_KEY = KeyInfo(key_id="release-gate", name="release-gate")
EVALUATION = {"id": "souverain-eval", "name": "souverain eval", "slug": "souverain-eval"}
REPORT_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; sandbox")


class GateKeeper(Protocol):
    """What the server needs of the release gate's keeper (`souverain.eval.gate`)."""

    token_digest: bytes  # key_digest of its per-process API key (the key never leaves it)

    def start(self) -> None:
        """Start evaluating pending gates (a thread); called once the app starts."""
        ...

    def stop(self) -> None:
        """Stop (a running evaluation is abandoned: its gate runs again at the next start)."""
        ...


def gate_key(keeper: GateKeeper | None, header: str | None) -> KeyInfo | None:
    """`GATE_KEY` when ``header`` is ``Bearer <the keeper's key>``, else None."""
    if keeper is None or not header:
        return None
    parts = header.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return GATE_KEY if hmac.compare_digest(key_digest(parts[1].strip()),
                                           keeper.token_digest) else None


class EvaluationService:
    """Held models, the latest run of each model, and the stored runs (module docstring)."""

    def __init__(self, runs: EvalRunStore, gates: GateRows | None,
                 keeper: GateKeeper | None = None):
        self.runs, self.gates, self.keeper = runs, gates, keeper
        self._lock = threading.Lock()
        self._latest: tuple[float, dict[str, tuple[str, float, bool | None]]] = (-1e9, {})

    def held(self) -> dict[str, Held]:
        """The held models, read now (the listing hides them)."""
        return self.gates.held() if self.gates is not None else {}

    def latest(self, fresh: bool = False) -> dict[str, tuple[str, float, bool | None]]:
        """Each model's latest run: read at most once a second (``fresh``: read now)."""
        with self._lock:
            at, latest = self._latest
            if fresh or time.monotonic() - at >= 1.0:
                latest = self.runs.latest()
                self._latest = (time.monotonic(), latest)
            return latest

    def invalidate(self) -> None:
        with self._lock:
            self._latest = (-1e9, {})

    @staticmethod
    def privileged(request: Request, key: KeyInfo | None) -> bool:
        """May this caller use a held model: the gate keeper, an admin key, or (without
        keys) a client on this machine, as `lifecycle.require_admin` decides."""
        if key is not None:
            return key is GATE_KEY or "admin" in key.scopes
        if state.config(request).api_keys is not None:
            return False
        return is_loopback(request.client.host if request.client else None)

    def check_released(self, request: Request, key: KeyInfo | None, model: str) -> None:
        """A 403 ``model_not_released`` for a held model, unless the caller is privileged.

        Read from the jobs database at each request (one query, only for an ordinary
        caller's ``ft:`` model), never from a cache: a cache would serve, for a moment, the
        model of a job that has just finished and hold one that has just been released."""
        if not model.startswith("ft:") or self.gates is None or self.privileged(request, key):
            return
        held = self.gates.gate_of(model)
        if held is not None:
            raise APIError(403, not_released(held), param="model", code="model_not_released")

    def card_field(self, model: str) -> dict[str, Any] | None:
        """The ``evaluation`` field of a model's card: its latest run (None without one).
        A fine-tuned model missing from the cached runs is looked up again now: its release
        gate's run is written by the fine-tuning worker, another process, and the card must
        not say "no evaluation" once the job says it passed."""
        found = self.latest().get(model)
        if found is None and model.startswith("ft:"):
            found = self.latest(fresh=True).get(model)
        if found is None:
            return None
        run_id, created_at, passed = found
        return {"latest_run_id": run_id, "report_url": report_url(run_id),
                "created_at": int(created_at), "passed": passed}


def not_released(held: Held) -> str:
    why = (f"its evaluation {held.status}: {'; '.join(held.reasons)}" if held.reasons
           else f"its evaluation is {held.status}" + (
               " (the release gate has not decided yet; GET /v1/fine_tuning/jobs/"
               f"{held.job_id} shows when it does)" if held.status in ("pending", "running")
               else ""))
    return (f"Model {held.model!r} is not released: fine-tuning job {held.job_id}'s release "
            f"gate holds it ({why}). An administrator can release it anyway with POST "
            f"/v1/fine_tuning/jobs/{held.job_id}/release {{\"reason\": \"...\"}} or "
            f"`souverain models release {held.model} --reason ...`.")


def report_url(run_id: str) -> str:
    return f"/v1/observability/evaluation-runs_v2/{run_id}/report"


# -- recording a run ---------------------------------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


Num = float | None  # a figure; null where it had no data (NaN in the run)


class _Endpoint(_Open):
    model: str = Field(min_length=1, max_length=512)
    url: str | None = Field(default=None, max_length=2048)


class _MetricIn(_Open):
    """A `souverain.eval.suite.Metric` as JSON."""

    name: str = Field(max_length=512)
    value: Num = None
    low: Num = None
    high: Num = None
    n: int = Field(default=0, ge=0, le=1 << 40)
    higher_is_better: bool = True
    description: str = ""
    samples: dict[str, float] = Field(default_factory=dict)


class _DeltaIn(_Open):
    delta: Num = None
    low: Num = None
    high: Num = None
    n: int = Field(default=0, ge=0, le=1 << 40)


class _SuiteResultIn(_Open):
    suite: str
    model: str
    metrics: dict[str, _MetricIn]
    examples: list[dict[str, Any]] = Field(default_factory=list)


class _SuiteRunIn(_Open):
    candidate: _SuiteResultIn
    base: _SuiteResultIn | None = None
    deltas: dict[str, _DeltaIn] = Field(default_factory=dict)


class _ThresholdIn(_Open):
    suite: str
    metric: str
    min: Num = None
    max: Num = None
    max_regression: Num = None


class _PolicyIn(_Open):
    suites: list[str] = Field(default_factory=list)
    limit: int | None = None
    thresholds: list[_ThresholdIn] = Field(default_factory=list)


class _VerdictIn(_Open):
    passed: bool
    reasons: list[str] = Field(default_factory=list)
    policy: _PolicyIn | None = None


class EvalRunIn(_Open):
    """An EvalRun's JSON (`souverain.eval.runner.EvalRun.to_json`), checked for what the
    server reads; the rest is kept as sent."""

    id: str = Field(pattern=RUN_ID.pattern)
    created_at: float = Field(ge=0, le=1e11)  # unix seconds (1e11: year 5138)
    candidate: _Endpoint
    base: _Endpoint | None = None
    suites: dict[str, _SuiteRunIn] = Field(min_length=1)
    verdict: _VerdictIn | None = None


class RecordRun(BaseModel):
    """``POST /v1/observability/evaluation-runs_v2``: a run of `souverain eval run`, its
    rendered HTML report (self-contained), as `souverain eval run --upload` sends them."""

    model_config = ConfigDict(extra="forbid")
    run: EvalRunIn
    html: str | None = Field(default=None, max_length=64 << 20)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float as None (a metric of no data is NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


# -- the observability API's shapes -------------------------------------------------------------
def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _metrics(run: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(suite, metric, the candidate's metric, its delta against the base or {})."""
    out = []
    for suite, sr in sorted(run.get("suites", {}).items()):
        deltas = sr.get("deltas") or {}
        for name, m in sorted((sr.get("candidate") or {}).get("metrics", {}).items()):
            out.append((suite, name, m, deltas.get(name) or {}))
    return out


def _goals(run: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each policy threshold as a GoalResultItem, by evaluator ("suite/metric")."""
    verdict = run.get("verdict") or {}
    policy = verdict.get("policy") or {}
    found = {(s, n): (m, d) for s, n, m, d in _metrics(run)}
    goals: dict[str, list[dict[str, Any]]] = {}
    for t in policy.get("thresholds") or []:
        key = (t.get("suite"), t.get("metric"))
        metric, delta = found.get(key, ({}, {}))
        value = finite(metric.get("value"))
        higher = metric.get("higher_is_better", True)
        items = goals.setdefault(f"{key[0]}/{key[1]}", [])
        for bound, op in (("min", ">="), ("max", "<=")):
            if t.get(bound) is not None:
                ok = value is not None and (value >= t[bound] if op == ">=" else value <= t[bound])
                items.append({"metric": "avg", "operator": op, "actual": value, "passed": ok,
                              "target": t[bound], "target_min": None, "target_max": None,
                              "direction": "maximize" if op == ">=" else "minimize"})
        if t.get("max_regression") is not None:
            d = finite(delta.get("delta"))
            worse = None if d is None else (-d if higher else d)  # how much worse than base
            items.append({"metric": "regression_vs_base", "operator": "<=", "actual": worse,
                          "passed": worse is not None and worse <= t["max_regression"],
                          "target": t["max_regression"], "target_min": None,
                          "target_max": None, "direction": "minimize"})
    return goals


def _statistic(m: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """A metric as the SDK's NumericStatistics (its interval and delta as scalar values)."""
    samples = [v for v in (m.get("samples") or {}).values() if isinstance(v, int | float)
               and math.isfinite(v)]
    mean = finite(m.get("value"))
    std = None
    if len(samples) > 1:
        mu = sum(samples) / len(samples)
        std = math.sqrt(sum((v - mu) * (v - mu) for v in samples) / (len(samples) - 1))
    values = [{"id": "avg", "type": "scalar", "value": mean},
              {"id": "ci95_low", "type": "scalar", "value": finite(m.get("low"))},
              {"id": "ci95_high", "type": "scalar", "value": finite(m.get("high"))}]
    if delta:
        values += [{"id": f"delta_vs_base{s}", "type": "scalar", "value": finite(delta.get(k))}
                   for s, k in (("", "delta"), ("_low", "low"), ("_high", "high"))]
    n = int(m.get("n") or 0)
    return {"type": "numeric", "values": values, "sample_count": n, "avg": mean,
            "min": min(samples) if samples else None, "max": max(samples) if samples else None,
            "std": std, "count": n}


def statistics(rec: RunRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """(statistics, goal_results) of a run, by evaluator ("suite/metric")."""
    stats = {f"{s}/{n}": _statistic(m, d) for s, n, m, d in _metrics(rec.run)}
    goals = {k: {"passed": all(i["passed"] for i in items), "results": items}
             for k, items in _goals(rec.run).items()}
    return stats, goals


def run_json(rec: RunRecord, *, refs: bool = False) -> dict[str, Any]:
    """A run as the SDK's EvaluationRunV2Response (``refs``: ...WithRefsResponse)."""
    run = rec.run
    created, recorded = _iso(rec.created_at), _iso(rec.recorded_at)
    stats, goals = statistics(rec)
    goal_of = {k: {"operator": g["results"][0]["operator"],
                   "value": g["results"][0]["target"], "metric": g["results"][0]["metric"]}
               for k, g in goals.items() if g["results"]}
    evaluators = [{
        "id": f"{s}/{n}", "created_at": created, "updated_at": created, "deleted_at": None,
        "name": f"{s}/{n}", "description": m.get("description") or None, "tags": [s],
        "num_scores": int(m.get("n") or 0), "goal": goal_of.get(f"{s}/{n}"),
        "statistics": [{"kind": "avg"}, {"kind": "std"}, {"kind": "count"}],
        "weight": 1, "direction": "maximize" if m.get("higher_is_better", True)
        else "minimize", "min_value": None, "max_value": None}
        for s, n, m, _ in _metrics(run)]
    candidate, base = run["candidate"], run.get("base") or None
    verdict = run.get("verdict") or None
    body: dict[str, Any] = {
        "id": rec.id, "created_at": created, "updated_at": recorded, "deleted_at": None,
        "creator_id": rec.created_by or ("release-gate" if rec.source == "gate" else "local"),
        "evaluation_id": EVALUATION["id"],
        "name": f"{rec.model} vs {rec.base_model}" if rec.base_model else rec.model,
        "description": (f"souverain eval: {', '.join(rec.suites)}"
                        + (f" (release gate of fine-tuning job {rec.job_id})"
                           if rec.job_id else "")),
        "tags": list(rec.suites), "metadata": {
            "source": rec.source, "job_id": rec.job_id, "candidate": candidate, "base": base,
            "options": run.get("options"), "machine": run.get("machine"),
            "verdict": verdict, "report_url": report_url(rec.id),
            "rendered_report": rec.has_report},
        "num_generations": sum(len((sr.get("candidate") or {}).get("examples") or [])
                               for sr in run.get("suites", {}).values()),
        "evaluators": evaluators, "run_info": {"model": rec.model, "base_model": rec.base_model},
        "status": "completed", "dataset_id": None, "run_evaluators": evaluators,
        "system": {"id": rec.model, "created_at": created, "updated_at": created,
                   "deleted_at": None, "name": rec.model, "kind": "model",
                   "params": {k: v for k, v in (("base_model", rec.base_model),
                                                ("url", candidate.get("url"))) if v},
                   "spec": None},
        "statistics": stats, "goal_results": goals,
        "passed": verdict.get("passed") if verdict else None, "run_scores": {},
        "optimization": None,
    }
    if refs:
        body["evaluation"] = dict(EVALUATION)
        body["project"] = None
    return finite(body)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _NameFilter(_Strict):
    value: str = Field(max_length=512)
    operator: Literal["equals", "contains"] | None = None


class _NameFilterGroup(_Strict):
    combinator: Literal["and", "or"] | None = None
    filters: list[_NameFilter] | None = Field(default=None, max_length=100)


class _SystemFilter(_Strict):
    name: _NameFilterGroup | None = None


class _TagFilter(_Strict):
    combinator: Literal["and", "or"] | None = None
    values: list[str] | None = Field(default=None, max_length=100)


class RunFilter(_Strict):
    """The SDK's EvaluationRunFilterInput as far as it applies here: ``run_ids``,
    ``evaluation_ids``, ``system`` (the model: ``{"name": {"filters": [{"value": ID,
    "operator": "equals"|"contains"}]}}``) and ``tags`` (suite names); its other filters
    (creators, projects, scores, goals, metadata) are not supported (422)."""

    run_ids: list[str] | None = Field(default=None, max_length=1000)
    evaluation_ids: list[str] | None = Field(default=None, max_length=100)
    tags: _TagFilter | None = None
    system: _SystemFilter | None = None


def search_args(f: RunFilter | None) -> dict[str, Any]:
    """`EvalRunStore.search` keyword arguments of a filter (AND between fields; within a
    group, its ``combinator``: ``and`` by default for tags, ``or`` for model names)."""
    if f is None:
        return {}
    args: dict[str, Any] = {}
    if f.run_ids is not None:
        args["run_ids"] = list(f.run_ids)
    if f.evaluation_ids is not None and EVALUATION["id"] not in f.evaluation_ids:
        args["run_ids"] = []  # every run here belongs to the one evaluation
    if f.tags is not None and f.tags.values:
        args["suites"] = list(f.tags.values)
        args["any_suite"] = f.tags.combinator == "or"
    group = f.system.name if f.system is not None else None
    if group is not None and group.filters:
        args["model_filters"] = [(flt.operator or "equals", flt.value) for flt in group.filters]
        args["all_models"] = group.combinator == "and"
    return args


def summary_html(rec: RunRecord) -> str:
    """A plain page of a run's figures, for a run recorded without its rendered report
    (every text escaped; no script, no external resource)."""
    from html import escape

    def num(v: Any) -> str:
        v = finite(v)
        return "no data" if v is None else f"{v:.4g}" if isinstance(v, float) else escape(str(v))

    rows = "".join(
        f"<tr><td>{escape(s)}</td><td>{escape(n)}</td><td>{num(m.get('value'))}</td>"
        f"<td>{num(m.get('low'))} – {num(m.get('high'))}</td><td>{num(m.get('n'))}</td>"
        f"<td>{num(d.get('delta')) if d else ''}</td></tr>"
        for s, n, m, d in _metrics(rec.run))
    verdict = rec.run.get("verdict") or None
    decided = "" if verdict is None else (
        f"<p>Policy {'passed' if verdict.get('passed') else 'failed'}</p><ul>"
        + "".join(f"<li>{escape(str(r))}</li>" for r in verdict.get("reasons") or []) + "</ul>")
    title = escape(f"Evaluation run {rec.id}: {rec.model}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head>"
            f"<body><h1>{title}</h1><p>Base: {escape(rec.base_model or 'none')} · suites: "
            f"{escape(', '.join(rec.suites))} · recorded without its rendered report (souverain "
            f"eval run --upload sends it)</p>{decided}<table border=1><tr><th>suite</th>"
            f"<th>metric</th><th>value</th><th>95% CI</th><th>n</th><th>delta vs base</th></tr>"
            f"{rows}</table></body></html>\n")
