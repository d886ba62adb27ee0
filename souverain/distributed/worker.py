"""One tensor-parallel rank: its model shard, its KV cache, and one forward per engine step.

A `TPWorker` holds rank r's shard (`souverain.distributed.tensor_parallel`) and a
`PagedKVCache` of its own kv heads only (``n_kv_heads / K``), addressed by the same block
tables on every rank. The driver (the engine's model runner) lives with rank 0 and
calls `TPWorker.run(step)` once per step: rank 0 broadcasts the step's inputs
(`broadcast_object_list`, so ranks may be processes on other machines), every rank runs the
same forward (the all-reduces inside keep them in step), and rank 0 returns the logits (every
rank computes the same ones: the head is replicated). The other ranks sit in `TPWorker.serve`
until rank 0's `stop`.

``world == 1`` needs no process group at all: `run` is then the plain forward over the paged
cache, the reference the sharded runs are compared with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from souverain.distributed.tensor_parallel import check_shardable, shard_model_, shard_of
from souverain.engine.paged_attention import PagedAttention, PagedKVCache, SeqSlice
from souverain.models.attention import PrefillAttention
from souverain.models.loader import load_model, parse_dtype
from souverain.models.transformer import Transformer

__all__ = ["StepInputs", "TPWorker", "init_process_group", "load_shard", "local_kv_cache"]


@dataclass
class StepInputs:
    """One step's flat batch as every rank needs it: plain Python values (picklable, no
    device), what `souverain.engine.model_runner.StepBatch` describes with tensors."""

    token_ids: list[int]  # (T,) the new tokens of every scheduled sequence, concatenated
    positions: list[int]  # (T,) absolute position of each
    seqs: list[SeqSlice]  # per sequence: start, new tokens, block table, prompt length
    logits_indices: list[int] | None = None  # flat rows to compute logits for (None: all)
    # rows whose logits also come back, first, through a head call of their own (prompt
    # logprobs: the sampling rows' logits are then computed exactly as without them)
    prompt_rows: list[int] | None = None
    # no KV cache: each of these lengths is a whole prompt from position 0 (`seqs` unused),
    # the engine's `prompt_logits` (nothing is written to the cache)
    prefill_lens: list[int] | None = None


def init_process_group(rank: int, world: int, *, backend: str | None = None,
                       device: str = "cpu", master_addr: str | None = None,
                       master_port: int | None = None, timeout_s: float = 600.0) -> str:
    """Join the default process group as ``rank`` of ``world`` and return its backend: "nccl"
    for a CUDA ``device`` (where CUDA is available), "gloo" otherwise, unless ``backend``
    says. With ``master_addr`` / ``master_port``, rendezvous over TCP there; without, from the
    environment (``MASTER_ADDR``, ``MASTER_PORT``: what ``torchrun`` sets)."""
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:  # the device's own index, else torchrun's LOCAL_RANK
        index = torch.device(device).index
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) if index is None else index)
    init_method = (None if master_addr is None
                   else f"tcp://{master_addr}:{master_port}")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return backend


def load_shard(model: str | os.PathLike[str], rank: int, world: int, *,
               dtype: str | torch.dtype = "float32", device: str = "cpu",
               quantization: str = "none",
               group: dist.ProcessGroup | None = None) -> Transformer:
    """Load ``model`` (a folder, file or alias: `souverain.weights.load`) as
    `souverain.models.loader.load_model` does, and keep rank ``rank`` of ``world``'s shard.

    Every rank reads the whole checkpoint, then frees what it does not keep: peak memory is
    the whole model (reading only the shard's rows is a later step)."""
    from souverain import weights

    ckpt = weights.load(model)
    check_shardable(ckpt.args, world)  # before reading any tensor
    full = load_model(ckpt, dtype, device, quantization=quantization)
    return shard_model_(full, rank, world, group)


def local_kv_cache(model: Transformer, num_blocks: int, block_size: int,
                   dtype: str | torch.dtype | None = None) -> PagedKVCache:
    """A `PagedKVCache` for ``model``'s shard: its own kv heads only (all of them for a
    model that is not sharded), ``dtype`` the model's unless given, on its device."""
    shard = shard_of(model)
    args = model.args
    kv_heads = args.n_kv_heads if shard is None else shard.n_kv_heads
    return PagedKVCache(args.n_layers, num_blocks, block_size, kv_heads, args.head_dim,
                        model.dtype if dtype is None else parse_dtype(dtype), model.device)


class TPWorker:
    """A rank's shard and KV cache, running the steps rank 0 is given (see module docstring).

    ``group`` is the process group the shard was made with (None: the default group); a
    model that is not sharded runs alone (world 1) without any."""

    def __init__(self, model: Transformer, cache: PagedKVCache,
                 group: dist.ProcessGroup | None = None):
        shard = shard_of(model)
        self.model, self.cache, self.group = model, cache, group
        self.rank = 0 if shard is None else shard.rank
        self.world = 1 if shard is None else shard.world
        self.device = model.device
        # broadcast_object_list takes the *global* rank of the group's rank 0
        self._src = 0 if group is None or self.world == 1 else dist.get_global_rank(group, 0)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Rank 0: hand ``step`` to every rank, run it here too, and return float32 logits
        ``(len(logits_indices) or T, vocab)``."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank} runs the steps of rank 0 (`serve`), not "
                               f"its own")
        self._broadcast(step)
        return self.forward(step)

    def serve(self) -> int:
        """Ranks 1..K-1: run each step rank 0 broadcasts until its `stop`; returns the number
        of steps run."""
        steps = 0
        while True:
            step = self._broadcast(None)
            if step is None:
                return steps
            self.forward(step)
            steps += 1

    def stop(self) -> None:
        """Rank 0: release the ranks waiting in `serve`."""
        if self.rank == 0:
            self._broadcast(None)

    def forward(self, step: StepInputs) -> torch.Tensor:
        """This rank's forward of ``step`` (every rank of the group must run it together):
        the logits of ``prompt_rows`` (if any), then those of ``logits_indices``."""
        with torch.inference_mode():
            tokens = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)
            positions = torch.tensor(step.positions, dtype=torch.long, device=self.device)
            attn = (PrefillAttention(step.prefill_lens) if step.prefill_lens is not None
                    else PagedAttention(self.cache, step.seqs, self.device))
            rows = (None if step.logits_indices is None else
                    torch.tensor(step.logits_indices, dtype=torch.long, device=self.device))
            if not step.prompt_rows:
                return self.model(tokens, positions, attn, logits_indices=rows)
            h = self.model.hidden(tokens, positions, attn)
            scored = torch.tensor(step.prompt_rows, dtype=torch.long, device=self.device)
            return torch.cat([self.model.head(h.index_select(0, scored)),
                              self.model.head(h if rows is None else h.index_select(0, rows))])

    def _broadcast(self, step: StepInputs | None) -> StepInputs | None:
        if self.world == 1:
            return step
        box: list[StepInputs | None] = [step]
        dist.broadcast_object_list(box, src=self._src, group=self.group)
        return box[0]
