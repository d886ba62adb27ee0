"""EleutherAI's lm-evaluation-harness over a `Target`: the model backend ``souverain``
(`SouverainLM`) and `run_tasks`, which scores lm-eval tasks (souverain's bundled ones in
``data/tasks/`` and the user's own task YAML files) with the harness's own task logic and
metrics.

The backend is tokenizer-free, as lm-eval's API backends with ``tokenized_requests=False``:
``loglikelihood`` and ``loglikelihood_rolling`` are the target's (``/v1/completions`` with
echo + logprobs; see `souverain.eval.target` for which tokens are the continuation's),
a rolling text longer than the model's context is refused by the server (an `EvalError`
with its message; the quality suite cuts its texts into paragraphs instead),
``generate_until`` is a raw ``/v1/completions`` generation (no chat template, as the
harness's completions backends do), greedy unless the task samples, cut at the first of its
``until`` strings, at most ``max_gen_toks`` tokens.

Offline: `run_tasks` sets ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` and reads each task's
data from local files. A task YAML with ``dataset_path: json`` (or csv, parquet, text) and
``dataset_kwargs.data_files`` naming relative paths gets them resolved against the YAML's
own folder (lm-eval alone passes them to ``datasets.load_dataset``, which resolves them
against the working directory). The ``datasets`` cache goes under souverain's cache.

Command line, as any lm-eval backend:
``lm_eval --model souverain --model_args url=http://127.0.0.1:8000,model=NAME --tasks ...``
(``import souverain.eval.harness`` first registers it, e.g. ``python -c`` or ``--include``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from souverain.eval import EvalError
from souverain.eval.suite import Target

TASKS_DIR = Path(__file__).resolve().parent / "data" / "tasks"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
DEFAULT_MAX_GEN_TOKS = 256


@register_model("souverain")
class SouverainLM(LM):
    """lm-eval's `LM` over a `Target` (a served model: souverain or La Plateforme)."""

    def __init__(self, target: Target | None = None, *, url: str | None = None,
                 model: str | None = None, api_key: str | None = None,
                 concurrency: int = 4,
                 on_requests: Callable[[str, int], None] | None = None) -> None:
        super().__init__()
        if target is None:
            if not url or not model:
                raise EvalError("the souverain lm-eval backend needs url=... and model=... "
                                "(e.g. --model_args url=http://127.0.0.1:8000,model=NAME)")
            from souverain.eval.target import ApiTarget

            target = ApiTarget(url, model, api_key or os.environ.get("MISTRAL_API_KEY"),
                               concurrency=concurrency)
        self.target = target
        self.concurrency = concurrency
        self.on_requests = on_requests  # (request type, how many) after each call

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> SouverainLM:
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if "=" in kv)
        return cls(url=args.get("url") or args.get("base_url"), model=args.get("model"),
                   api_key=args.get("api_key"),
                   concurrency=int(args.get("num_concurrent", args.get("concurrency", 4))))

    @property
    def tokenizer_name(self) -> str:
        return self.target.model  # the cache key of chat templates (none used here)

    def _done(self, kind: str, n: int) -> None:
        if self.on_requests is not None:
            self.on_requests(kind, n)

    def loglikelihood(self, requests: list[Any],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
        out = self.target.loglikelihood(pairs) if pairs else []
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        self._done("loglikelihood", len(pairs))
        return out

    def loglikelihood_rolling(self, requests: list[Any],
                              disable_tqdm: bool = False) -> list[float]:
        texts = [str(r.args[0]) for r in requests]
        out = [ll for ll, _n in self.target.loglikelihood_rolling(texts)] if texts else []
        for text, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        self._done("loglikelihood_rolling", len(texts))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        def one(args: tuple[str, dict[str, Any]]) -> str:
            context, gen_kwargs = args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_toks = int(kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get(
                "do_sample") else 0.0
            complete = getattr(self.target, "complete", None)
            if complete is not None:
                text = complete(context, max_tokens=max_toks, temperature=temperature,
                                stop=until)
            else:  # a Target without raw completions: one user turn (chat-templated)
                text = self.target.chat([{"role": "user", "content": context}],
                                        max_tokens=max_toks, temperature=temperature).text
                for s in until:
                    if s and s in text:
                        text = text[:text.index(s)]
            return str(text)

        items = [(str(r.args[0]), dict(r.args[1])) for r in requests]
        mapper = getattr(self.target, "map", None)
        out = (mapper(one, items, self.concurrency) if mapper is not None
               else [one(i) for i in items])
        for item, text in zip(items, out):
            self.cache_hook.add_partial("generate_until", item, text)
        self._done("generate_until", len(items))
        return list(out)


# -- tasks -------------------------------------------------------------------------------

def bundled_tasks() -> dict[str, Path]:
    """souverain's own lm-eval tasks: task name -> its YAML file."""
    found = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            found[doc["task"]] = path
    return found


def _datasets_cache() -> Path:
    from souverain.paths import cache_home

    return cache_home() / "hf-datasets"


def load_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (``!function`` tags, ``include``), with its local data
    files resolved against the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise EvalError(f"task file {path} does not exist; give an lm-eval task YAML")
    try:
        cfg = load_yaml(path, resolve_func=True, recursive=True)
    except (yaml.YAMLError, ValueError, OSError, ImportError, AttributeError) as exc:
        raise EvalError(f"task file {path} is not a valid lm-eval task YAML ({exc}); see "
                        f"souverain/eval/data/tasks/ for examples") from None
    if "task" not in cfg:
        raise EvalError(f"task file {path} has no 'task' name; add `task: my_task`")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if cfg.get("dataset_path") in LOCAL_BUILDERS:
        files = kwargs.get("data_files")
        if files is None:
            raise EvalError(f"task file {path} reads {cfg['dataset_path']} data but names no "
                            f"dataset_kwargs.data_files; add the file(s), relative to the YAML")
        kwargs["data_files"] = _resolve_files(files, path.parent)
        kwargs.setdefault("cache_dir", str(_datasets_cache()))
        cfg["dataset_kwargs"] = kwargs
    return cfg


def _resolve_files(files: Any, folder: Path) -> Any:
    if isinstance(files, dict):
        return {k: _resolve_files(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_resolve_files(v, folder) for v in files]
    p = Path(str(files)).expanduser()
    p = p if p.is_absolute() else folder / p
    if "://" not in str(files) and not any(c in str(p) for c in "*?[") and not p.is_file():
        raise EvalError(f"data file {p} of a task in {folder} does not exist; fix "
                        f"dataset_kwargs.data_files (paths are relative to the YAML)")
    return str(p)


def task_specs(tasks: Sequence[str | Path]) -> list[dict[str, Any] | str]:
    """Bundled task names and YAML paths -> lm-eval task configs; other names are left to
    lm-eval's own task index (its data must then be in the local ``datasets`` cache)."""
    bundled = bundled_tasks()
    specs: list[dict[str, Any] | str] = []
    for task in tasks:
        text = str(task)
        if text in bundled:
            specs.append(load_task_yaml(bundled[text]))
        elif text.endswith((".yaml", ".yml")) or Path(text).is_file():
            specs.append(load_task_yaml(Path(text)))
        else:
            specs.append(text)
    return specs


@contextmanager
def _quiet() -> Iterator[None]:
    """No tqdm bars from lm-eval and datasets while a task runs (souverain draws its own)."""
    import functools

    import datasets
    import lm_eval.api.task as task_module

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    # lm-eval's request building has its own bar (the module's `tqdm`; TQDM_DISABLE is read
    # when tqdm is imported, too late here)
    original = task_module.tqdm
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original
        if bars:
            datasets.enable_progress_bars()


def run_tasks(target: Target, tasks: Sequence[str | Path], limit: int | None = None, *,
              seed: int = 0, concurrency: int = 4,
              on_requests: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Score ``tasks`` (bundled names, lm-eval task YAML paths, or lm-eval task names) on
    ``target`` with `lm_eval.simple_evaluate`; at most ``limit`` documents per task (the
    first ones). Returns the harness's results dict (``results``, ``samples`` per task with
    each document's metric values, ``configs``, ...)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    specs = task_specs(tasks)
    by_name = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(by_name))
    unknown = [n for n in by_name if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task {unknown[0]!r}; use a bundled one "
                        f"({', '.join(sorted(bundled_tasks()))}), a task YAML file, or an "
                        f"lm-eval task name (`lm_eval --tasks list`)")
    lm = SouverainLM(target, concurrency=concurrency, on_requests=on_requests)
    try:
        with _quiet():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, limit=limit, log_samples=True,
                bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
    except (FileNotFoundError, ConnectionError) as exc:
        raise EvalError(f"an lm-eval task's data is not available offline ({exc}); give the "
                        f"task local data files (dataset_path: json + "
                        f"dataset_kwargs.data_files)") from None
    if not results:
        raise EvalError("lm-eval returned no results")
    return dict(results)
