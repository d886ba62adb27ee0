"""`DraftModel`: a smaller model with the same vocabulary drafts greedily for the target.

Its K/V live in a `PagedKVCache` of its own shape but with the target's blocks: the same block
tables (the engine's one `BlockManager`) address both caches, so a sequence's blocks hold the
target's and the draft's K/V side by side and are freed, preempted and shared together.

Per sequence, ``Sequence.draft_computed`` counts the leading tokens whose draft K/V is valid.
Drafting `k` tokens for a batch of sequences is ``k`` forwards of the draft model over all of
them at once: the first feeds each sequence's tokens from ``draft_computed`` to its last one
(a catch-up: its whole prompt the first time, then usually one or two tokens), the next ones
feed the token just drafted. After the target's verification, the draft K/V stays valid up to
the tokens kept (`LLMEngine._commit_verified` lowers ``draft_computed`` to ``num_computed``);
a preemption resets it to 0. Whatever the draft computes, the target decides every token, so
a stale or shared draft slot can only cost acceptance, never change an output.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from souverain.engine.config import EngineConfig
from souverain.engine.paged_attention import PagedAttention, PagedKVCache, SeqSlice
from souverain.engine.sequence import Sequence
from souverain.engine.speculative import best_seconds
from souverain.errors import RequestError
from souverain.models.attention import PrefillAttention
from souverain.models.loader import ProgressFn, load_model, parse_dtype
from souverain.weights import load
from souverain.weights.args import ModelArgs


class DraftModel:
    """The draft model of ``--speculative MODEL`` (see module docstring)."""

    def __init__(self, model: str | os.PathLike[str], target: ModelArgs, config: EngineConfig,
                 num_blocks: int, progress: ProgressFn | None = None):
        checkpoint = load(model)
        args = checkpoint.args
        if args.vocab_size != target.vocab_size:
            raise RequestError(
                f"the draft model {model} has a vocabulary of {args.vocab_size} tokens but the "
                f"target has {target.vocab_size}; a draft model must share the target's "
                "tokenizer (a smaller model of the same family, or a quantized copy).")
        windowed = [i for i in range(target.n_layers) if target.window_for_layer(i) is not None]
        if windowed:
            raise RequestError(
                "a draft model cannot serve a target with a sliding window yet (the blocks "
                "that leave the window are freed under the draft's K/V); use --speculative "
                "ngram with this model.")
        self.args = args
        own = dataclasses.replace(config, quantization=config.speculative_quantization,
                                  speculative=None)
        self.dtype = parse_dtype(own.model_dtype(args))
        self.model = load_model(checkpoint, self.dtype, progress=progress,
                                quantization=config.speculative_quantization)
        self.device = self.model.device
        self.cache = PagedKVCache(args.n_layers, num_blocks, config.block_size, args.n_kv_heads,
                                  args.head_dim, self.dtype, self.device)

    def step_seconds(self) -> float:
        """The best of 3 one-row forwards (after a warm-up): the cost of one drafted token."""
        with torch.inference_mode():
            tokens = torch.ones(1, dtype=torch.long, device=self.device)
            positions = torch.zeros(1, dtype=torch.long, device=self.device)

            def forward() -> object:
                return self.model(tokens, positions, PrefillAttention([1]))

            forward()  # warm-up
            return best_seconds(forward)

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[list[int]]:
        """Greedy drafts of ``lengths[i]`` tokens for ``seqs[i]`` (its blocks must already
        cover positions up to ``num_tokens + lengths[i] - 2``)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        active = [i for i, n in enumerate(lengths) if n > 0]
        feed = {i: seqs[i].token_ids[seqs[i].draft_computed:] for i in active}
        with torch.inference_mode():
            while active:
                tokens: list[int] = []
                positions: list[int] = []
                slices: list[SeqSlice] = []
                rows: list[int] = []
                for i in active:
                    seq, fed = seqs[i], feed[i]
                    start = seq.draft_computed
                    tokens.extend(fed)
                    positions.extend(range(start, start + len(fed)))
                    slices.append(SeqSlice(start, len(fed), seq.block_table,
                                           seq.num_prompt_tokens))
                    rows.append(len(tokens) - 1)
                logits = self.model(
                    torch.tensor(tokens, dtype=torch.long, device=self.device),
                    torch.tensor(positions, dtype=torch.long, device=self.device),
                    PagedAttention(self.cache, slices, self.device),
                    logits_indices=torch.tensor(rows, dtype=torch.long, device=self.device))
                best = logits.argmax(-1).tolist()
                still = []
                for i, token in zip(active, best):
                    seqs[i].draft_computed += len(feed[i])
                    drafts[i].append(int(token))
                    if len(drafts[i]) < lengths[i]:
                        feed[i] = [int(token)]
                        still.append(i)
                active = still
        return drafts
