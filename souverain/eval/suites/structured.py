"""The structured-output suite: JSON answers that parse and match their schema, and tool calls
that name the right function with the right arguments.

The set (data/suites/structured.jsonl, written for souverain):
- 12 JSON tasks (``kind``: ``json_schema`` sends ``response_format = {"type": "json_schema",
  "json_schema": {"name", "schema", "strict": true}}``; ``json_object`` sends ``{"type":
  "json_object"}`` with the wanted keys described in the prompt). Each has a ``schema``: the
  answer is valid JSON (``json_valid_rate``: an object, a ```json fence accepted) and valid
  against the schema (``schema_valid_rate``, checked with `jsonschema`, Draft 2020-12);
- 12 tool tasks (``kind``: ``tool``): ``tools`` (La Plateforme's function tools),
  ``tool_choice`` (auto | any) and the ``expected`` call ``{"name", "arguments"}``.

``tool_call_accuracy``, per task: 0 when the answer makes no call or the first call names
another function; 0.5 for the right function plus 0.5 x the share of expected arguments whose
value matches (strings compared case-insensitively with spaces collapsed and a final period
dropped, numbers numerically: "250" = 250.0; extra arguments the expectation does not name are
not penalised); arguments that are not a JSON object get no argument credit.
"""

from __future__ import annotations

import json
import time
from typing import Any

from souverain.eval import EvalError
from souverain.eval.metrics import metric_of
from souverain.eval.suite import (
    ChatAnswer,
    Example,
    Metric,
    Progress,
    SuiteOptions,
    SuiteResult,
    Target,
)
from souverain.eval.suites.dataset import (
    Item,
    clip,
    json_of,
    load_items,
    run_items,
    take_evenly,
    worst,
)

MAX_TOKENS = 200
KINDS = ("json_schema", "json_object", "tool")


def _normal(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = " ".join(value.split()).casefold().rstrip(".")
        try:
            return float(text)
        except ValueError:
            return text
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def same_value(got: Any, want: Any) -> bool:
    a, b = _normal(got), _normal(want)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return bool(a == b)


def tool_score(calls: list[dict[str, Any]], expected: dict[str, Any]) -> float:
    """The partial-credit score of an answer's tool calls (see the module docstring)."""
    if not calls or calls[0].get("name") != expected["name"]:
        return 0.0
    want = expected.get("arguments") or {}
    if not want:
        return 1.0
    got = calls[0].get("arguments")
    if not isinstance(got, dict):
        return 0.5
    matched = sum(1 for k, v in want.items() if k in got and same_value(got[k], v))
    return 0.5 + 0.5 * matched / len(want)


def json_scores(text: str, schema: dict[str, Any]) -> tuple[bool, bool, str]:
    """(valid JSON object, valid against ``schema``, why not)."""
    import jsonschema

    value = json_of(text)
    if not isinstance(value, dict):
        return False, False, "not a JSON object"
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        return True, False, f"schema: {error.message}"
    return True, True, ""


def response_format(item: Item) -> dict[str, Any]:
    if item["kind"] == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": "answer", "schema": item["schema"], "strict": True}}
    return {"type": "json_object"}


def _check(item: Item) -> None:
    kind = item.get("kind")
    if kind not in KINDS:
        raise EvalError(f"structured item {item['id']!r}: kind must be one of "
                        f"{', '.join(KINDS)}")
    if kind == "tool":
        expected = item.get("expected")
        if not isinstance(item.get("tools"), list) or not isinstance(expected, dict) \
                or "name" not in expected:
            raise EvalError(f"structured item {item['id']!r} (tool) needs tools (a list) and "
                            f"expected {{name, arguments}}")
        return
    if not isinstance(item.get("schema"), dict):
        raise EvalError(f"structured item {item['id']!r} ({kind}) needs a JSON schema object")
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(item["schema"])
    except jsonschema.exceptions.SchemaError as exc:
        raise EvalError(f"structured item {item['id']!r}: its schema is invalid "
                        f"({exc.message})") from None


class StructuredSuite:
    """JSON validity, schema validity and tool-call accuracy."""

    name = "structured"
    description = "JSON validity and schema validity of JSON answers; tool-call accuracy"

    def items(self, options: SuiteOptions) -> list[Item]:
        items = load_items(self.name, options, ("kind", "prompt"))
        for item in items:
            _check(item)
        return take_evenly(items, options.limit,
                           lambda i: "tool" if i["kind"] == "tool" else "json")

    def size(self, options: SuiteOptions) -> int:
        return len(self.items(options))

    def run(self, target: Target, options: SuiteOptions,
            progress: Progress | None = None) -> SuiteResult:
        start = time.perf_counter()
        items = self.items(options)

        def ask(item: Item) -> ChatAnswer:
            messages = [{"role": "user", "content": item["prompt"]}]
            if item["kind"] == "tool":
                return target.chat(messages, max_tokens=MAX_TOKENS, temperature=0.0,
                                   tools=item["tools"], tool_choice=item.get("tool_choice"))
            return target.chat(messages, max_tokens=MAX_TOKENS, temperature=0.0,
                               response_format=response_format(item))

        answers = run_items(target, ask, items, options.concurrency, progress)
        scored = [score(item, answer) for item, answer in zip(items, answers)]
        result = SuiteResult(self.name, target.model, metrics(scored),
                             worst([s["example"] for s in scored], 20),
                             settings={"max_tokens": MAX_TOKENS, "temperature": 0.0,
                                       "items": len(items)})
        result.notes.append("schemas checked with jsonschema (Draft 2020-12); tool calls: "
                            "0.5 for the function + 0.5 x the share of matching arguments")
        result.duration_s = time.perf_counter() - start
        return result


def score(item: Item, answer: ChatAnswer) -> dict[str, Any]:
    if item["kind"] == "tool":
        value = tool_score(answer.tool_calls, item["expected"])
        shown = (json.dumps(answer.tool_calls, ensure_ascii=False) if answer.tool_calls
                 else answer.text)
        return {"id": item["id"], "tool": value, "example": Example(
            item["id"], item["prompt"], clip(shown), value,
            expected=json.dumps(item["expected"], ensure_ascii=False),
            detail={"kind": "tool", "tool_choice": item.get("tool_choice"),
                    "finish_reason": answer.finish_reason})}
    valid, schema_ok, why = json_scores(answer.text, item["schema"])
    return {"id": item["id"], "valid": valid, "schema": schema_ok, "example": Example(
        item["id"], item["prompt"], clip(answer.text), (valid + schema_ok) / 2,
        expected=f"JSON valid against {json.dumps(item['schema'])[:300]}",
        detail={"kind": item["kind"], "why": why, "finish_reason": answer.finish_reason})}


def metrics(scored: list[dict[str, Any]]) -> dict[str, Metric]:
    json_rows = [s for s in scored if "valid" in s]
    return {
        "json_valid_rate": metric_of(
            "json_valid_rate", {s["id"]: float(s["valid"]) for s in json_rows},
            description="JSON tasks answered with a JSON object"),
        "schema_valid_rate": metric_of(
            "schema_valid_rate", {s["id"]: float(s["schema"]) for s in json_rows},
            description="JSON tasks answered with an object valid against the schema"),
        "tool_call_accuracy": metric_of(
            "tool_call_accuracy", {s["id"]: s["tool"] for s in scored if "tool" in s},
            description="tool tasks: right function (0.5) + share of right arguments (0.5)"),
    }
