"""La Plateforme's Files and Fine-tuning jobs APIs over a `JobStore`: request bodies, the
checks of an upload and of a new job, and the JSON shapes of files and jobs (La Plateforme's
OpenAPI spec; ``client.files`` of the mistralai SDK). Its routes are
`souverain.server.routers.files`.

The server only records: a job is QUEUED here and a separate worker process
(`souverain.finetune.worker`) validates and trains it, so a long run never slows serving. A
fine-tune upload is checked at once, line by line with the worker's own JSONL rules
(`souverain.finetune.jsonl`): empty, a line over the per-line limit, not UTF-8, not strict JSON
(NaN, Infinity, too deep), not a JSON object, an unknown sample shape -> 400 naming the line;
the full check (roles, order, lengths, with the base model's tokenizer) is the job's VALIDATING
step, whose errors name file and line.
"""

from __future__ import annotations

import io
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from souverain.finetune import classifier_data, jsonl
from souverain.finetune.jsonl import DEFAULT_MAX_LINE_BYTES
from souverain.finetune.store import (
    CANCELLED,
    FAILED,
    FAILED_VALIDATION,
    Busy,
    Conflict,
    FileRecord,
    JobRecord,
    JobsError,
    JobStore,
    NotFound,
)
from souverain.server.errors import APIError

_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingFile(_Body):
    file_id: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)


class Hyperparameters(_Body):
    """La Plateforme's completion training parameters (+ ``lora_rank``)."""

    training_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    weight_decay: float | None = Field(default=0.1, ge=0, le=10)
    warmup_fraction: float | None = Field(default=0.05, ge=0, lt=1)
    epochs: float | None = Field(default=None, gt=0, le=1000)
    seq_len: int | None = Field(default=None, ge=16, le=1_048_576)
    fim_ratio: float | None = Field(default=None, ge=0, le=1, description=(
        "Accepted for compatibility; FIM training is not done here (must be null or 0)."))
    lora_rank: int | None = Field(default=None, ge=1, le=1024, description=(
        "LoRA rank (souverain extension; default 16)."))


class ClassifierTargetIn(_Body):
    """One target of a classifier job (La Plateforme's ClassifierTargetIn)."""

    name: str = Field(min_length=1, max_length=200)
    labels: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=1000)
    weight: float = Field(default=1.0, gt=0, le=1000)
    loss_function: Literal["single_class", "multi_class"] | None = None


# the built-in `souverain eval` suites (souverain.eval.suites.SUITES: the server layer may not
# import it, tests/test_release_gate.py checks the two agree)
EVAL_SUITES = ("quality", "safety", "bias", "multilingual", "structured", "grounding")


class EvalThreshold(_Body):
    """One bound of a release policy: ``min`` / ``max`` on the candidate's value,
    ``max_regression``: how much worse than the base model (in the metric's bad direction)."""

    suite: str = Field(min_length=1)
    metric: str = Field(min_length=1, max_length=200)
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    max_regression: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class EvalPolicy(_Body):
    """A fine-tuning job's ``evaluation`` (souverain extension): the suites the release gate
    runs (``limit`` items each) and the thresholds its ``ft:`` model must meet to be served;
    the document `souverain.eval.policy.Policy.parse` reads."""

    suites: list[str] = Field(min_length=1, max_length=len(EVAL_SUITES))
    limit: int | None = Field(default=None, ge=1, le=100_000)
    thresholds: list[EvalThreshold] = Field(default_factory=list, max_length=200)


def check_policy(doc: Any) -> dict[str, Any]:
    """The checked ``evaluation`` document of a job (as stored), or a 400 naming the field."""
    from pydantic import ValidationError

    try:
        policy = EvalPolicy.model_validate(doc)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in ("evaluation", *e["loc"]))
        raise APIError(400, f"{where}: {e['msg']}; an evaluation policy is {{\"suites\": "
                            "[\"safety\"], \"limit\": 40, \"thresholds\": [{\"suite\": "
                            "\"safety\", \"metric\": \"over_refusal_rate\", \"max\": 0.2}]}.",
                       param=where) from None
    for i, name in enumerate(policy.suites):
        if name not in EVAL_SUITES:
            raise APIError(400, f"evaluation.suites.{i}: unknown suite {name!r}; use "
                                f"{', '.join(EVAL_SUITES)}.", param=f"evaluation.suites.{i}")
    if len(set(policy.suites)) != len(policy.suites):
        raise APIError(400, "evaluation.suites names a suite twice; name each once.",
                       param="evaluation.suites")
    for i, t in enumerate(policy.thresholds):
        where = f"evaluation.thresholds.{i}"
        if t.suite not in policy.suites:
            raise APIError(400, f"{where}.suite: {t.suite!r} is not among evaluation.suites "
                                f"({', '.join(policy.suites)}); add it there or fix the name.",
                           param=f"{where}.suite")
        if t.min is None and t.max is None and t.max_regression is None:
            raise APIError(400, f"{where} bounds nothing; give min, max or max_regression.",
                           param=where)
        if t.min is not None and t.max is not None and t.min > t.max:
            raise APIError(400, f"{where}: min {t.min} is above max {t.max}.", param=where)
    return policy.model_dump(exclude_none=True)


def evaluation_json(j: JobRecord) -> dict[str, Any] | None:
    """The job's release gate (souverain extension; None without a policy)."""
    if j.evaluation is None:
        return None
    run = j.evaluation_run_id
    status, reasons = j.evaluation_status or "pending", list(j.evaluation_reasons or [])
    if status == "pending" and j.status in (FAILED, FAILED_VALIDATION, CANCELLED):
        # no model was made: the gate will never run (not "pending" forever)
        status, reasons = "skipped", [f"the job ended {j.status}: there is no model to "
                                      "evaluate"]
    return {"policy": j.evaluation, "status": status, "reasons": reasons, "run_id": run,
            "report_url": f"/v1/observability/evaluation-runs_v2/{run}/report" if run else None}


class JobCreate(_Body):
    model: str = Field(min_length=1)
    training_files: list[TrainingFile | Annotated[str, Field(min_length=1)]] = Field(
        min_length=1)
    validation_files: list[Annotated[str, Field(min_length=1)]] | None = None
    suffix: str | None = Field(default=None, max_length=40)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    auto_start: bool = True
    integrations: list[dict[str, Any]] | None = None
    repositories: list[dict[str, Any]] | None = None
    job_type: Literal["completion", "classifier"] | None = None
    invalid_sample_skip_percentage: float | None = Field(default=0, ge=0, le=0.5)
    classifier_targets: list[ClassifierTargetIn] | None = None
    evaluation: dict[str, Any] | None = Field(default=None, description=(
        "souverain: the release gate's policy {suites, limit, thresholds}: the fine-tuned "
        "model is served only once an evaluation against its base model meets it."))


def file_json(f: FileRecord, *, deleted: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at),
        "filename": f.filename, "purpose": f.purpose, "sample_type": f.sample_type,
        "source": "upload", "num_lines": f.num_lines, "mimetype": f.mimetype,
        "signature": f.sha256, "expires_at": None, "visibility": "workspace"}
    if deleted is not None:
        body["deleted"] = deleted
    return body


def job_json(j: JobRecord, store: JobStore | None = None) -> dict[str, Any]:
    """A job as La Plateforme's (Completion)JobOut; with ``store``, DetailedJobOut (events and
    checkpoints). ``error`` is an extension: why a job FAILED / FAILED_VALIDATION."""
    hp = j.hyperparameters
    body: dict[str, Any] = {
        "id": j.id, "object": "job", "job_type": j.job_type or "completion",
        "auto_start": j.auto_start,
        "model": j.model, "status": j.status, "created_at": int(j.created_at),
        "modified_at": int(j.modified_at),
        "training_files": j.training_file_ids, "validation_files": list(j.validation_files),
        "fine_tuned_model": j.fine_tuned_model, "suffix": j.suffix, "integrations": [],
        "repositories": [], "trained_tokens": j.trained_tokens,
        "hyperparameters": {"training_steps": hp.get("training_steps"),
                            "learning_rate": hp.get("learning_rate", 1e-4),
                            "weight_decay": hp.get("weight_decay", 0.1),
                            "warmup_fraction": hp.get("warmup_fraction", 0.05),
                            "epochs": hp.get("epochs"), "seq_len": hp.get("seq_len"),
                            "fim_ratio": hp.get("fim_ratio"),
                            "lora_rank": hp.get("lora_rank")},
        "metadata": {"expected_duration_seconds": None, "cost": 0.0, "cost_currency": None,
                     "train_tokens_per_step": None, "train_tokens": j.trained_tokens,
                     "data_tokens": None, "estimated_start_time": None},
        "error": j.error,
        "evaluation": evaluation_json(j),
    }
    if j.is_classifier:  # ClassifierJobOut: its targets, no FIM
        del body["hyperparameters"]["fim_ratio"]
        body["classifier_targets"] = [
            {"name": t["name"], "labels": t["labels"], "weight": t.get("weight", 1.0),
             "loss_function": t.get("loss_function") or "single_class"}
            for t in j.classifier_targets or []]
    if store is not None:
        events = store.events(j.id)
        for e in events:
            if e.name == "status-updated" and "data_tokens" in e.data:
                body["metadata"]["data_tokens"] = e.data["data_tokens"]
        body["events"] = [{"name": e.name, "data": e.data, "created_at": int(e.created_at)}
                          for e in events]
        body["checkpoints"] = [
            {"metrics": {"train_loss": c.metrics.get("train_loss"),
                         "valid_loss": c.metrics.get("valid_loss"),
                         "valid_mean_token_accuracy": c.metrics.get(
                             "valid_mean_token_accuracy")},
             "step_number": c.step, "created_at": int(c.created_at)}
            for c in store.checkpoints(j.id)]
    return body


def check_upload(data: bytes, name: str, purpose: str, *,
                 max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES) -> tuple[str | None, int]:
    """``(sample_type, num_lines)`` of an upload, or a 400 naming the first bad line.

    Total: any bytes give a result or an `APIError` (lines read one at a time with the rules
    of `souverain.finetune.jsonl`, the ones the worker's validation uses)."""
    kinds: dict[str, int] = {}
    n = 0
    try:
        for i, row in jsonl.lines(io.BytesIO(data), max_line_bytes):
            if jsonl.is_blank(row):
                continue
            n += 1
            obj = jsonl.parse(row, i)
            if not isinstance(obj, dict):
                raise jsonl.JSONLError(i, f"holds a JSON {_json_type(obj)}, not an object; "
                                          "write one JSON object per line")
            if purpose != "fine-tune":
                continue
            kind = _kind(obj)
            if kind is None:
                raise APIError(400, f"{name} line {i} is no training sample (keys "
                                    f"{_keys(obj)}); write {{\"messages\": [...]}} "
                                    "(instruct), {\"text\": ...} (pretrain), {\"prompt\", "
                                    "\"chosen\", \"rejected\"} (preference) or {\"text\" or "
                                    "\"messages\", \"labels\": {...}} (classifier).",
                               param="file", code="invalid_sample")
            if kind == "classifier":
                try:
                    classifier_data.parse_example(obj, i)
                except ValueError as exc:
                    raise APIError(400, f"{name} line {i} {exc}.", param="file",
                                   code="invalid_sample") from None
            for other, line in kinds.items():
                if other != kind:
                    raise APIError(400, f"{name} line {i} is a {kind} sample but line {line} "
                                        f"is a {other} sample; put each kind in its own file.",
                                   param="file", code="mixed_samples")
            kinds.setdefault(kind, i)
    except jsonl.JSONLError as exc:
        code = "line_too_long" if "longer than the limit" in exc.reason else "invalid_jsonl"
        hint = ", or raise the server's --max-jsonl-line-kib" if code == "line_too_long" else ""
        raise APIError(400, f"{name} line {exc.line} {exc.reason}{hint}.", param="file",
                       code=code) from None
    if n == 0:
        raise APIError(400, f"{name} is empty (no line holds a JSON object); a {purpose} file "
                            "holds one JSON object per line, lines separated by \\n.",
                       param="file", code="empty_file")
    if purpose == "batch":
        return "batch_request", n
    return min(kinds, key=kinds.__getitem__), n


def _json_type(obj: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


def _keys(obj: dict[str, Any]) -> str:
    """The first keys of an object, each short and ASCII (safe in any error body)."""
    shown = [json.dumps(k)[:24] for k in sorted(obj)[:5]]
    return "[" + ", ".join(shown) + (", ..." if len(obj) > 5 else "") + "]"


def _kind(obj: dict[str, Any]) -> str | None:
    if classifier_data.is_classifier_sample(obj):
        return "classifier"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "instruct"
    if "text" in obj:
        return "pretrain"
    return None


def jobs_api_error(exc: JobsError) -> APIError:
    """The HTTP error of a store error: 404 (no such file or job), 409 (wrong status), 503
    (the database busy: retry), 400."""
    if isinstance(exc, Busy):
        return APIError(503, str(exc), code="database_busy", headers={"Retry-After": "2"})
    if isinstance(exc, NotFound):
        return APIError(404, str(exc), code="not_found")
    if isinstance(exc, Conflict):
        return APIError(409, str(exc), code="conflict")
    return APIError(400, str(exc))


def check_job(body: JobCreate) -> list[TrainingFile]:
    """A 400 for what a job may not ask here; its training files with their weights."""
    if body.classifier_targets is not None and body.job_type != "classifier":
        raise APIError(400, "classifier_targets is for classifier jobs; add "
                            "job_type: \"classifier\" or remove the field.",
                       param="classifier_targets")
    if body.classifier_targets:
        targets = [classifier_data.Target(t.name, list(dict.fromkeys(t.labels)),
                                          t.loss_function or "single_class", t.weight)
                   for t in body.classifier_targets]
        problem = classifier_data.check_targets(targets)
        if problem:
            raise APIError(400, f"classifier_targets: {problem}.", param="classifier_targets")
    if body.evaluation is not None and body.job_type == "classifier":
        raise APIError(400, "evaluation is for completion jobs (a chat model's adapter); "
                            "remove it from a classifier job.", param="evaluation")
    for field in ("integrations", "repositories"):
        if getattr(body, field):
            raise APIError(400, f"{field} are not supported here: training runs on this "
                                "machine and nothing is sent elsewhere; remove the field.",
                           param=field)
    hp = body.hyperparameters
    if hp.training_steps is not None and hp.epochs is not None:
        raise APIError(400, "hyperparameters sets both training_steps and epochs; give "
                            "one of them.", param="hyperparameters")
    if hp.fim_ratio and body.job_type == "classifier":
        raise APIError(400, "hyperparameters.fim_ratio is for completion jobs; a classifier "
                            "job has none.", param="hyperparameters.fim_ratio")
    if hp.fim_ratio:
        raise APIError(400, "hyperparameters.fim_ratio: FIM training is not supported "
                            "here; leave it out or set 0.", param="hyperparameters.fim_ratio")
    if body.invalid_sample_skip_percentage:
        raise APIError(400, "invalid_sample_skip_percentage must be 0 here: every line "
                            "is checked and any invalid one fails the job with its line "
                            "number.", param="invalid_sample_skip_percentage")
    if body.suffix is not None and not _SUFFIX.match(body.suffix):
        raise APIError(400, f"suffix {body.suffix!r} may hold only letters, digits, '.', "
                            "'_' and '-' (at most 40, no ':').", param="suffix")
    files = [f if isinstance(f, TrainingFile) else TrainingFile(file_id=f)
             for f in body.training_files]
    if len({f.weight for f in files}) > 1:
        raise APIError(400, "training_files with different weights are not supported "
                            "here yet; give every file the same weight (or repeat a file "
                            "to weigh it more).", param="training_files")
    return files


def check_job_files(store: JobStore, body: JobCreate, file_ids: list[str]) -> None:
    """A 400 when a file's samples do not fit the job type (classifier samples for a
    classifier job, and only for one); a 404 for a missing file (as the store says)."""
    classifier = body.job_type == "classifier"
    for fid in file_ids:
        try:
            f = store.get_file(fid)
        except NotFound:
            continue  # the store names it (404)
        if classifier and f.sample_type != "classifier" and f.purpose == "fine-tune":
            raise APIError(400, f"File {fid} ({f.filename}) holds {f.sample_type} samples; a "
                                "classifier job trains on lines {\"text\" (or \"messages\"), "
                                "\"labels\": {...}}.", param="training_files")
        if not classifier and f.sample_type == "classifier":
            raise APIError(400, f"File {fid} ({f.filename}) holds classifier samples; create "
                                "the job with job_type: \"classifier\".", param="job_type")


def classifier_targets(body: JobCreate) -> list[dict[str, Any]] | None:
    """The targets a classifier job declares (None: taken from its files at validation)."""
    if not body.classifier_targets:
        return None
    return [{"name": t.name, "labels": list(dict.fromkeys(t.labels)),
             "weight": t.weight, "loss_function": t.loss_function}  # None: from the data
            for t in body.classifier_targets]
