"""The shapes every `souverain eval` suite shares: what a suite talks to (`Target`), what it
returns (`SuiteResult` of `Metric`s and `Example`s), and the suite itself (`Suite`).

A suite never knows whether its target is a served model, a local model (served by a
`souverain serve` this process started) or an ``ft:`` adapter: it is a client of La
Plateforme's API like any other. Base-vs-candidate comparisons pair metrics by example id
(`Metric.samples`), so a suite must give the same example the same id on every run.

Cheap to import: no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]


@dataclass
class ChatAnswer:
    """One chat completion as a suite sees it."""

    text: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "arguments"}]
    finish_reason: str = "stop"
    latency_s: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Target(Protocol):
    """A model behind La Plateforme's API (souverain/eval/target.py implements it over HTTP).

    Every method is synchronous and thread-safe: a suite may call it from several threads at
    once (`map_concurrent`) so that the server batches the requests.
    """

    model: str  # the model id requests name
    url: str  # the server's base URL (…/v1)

    def chat(self, messages: Sequence[Message], *, max_tokens: int = 256,
             temperature: float = 0.0, response_format: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None, tool_choice: str | None = None,
             extra: dict[str, Any] | None = None) -> ChatAnswer: ...

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(context, continuation) -> (sum of the continuation's token logprobs, whether every
        continuation token is the greedy one), as lm-evaluation-harness defines it."""
        ...

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """A whole text's (sum of token logprobs, number of tokens scored): perplexity."""
        ...

    def moderate(self, texts: Sequence[str]) -> list[dict[str, float]] | None:
        """Category scores of each text by the server's moderation model, or None when the
        server has none (suites then score by rules and say so in `SuiteResult.notes`)."""
        ...


@dataclass
class Metric:
    """One figure of a suite, with its 95% confidence interval and the per-example values it
    is the mean of (``samples``: example id -> value; empty for a figure that is not a mean)."""

    name: str
    value: float
    low: float | None = None
    high: float | None = None
    n: int = 0
    higher_is_better: bool = True
    description: str = ""
    samples: dict[str, float] = field(default_factory=dict)


@dataclass
class Example:
    """One scored item: shown in the report's worst-examples table (lowest ``score`` first)."""

    id: str
    prompt: str
    answer: str
    score: float  # 0..1, 1 = the behaviour wanted
    expected: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteResult:
    suite: str
    model: str
    metrics: dict[str, Metric]
    examples: list[Example]
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # how it was scored, what was skipped
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SuiteResult:
        return cls(
            suite=doc["suite"], model=doc["model"],
            metrics={k: Metric(**v) for k, v in doc["metrics"].items()},
            examples=[Example(**e) for e in doc["examples"]],
            duration_s=doc.get("duration_s", 0.0), notes=list(doc.get("notes", [])),
            settings=dict(doc.get("settings", {})),
        )


@dataclass
class SuiteOptions:
    """What the user asked of a suite: ``limit`` items at most (taken evenly across the set's
    groups: languages, categories), the user's own ``files`` (replacing or adding to the
    built-in set, as the suite documents), the ``seed`` of any sampling, ``concurrency``
    requests in flight."""

    limit: int | None = None
    files: list[Path] = field(default_factory=list)
    seed: int = 0
    concurrency: int = 4
    library_id: str | None = None  # grounding: an existing library on the server


Progress = Callable[[int], None]  # advance the bar by n items


class Suite(Protocol):
    name: str  # "quality", "safety", "bias", "multilingual", "structured", "grounding"
    description: str

    def size(self, options: SuiteOptions) -> int:
        """How many items `run` will score (the progress bar's total)."""
        ...

    def run(self, target: Target, options: SuiteOptions,
            progress: Progress | None = None) -> SuiteResult: ...
