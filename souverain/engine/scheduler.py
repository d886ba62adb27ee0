"""`Scheduler`: which sequences run in the next step, and how many of their tokens.

Continuous batching with a per-step token budget (``max_num_batched_tokens``):
1. Running sequences first, oldest first: a decoding sequence needs one token, a sequence
   still prefilling takes the next chunk of its prompt that fits the budget (chunked prefill,
   so a long prompt never starves the decodes running beside it).
2. Then waiting sequences, first come first served, while budget, ``max_num_seqs`` and KV
   blocks allow; each starts from its longest cached prefix.
When a running sequence needs a block and none is free, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later (its generated tokens are kept, so its output is unchanged).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from souverain.engine.block_manager import BlockManager
from souverain.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step, from seq.num_computed


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        # prefix cache effectiveness, in tokens, counted at each admission (re-admissions too)
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        # 1. running sequences, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq itself was preempted: nothing newer is left running either
            self.blocks.allocate(seq, seq.num_computed + n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        # 2. waiting sequences, first come first served
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # a cached prefix has no logits: a request for prompt logprobs computes its prompt
            if not seq.block_table and not seq.needs_prompt_logprobs:
                seq.num_cached = self.blocks.match_prefix(seq)
                seq.num_computed = seq.num_cached
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                n = self._largest_fit(seq, n)  # a smaller first chunk may fit now
                if n <= 0:
                    self.blocks.free_sequence(seq)  # drop prefix-cache refs while it waits
                    seq.num_computed = seq.num_cached = 0
                    break  # keep FIFO order: wait for blocks to free up
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed + n)
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += seq.num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def _largest_fit(self, seq: Sequence, n: int) -> int:
        free_tokens = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
        return min(n, free_tokens - seq.num_computed)


    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.num_computed = 0
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
