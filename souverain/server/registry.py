"""The models a server offers: names, lazy or eager loading, and a memory budget.

Each served model is a name (the id clients send) bound to a model path or alias and an
`EngineConfig`. Its `AsyncLLMEngine` is created at start-up (``eager``) or on the first request
that names it (``lazy``). With a memory budget, loading a model that would not fit first unloads
the least recently used idle models (no request in flight); if it still does not fit, the
request gets a 503 naming the budget, and nothing already running is disturbed.

Fine-tuned models (``ft:<base>:<suffix>:<job>``, from finished fine-tuning jobs) run on their
base model's engine with their LoRA adapter: requests for the base and for any number of
adapters share one batch; the engine keeps the most recently used adapters resident.
Adapters given at start-up (`serve --lora-modules NAME=ADAPTER_DIR[@BASE]`, as vLLM's flag)
are served the same way under their NAME, whatever the jobs database holds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from souverain.engine import AsyncLLMEngine
from souverain.engine.config import EngineConfig
from souverain.errors import SouverainError
from souverain.server.errors import APIError, in_thread
from souverain.weights import Checkpoint, load

log = logging.getLogger("souverain.server")

GiB = 1 << 30
_BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass
class ServedModel:
    name: str
    model: str  # path or alias
    config: EngineConfig
    aliases: list[str] = field(default_factory=list)
    engine: AsyncLLMEngine | None = None
    in_flight: int = 0
    last_used: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))
    _lock: asyncio.Lock | None = None
    _checkpoint: Checkpoint | None = None

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def checkpoint(self) -> Checkpoint:
        """The checkpoint's header and tokenizer (no tensor read), opened once: model cards and
        the memory estimate of a model that is not loaded both read it."""
        if self._checkpoint is None:
            self._checkpoint = load(self.model)
        return self._checkpoint

    def memory_bytes(self) -> int:
        """What this model holds now: weights + its KV budget (0 when not loaded)."""
        if self.engine is None:
            return 0
        eng = self.engine.engine
        weights = eng.weight_bytes()  # over its tensor-parallel ranks too
        return int(weights + eng.kv_tokens * eng.kv_bytes_per_token)

    def estimate_bytes(self) -> int:
        """Weights + KV budget before loading (from the checkpoint's header only)."""
        if self.engine is not None:
            return self.memory_bytes()
        n_params = self.checkpoint().args.n_params
        cfg = self.config
        if cfg.quantization != "none":
            per = _BYTES_PER_PARAM[cfg.quantization]
        elif cfg.dtype in _BYTES_PER_PARAM:
            per = _BYTES_PER_PARAM[cfg.dtype]
        else:
            per = 4.0 if n_params < 3e9 else 2.0
        kv = (cfg.kv_cache_gib or 0) * GiB
        return int(n_params * per + kv)


@dataclass(frozen=True)
class FineTuned:
    """A fine-tuned model: a LoRA adapter served on top of a base model's engine."""

    name: str  # ft:<base>:<suffix>:<job>
    base: str  # the served base model's name
    adapter_dir: str
    job: str  # the fine-tuning job that made it


def lora_module(spec: str, served: list[ServedModel]) -> FineTuned:
    """``NAME=ADAPTER_DIR[@BASE]`` (BASE: a served model's name, default the first) as a
    `FineTuned` model, its adapter read and checked against the base's shapes now (a bad
    path, a file that is no LoRA adapter, an unknown base or a mismatched adapter is a
    `SouverainError` naming the fix)."""
    from souverain.weights.adapter import load_adapter
    from souverain.weights.checkpoint import expected_shapes

    name, sep, rest = spec.partition("=")
    name, rest = name.strip(), rest.strip()
    if not sep or not name or not rest:
        raise SouverainError(f"--lora-modules {spec!r} must be NAME=ADAPTER_DIR or "
                             "NAME=ADAPTER_DIR@BASE, e.g. "
                             "support-bot=runs/support/checkpoints/final@mistral-small")
    folder, at, base = (rest.rpartition("@") if "@" in rest and not Path(rest).exists()
                        else (rest, "", ""))
    if at and not base:
        raise SouverainError(f"--lora-modules {spec!r} ends with '@' but names no base "
                             "model; add the served model's name or drop the '@'")
    by_name = {n: m for m in served for n in [m.name, *m.aliases]}
    base_model = by_name.get(base) if base else served[0]
    if base_model is None:
        raise SouverainError(f"--lora-modules {spec!r} names base model {base!r}, which is "
                             f"not served here; use one of {', '.join(sorted(by_name))}")
    path = Path(folder).expanduser()
    if not path.exists():
        raise SouverainError(f"--lora-modules {name}: no adapter at {path}; give the folder "
                             "a fine-tuning run wrote (runs/NAME/checkpoints/final) or a "
                             "PEFT adapter folder")
    args = base_model.checkpoint().args
    try:
        adapter = load_adapter(path, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    except (SouverainError, OSError, ValueError) as exc:  # safetensors: a corrupt header
        raise SouverainError(f"--lora-modules {name}: {exc}") from None
    shapes = expected_shapes(args)
    for module, (a, b) in adapter.weights.items():
        want = shapes.get(f"{module}.weight")
        if want is None or len(want) != 2:
            raise SouverainError(f"--lora-modules {name}: the adapter at {path} adapts "
                                 f"{module}, which {base_model.name} does not have; it was "
                                 "trained for another model")
        if (b.shape[0], a.shape[1]) != tuple(want):
            raise SouverainError(f"--lora-modules {name}: the adapter at {path} has "
                                 f"{module} of shape {(b.shape[0], a.shape[1])}, "
                                 f"{base_model.name} has {tuple(want)}; it was trained "
                                 "for another model")
    return FineTuned(name, base_model.name, str(path.resolve()), "")


class ModelRegistry:
    def __init__(self, models: list[ServedModel], memory_budget_gib: float | None = None,
                 adapters: list[FineTuned] | None = None):
        names: dict[str, ServedModel] = {}
        for m in models:
            for n in [m.name, *m.aliases]:
                if n in names:
                    raise SouverainError(f"the model name {n!r} is given twice; give each "
                                         "--model a distinct --name.")
                names[n] = m
        for ft in adapters or []:
            if ft.name in names or ft.name in {a.name for a in adapters or [] if a is not ft}:
                raise SouverainError(f"the model name {ft.name!r} is given twice; give each "
                                     "--lora-modules adapter a name no model has.")
        self.models = models
        self._by_name = names
        # --lora-modules: served on their base whatever the jobs database says
        self.adapters = list(adapters or [])
        self.budget = int(memory_budget_gib * GiB) if memory_budget_gib else None
        # (fine_tuned_model, base name, adapter dir, job id) of finished jobs; set by the server
        self.fine_tuned_source: Callable[[], list[tuple[str, str, str, str]]] | None = None
        self._ft_cache: tuple[float, list[FineTuned]] = (0.0, [])
        self._lora_lock = threading.Lock()

    def fine_tuned(self) -> list[FineTuned]:
        """The fine-tuned models servable here (those whose base is served), cached 1 s."""
        if self.fine_tuned_source is None:
            return list(self.adapters)
        at, cached = self._ft_cache
        if time.monotonic() - at < 1.0:
            return cached
        fresh = [*self.adapters, *(FineTuned(*row) for row in self.fine_tuned_source()
                                   if row[1] in self._by_name)]
        self._ft_cache = (time.monotonic(), fresh)
        return fresh

    def forget_fine_tuned(self) -> None:
        """Drop the cached list (a fine-tuned model was deleted here)."""
        self._ft_cache = (0.0, [])

    def resolve(self, name: str) -> tuple[ServedModel, FineTuned | None]:
        """A base model, or a fine-tuned one with the base model it runs on (404 if neither)."""
        m = self._by_name.get(name)
        if m is not None:
            return m, None
        for ft in self.fine_tuned():
            if ft.name == name:
                return self.find(ft.base), ft
        return self.find(name), None

    def ensure_adapter(self, engine: AsyncLLMEngine, ft: FineTuned) -> None:
        """Load `ft`'s adapter into the base model's engine unless it is resident (an adapter
        evicted to make room is loaded again here)."""
        with self._lora_lock:
            if ft.name not in engine.list_loras():
                try:
                    engine.add_lora(ft.name, ft.adapter_dir)
                except SouverainError as exc:
                    raise APIError(503, f"The adapter of {ft.name!r} could not be loaded: "
                                        f"{exc}", code="adapter_load_failed") from None

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def find(self, name: str) -> ServedModel:
        m = self._by_name.get(name)
        if m is None:
            names = sorted([*self._by_name, *(ft.name for ft in self.fine_tuned())])
            raise APIError(404, f"Model {name!r} is not served here; GET /v1/models lists the "
                                f"models: {', '.join(names)}.",
                           param="model", code="model_not_found")
        return m

    def load_now(self, m: ServedModel, progress: Any = None) -> AsyncLLMEngine:
        """Load synchronously (start-up of an eager model)."""
        if m.engine is None:
            self._make_room(m)
            t = time.perf_counter()
            m.engine = AsyncLLMEngine(m.model, m.config, progress=progress)
            log.info("loaded %s (%s) in %.1f s", m.name, m.model, time.perf_counter() - t)
        return m.engine

    async def acquire(self, name: str) -> tuple[ServedModel, AsyncLLMEngine]:
        """The model's engine, loading it first if needed; the caller must `release` it."""
        m = self.find(name)
        if m._lock is None:
            m._lock = asyncio.Lock()
        m.in_flight += 1
        try:
            if m.engine is None:
                async with m._lock:
                    if m.engine is None:
                        try:
                            await in_thread(self.load_now, m)
                        except SouverainError as exc:
                            raise APIError(503, f"Model {m.name!r} could not be loaded: {exc}",
                                           code="model_load_failed") from None
        except BaseException:
            m.in_flight -= 1
            raise
        m.last_used = time.monotonic()
        return m, m.engine  # type: ignore[return-value]

    def release(self, m: ServedModel) -> None:
        m.in_flight -= 1
        m.last_used = time.monotonic()

    def _make_room(self, m: ServedModel) -> None:
        if self.budget is None:
            return
        need = m.estimate_bytes()
        used = sum(o.memory_bytes() for o in self.models if o is not m)
        if used + need <= self.budget:
            return
        idle = sorted((o for o in self.models if o is not m and o.loaded and o.in_flight == 0),
                      key=lambda o: o.last_used)
        for victim in idle:
            used -= victim.memory_bytes()
            self.unload(victim)
            if used + need <= self.budget:
                return
        raise SouverainError(
            f"it needs about {need / GiB:.2f} GiB but the server's memory budget is "
            f"{self.budget / GiB:.2f} GiB with {used / GiB:.2f} GiB held by models in use; "
            "retry later or raise --memory-budget-gib")

    def unload(self, m: ServedModel) -> None:
        if m.engine is not None:
            log.info("unloading %s to stay within the memory budget", m.name)
            m.engine.shutdown()
            m.engine = None
            gc.collect()

    def shutdown(self) -> None:
        for m in self.models:
            if m.engine is not None:
                m.engine.shutdown()
                m.engine = None
