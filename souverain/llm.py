"""`LLM`: the offline Python API (shaped like vLLM's).

>>> from souverain import LLM, SamplingParams
>>> llm = LLM("smollm2-135m-instruct")
>>> llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))[0].text
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch

from souverain.engine.generate import CompletionOutput, generate_stream
from souverain.engine.sampling import SamplingParams
from souverain.errors import TokenizerError
from souverain.models.loader import ProgressFn, load_model, parse_dtype
from souverain.runtime import configure_threads, default_dtype
from souverain.weights import load

Prompt = Union[str, Sequence[int]]
Messages = list[dict[str, Any]]


class LLM:
    """A model loaded for generation: ``generate``, ``chat``, ``logits``.

    ``model`` is a bundled alias (``smollm2-135m-instruct``), a ``.gguf`` file, or a folder
    in the official consolidated or Hugging Face format. ``dtype`` is ``"float32"``,
    ``"bfloat16"`` or ``"auto"`` (float32 when it fits comfortably in RAM, else bfloat16).
    """

    def __init__(self, model: str | os.PathLike[str] = "smollm2-135m-instruct",
                 dtype: str = "auto", threads: int | None = None,
                 progress: ProgressFn | None = None):
        self.threads = configure_threads(threads)
        self.checkpoint = load(model)
        self.args = self.checkpoint.args
        self.tokenizer = self.checkpoint.tokenizer
        self.dtype = parse_dtype(default_dtype(self.args.n_params) if dtype == "auto" else dtype)
        self.model = load_model(self.checkpoint, self.dtype, progress=progress)
        self.context = self.args.max_seq_len
        self.name = str(model) if not Path(str(model)).exists() else Path(str(model)).name

    # -- prompts -----------------------------------------------------------------------------
    def _require_tokenizer(self, what: str) -> Any:
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
            prompts = [prompts]  # type: ignore[list-item]
        return [self.encode(p) for p in prompts]  # type: ignore[union-attr]

    def _chats(self, messages: Messages | Sequence[Messages],
               tools: list[dict[str, Any]] | None) -> list[list[int]]:
        tok = self._require_tokenizer("chat")
        batch = [messages] if messages and isinstance(messages[0], dict) else messages
        return [tok.encode_chat(list(m), tools=tools) for m in batch]  # type: ignore[arg-type]

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
                 ) -> list[CompletionOutput]:
        """Complete each prompt (a string or a list of token ids); all run as one batch."""
        ids = self._prompts(prompts)
        return self._run(ids, self._params(params, len(ids)))

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[CompletionOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or a batch of them."""
        ids = self._chats(messages, tools)
        return self._run(ids, self._params(params, len(ids)))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is generated (UTF-8 safe deltas)."""
        return self._stream(self._prompts(prompt), params)

    def stream_chat(self, messages: Messages, params: SamplingParams | None = None,
                    tools: list[dict[str, Any]] | None = None) -> Iterator[str]:
        """Yield the text of the answer to one conversation as it is generated."""
        return self._stream(self._chats(messages, tools), params)

    def _stream(self, ids: list[list[int]], params: SamplingParams | None) -> Iterator[str]:
        self.last_output: CompletionOutput | None = None
        for outputs, deltas in generate_stream(self.model, self.tokenizer, ids,
                                               self._params(params, 1), self.context):
            self.last_output = outputs[0]
            if deltas[0]:
                yield deltas[0]

    def _run(self, ids: list[list[int]], params: list[SamplingParams]) -> list[CompletionOutput]:
        outputs: list[CompletionOutput] = []
        for outputs, _ in generate_stream(self.model, self.tokenizer, ids, params, self.context):
            pass
        return outputs

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-prefill logits: float32 tensor ``[len(token_ids), vocab]``."""
        from souverain.engine.generate import check_prompt

        ids = check_prompt(token_ids, self.args.vocab_size, None)
        with torch.inference_mode():
            tokens = torch.tensor(ids, dtype=torch.long, device=self.model.device)
            return self.model(tokens, torch.arange(len(ids), device=self.model.device))
