"""`LLM`: the offline Python API (shaped like vLLM's), running on the `LLMEngine`.

>>> from souverain import LLM, SamplingParams
>>> llm = LLM("smollm2-135m-instruct")
>>> llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))[0].text
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch

from souverain.engine.config import EngineConfig
from souverain.engine.engine import LLMEngine
from souverain.engine.sampling import SamplingParams
from souverain.engine.sequence import RequestOutput
from souverain.errors import RequestError, TokenizerError
from souverain.models.loader import ProgressFn
from souverain.tokenizer import Tokenizer

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]


class LLM:
    """A model loaded for generation: ``generate``, ``chat``, ``logits``.

    ``model`` is a bundled alias (``smollm2-135m-instruct``), a ``.gguf`` file, or a folder
    in the official consolidated or Hugging Face format. ``dtype`` is ``"float32"``,
    ``"bfloat16"`` or ``"auto"`` (float32 when it fits comfortably in RAM, else bfloat16;
    bfloat16 when ``quantization`` is int8/int4: half the KV cache at the same speed).
    """

    def __init__(self, model: str | os.PathLike[str] = "smollm2-135m-instruct",
                 dtype: str = "auto", quantization: str = "none", threads: int | None = None,
                 progress: ProgressFn | None = None, **engine_options: Any):
        config = EngineConfig(dtype=dtype, quantization=quantization, threads=threads,
                              **engine_options)
        self.engine = LLMEngine(model, config, progress=progress)
        self.checkpoint = self.engine.checkpoint
        self.args = self.engine.args
        self.tokenizer = self.engine.tokenizer
        self.model = self.engine.runner.model  # None under tensor parallelism (in the ranks)
        self.dtype = self.engine.runner.dtype
        self.threads = self.engine.threads
        self.context = self.engine.max_model_len
        self.last_output: RequestOutput | None = None

    def close(self) -> None:
        """Stop the tensor-parallel rank processes (``tensor_parallel=K``), if any; they
        also stop when this process exits."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompts -----------------------------------------------------------------------------
    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            fix = ("use a GGUF that embeds its tokenizer (tokenizer.ggml.* metadata)"
                   if self.checkpoint.format == "gguf" else
                   "put the model's tokenizer file (tokenizer.model.v3, tekken.json or "
                   "tokenizer.json) in its folder")
            raise TokenizerError(
                f"{self.checkpoint.path} has no tokenizer, so {what} is impossible; pass token "
                f"ids instead, or {fix}."
            )
        return self.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text gets the BOS token like the tokenizer's default)."""
        if isinstance(prompt, str):
            return self._require_tokenizer("encoding a text prompt").encode(prompt, bos=True)
        return [int(t) for t in prompt]

    def _prompts(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            return [self.encode(cast(Prompt, prompts))]
        return [self.encode(p) for p in cast(Sequence[Prompt], prompts)]

    def _chats(self, messages: Messages | Sequence[Messages],
               tools: list[dict[str, Any]] | None) -> list[list[int]]:
        tok = self._require_tokenizer("chat")
        one = bool(messages) and isinstance(messages[0], dict)
        batch = cast(Sequence[Messages], [messages] if one else messages)
        return [tok.encode_chat(list(m), tools=tools) for m in batch]

    @staticmethod
    def _params(params: SamplingParams | Sequence[SamplingParams] | None,
                n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
        return list(params)

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); all run as one batch."""
        ids = self._prompts(prompts)
        return self._run(ids, self._params(params, len(ids)))

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or a batch of them."""
        ids = self._chats(messages, tools)
        return self._run(ids, self._params(params, len(ids)))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is generated (UTF-8 safe deltas)."""
        return self._stream(self._prompts(prompt)[0], params)

    def stream_chat(self, messages: Messages, params: SamplingParams | None = None,
                    tools: list[dict[str, Any]] | None = None) -> Iterator[str]:
        """Yield the text of the answer to one conversation as it is generated."""
        return self._stream(self._chats(messages, tools)[0], params)

    def _stream(self, ids: list[int], params: SamplingParams | None) -> Iterator[str]:
        engine = self.engine
        request_id = engine.add_request(None, ids, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    self.last_output = out
                    finished = out.finished
                    if out.outputs[0].delta_text:
                        yield out.outputs[0].delta_text
        finally:
            if not finished:
                engine.abort(request_id)

    def _run(self, ids: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        engine = self.engine
        order = [engine.add_request(None, p, sp) for p, sp in zip(ids, params)]
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(order):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                if not engine.has_unfinished() and len(done) < len(order):
                    raise RequestError("the engine stopped before every request finished")
        finally:
            for request_id in order:
                if request_id not in done:
                    engine.abort(request_id)
        return [done[r] for r in order]

    def logits(self, token_ids: Sequence[int], *, lora: str | None = None) -> torch.Tensor:
        """Full-prefill logits: float32 tensor ``[len(token_ids), vocab]``, with the loaded
        adapter ``lora`` if given (see ``engine.add_lora``)."""
        ids = [int(t) for t in token_ids]
        self.engine.check_token_ids(ids)
        return self.engine.runner.prompt_logits(ids, lora)
