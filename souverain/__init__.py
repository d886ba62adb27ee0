"""souverain: your own La Plateforme — Mistral-family models on machines you own."""

from souverain import offline as _offline

_offline.apply_from_env()  # before any library below reads its telemetry switches

from souverain.engine import (
    AsyncLLMEngine, CompletionOutput, EngineConfig, LLMEngine, RequestOutput, SamplingParams,
)
from souverain.errors import SouverainError
from souverain.llm import LLM
from souverain.models.args import ModelArgs, MoeArgs

__all__ = ["LLM", "LLMEngine", "AsyncLLMEngine", "EngineConfig", "SamplingParams",
           "RequestOutput", "CompletionOutput", "ModelArgs", "MoeArgs", "SouverainError"]
__version__ = "0.1.0"
