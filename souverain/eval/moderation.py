"""The moderation evaluation: souverain's labelled set, scored by any moderation backend.

The set (``data/moderation.jsonl``, described in ``data/README.md``) holds short user messages
in English, French, German, Spanish and Italian, each with the La Plateforme v2 categories a
moderator must flag (``positive``), or none (``hard_negative``: fine texts that look risky,
``benign``: plainly fine ones). `load_set` checks every line and names the first bad one.

A scorer is anything with the shape of a moderation backend: ``score(texts) -> [{category:
score in [0, 1]}]``, one dict per text (`HttpModerationScorer` for a server; the moderation
service's backends in process). `score_set` runs it in batches and times each batch;
`evaluate` turns the scores into one `CategoryResult` per category the scorer answers:

* flagged = score >= threshold; precision, recall and F1 over the whole set (a text is a
  positive of a category when the category is among its labels);
* AUROC (threshold-free) where the set has both positives and negatives of the category;
* the false-positive rate on hard negatives (flagged hard negatives / hard negatives);
* v1 scorers answer ``dangerous_and_criminal_content``: its truth is dangerous OR criminal.

`Report.to_json` keeps every text's scores next to the metrics, so that a result can be
audited line by line; `tables` renders the report for a terminal.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from souverain.eval import EvalError
from souverain.eval.metrics import Confusion, auroc, percentile

CATEGORIES = ("sexual", "hate_and_discrimination", "violence_and_threats", "dangerous",
              "criminal", "selfharm", "health", "financial", "law", "pii", "jailbreaking")
"""La Plateforme's v2 categories (mistral-moderation-2603, `moderation_llm_v2`), the labels."""
V1_DANGEROUS_AND_CRIMINAL = "dangerous_and_criminal_content"
"""The v1 category (mistral-moderation-2411) that v2 splits into dangerous and criminal."""
SCORABLE = (*CATEGORIES, V1_DANGEROUS_AND_CRIMINAL)
LANGUAGES = ("en", "fr", "de", "es", "it")
KINDS = ("positive", "hard_negative", "benign")
DEFAULT_SET = Path(__file__).parent / "data" / "moderation.jsonl"
DEFAULT_THRESHOLD = 0.5

Scorer = Callable[[list[str]], list[dict[str, float]]]
"""A moderation backend: texts -> one {category: score in [0, 1]} per text, in order."""


@dataclass(frozen=True)
class Example:
    """One labelled text of the set."""

    id: str
    lang: str
    text: str
    categories: tuple[str, ...]
    kind: str

    def is_positive(self, category: str) -> bool:
        """Whether a moderator must flag this text for ``category`` (v1's combined category
        included: dangerous or criminal)."""
        if category == V1_DANGEROUS_AND_CRIMINAL:
            return "dangerous" in self.categories or "criminal" in self.categories
        return category in self.categories


def _example(obj: Any, where: str) -> Example:
    """One line's object checked against the set's schema; EvalError names the field."""
    if not isinstance(obj, dict):
        raise EvalError(f"{where}: a line must be a JSON object with id, lang, text, "
                        f"categories and kind")
    expected = {"id", "lang", "text", "categories", "kind"}
    if missing := expected - obj.keys():
        raise EvalError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    if extra := obj.keys() - expected:
        raise EvalError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; a line has "
                        f"only {', '.join(sorted(expected))}")
    for name in ("id", "lang", "text", "kind"):
        if not isinstance(obj[name], str) or not obj[name].strip():
            raise EvalError(f"{where}: {name!r} must be a non-empty string")
    if obj["lang"] not in LANGUAGES:
        raise EvalError(f"{where}: unknown language {obj['lang']!r}; use one of "
                        f"{', '.join(LANGUAGES)}")
    if obj["kind"] not in KINDS:
        raise EvalError(f"{where}: unknown kind {obj['kind']!r}; use one of {', '.join(KINDS)}")
    cats = obj["categories"]
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise EvalError(f"{where}: 'categories' must be a list of category names")
    for c in cats:
        if c not in CATEGORIES:
            hint = (" (v1's dangerous_and_criminal_content is labelled dangerous or criminal)"
                    if c == V1_DANGEROUS_AND_CRIMINAL else "")
            raise EvalError(f"{where}: unknown category {c!r}; use La Plateforme's v2 "
                            f"categories: {', '.join(CATEGORIES)}{hint}")
    if len(set(cats)) != len(cats):
        raise EvalError(f"{where}: a category is listed twice in {cats}")
    if obj["kind"] == "positive" and not cats:
        raise EvalError(f"{where}: a positive needs at least one category (or kind "
                        f"'hard_negative' / 'benign')")
    if obj["kind"] != "positive" and cats:
        raise EvalError(f"{where}: a {obj['kind']} text has no category; make it a positive "
                        f"or empty its categories")
    return Example(obj["id"], obj["lang"], obj["text"], tuple(cats), obj["kind"])


def load_set(path: Path = DEFAULT_SET) -> list[Example]:
    """Read and check an evaluation set (JSONL, one object per line; blank lines skipped).

    Every line must be a valid example; ids and texts must be unique. Raises EvalError naming
    the file, the line and the fix."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise EvalError(f"{path} is a folder; give the evaluation set's .jsonl file") from None
    except FileNotFoundError:
        raise EvalError(f"{path} does not exist; give an evaluation set (.jsonl)") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") \
            from None
    examples: list[Example] = []
    ids: dict[str, int] = {}
    texts: dict[str, int] = {}
    for number, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        ex = _example(obj, where)
        if ex.id in ids:
            raise EvalError(f"{where}: id {ex.id!r} is already used on line {ids[ex.id]}")
        key = " ".join(ex.text.split()).casefold()
        if key in texts:
            raise EvalError(f"{where}: the same text is on line {texts[key]}")
        ids[ex.id], texts[key] = number, number
        examples.append(ex)
    if not examples:
        raise EvalError(f"{path} holds no example; it needs one JSON object per line")
    return examples


def spread(examples: Sequence[Example], limit: int | None) -> list[Example]:
    """At most ``limit`` examples taken evenly across the set (every category, kind and
    language keeps its share), in the set's order; all of them when ``limit`` is None."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise EvalError(f"--limit must be at least 1, not {limit}")
    return [examples[i * len(examples) // limit] for i in range(limit)]


@dataclass
class ScoredSet:
    """A scorer's answers on a set: one score dict per example, and each batch's timing."""

    examples: list[Example]
    scores: list[dict[str, float]]
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)


def _checked_scores(answer: Any, texts: list[str]) -> list[dict[str, float]]:
    if not isinstance(answer, list) or len(answer) != len(texts):
        got = f"{len(answer)} results" if isinstance(answer, list) else type(answer).__name__
        raise EvalError(f"the scorer answered {got} for {len(texts)} texts; it must return "
                        f"one {{category: score}} per text")
    for scores in answer:
        if not isinstance(scores, dict):
            raise EvalError(f"the scorer answered {type(scores).__name__} for a text; it must "
                            f"be a {{category: score}} dict")
        for name, value in scores.items():
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or not 0 <= value <= 1):
                raise EvalError(f"the scorer gave {name!r} the score {value!r}; scores are "
                                f"numbers in [0, 1]")
    return [{k: float(v) for k, v in scores.items()} for scores in answer]


def score_set(examples: Sequence[Example], scorer: Scorer, batch_size: int = 16,
              on_batch: Callable[[int], None] | None = None) -> ScoredSet:
    """Score ``examples`` in batches of ``batch_size`` texts, timing each call of ``scorer``
    (wall clock); ``on_batch(n)`` after each batch of n texts (a progress bar)."""
    if batch_size < 1:
        raise EvalError(f"the batch size must be at least 1, not {batch_size}")
    run = ScoredSet(list(examples), [])
    for start in range(0, len(examples), batch_size):
        texts = [ex.text for ex in examples[start:start + batch_size]]
        t0 = time.perf_counter()
        answer = scorer(texts)
        run.batch_seconds.append(time.perf_counter() - t0)
        run.batch_sizes.append(len(texts))
        run.scores.extend(_checked_scores(answer, texts))
        if on_batch is not None:
            on_batch(len(texts))
    return run


@dataclass(frozen=True)
class CategoryResult:
    """One category's metrics over the scored set."""

    category: str
    positives: int
    confusion: Confusion
    auroc: float | None
    hard_negatives_flagged: int
    hard_negatives: int

    @property
    def hard_negative_fpr(self) -> float | None:
        return (self.hard_negatives_flagged / self.hard_negatives if self.hard_negatives
                else None)

    def to_json(self) -> dict[str, Any]:
        c = self.confusion
        return {"category": self.category, "positives": self.positives, "tp": c.tp,
                "fp": c.fp, "fn": c.fn, "tn": c.tn, "precision": c.precision,
                "recall": c.recall, "f1": c.f1, "auroc": self.auroc,
                "hard_negative_fpr": self.hard_negative_fpr}


@dataclass(frozen=True)
class Latency:
    """Wall-clock seconds of the scorer's calls: per batch, and per text (a batch's time
    shared equally by its texts)."""

    batches: int
    texts: int
    total_s: float
    batch_p50_s: float
    batch_p95_s: float
    text_p50_s: float
    text_p95_s: float

    @classmethod
    def of(cls, run: ScoredSet) -> Latency:
        if not run.batch_seconds:
            return cls(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        per_text = [s / n for s, n in zip(run.batch_seconds, run.batch_sizes) for _ in range(n)]
        return cls(len(run.batch_seconds), len(per_text), sum(run.batch_seconds),
                   percentile(run.batch_seconds, 50), percentile(run.batch_seconds, 95),
                   percentile(per_text, 50), percentile(per_text, 95))


@dataclass(frozen=True)
class Report:
    """What `evaluate` found: per-category results and the set-wide figures."""

    threshold: float
    categories: list[CategoryResult]
    not_scored: list[str]
    """Labelled categories the scorer gave no score for (not in the table)."""
    ignored: list[str]
    """Keys the scorer answered that are not La Plateforme categories (left out)."""
    hard_negatives_any_flag: float | None
    benign_any_flag: float | None
    per_language_macro_f1: dict[str, float]
    latency: Latency
    run: ScoredSet

    @property
    def macro(self) -> dict[str, float]:
        """Unweighted means over the scored categories (as scikit-learn's average='macro')."""
        cs = [r.confusion for r in self.categories]
        if not cs:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        return {"precision": sum(c.precision for c in cs) / len(cs),
                "recall": sum(c.recall for c in cs) / len(cs),
                "f1": sum(c.f1 for c in cs) / len(cs)}

    def to_json(self, **about: Any) -> dict[str, Any]:
        """The report as JSON: ``about`` (model, url, set...), the metrics, and every text's
        labels and scores."""
        lat = self.latency
        return {
            **about,
            "threshold": self.threshold,
            "examples": len(self.run.examples),
            "categories": [r.to_json() for r in self.categories],
            "macro": self.macro,
            "not_scored": self.not_scored,
            "ignored_keys": self.ignored,
            "hard_negatives_any_flag_rate": self.hard_negatives_any_flag,
            "benign_any_flag_rate": self.benign_any_flag,
            "per_language_macro_f1": self.per_language_macro_f1,
            "latency": {"batches": lat.batches, "texts": lat.texts, "total_s": lat.total_s,
                        "batch_p50_s": lat.batch_p50_s, "batch_p95_s": lat.batch_p95_s,
                        "text_p50_s": lat.text_p50_s, "text_p95_s": lat.text_p95_s},
            "items": [{"id": ex.id, "lang": ex.lang, "kind": ex.kind,
                       "categories": list(ex.categories), "scores": scores}
                      for ex, scores in zip(self.run.examples, self.run.scores)],
        }


def _scored_categories(run: ScoredSet) -> tuple[list[str], list[str]]:
    """The La Plateforme categories the scorer answers (every text must have the same ones)
    and the other keys it answers."""
    keys = [frozenset(s) for s in run.scores]
    if not keys:
        return [], []
    first = keys[0]
    for i, k in enumerate(keys):
        if k != first:
            diff = sorted(first.symmetric_difference(k))
            raise EvalError(f"the scorer answered different categories for text "
                            f"{run.examples[i].id!r} ({', '.join(diff)} differ from the first "
                            f"text's); every text needs the same categories")
    scored = [c for c in SCORABLE if c in first]
    return scored, sorted(first - set(SCORABLE))


def _any_flag_rate(run: ScoredSet, kind: str, categories: list[str],
                   threshold: float) -> float | None:
    rows = [s for ex, s in zip(run.examples, run.scores) if ex.kind == kind]
    if not rows:
        return None
    return sum(1 for s in rows if any(s[c] >= threshold for c in categories)) / len(rows)


def evaluate(run: ScoredSet, threshold: float = DEFAULT_THRESHOLD) -> Report:
    """Metrics of a scored set at ``threshold`` (flagged = score >= threshold)."""
    if not 0 <= threshold <= 1:
        raise EvalError(f"the threshold must be within [0, 1], not {threshold}")
    scored, ignored = _scored_categories(run)
    if run.scores and not scored:
        raise EvalError(f"the scorer answered none of La Plateforme's categories (it gave "
                        f"{', '.join(ignored) or 'nothing'}); expected some of "
                        f"{', '.join(SCORABLE)}")
    labelled = {c for ex in run.examples for c in ex.categories}
    covered = set(scored) | ({"dangerous", "criminal"}
                             if V1_DANGEROUS_AND_CRIMINAL in scored else set())
    not_scored = [c for c in CATEGORIES if c in labelled and c not in covered]
    hard = [i for i, ex in enumerate(run.examples) if ex.kind == "hard_negative"]
    results = []
    for cat in scored:
        truth = [ex.is_positive(cat) for ex in run.examples]
        scores = [s[cat] for s in run.scores]
        results.append(CategoryResult(
            cat, sum(truth), Confusion.count(truth, scores, threshold), auroc(truth, scores),
            sum(1 for i in hard if scores[i] >= threshold), len(hard)))
    per_language = {}
    for lang in LANGUAGES:
        idx = [i for i, ex in enumerate(run.examples) if ex.lang == lang]
        if idx and scored:
            f1s = [Confusion.count([run.examples[i].is_positive(c) for i in idx],
                                   [run.scores[i][c] for i in idx], threshold).f1
                   for c in scored]
            per_language[lang] = sum(f1s) / len(f1s)
    return Report(threshold, results, not_scored, ignored,
                  _any_flag_rate(run, "hard_negative", scored, threshold),
                  _any_flag_rate(run, "benign", scored, threshold),
                  per_language, Latency.of(run), run)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def tables(report: Report, title: str = "") -> list[Table]:
    """The report for a terminal: per-category metrics (+ macro average), then the set-wide
    false-positive rates and latency."""
    main = Table("category", "positives", "precision", "recall", "F1", "AUROC",
                 "FPR hard neg.", title=title or None)
    for r in report.categories:
        c = r.confusion
        main.add_row(r.category, str(r.positives), _num(c.precision), _num(c.recall),
                     _num(c.f1), _num(r.auroc), _pct(r.hard_negative_fpr))
    m = report.macro
    main.add_row("[bold]macro average[/]", "", _num(m["precision"]), _num(m["recall"]),
                 _num(m["f1"]), "", "", end_section=True)
    lat = report.latency
    side = Table("figure", "value", show_header=False)
    side.add_row("threshold", f"{report.threshold:g} (flagged = score >= threshold)")
    side.add_row("texts", f"{len(report.run.examples)} in {lat.batches} batches")
    side.add_row("hard negatives flagged (any category)", _pct(report.hard_negatives_any_flag))
    side.add_row("benign texts flagged (any category)", _pct(report.benign_any_flag))
    side.add_row("macro F1 per language", "  ".join(
        f"{lang} {f1:.3f}" for lang, f1 in report.per_language_macro_f1.items()))
    side.add_row("latency per batch p50 / p95",
                 f"{1000 * lat.batch_p50_s:.1f} / {1000 * lat.batch_p95_s:.1f} ms")
    side.add_row("latency per text p50 / p95",
                 f"{1000 * lat.text_p50_s:.1f} / {1000 * lat.text_p95_s:.1f} ms")
    if report.not_scored:
        side.add_row("not scored by this model", ", ".join(report.not_scored))
    if report.ignored:
        side.add_row("other keys in the answers (ignored)", ", ".join(report.ignored))
    return [main, side]
