"""`SamplingParams` and the per-request sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from souverain.errors import RequestError


@dataclass
class SamplingParams:
    """How to pick tokens for one request (names follow vLLM and the La Plateforme API).

    ``temperature=0`` is greedy. ``seed`` makes sampling reproducible: each request owns its
    own generator, so the same seed gives the same text whatever else runs beside it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int | None = 256  # None: until EOS or the model's context is full
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.top_k >= -1, f"top_k={self.top_k} must be -1, 0 (off) or positive"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens={self.max_tokens} must be at least 1"),
            (self.min_tokens >= 0, f"min_tokens={self.min_tokens} must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(f"invalid sampling parameter: {message}.")

    def make_generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator(device="cpu")
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> int:
    """One token from a (vocab,) float32 logits row."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
