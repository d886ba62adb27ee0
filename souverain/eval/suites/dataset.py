"""What the behaviour suites (safety, bias, multilingual, structured, grounding) share: their
item sets (the bundled JSONL under ``souverain/eval/data/suites/`` or the user's own files in
the same format), the choice of ``--limit`` items evenly across groups, running one request
per item with several in flight, and the worst-examples list of a report.

An item is one JSON object per line with a stable ``id`` (the key that pairs a candidate's
score with the base's); each suite documents the other fields (and data/suites/README.md).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from souverain.eval import EvalError
from souverain.eval.suite import Example, Progress, SuiteOptions, Target

DATA = Path(__file__).resolve().parent.parent / "data" / "suites"
WORST = 10  # examples kept per suite for the report (lowest score first)

T = TypeVar("T")
R = TypeVar("R")
Item = dict[str, Any]


def read_items(path: Path, required: Sequence[str], *, suite: str) -> list[Item]:
    """The items of one JSONL file: every line an object with ``id`` and ``required`` fields,
    ids unique. A bad line is an `EvalError` naming the file, the line and the fix."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"cannot read the {suite} set {path} ({exc.strerror}); give an existing "
                        f"JSONL file") from None
    items: list[Item] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where} is not JSON ({exc.msg}); write one JSON object per "
                            f"line") from None
        if not isinstance(item, dict):
            raise EvalError(f"{where} is not a JSON object; write one object per line")
        missing = [f for f in ("id", *required) if f not in item]
        if missing:
            raise EvalError(f"{where} lacks {', '.join(missing)}; every {suite} item needs "
                            f"id, {', '.join(required)} (see souverain/eval/data/suites/"
                            f"README.md)")
        item_id = item["id"]
        if not isinstance(item_id, str) or not item_id:
            raise EvalError(f"{where}: id must be a non-empty string")
        if item_id in seen:
            raise EvalError(f"{where}: id {item_id!r} is used twice; ids must be unique (they "
                            f"pair a candidate's answers with the base's)")
        seen.add(item_id)
        items.append(item)
    if not items:
        raise EvalError(f"the {suite} set {path} has no item; write one JSON object per line")
    return items


def load_items(suite: str, options: SuiteOptions, required: Sequence[str],
               builtin: str | None = None) -> list[Item]:
    """The user's files (``options.files``, replacing the built-in set) or the bundled
    ``data/suites/<builtin or suite>.jsonl``; ids must be unique across files."""
    paths = list(options.files) or [DATA / f"{builtin or suite}.jsonl"]
    items: list[Item] = []
    seen: set[str] = set()
    for path in paths:
        for item in read_items(path, required, suite=suite):
            if item["id"] in seen:
                raise EvalError(f"{path}: id {item['id']!r} is also in another file; ids must "
                                f"be unique across the files of a run")
            seen.add(item["id"])
            items.append(item)
    return items


def take_evenly(items: Sequence[T], limit: int | None,
                group: Callable[[T], str | tuple[str, ...]]) -> list[T]:
    """At most ``limit`` items, taken round-robin over the groups (in the order groups first
    appear), each group in file order: ``limit=3`` over (en, fr, de, ...) takes the first
    item of each of the first three languages. A tuple key nests the round-robin: with
    ``(harmful?, category)`` a limit of 4 takes 2 harmful and 2 safe items, each pair from two
    categories. The result keeps the file order, so the same limit always picks the same
    items."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        raise EvalError(f"limit {limit} is not positive; give --limit 1 or more")
    tree: dict[str, Any] = {}
    for index, item in enumerate(items):
        key = group(item)
        path = (key,) if isinstance(key, str) else tuple(key)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(path[-1], []).append(index)
    order = _round_robin(tree)
    return [items[i] for i in sorted(next(order) for _ in range(limit))]


def _round_robin(node: dict[str, Any] | list[int]) -> Iterator[int]:
    if isinstance(node, list):
        yield from node
        return
    children = [_round_robin(child) for child in node.values()]
    while children:
        alive = []
        for child in children:
            index = next(child, None)
            if index is not None:
                yield index
                alive.append(child)
        children = alive


def run_items(target: Target, fn: Callable[[T], R], items: Iterable[T], concurrency: int,
              progress: Progress | None = None, *, weight: Callable[[T], int] | None = None
              ) -> list[R]:
    """``[fn(item) for item in items]`` with ``concurrency`` requests in flight (the target's
    own ``map`` where it has one: `ApiTarget.map`), results in order; ``progress`` advances by
    ``weight(item)`` (default 1) as each item finishes."""
    lock = threading.Lock()

    def one(item: T) -> R:
        result = fn(item)
        if progress is not None:
            with lock:
                progress(weight(item) if weight else 1)
        return result

    items = list(items)
    mapper = getattr(target, "map", None)
    if callable(mapper):
        return list(mapper(one, items, concurrency))
    workers = max(1, min(concurrency, len(items)))
    if workers == 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-suite") as pool:
        return list(pool.map(one, items))


def worst(examples: Sequence[Example], n: int = WORST) -> list[Example]:
    """The ``n`` lowest-scoring examples (ties in file order) for the report."""
    order = sorted(range(len(examples)), key=lambda i: (examples[i].score, i))
    return [examples[i] for i in order[:n]]


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL | re.IGNORECASE)


def json_of(text: str) -> Any:
    """The JSON value of an answer (a fenced ```json block accepted), or None."""
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text.strip()
    try:
        return json.loads(body)
    except ValueError:
        return None


def clip(text: str, n: int = 600) -> str:
    """An answer shortened for the report (the full text is not needed to see the failure)."""
    return text if len(text) <= n else text[: n - 1] + "…"
