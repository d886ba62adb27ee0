"""`Sequence`: all per-request state in one place (as nano-vllm), and the outputs users see."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from souverain.engine.sampling import SamplingParams, TokenLogprob
from souverain.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from souverain.engine.lora import LoRARef
    from souverain.engine.speculative import SpecState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV blocks were freed)
    RUNNING = "running"  # holds KV blocks, is scheduled every step
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    """One generated continuation.

    ``finish_reason``: ``stop`` (EOS, a stop token or a stop string), ``length`` (max_tokens),
    ``model_length`` (the model's context is full) or ``abort``; None while running.
    ``delta_text`` / ``delta_token_ids`` are what the last engine step added (for streaming).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token when requested
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """What a request has produced so far: one `CompletionOutput` per sample (``n``).

    ``text``, ``token_ids`` and ``finish_reason`` are shortcuts to the first sample, so
    ``llm.generate(...)[0].text`` reads naturally when ``n == 1``.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # with `SamplingParams.prompt_logprobs`: one per prompt token (the first is None), once
    # the whole prompt is computed; else None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class Sequence:
    """One sample of one request: its tokens, KV blocks, sampling state and text.

    ``num_computed`` counts the leading tokens whose keys/values are in the KV cache; the
    scheduler moves it forward (prefill chunks, then one token per decode step) and resets it
    to 0 on preemption, when the blocks are freed and the tokens will be recomputed.
    """

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, detokenizer: IncrementalDetokenizer | None,
                 stop_ids: set[int], limit: int, arrival_time: float, *,
                 lora: LoRARef | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = list(prompt_token_ids)  # prompt + generated
        self.params = params
        self.generator: torch.Generator | None = params.make_generator()
        self.detokenizer = detokenizer
        self.stop_ids = stop_ids
        self.limit = limit  # most tokens (prompt + generated) this sequence may reach
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.num_cached = 0  # prompt tokens found in the prefix cache at admission
        self.block_table: list[int] = []  # -1 marks a block freed because it left the window
        self.output = CompletionOutput(index=index, logprobs=[] if params.logprobs else None)
        # the prompt's logprobs so far (sample 0 of a request that asks for them); the first
        # prompt token has none
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.held_text = ""  # text withheld because it may be the start of a stop string
        self.arrival_time = arrival_time
        self.lora = lora  # the adapter it generates with (None: base); kept over preemption
        # seeds the prefix-cache hash chain: blocks are only shared within one adapter
        self.hash_seed = 0 if lora is None else lora.hash_seed
        # speculative decoding: the proposer's state (None: off), and this step's draft
        # tokens (verified by the step's forward; never in token_ids until accepted)
        self.spec: SpecState | None = None
        self.draft: list[int] = []
        self.draft_computed = 0  # with a draft model: leading tokens whose draft K/V is valid

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and some are not computed yet."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.value}, "
                f"{self.num_computed}/{self.num_tokens} computed, {len(self.block_table)} blocks)")


def now() -> float:
    return time.perf_counter()
