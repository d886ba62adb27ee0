"""souverain: your own La Plateforme — Mistral-family models on machines you own.

`import souverain` is cheap: it applies the offline switches and nothing else. The public names
below (`LLM`, `LLMEngine`, `SamplingParams`, `ModelArgs`, ...) are imported on first access
(PEP 562), so `souverain --help`, `souverain keys ...` and `souverain doctor` never load torch or
build the C++ kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from souverain import offline as _offline

_offline.apply_from_env()  # before any library imported later reads its telemetry switches

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "LLM": "souverain.llm",
    "LLMEngine": "souverain.engine",
    "AsyncLLMEngine": "souverain.engine",
    "EngineConfig": "souverain.engine",
    "SamplingParams": "souverain.engine",
    "RequestOutput": "souverain.engine",
    "CompletionOutput": "souverain.engine",
    "ModelArgs": "souverain.weights.args",
    "MoeArgs": "souverain.weights.args",
    "SouverainError": "souverain.errors",
}

__all__ = [
    "LLM", "LLMEngine", "AsyncLLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
    "CompletionOutput", "ModelArgs", "MoeArgs", "SouverainError",
]

if TYPE_CHECKING:
    from souverain.engine import (
        AsyncLLMEngine,
        CompletionOutput,
        EngineConfig,
        LLMEngine,
        RequestOutput,
        SamplingParams,
    )
    from souverain.errors import SouverainError
    from souverain.llm import LLM
    from souverain.weights.args import ModelArgs, MoeArgs


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'souverain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
