"""`souverain serve`: La Plateforme's HTTP API on this machine, in named steps: flags ->
served models and `ServerConfig`, the model registry (loaded now with progress bars unless
--lazy), the FastAPI app, uvicorn. The engine, FastAPI and uvicorn are imported inside the
command.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from souverain.cli.common import (
    DtypeOpt,
    KvOpt,
    ModelArg,
    QuantOpt,
    SpecTokensOpt,
    SpeculativeOpt,
    TensorParallelOpt,
    ThreadsOpt,
    err,
    loading_bar,
    user_errors,
)
from souverain.errors import SouverainError

if TYPE_CHECKING:
    from souverain.audit import AuditLog
    from souverain.engine.config import EngineConfig
    from souverain.paths import DataDirLock
    from souverain.server.app import ServerConfig
    from souverain.server.registry import ModelRegistry, ServedModel

MiB = 1 << 20

# the flags of `serve` alone (the model and engine flags are shared, in souverain.cli.common)
NameOpt = typer.Option(
    None, "--name", help="Model id clients send (default: the alias, file stem or folder "
                         "name), e.g. mistral-small-latest.")
MoreModelsOpt = typer.Option(
    [], "--model", "-m", help="Serve another model too: NAME=PATH (repeatable).")
LoraModulesOpt = typer.Option(
    [], "--lora-modules",
    help="Serve a LoRA adapter on a served model: NAME=ADAPTER_DIR[@BASE] (repeatable; BASE "
         "defaults to the first model). ADAPTER_DIR is a fine-tuning run's checkpoint "
         "folder (lora.safetensors) or a PEFT adapter; NAME is listed in /v1/models.")
HostOpt = typer.Option("127.0.0.1", "--host", help="Address to listen on.")
PortOpt = typer.Option(8000, "--port", "-p", min=1, max=65535, help="Port.")
ApiKeysFileOpt = typer.Option(
    None, "--api-keys-file", help="Keys file made by `souverain keys add` (hashes only). "
                                  "Without it only clients on this machine are answered.")
InsecureNoAuthOpt = typer.Option(
    False, "--insecure-no-auth", help="Answer any client without a key (trusted networks "
                                      "only).")
LazyOpt = typer.Option(False, "--lazy/--eager",
                       help="Load models on their first request, or all at start-up.")
MemoryBudgetOpt = typer.Option(
    None, "--memory-budget-gib", min=0.01,
    help="Most memory all loaded models (weights + KV) may hold; idle models are unloaded "
         "to make room for a lazy one.")
MaxPendingOpt = typer.Option(256, "--max-pending", min=1,
                             help="Requests running or queued at once; more get 429.")
MaxRequestOpt = typer.Option(4.0, "--max-request-mib", min=0.001,
                             help="Largest request body accepted (413 above).")
MaxUploadOpt = typer.Option(
    100.0, "--max-upload-mib", min=0.001,
    help="Largest document upload to a library (413 above).")
DataDirOpt = typer.Option(
    None, "--data-dir", help="Where document libraries, fine-tuning files and runs (and the "
                             "audit log) are kept; one server per folder (default: "
                             "$SOUVERAIN_HOME or ~/.local/share/souverain).")
LibrariesOpt = typer.Option(
    True, "--libraries/--no-libraries",
    help="Serve the Libraries API and the document_library chat tool.")
LibrariesDbOpt = typer.Option(
    None, "--libraries-db",
    help="Document libraries' metadata database: sqlite:///PATH (default: meta.sqlite in the "
         "libraries folder) or postgresql+psycopg://USER:PASS@HOST/DB (it may be the "
         "--jobs-db database: the tables do not clash). Servers that share one, and one "
         "--libraries-dir, share their libraries: a document uploaded through one is "
         "listed, searched and deleted through any.")
LibrariesDirOpt = typer.Option(
    None, "--libraries-dir",
    help="Where the libraries' document bytes and passage index live (default: "
         "DATA_DIR/libraries); for several servers, a folder on storage they all mount, "
         "with a PostgreSQL --libraries-db.")
FinetuneOpt = typer.Option(
    True, "--finetune/--no-finetune",
    help="Serve /v1/files and /v1/fine_tuning/jobs, with a training worker process "
         "started and stopped with the server.")
JobsDbOpt = typer.Option(
    None, "--jobs-db", help="Fine-tuning jobs database: sqlite:///PATH (default: "
                            "DATA_DIR/finetune/jobs.sqlite) or "
                            "postgresql+psycopg://USER:PASS@HOST/DB. Servers sharing one "
                            "(each with its own --data-dir) each run the jobs of the models "
                            "they serve.")
MaxFileOpt = typer.Option(
    512.0, "--max-file-mib", min=0.001, help="Largest POST /v1/files upload (413 above).")
MaxJsonlLineOpt = typer.Option(
    1024.0, "--max-jsonl-line-kib", min=1.0,
    help="Longest line of a POST /v1/files JSONL upload (400 naming the line above).")
FinetuneThreadsOpt = typer.Option(
    1, "--finetune-threads", min=0,
    help="CPU threads the training worker uses (0 = all cores; 1 leaves the rest to "
         "serving).")
BatchOpt = typer.Option(
    True, "--batch/--no-batch",
    help="Serve /v1/batch/jobs (with --finetune, which serves the files API) and run the "
         "batch jobs of the models served here, behind interactive requests.")
BatchConcurrencyOpt = typer.Option(
    4, "--batch-concurrency", min=1,
    help="Requests of a batch job in flight at once (more: faster batches, interactive "
         "requests share the engine with more batch lines).")
EmbedModelOpt = typer.Option(
    "souverain-embed", "--embed-model",
    help="Model of POST /v1/embeddings (served as souverain-embed, alias mistral-embed): "
         "the bundled all-MiniLM-L6-v2, a sentence-transformers folder, or none.")
ModerationModelOpt = typer.Option(
    None, "--moderation-model",
    help="The model behind /v1/moderations, /v1/chat/moderations and chat guardrails "
         "(mistral-moderation-latest): a served model's NAME, or a PATH/alias served too "
         "(Llama Guard 3 is read in its own format), or ft:... a classifier trained here "
         "whose targets or labels are named after the categories. Default: the first "
         "served model.")
WithdrawnFallbackOpt = typer.Option(
    False, "--withdrawn-fallback",
    help="Serve a withdrawn model's requests with its replacement (response header "
         "x-souverain-model-replaced: OLD -> NEW) instead of a 410 naming it; `souverain "
         "models withdraw ID --replacement NEW [--fallback/--no-fallback]` sets it per model.")
ConsoleOpt = typer.Option(
    True, "--console/--no-console",
    help="Serve the web console at / (playground, documents, fine-tuning, batches, models, "
         "health): a client of this API with the caller's key, no other host contacted.")
AuditOpt = typer.Option(
    True, "--audit/--no-audit",
    help="Append one JSON line per API call (time, key id, route, model, status, tokens, "
         "latency) to DATA_DIR/audit/audit-YYYY-MM-DD.jsonl.")
AuditLogOpt = typer.Option(
    None, "--audit-log", help="Write the audit log to this one file instead.")
AuditContentOpt = typer.Option(
    False, "--audit-content",
    help="Also log request bodies and generated text, with e-mails, phones, IBANs, card "
         "numbers, IP addresses and key-shaped secrets redacted.")
AuditRetentionOpt = typer.Option(
    0, "--audit-retention-days", min=0,
    help="Delete audit records older than this many days, at start and daily (default 0: "
         "kept until `souverain audit prune`: who called what and when is the audit trail, "
         "and deleting it is your decision; the CNIL recommends 6 to 12 months for access "
         "logs).")
AuditContentRetentionOpt = typer.Option(
    30, "--audit-content-retention-days", min=0,
    help="With --audit-content: the logged request and response texts (personal data, kept "
         "only as long as needed) are replaced by \"[EXPIRED <date>]\" after this many days; "
         "the record's metadata stays (0 keeps the texts).")
RateLimitRpmOpt = typer.Option(
    None, "--rate-limit-rpm", min=0.001, help="Requests per minute per API key (429).")
RateLimitTpmOpt = typer.Option(
    None, "--rate-limit-tpm", min=1, help="Tokens (prompt + completion) per minute per key.")
DefaultTemperatureOpt = typer.Option(
    0.7, "--default-temperature", min=0.0, help="Temperature when a request gives none.")
MaxModelLenOpt = typer.Option(
    None, "--max-model-len", min=16, help="Context served per sequence (default: the "
                                          "model's, bounded by the KV budget).")
MaxNumSeqsOpt = typer.Option(64, "--max-num-seqs", min=1,
                             help="Sequences decoded together in one batch.")
LogLevelOpt = typer.Option("info", "--log-level", help="debug, info, warning, error.")
ReplicasOpt = typer.Option(
    1, "--replicas", min=1,
    help="Serve the same API from N replicas on Ray Serve behind this one address: a local "
         "Ray instance, or the cluster of --ray-address. Requests sharing a prompt prefix go "
         "to the replica holding it in its cache; keys, jobs, libraries and rate limits are "
         "shared; /metrics shows every replica, labelled. A replica that dies is restarted.")
RayAddressOpt = typer.Option(
    None, "--ray-address",
    help="Run the replicas on this Ray cluster (auto, or HOST:6379 of `ray start --head`) "
         "instead of a local instance; share --data-dir storage and a PostgreSQL --jobs-db "
         "between its machines. With --tensor-parallel K and one replica: this server, its K "
         "ranks Ray actors on that cluster (local: a Ray instance on this machine).")
ReplicaCpusOpt = typer.Option(
    None, "--replica-cpus", min=0.0,
    help="CPUs Ray reserves for each replica (default: --threads, or this machine's cores "
         "divided among the replicas).")


class ReplicaHook:
    """How a replica of `--replicas` runs `serve`: with the data-folder lock it already holds,
    a say in the `ServerConfig` (the shared rate limiter), and the app handed back to it
    instead of run by uvicorn."""

    def __init__(self, lock: DataDirLock, configure: Callable[[ServerConfig], None]):
        self.lock = lock
        self.configure = configure
        self.app: Any = None


REPLICA_HOOK: ContextVar[ReplicaHook | None] = ContextVar("souverain_replica_hook", default=None)


def _default_name(model: str) -> str:
    p = Path(model)
    if not p.exists():
        return model  # an alias
    return p.stem if p.is_file() else p.name


def served_models(model: str, name: str | None, more_models: list[str],
                  engine_config: Callable[[], EngineConfig]) -> list[ServedModel]:
    """MODEL (as --name) then each --model NAME=PATH, each with its own engine config."""
    from souverain.server.registry import ServedModel

    served = [ServedModel(name or _default_name(model), model, engine_config())]
    for spec in more_models:
        n, sep, path = spec.partition("=")
        if not sep or not n or not path:
            raise typer.BadParameter(f"--model {spec!r} must be NAME=PATH")
        served.append(ServedModel(n, path, engine_config()))
    return served


def moderation_model_name(served: list[ServedModel], moderation_model: str | None,
                          engine_config: Callable[[], EngineConfig]) -> str | None:
    """--moderation-model as a served model's name: a NAME is taken as is; a PATH or alias is
    appended to ``served`` (under its default name) first."""
    from souverain.server.registry import ServedModel

    if moderation_model is None or any(m.name == moderation_model for m in served) \
            or moderation_model.startswith("ft:"):  # ft: a classifier trained here
        return moderation_model
    name = _default_name(moderation_model)
    if any(m.name == name for m in served):
        raise typer.BadParameter(f"--moderation-model {moderation_model!r} would be served as "
                                 f"{name!r}, a name already taken; serve it with --model "
                                 "NAME=PATH and pass that NAME.")
    served.append(ServedModel(name, moderation_model, engine_config()))
    return name


def _audit_log(on: bool, path: str | None, content: bool,
               data_dir: str | None, retention_days: int = 0,
               content_retention_days: int = 30) -> AuditLog | None:
    from souverain.audit import AuditLog
    from souverain.paths import audit_dir

    if not on:
        return None
    try:
        texts_days = content_retention_days if content else 0
        if path:
            return AuditLog(path=path, content=content, retention_days=retention_days,
                            content_retention_days=texts_days)
        return AuditLog(audit_dir(Path(data_dir).expanduser() if data_dir else None),
                        content=content, retention_days=retention_days,
                        content_retention_days=texts_days)
    except OSError as exc:
        raise SouverainError(f"Cannot open the audit log ({exc.strerror}: {exc.filename}); "
                             "give a writable --audit-log PATH or --data-dir, or --no-audit."
                             ) from None


def hold_data_dir(data_dir: str | None, host: str, port: int, *, libraries: bool,
                  finetune: bool, audit: bool) -> DataDirLock | None:
    """The data folder's `DataDirLock` when this server writes there (libraries, fine-tuning
    files and runs, the audit log); a second server on it fails here with one sentence."""
    from souverain.paths import DataDirInUse, DataDirLock

    if not (libraries or finetune or audit):
        return None
    root = Path(data_dir).expanduser() if data_dir else None
    try:
        return DataDirLock(root, url=f"http://{host}:{port}")
    except DataDirInUse as exc:
        raise SouverainError(str(exc)) from None
    except OSError as exc:
        raise SouverainError(f"Cannot write to the data folder ({exc.strerror}: "
                             f"{exc.filename}); give a writable --data-dir.") from None


def server_config(*, api_keys_file: str | None, insecure_no_auth: bool, max_pending: int,
                  max_request_mib: float, rate_limit_rpm: float | None,
                  rate_limit_tpm: float | None, default_temperature: float,
                  data_dir: str | None, libraries: bool, max_upload_mib: float,
                  embed_model: str, audit: bool, audit_log: str | None, audit_content: bool,
                  finetune: bool, jobs_db: str | None, max_file_mib: float,
                  finetune_threads: int, max_jsonl_line_kib: float = 1024.0,
                  audit_retention_days: int = 0,
                  audit_content_retention_days: int = 30, batch: bool = True,
                  batch_concurrency: int = 4, libraries_db: str | None = None,
                  libraries_dir: str | None = None) -> ServerConfig:
    """The flags as `ServerConfig`: MiB -> bytes, the data folder expanded, the keys file
    read, the audit log opened, ``none`` and 0 -> None."""
    from souverain.server.app import ServerConfig
    from souverain.server.auth import APIKeys

    return ServerConfig(api_keys=APIKeys.from_file(api_keys_file) if api_keys_file else None,
                        insecure_no_auth=insecure_no_auth, max_pending=max_pending,
                        max_request_bytes=int(max_request_mib * MiB),
                        rate_limit_rpm=rate_limit_rpm, rate_limit_tpm=rate_limit_tpm,
                        default_temperature=default_temperature,
                        data_dir=Path(data_dir).expanduser() if data_dir else None,
                        libraries=libraries, max_upload_bytes=int(max_upload_mib * MiB),
                        libraries_db=libraries_db,
                        libraries_dir=Path(libraries_dir).expanduser() if libraries_dir
                        else None,
                        embed_model=None if embed_model.lower() == "none" else embed_model,
                        audit=_audit_log(audit, audit_log, audit_content, data_dir,
                                         audit_retention_days, audit_content_retention_days),
                        finetune=finetune, jobs_db=jobs_db,
                        max_file_bytes=int(max_file_mib * MiB),
                        max_jsonl_line_bytes=int(max_jsonl_line_kib * 1024),
                        finetune_threads=finetune_threads or None,
                        batch=batch, batch_concurrency=batch_concurrency)


def release_gate(host: str, port: int, config: ServerConfig,
                 served: list[ServedModel]) -> Any:
    """The release gate's keeper (`souverain.eval.gate`), a client of this very server: it
    evaluates the ``ft:`` models of finished jobs with an evaluation policy, on this server's
    models, through its own address (loopback when it listens on every address)."""
    from souverain.eval.gate import GateKeeper

    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    address = f"[{local}]" if ":" in local else local
    return GateKeeper(f"http://{address}:{port}", db_url=config.jobs_db,
                      data_dir=config.data_dir, models=[m.name for m in served])


def check_tensor_parallel(served: list[ServedModel], lora_modules: list[str], k: int) -> None:
    """--tensor-parallel K, refused at start (not at a lazy model's first request): a served
    model that does not split over K ranks (naming the sizes that do), or --lora-modules."""
    if k == 1:
        return  # (no checkpoint header opened for it)
    from souverain.distributed.tensor_parallel import check_shardable

    if lora_modules:
        raise SouverainError(f"--lora-modules cannot be served with --tensor-parallel {k}: "
                             "LoRA adapters are not split over ranks yet; use one or the "
                             "other.")
    for m in served:
        check_shardable(m.checkpoint().args, k)


def load_now(registry: ModelRegistry, m: ServedModel) -> None:
    """Load one served model now, with its progress bar (--eager loads each at start-up)."""
    with loading_bar() as bar:
        task = bar.add_task(f"{m.name} ({m.model})", total=None)
        registry.load_now(m, progress=lambda d, t: bar.update(task, completed=d, total=t))


def announce(served: list[ServedModel], host: str, port: int, config: ServerConfig,
             api_keys_file: str | None) -> None:
    """What is served where, who may call it, where the audit log goes."""
    from souverain.server.auth import is_loopback

    keys = config.api_keys
    auth = (f"{len(keys)} API key(s) from {api_keys_file}" if keys is not None
            else "no auth (--insecure-no-auth)" if config.insecure_no_auth
            else "no API keys: loopback clients only")
    err.print(f"[bold]souverain[/] serving {', '.join(m.name for m in served)} on "
              f"http://{host}:{port} · {auth}")
    err.print(f"[dim]audit log: {config.audit.describe() if config.audit else 'off'}[/]")
    if config.console:
        err.print(f"console: http://{host}:{port}/ · API reference: http://{host}:{port}/docs")
    if keys is None and not config.insecure_no_auth and not is_loopback(host):
        err.print("[yellow]warning:[/] listening beyond loopback without API keys: remote "
                  "clients get 403 until you pass --api-keys-file.")


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging config, its access log passed through `AccessLogRedaction`: a key
    sent in a URL (refused with a 401) is not written to the log either."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_keys"] = {
        "()": "souverain.server.access.AccessLogRedaction"}
    config["loggers"]["uvicorn.access"].setdefault("filters", []).append("redact_keys")
    return config


def run_uvicorn(app: Any, host: str, port: int, log_level: str) -> None:
    import uvicorn

    # uvicorn drains on SIGTERM, then re-raises it: make that re-raise a clean exit (0),
    # not a death by signal (-15).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=30, log_config=uvicorn_log_config())


def serve(
    model: str = ModelArg,
    name: str | None = NameOpt,
    more_models: list[str] = MoreModelsOpt,
    lora_modules: list[str] = LoraModulesOpt,
    host: str = HostOpt,
    port: int = PortOpt,
    api_keys_file: str | None = ApiKeysFileOpt,
    insecure_no_auth: bool = InsecureNoAuthOpt,
    lazy: bool = LazyOpt,
    memory_budget_gib: float | None = MemoryBudgetOpt,
    max_pending: int = MaxPendingOpt,
    max_request_mib: float = MaxRequestOpt,
    max_upload_mib: float = MaxUploadOpt,
    data_dir: str | None = DataDirOpt,
    libraries: bool = LibrariesOpt,
    libraries_db: str | None = LibrariesDbOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    finetune: bool = FinetuneOpt,
    jobs_db: str | None = JobsDbOpt,
    max_file_mib: float = MaxFileOpt,
    max_jsonl_line_kib: float = MaxJsonlLineOpt,
    finetune_threads: int = FinetuneThreadsOpt,
    batch: bool = BatchOpt,
    batch_concurrency: int = BatchConcurrencyOpt,
    embed_model: str = EmbedModelOpt,
    moderation_model: str | None = ModerationModelOpt,
    withdrawn_fallback: bool = WithdrawnFallbackOpt,
    console: bool = ConsoleOpt,
    audit: bool = AuditOpt,
    audit_log: str | None = AuditLogOpt,
    audit_content: bool = AuditContentOpt,
    audit_retention_days: int = AuditRetentionOpt,
    audit_content_retention_days: int = AuditContentRetentionOpt,
    rate_limit_rpm: float | None = RateLimitRpmOpt,
    rate_limit_tpm: float | None = RateLimitTpmOpt,
    default_temperature: float = DefaultTemperatureOpt,
    dtype: str = DtypeOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: float | None = KvOpt,
    threads: int | None = ThreadsOpt,
    tensor_parallel: int = TensorParallelOpt,
    max_model_len: int | None = MaxModelLenOpt,
    max_num_seqs: int = MaxNumSeqsOpt,
    speculative: str | None = SpeculativeOpt,
    num_speculative_tokens: int = SpecTokensOpt,
    replicas: int = ReplicasOpt,
    ray_address: str | None = RayAddressOpt,
    replica_cpus: float | None = ReplicaCpusOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Serve La Plateforme's HTTP API (chat completions, FIM, models, metrics) on this machine.

    The official SDKs work unchanged with only the URL changed:
      Mistral(api_key=KEY, server_url="http://127.0.0.1:8000")
      OpenAI(api_key=KEY, base_url="http://127.0.0.1:8000/v1")

    Examples:
      souverain serve                                   # bundled model on 127.0.0.1:8000
      souverain keys add keys.txt alice                 # prints a new key once, stores its hash
      souverain serve /models/Mistral-7B-Instruct-v0.3 --name mistral-small-latest \\
          --api-keys-file keys.txt --host 0.0.0.0 --quantization int8
      souverain serve --model codestral=/models/codestral.gguf --lazy --memory-budget-gib 12
      souverain serve /models/mistral-7b --lora-modules support=runs/support/checkpoints/final
      souverain serve --replicas 2 --data-dir /srv/souverain   # 2 replicas on a local Ray
    """
    opts = dict(locals())  # every flag, as given (what --replicas hands each replica)
    hook = REPLICA_HOOK.get()
    # --ray-address: the replicas on that cluster; with one replica and --tensor-parallel K,
    # this server with its K ranks as Ray actors there
    if hook is None and (replicas > 1 or (ray_address and tensor_parallel == 1)):
        with user_errors():
            serve_replicas(opts)
        return
    with user_errors():
        # one server per data folder, checked before anything is imported or loaded (held
        # until exit)
        lock = hook.lock if hook is not None else hold_data_dir(
            data_dir, host, port, libraries=libraries, finetune=finetune,
            audit=audit and not audit_log)
        from souverain.engine.config import EngineConfig
        from souverain.server.app import create_app
        from souverain.server.registry import ModelRegistry, lora_module

        def engine_config() -> EngineConfig:
            return EngineConfig(dtype=dtype, quantization=quantization, threads=threads,
                                kv_cache_gib=kv_cache_gib, max_model_len=max_model_len,
                                max_num_seqs=max_num_seqs, speculative=speculative,
                                num_speculative_tokens=num_speculative_tokens,
                                tensor_parallel=tensor_parallel,
                                tensor_parallel_ray=ray_address if tensor_parallel > 1
                                and hook is None else None)

        served = served_models(model, name, more_models, engine_config)
        moderation_name = moderation_model_name(served, moderation_model, engine_config)
        check_tensor_parallel(served, lora_modules, tensor_parallel)
        adapters = [lora_module(spec, served) for spec in lora_modules]
        registry = ModelRegistry(served, memory_budget_gib, adapters)
        config = server_config(
            api_keys_file=api_keys_file, insecure_no_auth=insecure_no_auth,
            max_pending=max_pending, max_request_mib=max_request_mib,
            rate_limit_rpm=rate_limit_rpm, rate_limit_tpm=rate_limit_tpm,
            default_temperature=default_temperature, data_dir=data_dir, libraries=libraries,
            max_upload_mib=max_upload_mib, embed_model=embed_model, audit=audit,
            audit_log=audit_log, audit_content=audit_content, finetune=finetune,
            jobs_db=jobs_db, max_file_mib=max_file_mib, finetune_threads=finetune_threads,
            max_jsonl_line_kib=max_jsonl_line_kib, audit_retention_days=audit_retention_days,
            audit_content_retention_days=audit_content_retention_days, batch=batch,
            batch_concurrency=batch_concurrency, libraries_db=libraries_db,
            libraries_dir=libraries_dir)
        config.moderation_model = moderation_name
        config.withdrawn_fallback = withdrawn_fallback
        config.console = console
        if finetune:  # the release gate of the jobs that carry an evaluation policy
            config.gate_keeper = release_gate(host, port, config, served)
        if hook is not None:
            hook.configure(config)
        logging.basicConfig(level=log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not lazy:
            for m in served:
                load_now(registry, m)
        app = create_app(registry, config)
        if hook is not None:  # a replica: Ray Serve runs the app (souverain.server.replicas)
            hook.app = app
            return
        announce(served, host, port, config, api_keys_file)
        run_uvicorn(app, host, port, log_level)
        if lock is not None:
            lock.release()


# -- --replicas: the same server on Ray Serve (souverain.server.replicas) ----------------------
def serve_replicas(opts: dict[str, Any]) -> None:
    """`serve --replicas N [--ray-address A]`: hold DATA_DIR, deploy N replicas of this very
    command (each in DATA_DIR/replicas/<slot>, sharing the jobs database, the libraries and
    the rate limits) behind one address, and wait for SIGINT/SIGTERM."""
    n, address = opts["replicas"], opts["ray_address"]
    if address is not None and "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists()):
        # a cluster with token authentication (Ray's default): present its token, which Ray
        # reads when it is imported (just below), not when it connects
        os.environ["RAY_AUTH_MODE"] = "token"
    from souverain.paths import data_home
    from souverain.server import replicas as rs

    root = Path(opts["data_dir"]).expanduser() if opts["data_dir"] else data_home()
    lock = hold_data_dir(str(root), opts["host"], opts["port"], libraries=True,
                         finetune=True, audit=True)
    assert lock is not None  # (it writes there)
    shared = dict(opts, replicas=1, ray_address=None, replica_cpus=None)
    if address is None:  # one machine: its cores divided among the replicas
        shared["threads"] = opts["threads"] or max(1, (os.cpu_count() or 1) // n)
    if address is not None:  # machines share no SQLite file: PostgreSQL, shared storage
        if (opts["finetune"] or opts["batch"]) and \
                not str(opts["jobs_db"] or "").startswith("postgresql"):
            raise SouverainError(
                "Replicas on a Ray cluster share fine-tuning and batch jobs through one "
                "database: pass --jobs-db postgresql+psycopg://USER:PASS@HOST/DB (or "
                "--no-finetune --no-batch).")
        if opts["libraries"] and not (
                str(opts.get("libraries_db") or "").startswith("postgresql")
                and opts.get("libraries_dir")):
            raise SouverainError(
                "Replicas on a Ray cluster share document libraries through one metadata "
                "database and one folder: pass --libraries-db postgresql+psycopg://... and "
                "--libraries-dir on storage every machine mounts (or --no-libraries).")
    if shared["jobs_db"] is None:
        (root / "finetune").mkdir(parents=True, exist_ok=True)
        shared["jobs_db"] = f"sqlite:///{root / 'finetune' / 'jobs.sqlite'}"
    if "libraries_dir" in shared and shared["libraries_dir"] is None:
        shared["libraries_dir"] = str(root / "libraries")
    cpus = opts["replica_cpus"] if opts["replica_cpus"] is not None \
        else float(shared["threads"] or 1)
    plan = rs.ReplicaPlan(
        replicas=n, build=partial(replica_app, shared, str(root)), host=opts["host"],
        port=opts["port"], ray_address=address, cpus_per_replica=cpus,
        max_ongoing_requests=opts["max_pending"], rate_limit_rpm=opts["rate_limit_rpm"],
        rate_limit_tpm=opts["rate_limit_tpm"])
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    err.print(f"[bold]souverain[/] starting {n} replica(s) on {where} "
              f"({cpus:g} CPU(s) each; data folder {root})")
    try:
        rs.deploy(plan)
        err.print(f"[bold]souverain[/] {n} replica(s) serving on "
                  f"http://{opts['host']}:{opts['port']} (metrics of every replica: /metrics)")
        rs.wait_forever()
    except RuntimeError as exc:  # a replica that could not start: its error is logged above
        raise SouverainError(f"The replicas did not start: {str(exc).splitlines()[0]}") \
            from None
    finally:
        rs.shutdown(local=address is None)
        lock.release()


def replica_app(opts: dict[str, Any], root: str) -> tuple[Any, Any, str]:
    """In a replica: the first free DATA_DIR/replicas/<slot> (its lock held), then `serve` with
    these flags there, its app handed back (not run); returns (app, lock, folder)."""
    import typer as _typer

    from souverain.paths import DataDirInUse, DataDirLock
    from souverain.server import replicas as rs

    for slot in range(1024):
        folder = Path(root) / "replicas" / str(slot)
        try:
            lock = DataDirLock(folder, url=f"http://{opts['host']}:{opts['port']}")
            break
        except DataDirInUse:
            continue
    else:
        raise SouverainError(f"Every replica folder under {root}/replicas is in use.")

    def configure(config: ServerConfig) -> None:
        config.rate_limiter = rs.shared_limiter(opts["rate_limit_rpm"], opts["rate_limit_tpm"])

    hook = ReplicaHook(lock, configure)
    token = REPLICA_HOOK.set(hook)
    try:
        serve(**dict(opts, data_dir=str(folder)))
    except _typer.Exit as exc:
        lock.release()
        raise RuntimeError(f"the replica could not start (exit code {exc.exit_code}); its "
                           "error is in the log above") from None
    except BaseException:
        lock.release()  # (its folder free for the replica Ray starts in its place)
        raise
    finally:
        REPLICA_HOOK.reset(token)
    if hook.app is None:
        lock.release()
        raise RuntimeError("the replica built no app")
    return hook.app, lock, str(folder)
