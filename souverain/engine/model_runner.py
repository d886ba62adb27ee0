"""`ModelRunner`: the model, its paged KV cache and the attention backend of each step.

The engine hands it the sequences the scheduler picked; the runner describes them in ONE
`StepBatch` (`prepare`), runs one forward over it (`run`) and samples the next tokens
(`sample`), as nano-vllm's ``model_runner.py`` does, over mixed prefill + decode batches. It
owns the weights, the KV cache, the resident LoRA adapters (and the lock that keeps adapter
changes out of a forward); the engine owns requests, the scheduler, the block manager (which
slots each sequence may use) and the outputs.

With ``EngineConfig.tensor_parallel`` K > 1 the weights and the KV cache are not here: K rank
processes (`souverain.distributed.launch.LocalTensorParallel`) each hold a shard and a paged
cache of their own kv heads, with the same ``num_blocks`` x ``block_size`` slots, so the block
tables this process computes address every rank's cache. `run` and `prompt_logits` send the
step's plain description to rank 0 and get its logits back; preparing, sampling and everything
the engine does stays here. No LoRA adapter (the engine refuses them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from souverain import kernels
from souverain.engine.config import EngineConfig
from souverain.engine.lora import LoRAManager
from souverain.engine.paged_attention import PagedAttention, PagedKVCache, SeqSlice
from souverain.engine.sampler import SamplingRow, sample_batch
from souverain.engine.sampling import TokenLogprob
from souverain.engine.scheduler import ScheduledSeq
from souverain.engine.sequence import Sequence
from souverain.models.loader import ProgressFn, load_model, parse_dtype
from souverain.models.quantize import quantized_bytes
from souverain.models.transformer import Transformer
from souverain.runtime import available_memory
from souverain.weights.args import ModelArgs
from souverain.weights.checkpoint import Checkpoint

if TYPE_CHECKING:
    from souverain.distributed.launch import LocalTensorParallel, RayTensorParallel

GiB = 1 << 30


@dataclass
class StepBatch:
    """One step's flat batch, described once (as mistral-inference's ``CacheInputMetadata``).

    The T new tokens of every scheduled sequence are concatenated in scheduling order; the S
    sequences whose last known token is in the batch (decodes, and prefills that reach the
    end of their tokens) sample one token each, from the logits of that token's row. A
    sequence with ``d`` draft tokens (speculative decoding) feeds them after its last token
    and has ``1 + d`` consecutive logits rows, checked in order by `ModelRunner.sample`.
    """

    token_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,) absolute position of each token in its sequence
    # per sequence: its slice and block table; the K/V slot of each token (None under tensor
    # parallelism: the ranks build their own from ``slices``)
    attn: PagedAttention | None
    logits_indices: torch.Tensor  # (S + drafts,) flat rows of each sampling sequence's
    # last token and its draft tokens
    sampling: list[Sequence]  # the S sequences that sample this step, in logits order
    lora_rows: dict[int, list[int]]  # adapter slot -> its flat rows (the other rows: base)
    # prompt logprobs: the flat rows whose logits score the next prompt token, and for each
    # row the sequence and the position of the token it scores
    prompt_rows: torch.Tensor | None = None
    prompt_targets: list[tuple[Sequence, int]] = field(default_factory=list)
    prompt_logits: torch.Tensor | None = None  # (len(prompt_targets), vocab), set by `run`
    drafts: list[list[int]] = field(default_factory=list)  # per sampling sequence ([]: none)
    slices: list[SeqSlice] = field(default_factory=list)  # per scheduled sequence


class ModelRunner:
    """Loads ``checkpoint`` as ``config`` says, sizes and allocates the KV cache, and runs
    the steps the engine schedules (see module docstring)."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig,
                 progress: ProgressFn | None = None, threads: int | None = None):
        args = checkpoint.args
        self.dtype = parse_dtype(config.model_dtype(args))
        # every rank's kv heads together: the KV budget is the machine's, whatever K
        self.kv_bytes_per_token = PagedKVCache.bytes_per_token(args.n_layers, args.n_kv_heads,
                                                               args.head_dim, self.dtype)
        self.model: Transformer | None = None
        self.cache: PagedKVCache | None = None
        self.tp: LocalTensorParallel | RayTensorParallel | None = None
        if config.tensor_parallel > 1:
            self.device = torch.device("cpu")
            self.num_blocks = self._kv_blocks(config, args, self._weights_estimate(config, args))
            self.tp = self._start_ranks(checkpoint, config, threads)
            self.weight_bytes = self.tp.shard_bytes * config.tensor_parallel
        else:
            self.model = load_model(checkpoint, self.dtype, progress=progress,
                                    quantization=config.quantization)
            self.device = self.model.device
            if self.device.type == "cpu":
                kernels.available()  # built once per machine (~30 s), not mid-request
            self.weight_bytes = quantized_bytes(self.model)
            self.num_blocks = self._kv_blocks(config, args)
            self.cache = PagedKVCache(args.n_layers, self.num_blocks, config.block_size,
                                      args.n_kv_heads, args.head_dim, self.dtype, self.device)
        budget = config.lora_budget_gib
        # under tensor parallelism the manager stays empty: the engine refuses adapters
        self.loras = LoRAManager(cast(Transformer, self.model), args, config.max_loras,
                                 None if budget is None else int(budget * GiB))
        # adapters may be added from other threads (the server) while the engine thread steps
        self.lora_lock = threading.Lock()

    def _start_ranks(self, checkpoint: Checkpoint, config: EngineConfig,
                     threads: int | None) -> LocalTensorParallel | RayTensorParallel:
        """K rank processes holding their shards and caches (`CheckpointError` naming the
        sizes that work, before any starts, if the model does not split over K)."""
        from souverain.distributed.launch import LocalTensorParallel, RayTensorParallel, TPConfig

        k = config.tensor_parallel
        tp = TPConfig(
            str(checkpoint.path), world=k, dtype=str(self.dtype).removeprefix("torch."),
            quantization=config.quantization, num_blocks=self.num_blocks,
            block_size=config.block_size,
            threads=max(1, (config.threads or threads or k) // k))
        if config.tensor_parallel_ray is not None:  # ranks as Ray actors
            address = config.tensor_parallel_ray
            return RayTensorParallel(tp, address=None if address == "local" else address)
        return LocalTensorParallel(tp)

    def _weights_estimate(self, config: EngineConfig, args: ModelArgs) -> int:
        """What the ranks' weights will take, from the header alone (they load after the
        KV budget is sized): bytes per parameter of the quantization or the dtype."""
        per = {"int8": 1.0, "int4": 0.5}.get(config.quantization,
                                             float(torch.empty((), dtype=self.dtype)
                                                   .element_size()))
        return int(args.n_params * per)

    def _kv_blocks(self, config: EngineConfig, args: ModelArgs, loading: int = 0) -> int:
        """Blocks of the KV budget (see `EngineConfig`), sized after the weights are loaded
        (or with ``loading`` bytes of weights still to come)."""
        if config.kv_cache_tokens is not None:
            tokens = config.kv_cache_tokens
        elif config.kv_cache_gib is not None:
            tokens = int(config.kv_cache_gib * GiB // self.kv_bytes_per_token)
        else:
            avail = available_memory()
            budget = min(4 * GiB, 0.25 * (max(0, avail - loading) if avail else 8 * GiB))
            tokens = min(int(budget // self.kv_bytes_per_token),
                         config.max_num_seqs * config.context(args))
        return max(2, tokens // config.block_size)

    # -- one step ------------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        """The flat batch of this step's scheduled tokens (each sequence from its first
        uncomputed token)."""
        tokens: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        sampling: list[Sequence] = []
        rows: list[int] = []
        lora_rows: dict[int, list[int]] = {}
        prompt_rows: list[int] = []
        targets: list[tuple[Sequence, int]] = []
        drafts: list[list[int]] = []
        for item in scheduled:
            seq, n, c = item.seq, item.num_new, item.seq.num_computed
            if seq.lora is not None:
                lora_rows.setdefault(seq.lora.slot, []).extend(range(len(tokens),
                                                                     len(tokens) + n))
            if seq.needs_prompt_logprobs:  # row p scores prompt token p + 1
                assert seq.prompt_logprobs is not None
                first = max(c, len(seq.prompt_logprobs) - 1)
                for p in range(first, min(c + n, seq.num_prompt_tokens - 1)):
                    prompt_rows.append(len(tokens) + p - c)
                    targets.append((seq, p + 1))
            draft = item.draft
            tokens.extend(seq.token_ids[c:c + n - len(draft)])
            tokens.extend(draft)
            positions.extend(range(c, c + n))
            slices.append(SeqSlice(c, n, seq.block_table, seq.num_prompt_tokens))
            if c + n - len(draft) == seq.num_tokens:
                sampling.append(seq)
                drafts.append(draft)
                rows.extend(range(len(tokens) - 1 - len(draft), len(tokens)))
        device = self.device
        with torch.inference_mode():  # inference tensors: no autograd bookkeeping (detach_)
            return StepBatch(
                token_ids=torch.tensor(tokens, dtype=torch.long, device=device),
                positions=torch.tensor(positions, dtype=torch.long, device=device),
                attn=(None if self.cache is None else
                      PagedAttention(self.cache, slices, device)),
                slices=slices,
                logits_indices=torch.tensor(rows, dtype=torch.long, device=device),
                sampling=sampling, lora_rows=lora_rows,
                prompt_rows=(torch.tensor(prompt_rows, dtype=torch.long, device=device)
                             if prompt_rows else None),
                prompt_targets=targets, drafts=drafts)

    def run(self, batch: StepBatch) -> torch.Tensor:
        """One forward over the whole batch: every new token's K/V written to its slot;
        returns the float32 logits of the sampling rows, ``(S, vocab)``. Prompt-logprob rows
        go through the head in a call of their own (`batch.prompt_logits`), so the sampling
        rows' logits are computed exactly as without them."""
        if self.tp is not None:
            return self._run_ranks(batch)
        assert self.model is not None and batch.attn is not None
        with self.lora_lock, torch.inference_mode():
            self.loras.begin_step(batch.lora_rows, len(batch.token_ids))
            try:
                if batch.prompt_rows is None:
                    return self.model(batch.token_ids, batch.positions, batch.attn,
                                      logits_indices=batch.logits_indices)
                h = self.model.hidden(batch.token_ids, batch.positions, batch.attn)
                batch.prompt_logits = self.model.head(h.index_select(0, batch.prompt_rows))
                return self.model.head(h.index_select(0, batch.logits_indices))
            finally:
                self.loras.end_step()

    def _run_ranks(self, batch: StepBatch) -> torch.Tensor:
        """`run` on the tensor-parallel ranks: the step's plain description to rank 0, its
        logits back (the prompt-logprob rows first, in a head call of their own there too)."""
        from souverain.distributed.worker import StepInputs

        assert self.tp is not None
        scored = None if batch.prompt_rows is None else batch.prompt_rows.tolist()
        step = StepInputs(batch.token_ids.tolist(), batch.positions.tolist(), batch.slices,
                          batch.logits_indices.tolist(), prompt_rows=scored)
        with self.lora_lock:  # one step on the ranks' pipe at a time
            logits = self.tp.run(step)
        if scored is None:
            return logits
        batch.prompt_logits = logits[:len(scored)]
        return logits[len(scored):]

    def sample(self, batch: StepBatch, logits: torch.Tensor
               ) -> list[list[tuple[int, TokenLogprob | None]]]:
        """The new tokens (and their logprobs when asked) of each sampling sequence.

        Without drafts, one token per sequence. A sequence with drafts gets its rows walked
        in order (see `souverain.engine.speculative`): row ``i`` is sampled exactly as a
        normal step would be with the tokens accepted so far as output, and the walk goes on
        while the token equals draft ``i`` (and is not a stop id). A sequence short of its
        ``min_tokens`` cannot stop yet (its stop ids are banned)."""
        logits = logits.cpu()
        seqs, drafts = batch.sampling, batch.drafts or [[] for _ in batch.sampling]
        starts, row = [], 0
        for d in drafts:
            starts.append(row)
            row += 1 + len(d)
        results: list[list[tuple[int, TokenLogprob | None]]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        i = 0
        while active:
            x = logits if row == len(active) else logits.index_select(
                0, torch.tensor([starts[j] + i for j in active]))
            rows = []
            with torch.inference_mode():  # logits is an inference tensor: edit it in that mode
                for r, j in enumerate(active):
                    seq = seqs[j]
                    out = seq.output_token_ids
                    if i:
                        out += [t for t, _ in results[j]]
                    if len(out) < seq.params.min_tokens and seq.stop_ids:
                        x[r, list(seq.stop_ids)] = float("-inf")
                    rows.append(SamplingRow(seq.params, seq.generator, seq.prompt_token_ids, out))
            tokens, logprobs = sample_batch(x, rows)
            still = []
            for j, token, lp in zip(active, tokens, logprobs):
                results[j].append((token, lp))
                d = drafts[j]
                if i < len(d) and token == d[i] and token not in seqs[j].stop_ids:
                    still.append(j)
            active, i = still, i + 1
        return results

    @staticmethod
    def record_prompt_logprobs(batch: StepBatch) -> None:
        """Each scored prompt token's logprob (log_softmax of the float32 logits, as
        `sample_batch` reports generated tokens') and its sequence's top-k."""
        if batch.prompt_logits is None:
            return
        with torch.inference_mode():
            lps = torch.log_softmax(batch.prompt_logits.float(), dim=-1).cpu()
            ks = [seq.params.prompt_logprobs or 0 for seq, _ in batch.prompt_targets]
            k_max = max(ks)
            top_v, top_i = (lps.topk(k_max, dim=-1) if k_max else (None, None))
            ids = torch.tensor([seq.token_ids[p] for seq, p in batch.prompt_targets])
            chosen = lps.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
        for r, ((seq, p), k) in enumerate(zip(batch.prompt_targets, ks)):
            assert seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == p
            top = ([] if top_v is None or top_i is None else
                   list(zip(top_i[r, :k].tolist(), top_v[r, :k].tolist())))
            seq.prompt_logprobs.append(TokenLogprob(seq.token_ids[p], chosen[r], top))

    # -- outside the steps -------------------------------------------------------------------
    def prompt_logits(self, token_ids: list[int], lora: str | None = None) -> torch.Tensor:
        """Logits of every position of one whole prompt, without the KV cache: float32
        ``[len(token_ids), vocab]``, with the loaded adapter ``lora`` if given."""
        if self.tp is not None:
            from souverain.distributed.worker import StepInputs

            if lora is not None:
                self.loras.ref(lora)  # none is ever loaded here: RequestError naming none
            n = len(token_ids)
            with self.lora_lock:
                return self.tp.run(StepInputs(list(token_ids), list(range(n)), [],
                                              prefill_lens=[n]))
        assert self.model is not None
        with self.lora_lock, self.loras.applied(lora), torch.inference_mode():
            tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            return self.model(tokens, torch.arange(len(token_ids), device=self.device))

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (the engine is unusable afterwards)."""
        if self.tp is not None:
            self.tp.close()
