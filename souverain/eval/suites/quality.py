"""The ``quality`` suite: does the model still model language and know things?

Two parts, both scored through the target's API (never in this process):

- **Perplexity** on text files: each paragraph (blank-line separated; one longer than
  `CHUNK_CHARS` is cut at whitespace) is a sample, scored on its own from BOS
  (`Target.loglikelihood_rolling`); its sample value is its mean negative log-likelihood per
  token (nats). ``perplexity.<file stem>`` = exp(mean of the samples) (every paragraph
  weighs the same), and its interval is exp of the bootstrap interval of that mean (exp is
  increasing, so a percentile interval maps exactly). Lower is better. The samples stay in
  nats per token, so a base-vs-candidate delta is a difference of mean NLL (= the log of the
  perplexity ratio). The user's ``.txt`` / ``.md`` files replace the bundled texts
  (``data/quality/``: one original short text per language, en fr de es it).
- **lm-evaluation-harness tasks** (`souverain.eval.harness.run_tasks`): the bundled
  ``souverain_mc`` (multiple choice: ``acc``, ``acc_norm``) and ``souverain_gen``
  (generation: ``exact_match``), plus the user's task YAML files (``.yaml``/``.yml`` among
  the files: added to the bundled tasks). Each metric ``<task>.<metric>`` has lm-eval's own
  value and the per-document values lm-eval logs (``log_samples``) as its samples, ids
  ``<task>/<doc id>``, so two runs pair document by document.

``limit`` caps each group: the paragraphs of each text file, the documents of each task (the
first ones, as lm-eval's ``--limit``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from souverain.eval import EvalError
from souverain.eval.metrics import metric_of
from souverain.eval.suite import Example, Metric, Progress, SuiteOptions, SuiteResult, Target

DATA = Path(__file__).resolve().parent.parent / "data"
TEXTS_DIR = DATA / "quality"
TEXT_SUFFIXES = (".txt", ".md")
TASK_SUFFIXES = (".yaml", ".yml")
BUNDLED_TASKS = ("souverain_mc", "souverain_gen")
CHUNK_CHARS = 1500
WORST_PER_GROUP = 5


def paragraphs(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Blank-line separated paragraphs, whitespace-normalised; over-long ones cut at the last
    whitespace before ``max_chars``."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        while len(block) > max_chars:
            cut = block.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(block[:cut])
            block = block[cut:].strip()
        if block:
            out.append(block)
    return out


class QualitySuite:
    """Perplexity on text + lm-evaluation-harness tasks (see the module docstring)."""

    name = "quality"
    description = ("Language modelling and knowledge: perplexity on text (bundled texts in 5 "
                   "languages, or the user's .txt/.md files) and lm-evaluation-harness tasks "
                   "(bundled multiple-choice and short-answer sets, plus the user's task YAML "
                   "files)")

    def _split_files(self, options: SuiteOptions) -> tuple[list[Path], list[Path]]:
        texts, tasks = [], []
        for f in options.files:
            path = Path(f)
            if not path.is_file():
                raise EvalError(f"quality: {path} does not exist; give .txt/.md text files "
                                f"or lm-eval task .yaml files")
            if path.suffix.lower() in TEXT_SUFFIXES:
                texts.append(path)
            elif path.suffix.lower() in TASK_SUFFIXES:
                tasks.append(path)
            else:
                raise EvalError(f"quality: {path.name} is neither a text file (.txt, .md) nor "
                                f"an lm-eval task (.yaml); rename it or leave it out")
        if not texts:
            texts = sorted(TEXTS_DIR.glob("*.md"))
        stems = [p.stem for p in texts]
        if len(set(stems)) != len(stems):
            raise EvalError("quality: two text files share a name stem; metrics are named "
                            "perplexity.<stem>: rename one")
        return texts, tasks

    def _chunks(self, texts: list[Path], limit: int | None) -> dict[str, list[str]]:
        out = {}
        for path in texts:
            try:
                parts = paragraphs(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise EvalError(f"quality: {path} is not UTF-8 text") from None
            if not parts:
                raise EvalError(f"quality: {path} holds no text")
            out[path.stem] = parts[:limit] if limit else parts
        return out

    def _task_sizes(self, tasks: Sequence[str | Path], limit: int | None) -> dict[str, int]:
        from souverain.eval.harness import bundled_tasks, load_task_yaml

        bundled = bundled_tasks()
        sizes = {}
        for task in tasks:
            cfg = load_task_yaml(bundled[str(task)] if str(task) in bundled else Path(task))
            files = (cfg.get("dataset_kwargs") or {}).get("data_files")
            split = cfg.get("test_split") or cfg.get("validation_split")
            path = files.get(split) if isinstance(files, dict) else files
            n = limit or 0
            if isinstance(path, str) and path.endswith((".jsonl", ".txt", ".csv")):
                with open(path, encoding="utf-8") as fh:
                    n = sum(1 for line in fh if line.strip())
                n -= path.endswith(".csv")  # its header
                n = min(n, limit) if limit else n
            sizes[str(cfg["task"])] = n
        return sizes

    def _tasks(self, options: SuiteOptions) -> list[str | Path]:
        return [*BUNDLED_TASKS, *self._split_files(options)[1]]

    def size(self, options: SuiteOptions) -> int:
        texts, _ = self._split_files(options)
        chunks = self._chunks(texts, options.limit)
        return (sum(len(c) for c in chunks.values())
                + sum(self._task_sizes(self._tasks(options), options.limit).values()))

    def run(self, target: Target, options: SuiteOptions,
            progress: Progress | None = None) -> SuiteResult:
        start = time.monotonic()
        advance = progress or (lambda n: None)
        texts, _ = self._split_files(options)
        tasks = self._tasks(options)
        metrics: dict[str, Metric] = {}
        examples: list[Example] = []
        notes = [f"perplexity: each paragraph (cut at {CHUNK_CHARS} characters) scored alone "
                 f"from BOS; sample = its mean NLL per token (nats); value = exp(mean NLL), "
                 f"interval = exp(bootstrap interval of the mean)"]
        for stem, chunks in self._chunks(texts, options.limit).items():
            metric, worst = self._perplexity(target, stem, chunks, options, advance)
            metrics[metric.name] = metric
            examples += worst
        sizes = self._task_sizes(tasks, options.limit)
        versions: dict[str, Any] = {}
        for task in tasks:
            from souverain.eval.harness import run_tasks

            results = run_tasks(target, [task], options.limit, seed=options.seed,
                                concurrency=options.concurrency)
            for name, found in self._task_metrics(results).items():
                metrics[name] = found
            examples += self._task_examples(results)
            versions.update({k: v.get("version") if isinstance(v, dict) else v
                             for k, v in (results.get("versions") or {}).items()})
            advance(sum(sizes.get(t, 0) for t in results.get("samples") or {}))
        try:
            from importlib.metadata import version

            lm_eval_version = version("lm_eval")
        except Exception:
            lm_eval_version = "unknown"
        notes.append(f"tasks scored by lm-evaluation-harness {lm_eval_version} (log-likelihoods "
                     f"from /v1/completions echo + logprobs, generation greedy and raw)")
        return SuiteResult(
            suite=self.name, model=target.model, metrics=metrics, examples=examples,
            duration_s=time.monotonic() - start, notes=notes,
            settings={"texts": [str(p) for p in texts], "tasks": [str(t) for t in tasks],
                      "limit": options.limit, "chunk_chars": CHUNK_CHARS,
                      "lm_eval": lm_eval_version, "task_versions": versions})

    # -- perplexity --------------------------------------------------------------------------
    def _perplexity(self, target: Target, stem: str, chunks: list[str],
                    options: SuiteOptions, advance: Progress) -> tuple[Metric, list[Example]]:
        def one(chunk: str) -> tuple[float, int]:
            ll, n = _rolling(target, chunk)
            advance(1)
            return ll, n

        mapper = getattr(target, "map", None)
        scored = (mapper(one, chunks, options.concurrency) if mapper is not None
                  else [one(c) for c in chunks])
        samples: dict[str, float] = {}
        worst = []
        for i, (chunk, (ll, n)) in enumerate(zip(chunks, scored)):
            if n == 0:
                continue
            nll = -ll / n
            key = f"{stem}/{i}"
            samples[key] = nll
            worst.append(Example(id=f"perplexity.{key}", prompt=chunk[:500], answer="",
                                 score=math.exp(-nll),
                                 detail={"nll_per_token": nll, "tokens": n,
                                         "perplexity": math.exp(nll)}))
        metric = metric_of(f"perplexity.{stem}", samples, higher_is_better=False,
                           description=f"perplexity on {stem} (exp of the mean NLL per token "
                                       f"of its paragraphs; samples are NLL in nats/token)",
                           seed=options.seed)
        if metric.n:  # the samples are NLLs: report perplexity
            metric.value = math.exp(metric.value)
            metric.low = math.exp(metric.low) if metric.low is not None else None
            metric.high = math.exp(metric.high) if metric.high is not None else None
        worst.sort(key=lambda e: e.score)
        return metric, worst[:WORST_PER_GROUP]

    # -- lm-eval tasks -----------------------------------------------------------------------
    @staticmethod
    def _sample_id(task: str, sample: dict[str, Any]) -> str:
        doc = sample.get("doc")
        doc_id = doc.get("id") if isinstance(doc, dict) and doc.get("id") is not None else None
        return f"{task}/{doc_id if doc_id is not None else sample.get('doc_id')}"

    def _task_metrics(self, results: dict[str, Any]) -> dict[str, Metric]:
        out = {}
        higher = results.get("higher_is_better") or {}
        for task, samples in (results.get("samples") or {}).items():
            filters = list(dict.fromkeys(s.get("filter", "none") for s in samples))
            for filt in filters:
                values: dict[str, dict[str, float]] = {}
                for s in samples:
                    if s.get("filter", "none") != filt:
                        continue
                    for m in s.get("metrics") or []:
                        v = s.get(m)
                        if isinstance(v, (int, float)) or hasattr(v, "__float__"):
                            try:
                                values.setdefault(m, {})[self._sample_id(task, s)] = float(v)
                            except (TypeError, ValueError):
                                pass
                aggregate = (results.get("results") or {}).get(task, {})
                for m in dict.fromkeys(m for s in samples for m in s.get("metrics") or []):
                    name = f"{task}.{m}" if filt == filters[0] else f"{task}.{m}.{filt}"
                    better = bool((higher.get(task) or {}).get(m, True))
                    value = aggregate.get(f"{m},{filt}")
                    metric = metric_of(name, values.get(m, {}), higher_is_better=better,
                                       description=f"lm-eval {task} {m} (filter {filt})")
                    if isinstance(value, (int, float)):
                        metric.value = float(value)  # the harness's own aggregate
                        if not metric.n:  # not a mean of per-document values
                            metric.samples = {}
                    out[name] = metric
        return out

    def _task_examples(self, results: dict[str, Any]) -> list[Example]:
        examples = []
        for task, samples in (results.get("samples") or {}).items():
            first = samples[0].get("filter", "none") if samples else "none"
            scored = []
            for s in samples:
                if s.get("filter", "none") != first:
                    continue
                metric_names = s.get("metrics") or []
                if not metric_names:
                    continue
                try:
                    score = float(s.get(metric_names[0]))
                except (TypeError, ValueError):
                    continue
                args = s.get("arguments") or []
                prompt = str(args[0][0]) if args and args[0] else ""
                resps = s.get("filtered_resps") or []
                detail: dict[str, Any] = {"task": task, metric_names[0]: score}
                if args and len(args[0]) > 1 and isinstance(args[0][1], str):
                    # multiple choice: one (context, choice) per choice, resps (ll, greedy)
                    lls = [float(r[0]) for r in resps]
                    choices = [str(a[1]) for a in args]
                    best = max(range(len(lls)), key=lls.__getitem__) if lls else 0
                    answer = choices[best].strip() if choices else ""
                    target_index = s.get("target")
                    expected = (choices[target_index].strip()
                                if isinstance(target_index, int) and 0 <= target_index
                                < len(choices) else str(target_index))
                    detail["loglikelihoods"] = dict(zip((c.strip() for c in choices), lls))
                else:
                    answer = str(resps[0]) if resps else ""
                    expected = str(s.get("target"))
                scored.append(Example(id=self._sample_id(task, s), prompt=prompt,
                                      answer=answer, score=max(0.0, min(1.0, score)),
                                      expected=expected, detail=detail))
            scored.sort(key=lambda e: e.score)
            examples += scored[:WORST_PER_GROUP]
        return examples


def _rolling(target: Target, text: str) -> tuple[float, int]:
    """(sum of logprobs, tokens scored) of ``text``; a text the server finds longer than the
    model's context (HTTP 400) is scored in two halves cut at whitespace."""
    try:
        return target.loglikelihood_rolling([text])[0]
    except EvalError as exc:
        if "HTTP 400" not in str(exc) or "context" not in str(exc) or len(text) < 16:
            raise
    cut = text.rfind(" ", 0, len(text) // 2)
    cut = cut if cut > 0 else len(text) // 2
    a, b = _rolling(target, text[:cut]), _rolling(target, text[cut:].strip())
    return a[0] + b[0], a[1] + b[1]
