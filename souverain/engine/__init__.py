"""The inference engine: scheduler, paged KV cache, model runner, sampler, outputs."""

from souverain.engine.async_engine import AsyncLLMEngine
from souverain.engine.config import EngineConfig
from souverain.engine.engine import LLMEngine
from souverain.engine.sampling import SamplingParams
from souverain.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["AsyncLLMEngine", "EngineConfig", "LLMEngine", "SamplingParams", "CompletionOutput",
           "RequestMetrics", "RequestOutput"]
