"""`LLMEngine`: requests in, one batched forward per step, outputs out.

    engine = LLMEngine("smollm2-135m-instruct", EngineConfig(kv_cache_tokens=8192))
    engine.add_request("r1", "The capital of France is", SamplingParams(max_tokens=16))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.outputs[0].delta_text, out.finished)

Each `step` = schedule (continuous batching, chunked prefill, prefix cache, preemption) ->
`ModelRunner`: one `StepBatch` of every scheduled sequence, one forward through a
`PagedAttention` backend, batched sampling -> postprocess: KV bookkeeping, detokenization and
stop checks, blocks of finished sequences freed at once. The engine owns the requests, the
scheduler, the block manager and the outputs; the runner owns the model, the KV cache and
the LoRA adapters.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from souverain.engine.block_manager import BlockManager
from souverain.engine.config import EngineConfig
from souverain.engine.draft import DraftModel
from souverain.engine.lora import LoRARef
from souverain.engine.model_runner import ModelRunner, StepBatch
from souverain.engine.sampling import SamplingParams, TokenLogprob
from souverain.engine.scheduler import ScheduledSeq, Scheduler
from souverain.engine.sequence import (
    RequestMetrics,
    RequestOutput,
    Sequence,
    now,
)
from souverain.engine.speculative import NgramIndex, SpecState, SpecStats, best_seconds
from souverain.errors import RequestError, TokenizerError
from souverain.models.loader import ProgressFn
from souverain.runtime import configure_threads
from souverain.tokenizer import IncrementalDetokenizer, Tokenizer
from souverain.weights import load
from souverain.weights.adapter import LoRAAdapter, load_adapter

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics
    finished: bool = False
    lora: LoRARef | None = None

    def output(self) -> RequestOutput:
        """A snapshot: later steps do not change what was handed out (streams may lag)."""
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[dataclasses.replace(s.output, token_ids=list(s.output.token_ids),
                                         logprobs=None if s.output.logprobs is None
                                         else list(s.output.logprobs))
                     for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.seqs[0].num_cached,
            prompt_logprobs=(None if self.seqs[0].prompt_logprobs is None
                             else list(self.seqs[0].prompt_logprobs)),
        )


class LLMEngine:
    """The inference engine behind `LLM` and the server (see module docstring)."""

    def __init__(self, model: str | os.PathLike[str] = "smollm2-135m-instruct",
                 config: EngineConfig | None = None, progress: ProgressFn | None = None):
        self.config = config = config or EngineConfig()
        self.threads = configure_threads(config.threads)
        self.checkpoint = load(model)
        self.args = self.checkpoint.args
        self.tokenizer: Tokenizer | None = self.checkpoint.tokenizer
        self.tensor_parallel = config.tensor_parallel
        self.runner = ModelRunner(self.checkpoint, config, progress, self.threads)
        try:
            self._set_up(progress)
        except BaseException:
            self.close()  # no rank process left behind by a failed start
            raise

    def _set_up(self, progress: ProgressFn | None) -> None:
        """The rest of `__init__`, once the runner holds the model (or its ranks do)."""
        config, args, runner = self.config, self.args, self.runner
        # the runner's, named here for callers (the server's memory accounting, `LLM`, tests);
        # a step reaches them only through the runner. Under tensor parallelism the model and
        # the cache are in the rank processes (None here).
        self.model, self.cache, self.loras = runner.model, runner.cache, runner.loras
        self.dtype, self.kv_bytes_per_token = runner.dtype, runner.kv_bytes_per_token

        windows = {args.window_for_layer(i) for i in range(args.n_layers)}
        self.window = None if None in windows else max(w for w in windows if w is not None)
        self.kv_tokens = (runner.num_blocks - 1) * config.block_size  # block 0 pads
        self.max_model_len = self._max_model_len()
        self.blocks = BlockManager(runner.num_blocks, config.block_size,
                                   config.enable_prefix_caching, self.window)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.eos_ids = set(self.tokenizer.eos_ids) if self.tokenizer is not None else set()
        self.spec_stats = SpecStats()
        self.spec_row_cost: float | None = None  # see `_measure_row_cost`
        self._drafted: list[Sequence] = []  # sequences the draft model drafted for this step
        self.speculative = config.speculative
        self.drafter: DraftModel | None = None
        if self.speculative is not None:
            if self.speculative != "ngram":
                self.drafter = DraftModel(self.speculative, args, config, runner.num_blocks,
                                          progress)
            cost = config.speculative_row_cost
            if cost is None:
                cost, step = self._measure_row_cost()
                if self.drafter is not None:  # each drafted token also costs a draft forward
                    cost += self.drafter.step_seconds() / step
            self.spec_row_cost = cost
            if cost >= 1:
                logger.warning(
                    "speculative decoding turned off: a drafted token costs %.2f of a plain "
                    "decode step with this model and CPU (the quantized kernels do not batch "
                    "small row counts here, or the draft model is not much smaller), so "
                    "verifying drafts cannot pay; use float weights or a smaller draft model "
                    "to speculate.", cost)
                self.speculative = self.drafter = None

    def weight_bytes(self) -> int:
        """Bytes of the model's weights (quantized as loaded), in this process or, under
        tensor parallelism, over all its ranks."""
        return self.runner.weight_bytes

    def close(self) -> None:
        """Release what outlives the object: the tensor-parallel rank processes (an engine
        without them has nothing to release). The engine cannot step afterwards."""
        self.runner.close()

    def _step_seconds(self, n: int = 1) -> float:
        """The best of 3 timings of an ``n``-row forward of the target (logits included)."""
        return best_seconds(lambda: self.runner.prompt_logits([1] * n))

    def _measure_row_cost(self) -> tuple[float, float]:
        """(what one more row adds to a one-row forward, relative to it; the one-row time):
        timings of 1 and ``1 + num_speculative_tokens`` rows (after a warm-up), as a
        verification step runs them. ~0.1 for float weights (a forward reads every weight
        once, however many rows); ~1 for kernels that loop over rows."""
        k = self.config.num_speculative_tokens
        self._step_seconds(1 + k)  # warm-up
        one = self._step_seconds(1)
        return max(0.0, (self._step_seconds(1 + k) - one) / (k * one)), one

    def _max_model_len(self) -> int:
        """Most tokens one sequence may reach: the context, within the KV budget."""
        config, context = self.config, self.config.context(self.args)
        if self.window is None:
            # a sequence holds all its tokens: it can never be longer than the whole budget
            return min(context, self.kv_tokens)
        if self.kv_tokens < self.window + config.max_num_batched_tokens + config.block_size:
            raise RequestError(
                f"the KV budget ({self.kv_tokens} tokens) is smaller than one sliding window "
                f"plus a step ({self.window} + {config.max_num_batched_tokens}); raise "
                "kv_cache_tokens / kv_cache_gib."
            )
        return context

    # -- LoRA adapters -------------------------------------------------------------------------
    def add_lora(self, name: str, adapter: LoRAAdapter | str | os.PathLike[str]) -> None:
        """Make ``adapter`` (in memory, or a folder / lora.safetensors on disk) servable as
        ``lora=name``. Past ``max_loras`` / ``lora_budget_gib`` the least recently used
        adapter no unfinished request uses is evicted; if all are in use, RequestError."""
        if self.tensor_parallel > 1:
            raise RequestError(
                f"LoRA adapter {name!r} cannot be served with tensor parallelism "
                f"(tensor_parallel={self.tensor_parallel}): adapters are not split over "
                "ranks yet; serve this model with --tensor-parallel 1 to use adapters.")
        if not isinstance(adapter, LoRAAdapter):
            adapter = load_adapter(adapter, n_heads=self.args.n_heads,
                                   n_kv_heads=self.args.n_kv_heads)
        with self.runner.lora_lock:
            self.runner.loras.add(name, adapter, self._lora_in_use)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; RequestError if unknown or if unfinished requests use it."""
        with self.runner.lora_lock:
            self.runner.loras.ref(name)  # unknown -> RequestError naming the loaded ones
            if self._lora_in_use(name):
                raise RequestError(f"LoRA adapter {name!r} is used by unfinished requests; "
                                   "abort them or wait for them to finish.")
            self.runner.loras.remove(name)

    def list_loras(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return self.runner.loras.names()

    def _lora_in_use(self, name: str) -> bool:
        return any(r.lora is not None and r.lora.name == name for r in self.requests.values())

    # -- requests --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError(
                    f"{self.checkpoint.path} has no tokenizer, so a text prompt cannot be "
                    "encoded; pass token ids instead."
                )
            return self.tokenizer.encode(prompt, bos=True)
        return [int(t) for t in prompt]

    def check_prompt(self, ids: list[int]) -> None:
        """Reject a prompt that is empty, has unknown ids, or leaves no room to generate."""
        self.check_token_ids(ids)
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but this engine serves at most "
                f"{self.max_model_len} tokens per sequence (model context and KV budget), "
                "leaving no room to generate; shorten the prompt (souverain never truncates "
                "it silently)."
            )

    def check_token_ids(self, ids: list[int]) -> None:
        vocab = self.args.vocab_size
        if not ids:
            raise RequestError("the prompt is empty; give at least one token.")
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise RequestError(
                f"token id {bad} is outside the vocabulary (0..{vocab - 1}); check the "
                "tokenizer matches this model."
            )

    def prepare_request(self, request_id: str | None, prompt: str | Seq[int],
                        params: SamplingParams | None = None,
                        arrival_time: float | None = None, *,
                        lora: str | None = None) -> _Request:
        """Encode and validate a request without touching the scheduler (safe to call from
        another thread; `AsyncLLMEngine` does so, so bad input fails in the caller at once).
        ``lora``: the name of a loaded adapter to generate with (None: the base model)."""
        params = params or SamplingParams()
        lora_ref = None
        if lora is not None:  # a dict read: no lock (this may run on the event loop)
            lora_ref = self.runner.loras.ref(lora)
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        ids = self.encode_prompt(prompt)
        self.check_prompt(ids)
        limit = self.max_model_len
        if params.max_tokens is not None:
            limit = min(limit, len(ids) + params.max_tokens)
        arrival = arrival_time if arrival_time is not None else now()
        seqs = []
        for index in range(params.n):
            p = params.clone_for(index) if params.n > 1 else params
            detok = (IncrementalDetokenizer(self.tokenizer, ids, p.skip_special_tokens)
                     if self.tokenizer is not None else None)
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
            seq = Sequence(next(self._seq_ids), request_id, index, ids, p, detok,
                           stop_ids, limit, arrival, lora=lora_ref)
            if self.speculative is not None:
                proposer = (None if self.drafter is not None else
                            NgramIndex(self.config.prompt_lookup_min,
                                       self.config.prompt_lookup_max))
                seq.spec = SpecState(proposer, self.config.num_speculative_tokens,
                                     self.spec_row_cost or 0.0)
            seqs.append(seq)
        return _Request(request_id, ids, seqs, RequestMetrics(arrival), lora=lora_ref)

    def submit(self, req: _Request) -> None:
        """Queue a prepared request; it joins the running batch at the next step."""
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use.")
        if req.lora is not None:
            with self.runner.lora_lock:
                if not self.runner.loras.is_current(req.lora):
                    raise RequestError(f"LoRA adapter {req.lora.name!r} was removed or "
                                       "evicted before the request started; add it again.")
                self.runner.loras.touch(req.lora.name)
                self.requests[req.request_id] = req  # in use from now: never evicted
        else:
            self.requests[req.request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str | None, prompt: str | Seq[int],
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None, *, lora: str | None = None) -> str:
        """Queue a request (text or token ids), on adapter ``lora`` if given; returns its id."""
        req = self.prepare_request(request_id, prompt, params, arrival_time, lora=lora)
        self.submit(req)
        return req.request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                seq.output.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batched forward and return the requests that progressed."""
        if self.speculative is not None:
            self._propose_drafts()
        try:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return []
            batch = self.runner.prepare(scheduled)
            logits = self.runner.run(batch)
            return self._postprocess(scheduled, batch, logits)
        finally:
            for seq in self._drafted:  # drafted K/V stays valid only for the tokens kept
                # (a draft the scheduler cut or dropped included)
                seq.draft_computed = min(seq.draft_computed, seq.num_computed)
            self._drafted = []

    def _postprocess(self, scheduled: list[ScheduledSeq], batch: StepBatch,
                     logits: torch.Tensor) -> list[RequestOutput]:
        """After the forward: the new KV is committed, then the sampled tokens go into the
        outputs."""
        t = now()
        # a sequence with drafts commits once the runner says how many were accepted
        self._commit_computed([item for item in scheduled if not item.draft])
        self.runner.record_prompt_logprobs(batch)
        if not batch.sampling:
            return []
        new_tokens = self.runner.sample(batch, logits)
        drafted = {item.seq.seq_id: item for item in scheduled if item.draft}
        touched = self._append_tokens(batch.sampling, new_tokens, drafted, t)
        return self._outputs(touched, t)

    def _propose_drafts(self) -> None:
        """Draft tokens for the running sequences that decode (`souverain.engine.speculative`):
        none when more decode at once than ``speculative_disable_batch_size``."""
        decoding = [s for s in self.scheduler.running
                    if s.spec is not None and s.num_tokens - s.num_computed == 1]
        if len(decoding) > self.config.speculative_disable_batch_size:
            return
        if self.drafter is not None:
            self._draft_with_model(decoding)
            return
        for seq in decoding:
            assert seq.spec is not None
            # every accepted draft and the token after them must fit within the limit
            room = seq.limit - seq.num_tokens - 1
            seq.draft = seq.spec.propose(seq.token_ids, room) if room > 0 else []

    def _draft_with_model(self, decoding: list[Sequence]) -> None:
        """The draft model's greedy drafts for ``decoding``, in one batch per drafted token;
        their K/V slots are allocated first (a draft is shortened rather than take a block
        another running sequence may need)."""
        assert self.drafter is not None
        lengths = []
        reserve = len(self.scheduler.running)
        for seq in decoding:
            assert seq.spec is not None
            k = seq.spec.length(seq.limit - seq.num_tokens - 1)
            # the draft model writes K/V up to position num_tokens + k - 2
            while k > 0 and not self.blocks.can_spare(seq, seq.num_tokens + k - 1, reserve):
                k -= 1
            if k > 0:
                self.blocks.allocate(seq, seq.num_tokens + k - 1)
            lengths.append(k)
        if any(lengths):
            for seq, draft in zip(decoding, self.drafter.propose(decoding, lengths)):
                seq.draft = draft
            self._drafted = decoding

    def _commit_computed(self, scheduled: list[ScheduledSeq]) -> None:
        """The scheduled tokens' K/V are in the cache now: full blocks join the prefix cache,
        blocks that left the sliding window are released."""
        for item in scheduled:
            item.seq.num_computed += item.num_new
            self.blocks.commit_computed(item.seq)
            self.blocks.release_outside_window(item.seq)

    def _append_tokens(self, seqs: list[Sequence],
                       new_tokens: list[list[tuple[int, TokenLogprob | None]]],
                       drafted: dict[int, ScheduledSeq], t: float) -> dict[str, _Request]:
        """Each sequence's new tokens, in order, until one finishes it (finished sequences
        leave the scheduler); a sequence that verified drafts commits the K/V of the tokens
        it kept. Returns the requests that progressed."""
        touched: dict[str, _Request] = {}
        for seq, toks in zip(seqs, new_tokens):
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            for token, lp in toks:
                self._append_token(seq, token, lp)
                if seq.output.finished:
                    break
            item = drafted.get(seq.seq_id)
            if item is not None:
                self._commit_verified(item, len(toks))
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = t
            if seq.output.finished:
                self.scheduler.finish(seq)
            touched[req.request_id] = req
        return touched

    def _commit_verified(self, item: ScheduledSeq, emitted: int) -> None:
        """The step computed K/V for the last token and ``len(item.draft)`` drafts; the first
        ``emitted - 1`` drafts were accepted, so K/V up to and including them is valid (the
        rest of those slots are overwritten when their positions are computed again)."""
        seq, spec = item.seq, item.seq.spec
        seq.num_computed = min(seq.num_computed + emitted, seq.num_tokens)
        self.blocks.commit_computed(seq)
        self.blocks.release_outside_window(seq)
        accepted = emitted - 1
        stats = self.spec_stats
        stats.verify_steps += 1
        stats.draft_tokens += len(item.draft)
        stats.accepted_tokens += accepted
        stats.emitted_tokens += emitted
        if spec is not None:
            spec.update(len(item.draft), accepted)
        seq.draft = []

    def _outputs(self, touched: dict[str, _Request], t: float) -> list[RequestOutput]:
        """A snapshot per progressed request; finished requests are forgotten."""
        outputs = []
        for req in touched.values():
            if all(s.finished for s in req.seqs):
                req.finished = True
                req.metrics.finished_time = t
                del self.requests[req.request_id]
            outputs.append(req.output())
            for seq in req.seqs:  # deltas describe one step only
                seq.output.delta_text = ""
                seq.output.delta_token_ids = []
        return outputs

    # -- output processing -------------------------------------------------------------------
    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None
                      ) -> None:
        """Add a sampled token to ``seq``; update its text and decide whether it is done."""
        out, p = seq.output, seq.params
        seq.token_ids.append(token)
        out.token_ids.append(token)
        out.delta_token_ids.append(token)  # several per step with speculative decoding
        if out.logprobs is not None and logprob is not None:
            out.logprobs.append(logprob)
        if token in seq.stop_ids:
            out.finish_reason = "stop"
            out.delta_text += self._flush(seq)
            return
        piece = seq.detokenizer.add(token) if seq.detokenizer is not None else ""
        text = seq.held_text + piece
        for s in p.stop:
            cut = text.find(s)
            if cut >= 0:
                out.finish_reason = "stop"
                seq.held_text = ""
                out.text += text[:cut]
                out.delta_text += text[:cut]
                return
        # hold back a tail that could still grow into a stop string with the next tokens
        keep = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        shown, seq.held_text = text[:len(text) - keep], text[len(text) - keep:]
        out.text += shown
        out.delta_text += shown
        if seq.num_tokens >= seq.limit:
            hit_max = p.max_tokens is not None and len(out.token_ids) >= p.max_tokens
            out.finish_reason = "length" if hit_max else "model_length"
            out.delta_text += self._flush(seq)

    @staticmethod
    def _flush(seq: Sequence) -> str:
        rest = seq.held_text + (seq.detokenizer.flush() if seq.detokenizer is not None else "")
        seq.held_text = ""
        seq.output.text += rest
        return rest

    # -- introspection -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_blocks": self.blocks.num_free_blocks,
            "usable_blocks": self.blocks.num_usable_blocks,
            "kv_tokens": self.kv_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.scheduler.prefix_queried_tokens,
            "prefix_cache_hits": self.scheduler.prefix_hit_tokens,
            "loras": len(self.runner.loras.resident),
            "lora_evictions": self.runner.loras.num_evictions,
            "spec_verify_steps": self.spec_stats.verify_steps,
            "spec_draft_tokens": self.spec_stats.draft_tokens,
            "spec_accepted_tokens": self.spec_stats.accepted_tokens,
            "spec_emitted_tokens": self.spec_stats.emitted_tokens,
            "tensor_parallel": self.tensor_parallel,
        }
