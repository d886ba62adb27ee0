"""Classifier training data (La Plateforme's ``job_type: "classifier"``), read and checked.

One JSON object per line, with the labels of one or more *targets*::

    {"text": "the service was slow", "labels": {"sentiment": "negative"}}
    {"text": "...", "labels": {"topics": ["billing", "delivery"]}}      # multi-label target
    {"messages": [{"role": "user", "content": "..."}], "labels": {...}}  # a conversation

A target whose labels are lists in any line is multi-label (``loss_function: "multi_class"``,
one sigmoid per label); otherwise single-label (``"single_class"``, one softmax). A line may
leave a target out (it then trains only the others). The targets are those the job declares
(``classifier_targets``: name, labels, weight, loss_function) or, without them, those the
training files use, labels sorted. Lines are read with `souverain.finetune.jsonl`'s rules, the
same as instruct data; every problem names its line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from souverain.finetune import jsonl
from souverain.finetune.data import DataReport, LineError, Stopped

SINGLE, MULTI = "single_class", "multi_class"
MAX_LABELS = 1000


@dataclass
class Target:
    """One classification target: its labels (the head's outputs, in this order)."""

    name: str
    labels: list[str]
    loss_function: str = SINGLE  # single_class (softmax) | multi_class (sigmoid per label)
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        return cls(name=str(d["name"]), labels=[str(x) for x in d["labels"]],
                   loss_function=str(d.get("loss_function") or SINGLE),
                   weight=float(d.get("weight", 1.0)))


@dataclass
class Example:
    """One line: the text the model reads and, per target, the labels it gives."""

    line: int
    text: str
    labels: dict[str, list[str]] = field(default_factory=dict)
    multi: set[str] = field(default_factory=set)  # targets given as a list on this line


def render_chat(messages: list[dict[str, Any]]) -> str:
    """A conversation as the text a classifier reads: one ``role: content`` line per message
    (training and ``/v1/chat/classifications`` use the same rendering)."""
    return "\n".join(f"{m.get('role', 'user')}: {_content_text(m.get('content'))}"
                     for m in messages)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # chunks: keep the text ones
        return " ".join(str(c.get("text", "")) for c in content
                        if isinstance(c, dict) and c.get("type", "text") == "text")
    return "" if content is None else str(content)


def is_classifier_sample(obj: dict[str, Any]) -> bool:
    return "labels" in obj


def parse_example(obj: Any, line: int) -> Example:
    """A line's example, or a `ValueError` saying (without the line number) what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("is not a JSON object; write {\"text\": ..., \"labels\": {...}}")
    unknown = sorted(set(obj) - {"text", "messages", "labels"})
    if unknown:
        raise ValueError(f"has unknown key(s) {unknown[:3]}; a classifier sample holds "
                         "\"text\" (or \"messages\") and \"labels\"")
    if ("text" in obj) == ("messages" in obj):
        raise ValueError("needs exactly one of \"text\" or \"messages\"")
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("\"text\" must be a non-empty string")
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool")
                for m in msgs):
            raise ValueError("\"messages\" must be a non-empty list of {\"role\": "
                             "system|user|assistant|tool, \"content\": ...} objects")
        text = render_chat(msgs)
    labels = obj.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError("needs \"labels\": an object {target name: label or [labels]}")
    out: dict[str, list[str]] = {}
    multi: set[str] = set()
    for name, value in labels.items():
        if not name.strip():
            raise ValueError("has a target with an empty name in \"labels\"")
        if isinstance(value, str) and value.strip():
            out[name] = [value]
        elif isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
            out[name] = list(dict.fromkeys(value))
            multi.add(name)
        else:
            raise ValueError(f"labels.{name} must be a non-empty string, or a list of "
                             "non-empty strings (multi-label)")
    return Example(line, text, out, multi)


def read_examples(path: str | os.PathLike[str], *, max_line_bytes: int | None = None,
                  should_stop: Callable[[], bool] | None = None
                  ) -> Iterator[Example | LineError]:
    """The example, or the error, of every non-blank line; raises `Stopped` when
    ``should_stop()`` turns true."""
    with open(path, "rb") as f:
        try:
            for i, row in jsonl.lines(f, max_line_bytes):
                if should_stop is not None and should_stop():
                    raise Stopped()
                if jsonl.is_blank(row):
                    continue
                try:
                    ex = parse_example(jsonl.parse(row, i), i)
                except jsonl.JSONLError as exc:
                    yield LineError(i, exc.reason)
                    continue
                except ValueError as exc:
                    yield LineError(i, str(exc))
                    continue
                yield ex
        except jsonl.JSONLError as exc:  # a line over the limit ends the reading
            yield LineError(exc.line, exc.reason)


def infer_targets(paths: list[str], should_stop: Callable[[], bool] | None = None
                  ) -> list[Target]:
    """The targets the files use: labels sorted, multi-label where any line gives a list."""
    labels: dict[str, set[str]] = {}
    multi: set[str] = set()
    for p in paths:
        for ex in read_examples(p, should_stop=should_stop):
            if isinstance(ex, LineError):
                continue
            multi |= ex.multi
            for name, ls in ex.labels.items():
                labels.setdefault(name, set()).update(ls)
    return [Target(n, sorted(ls), MULTI if n in multi else SINGLE)
            for n, ls in sorted(labels.items())]


def check_targets(targets: list[Target]) -> str | None:
    """What is wrong with declared targets (one sentence), or None."""
    if not targets:
        return "no classification target: the files' lines need \"labels\""
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            return f"target {t.name!r} is declared twice"
        seen.add(t.name)
        if t.loss_function == SINGLE and len(t.labels) < 2:
            return (f"target {t.name!r} has {len(t.labels)} label(s) ({t.labels}); a "
                    "single-label target needs at least 2")
        if not t.labels:
            return f"target {t.name!r} has no label"
        if len(t.labels) > MAX_LABELS:
            return f"target {t.name!r} has more than {MAX_LABELS} labels"
        if t.loss_function not in (SINGLE, MULTI):
            return f"target {t.name!r}: loss_function must be single_class or multi_class"
    return None


def validate_classifier_file(path: str | os.PathLike[str], targets: list[Target], *,
                             count_tokens: Callable[[list[str]], list[int]] | None = None,
                             max_tokens: int | None = None,
                             should_stop: Callable[[], bool] | None = None) -> DataReport:
    """Every problem of one classifier file against ``targets`` (unknown target or label, a
    list for a single-label target, a text over ``max_tokens``), each with its line."""
    by_name = {t.name: t for t in targets}
    errors: list[LineError] = []
    n, tokens = 0, 0
    for ex in read_examples(path, should_stop=should_stop):
        if isinstance(ex, LineError):
            errors.append(ex)
            continue
        n += 1
        for name, ls in ex.labels.items():
            t = by_name.get(name)
            if t is None:
                errors.append(LineError(ex.line, f"labels.{name}: no such target (the job's "
                                                 f"targets: {sorted(by_name)})"))
                continue
            if name in ex.multi and t.loss_function == SINGLE and len(ls) != 1:
                errors.append(LineError(ex.line, f"labels.{name} lists {len(ls)} labels but "
                                                 f"target {name!r} is single-label; give one"))
            bad = [x for x in ls if x not in t.labels]
            if bad:
                errors.append(LineError(ex.line, f"labels.{name}: unknown label {bad[0]!r} "
                                                 f"(target {name!r} has {t.labels[:10]})"))
        if count_tokens is not None and max_tokens is not None:
            k = count_tokens([ex.text])[0]
            tokens += k
            if k > max_tokens:
                errors.append(LineError(ex.line, f"is {k} tokens long but the base model "
                                                 f"reads at most {max_tokens}; shorten it"))
    return DataReport(path=str(path), kind=None, n_samples=n, n_tokens=tokens, errors=errors)
