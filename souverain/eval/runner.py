"""`run_eval`: the suites of one evaluation run on a candidate (and, to compare, a base), the
paired deltas between them, what ran where, and the policy's verdict: one `EvalRun`.

Both models answer the same items: each suite runs with the same `SuiteOptions` on both, and
suites give an item the same id on every run, so each metric's difference is the paired
bootstrap interval over the ids both runs scored (`metrics.paired_delta` of `Metric.samples`),
the honest comparison of two models on one set. A delta is in the unit of the metric's
per-example samples (for perplexity: mean token negative log-likelihood, not the exp).

A suite that fails (the server refuses, a data file is bad) fails the run: an `EvalError`
naming the suite and the model, never a traceback.

Cheap to import: no torch (versions are read from package metadata), no matplotlib.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from souverain.eval import EvalError
from souverain.eval.metrics import paired_delta
from souverain.eval.suite import Progress, SuiteOptions, SuiteResult, Target

if TYPE_CHECKING:
    from souverain.eval.policy import Policy

OnProgress = Callable[[str, int, int], None]  # (bar key, done, total)

# the CPU features that decide how fast (and through which kernels) souverain runs a model
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "amx_int8")


@dataclass
class EvalRun:
    """One evaluation run, as written to report.json and uploaded to a server.

    ``suites``: name -> ``{"candidate": SuiteResult, "base": SuiteResult | None, "deltas":
    {metric: {"delta", "low", "high", "n", "higher_is_better"}}, "description": str}``.
    ``verdict``: ``{"passed", "reasons", "policy", "checks"}`` when a policy was applied."""

    id: str
    created_at: int
    candidate: dict[str, str]
    base: dict[str, str] | None
    suites: dict[str, dict[str, Any]]
    options: dict[str, Any]
    machine: dict[str, Any]
    verdict: dict[str, Any] | None = None
    duration_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the command line that ran it

    def result(self, suite: str, role: str = "candidate") -> SuiteResult | None:
        entry = self.suites.get(suite)
        return None if entry is None else entry.get(role)

    def to_json(self) -> dict[str, Any]:
        """Strict JSON (RFC 8259): a NaN figure ("no data") becomes null."""
        suites = {}
        for name, entry in self.suites.items():
            base = entry.get("base")
            suites[name] = {**entry, "candidate": entry["candidate"].to_json(),
                            "base": base.to_json() if base is not None else None}
        doc = {"object": "evaluation.run", "id": self.id, "created_at": self.created_at,
               "candidate": self.candidate, "base": self.base, "suites": suites,
               "options": self.options, "machine": self.machine, "verdict": self.verdict,
               "duration_s": self.duration_s, "meta": self.meta}
        return _finite(doc)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EvalRun:
        try:
            suites = {}
            for name, entry in doc["suites"].items():
                base = entry.get("base")
                suites[name] = {**entry, "candidate": _suite_result(entry["candidate"]),
                                "base": _suite_result(base) if base is not None else None,
                                "deltas": dict(entry.get("deltas") or {})}
            return cls(id=doc["id"], created_at=int(doc["created_at"]),
                       candidate=dict(doc["candidate"]),
                       base=dict(doc["base"]) if doc.get("base") else None, suites=suites,
                       options=dict(doc.get("options") or {}),
                       machine=dict(doc.get("machine") or {}), verdict=doc.get("verdict"),
                       duration_s=float(doc.get("duration_s") or 0.0),
                       meta=dict(doc.get("meta") or {}))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise EvalError(f"not an evaluation run document ({type(exc).__name__}: {exc}); "
                            f"give the report.json that `souverain eval run` wrote") from None


def _suite_result(doc: dict[str, Any]) -> SuiteResult:
    result = SuiteResult.from_json(doc)
    for metric in result.metrics.values():  # null (written for NaN) -> NaN again
        if metric.value is None:
            metric.value = math.nan
    return result


def _finite(obj: Any) -> Any:
    """JSON-ready: non-finite floats -> None, numpy scalars -> Python numbers, tuples and
    sets -> lists, anything else that JSON cannot hold (a Path in a suite's detail) -> str:
    an hour of evaluation is never lost to a report that cannot be written."""
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_finite(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _finite(item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def new_run_id() -> str:
    return "evr_" + secrets.token_hex(12)


# -- what ran where ------------------------------------------------------------------------
def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_summary(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and the flags that matter here (/proc/cpuinfo on Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    present = [f for f in CPU_FLAGS if f in flags]
    return {"model": name, "flags": present,
            "flags_summary": " ".join(present) if present else "none of " + "/".join(CPU_FLAGS),
            "logical_cpus": os.cpu_count()}


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def model_card(target: Target, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """The server's ``GET /v1/models/{id}`` card of the target's model (None when the server
    does not answer it: the run still goes on, the report says "unknown")."""
    base = target.url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    request = urllib.request.Request(f"{base}/models/{urllib.parse.quote(target.model, safe='')}",
                                     headers={"Accept": "application/json"})
    api_key = getattr(target, "api_key", None)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            card = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def machine_info(candidate: Target, base: Target | None) -> dict[str, Any]:
    """This machine (the one that ran `souverain eval`; the server's too when it started it)
    and the models' cards as the server describes them."""
    return {
        "cpu": cpu_summary(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {"souverain": _version("souverain"), "torch": _version("torch"),
                     "lm-eval": _version("lm_eval", "lm-eval"),
                     "matplotlib": _version("matplotlib")},
        "candidate_card": model_card(candidate),
        "base_card": model_card(base) if base is not None else None,
    }


def options_json(options: SuiteOptions,
                 files: Mapping[str, Sequence[Path]] | None = None) -> dict[str, Any]:
    """The options as recorded, each user file with its suite (None: every suite), size and
    SHA-256 (provenance)."""
    entries: list[tuple[str | None, Path]] = [(None, Path(p)) for p in options.files]
    entries += [(suite, Path(p)) for suite, paths in (files or {}).items() for p in paths]
    recorded = []
    for suite, path in entries:
        entry: dict[str, Any] = {"suite": suite, "path": str(path)}
        try:
            data = Path(path).read_bytes()
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        except OSError as exc:
            entry["error"] = str(exc)
        recorded.append(entry)
    return {"limit": options.limit, "seed": options.seed, "concurrency": options.concurrency,
            "library_id": options.library_id, "files": recorded}


DATA_DIR = Path(__file__).resolve().parent / "data"
# where each suite's bundled data lives under souverain/eval/data (relative globs)
BUNDLED_DATA = {"quality": ("quality/*", "tasks/*")}


def bundled_data(suite: str) -> list[dict[str, Any]]:
    """The data files souverain ships for ``suite`` (``suites/<name>.jsonl``, ``suites/<name>/``
    and the suite's own folders), each with its size and SHA-256: the provenance of the
    built-in sets in the report."""
    patterns = BUNDLED_DATA.get(suite, (f"suites/{suite}.jsonl", f"suites/{suite}/**/*"))
    found: dict[str, dict[str, Any]] = {}
    for pattern in patterns:
        for path in sorted(DATA_DIR.glob(pattern)):
            if path.is_file():
                data = path.read_bytes()
                found[path.relative_to(DATA_DIR).as_posix()] = {
                    "path": "souverain/eval/data/" + path.relative_to(DATA_DIR).as_posix(),
                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return list(found.values())


# -- the run -------------------------------------------------------------------------------
def deltas_of(candidate: SuiteResult, base: SuiteResult) -> dict[str, dict[str, Any]]:
    """Per metric both runs have samples of: the paired bootstrap difference candidate - base
    over their shared example ids (metrics without samples, or with no shared id, skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for name, metric in candidate.metrics.items():
        other = base.metrics.get(name)
        if other is None or not metric.samples or not other.samples:
            continue
        try:
            delta, low, high, n = paired_delta(metric.samples, other.samples)
        except ValueError:
            continue
        out[name] = {"delta": delta, "low": low, "high": high, "n": n,
                     "higher_is_better": metric.higher_is_better}
    return out


def _run_suite(suite_name: str, suite: Any, target: Target, options: SuiteOptions,
               total: int, key: str, on_progress: OnProgress | None) -> SuiteResult:
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(key, done, total)

    progress: Progress = advance
    started = time.perf_counter()
    if on_progress is not None:
        on_progress(key, 0, total)
    try:
        result: SuiteResult = suite.run(target, options, progress)
    except EvalError as exc:
        raise EvalError(f"suite {suite_name} failed on {target.model} at {target.url}: "
                        f"{exc}") from None
    if not result.duration_s:
        result.duration_s = time.perf_counter() - started
    if on_progress is not None and done < total:
        on_progress(key, total, total)
    return result


def run_eval(candidate: Target, base: Target | None, suites: Sequence[str],
             options: SuiteOptions, *, on_progress: OnProgress | None = None,
             policy: Policy | None = None,
             files: Mapping[str, Sequence[Path]] | None = None) -> EvalRun:
    """Run ``suites`` on ``candidate`` (and ``base`` with the same options), compute the paired
    deltas, record the machine and apply ``policy``. ``on_progress(key, done, total)``: key is
    the suite's name for the candidate, ``"<suite> (base)"`` for the base. ``files``: the
    user's own data per suite (added to ``options.files`` for that suite only)."""
    from souverain.eval.suites import get_suite

    if not suites:
        raise EvalError("no suite to run; name at least one (--suite safety)")
    if len(set(suites)) != len(suites):
        raise EvalError(f"a suite is named twice in {list(suites)}; name each once")
    if policy is not None:
        policy.check_plan(suites, has_base=base is not None)
    instances = {name: get_suite(name) for name in suites}  # unknown names fail before any run
    stray = sorted(set(files or {}) - set(suites))
    if stray:
        raise EvalError(f"data files are given for suite {stray[0]!r}, which this run does not "
                        f"run; add --suite {stray[0]} or drop its --file")
    own = {name: replace(options, files=[*options.files, *(files or {}).get(name, ())])
           for name in suites}
    totals = {}
    for name, suite in instances.items():  # reads each suite's data: bad files fail now
        try:
            totals[name] = suite.size(own[name])
        except EvalError as exc:
            raise EvalError(f"suite {name} cannot run: {exc}") from None
    started = time.perf_counter()
    created_at = int(time.time())
    results: dict[str, dict[str, Any]] = {}
    for name, suite in instances.items():
        cand = _run_suite(name, suite, candidate, own[name], totals[name], name, on_progress)
        base_result = None
        if base is not None:
            base_result = _run_suite(name, suite, base, own[name], totals[name],
                                     f"{name} (base)", on_progress)
        results[name] = {"candidate": cand, "base": base_result,
                         "deltas": deltas_of(cand, base_result) if base_result else {},
                         "description": getattr(suite, "description", ""),
                         "bundled_data": bundled_data(name)}
    run = EvalRun(
        id=new_run_id(), created_at=created_at,
        candidate={"model": candidate.model, "url": candidate.url},
        base={"model": base.model, "url": base.url} if base is not None else None,
        suites=results, options=options_json(options, files),
        machine=machine_info(candidate, base), duration_s=time.perf_counter() - started)
    if policy is not None:
        verdict = policy.check(run)
        run.verdict = {"passed": verdict.passed, "reasons": verdict.reasons,
                       "policy": policy.to_json(), "checks": verdict.checks}
    return run
