"""Prometheus metrics of the HTTP server (``GET /metrics``).

Every :class:`ServerMetrics` owns its own :class:`prometheus_client.CollectorRegistry`, so
several apps in one process (and tests) do not collide on metric names.

Label cardinality stays bounded: ``route`` must be the route TEMPLATE the request matched
(``/v1/models/{model_id}``, never ``/v1/models/abc``; the app passes ``"<unmatched>"`` or
similar for 404s), ``method`` an HTTP method, ``status`` a status code, ``model`` a model the
server serves.

Exported (all prefixed ``souverain_``):

* ``requests_total{route,method,status}``, ``request_duration_seconds{route}`` (histogram);
* ``prompt_tokens_total{model}``, ``completion_tokens_total{model}``;
* ``time_to_first_token_seconds{model}`` (0.01-60 s), ``inter_token_latency_seconds{model}``
  (0.001-5 s): histograms with buckets suited to CPU inference;
* ``requests_aborted_total{model}``: generations cut short by a client disconnect;
* ``chat_answers_total{model}``, ``chat_refusals_total{model}``: final chat answers, and those
  `souverain.moderation.refusal.is_refusal` calls refusals (refusal rate = the ratio);
* ``guardrail_flags_total{model,category}``: categories flagged by a chat request's guardrails;
* read from each engine at scrape time (see :meth:`ServerMetrics.add_engine_source`):
  ``queue_depth``, ``running_sequences``, ``kv_blocks_used``, ``kv_blocks_free``,
  ``prefix_cache_hit_rate`` (gauges) and ``preemptions_total`` (counter), all ``{model}``;
  with ``--speculative``: ``spec_draft_tokens_total``, ``spec_accepted_tokens_total``,
  ``spec_verify_steps_total``, ``spec_emitted_tokens_total`` (counters),
  ``spec_acceptance_rate`` (accepted / drafted) and ``spec_tokens_per_step`` (tokens a
  verifying step emits on average: the decode speed-up before the verification's own cost)
  (gauges, since start);
* the ``process_*`` metrics (CPU, resident memory, open fds) of this process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from souverain.moderation.refusal import is_refusal

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

EngineStats = Callable[[], "dict | None"]


def _reader(stats: dict) -> Callable[[str], float | None]:
    def num(key: str) -> float | None:
        v = stats.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return num


_SPEC_COUNTERS = {
    "spec_draft_tokens": "Speculative decoding: draft tokens verified.",
    "spec_accepted_tokens": "Speculative decoding: draft tokens accepted.",
    "spec_verify_steps": "Speculative decoding: sequence-steps that verified drafts.",
    "spec_emitted_tokens": "Speculative decoding: tokens emitted by verifying steps.",
}

class _EngineCollector(Collector):
    """Turns engine ``stats()`` dicts into gauges at scrape time."""

    def __init__(self) -> None:
        self._sources: dict[str, EngineStats] = {}
        self._lock = threading.Lock()

    def set(self, model: str, stats: EngineStats) -> None:
        with self._lock:
            self._sources[model] = stats

    def remove(self, model: str) -> None:
        with self._lock:
            self._sources.pop(model, None)

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        return {
            "queue_depth": GaugeMetricFamily(
                "souverain_queue_depth", "Sequences waiting to be scheduled.", labels=["model"]
            ),
            "running": GaugeMetricFamily(
                "souverain_running_sequences", "Sequences being generated.", labels=["model"]
            ),
            "kv_used": GaugeMetricFamily(
                "souverain_kv_blocks_used", "KV-cache blocks in use.", labels=["model"]
            ),
            "kv_free": GaugeMetricFamily(
                "souverain_kv_blocks_free", "KV-cache blocks free.", labels=["model"]
            ),
            "hit_rate": GaugeMetricFamily(
                "souverain_prefix_cache_hit_rate",
                "Share of prompt tokens served from the prefix cache (0-1, since start).",
                labels=["model"],
            ),
            "preemptions": CounterMetricFamily(
                "souverain_preemptions",
                "Sequences preempted for lack of KV-cache blocks.",
                labels=["model"],
            ),
            **{key: CounterMetricFamily(f"souverain_{key}", text, labels=["model"])
               for key, text in _SPEC_COUNTERS.items()},
            "tensor_parallel": GaugeMetricFamily(
                "souverain_tensor_parallel_size",
                "Rank processes the model's forward is split over (--tensor-parallel; 1: "
                "the server's own process).",
                labels=["model"],
            ),
            "spec_acceptance_rate": GaugeMetricFamily(
                "souverain_spec_acceptance_rate",
                "Speculative decoding: share of draft tokens accepted (0-1, since start).",
                labels=["model"],
            ),
            "spec_tokens_per_step": GaugeMetricFamily(
                "souverain_spec_tokens_per_step",
                "Speculative decoding: tokens emitted per verifying sequence-step (1 = no "
                "gain; since start).",
                labels=["model"],
            ),
        }

    def describe(self) -> Iterator[Metric]:  # registration must not call the sources
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        fam = self._families()
        with self._lock:
            sources = sorted(self._sources.items())
        for model, source in sources:
            try:
                stats = source()
            except Exception:  # a scrape must not fail because one engine is mid-(un)load
                logger.debug(
                    "Engine stats of model %s failed; skipped in this scrape.", model, exc_info=True
                )
                continue
            if not stats:
                continue
            labels = [model]
            num = _reader(stats)
            waiting, running = num("waiting"), num("running")
            usable, free = num("usable_blocks"), num("free_blocks")
            hits, queries = num("prefix_cache_hits"), num("prefix_cache_queries")
            preemptions = num("preemptions")
            if waiting is not None:
                fam["queue_depth"].add_metric(labels, waiting)
            if running is not None:
                fam["running"].add_metric(labels, running)
            if usable is not None and free is not None:
                fam["kv_used"].add_metric(labels, usable - free)
            if free is not None:
                fam["kv_free"].add_metric(labels, free)
            if hits is not None or queries is not None:
                fam["hit_rate"].add_metric(labels, (hits or 0.0) / queries if queries else 0.0)
            if preemptions is not None:
                fam["preemptions"].add_metric(labels, preemptions)
            if (tp := num("tensor_parallel")) is not None:
                fam["tensor_parallel"].add_metric(labels, tp)
            spec = {key: num(key) for key in _SPEC_COUNTERS}
            if spec["spec_verify_steps"]:  # only engines that verified drafts
                for key, value in spec.items():
                    fam[key].add_metric(labels, value or 0.0)
                drafted, accepted = spec["spec_draft_tokens"], spec["spec_accepted_tokens"]
                fam["spec_acceptance_rate"].add_metric(
                    labels, (accepted or 0.0) / drafted if drafted else 0.0)
                fam["spec_tokens_per_step"].add_metric(
                    labels, (spec["spec_emitted_tokens"] or 0.0) / spec["spec_verify_steps"])
        yield from fam.values()


class ServerMetrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "souverain_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "souverain_request_duration_seconds",
            "HTTP request duration by route template.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "souverain_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "souverain_completion_tokens", "Completion tokens generated.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "souverain_time_to_first_token_seconds",
            "Time from request to first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "souverain_inter_token_latency_seconds",
            "Time between consecutive streamed tokens.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.aborted = Counter(
            "souverain_requests_aborted",
            "Generations aborted because the client disconnected.",
            ["model"],
            registry=r,
        )
        # monitoring after release: every final chat answer, and those that are refusals
        # (`souverain.moderation.refusal.is_refusal`), so a drift shows as a rising ratio
        self.chat_answers = Counter(
            "souverain_chat_answers", "Final chat answers (choices) by model.", ["model"],
            registry=r,
        )
        self.chat_refusals = Counter(
            "souverain_chat_refusals",
            "Final chat answers that refuse the request (rule-based refusal detection).",
            ["model"],
            registry=r,
        )
        self.guardrail_flags = Counter(
            "souverain_guardrail_flags",
            "Categories a chat request's guardrails flagged (input or output), by chat model.",
            ["model", "category"],
            registry=r,
        )
        self._engines = _EngineCollector()
        r.register(self._engines)
        if process_metrics:
            ProcessCollector(registry=r)

    def __repr__(self) -> str:
        return "ServerMetrics()"

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """``route`` is the matched route TEMPLATE (bounded cardinality), not the raw path."""
        self.requests.labels(route=route, method=method.upper(), status=str(int(status))).inc()
        self.request_duration.labels(route=route).observe(max(0.0, seconds))

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt > 0:
            self.prompt_tokens.labels(model=model).inc(prompt)
        if completion > 0:
            self.completion_tokens.labels(model=model).inc(completion)

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.labels(model=model).observe(max(0.0, seconds))

    def observe_itl(self, model: str, seconds: float) -> None:
        self.itl.labels(model=model).observe(max(0.0, seconds))

    def observe_abort(self, model: str) -> None:
        self.aborted.labels(model=model).inc()

    def observe_answer(self, model: str, text: str) -> None:
        """One final chat answer of ``model``: counted, and as a refusal when it is one."""
        self.chat_answers.labels(model=model).inc()
        if is_refusal(text):
            self.chat_refusals.labels(model=model).inc()

    def observe_guardrail_flag(self, model: str, category: str) -> None:
        self.guardrail_flags.labels(model=model, category=category).inc()

    def add_engine_source(self, model: str, stats: EngineStats) -> None:
        """Export ``stats()`` (an engine's stats dict, or None while not loaded) as ``{model}`` gauges.

        Called at every scrape; adding a source for a model already present replaces it.
        """
        self._engines.set(model, stats)

    def remove_engine_source(self, model: str) -> None:
        """Stop exporting a model's engine gauges (e.g. after it is unloaded)."""
        self._engines.remove(model)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
