"""`ModelRunner`: the model, its paged KV cache and the attention backend of each step.

The engine hands it the sequences the scheduler picked; the runner describes them in ONE
`StepBatch` (`prepare`), runs one forward over it (`run`) and samples the next tokens
(`sample`), as nano-vllm's ``model_runner.py`` does, over mixed prefill + decode batches. It
owns the weights, the KV cache, the resident LoRA adapters (and the lock that keeps adapter
changes out of a forward); the engine owns requests, the scheduler, the block manager (which
slots each sequence may use) and the outputs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

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
from souverain.runtime import available_memory
from souverain.weights.args import ModelArgs
from souverain.weights.checkpoint import Checkpoint

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
    attn: PagedAttention  # per sequence: its slice and block table; the K/V slot of each token
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


class ModelRunner:
    """Loads ``checkpoint`` as ``config`` says, sizes and allocates the KV cache, and runs
    the steps the engine schedules (see module docstring)."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig,
                 progress: ProgressFn | None = None):
        args = checkpoint.args
        self.dtype = parse_dtype(config.model_dtype(args))
        self.model = load_model(checkpoint, self.dtype, progress=progress,
                                quantization=config.quantization)
        self.device = self.model.device
        if self.device.type == "cpu":
            kernels.available()  # built once per machine (~30 s), here rather than mid-request
        self.kv_bytes_per_token = PagedKVCache.bytes_per_token(args.n_layers, args.n_kv_heads,
                                                               args.head_dim, self.dtype)
        self.num_blocks = self._kv_blocks(config, args)
        self.cache = PagedKVCache(args.n_layers, self.num_blocks, config.block_size,
                                  args.n_kv_heads, args.head_dim, self.dtype, self.device)
        budget = config.lora_budget_gib
        self.loras = LoRAManager(self.model, args, config.max_loras,
                                 None if budget is None else int(budget * GiB))
        # adapters may be added from other threads (the server) while the engine thread steps
        self.lora_lock = threading.Lock()

    def _kv_blocks(self, config: EngineConfig, args: ModelArgs) -> int:
        """Blocks of the KV budget (see `EngineConfig`), sized after the weights are loaded."""
        if config.kv_cache_tokens is not None:
            tokens = config.kv_cache_tokens
        elif config.kv_cache_gib is not None:
            tokens = int(config.kv_cache_gib * GiB // self.kv_bytes_per_token)
        else:
            budget = min(4 * GiB, 0.25 * (available_memory() or 8 * GiB))
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
                attn=PagedAttention(self.cache, slices, device),
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
        with self.lora_lock, self.loras.applied(lora), torch.inference_mode():
            tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            return self.model(tokens, torch.arange(len(token_ids), device=self.device))
