"""`Scheduler`: which sequences run in the next step, and how many of their tokens.

Continuous batching with a per-step token budget (``max_num_batched_tokens``):
1. Running sequences first, oldest first: a decoding sequence needs one token (plus its
   draft tokens under speculative decoding, cut to the budget and dropped before anything
   is preempted for them), a sequence still prefilling takes the next chunk of its prompt
   that fits the budget (chunked prefill, so a long prompt never starves the decodes
   running beside it).
2. Then waiting sequences, by priority (``SamplingParams.priority``, lower first: interactive
   requests before batch lines) and first come first served within a priority, while budget,
   ``max_num_seqs`` and KV blocks allow; each starts from its longest cached prefix.
``running`` is kept in (priority, admission) order, so step 1 serves interactive sequences
before batch ones. When a running sequence needs a block and none is free, the last running
sequence is preempted: the most recently admitted one of the lowest priority (a batch line
before any interactive request); its blocks are freed and it goes back to the front of its
priority's place in the queue, to be recomputed later (its generated tokens are kept, so its
output is unchanged). With one priority (every request interactive) this is plain FIFO and
newest-first preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from souverain.engine.block_manager import BlockManager
from souverain.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step, from seq.num_computed (draft tokens included)
    draft: list[int] = field(default_factory=list)  # the draft tokens verified this step


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in (priority, admission) order
        self.num_preemptions = 0
        # prefix cache effectiveness, in tokens, counted at each admission (re-admissions too)
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` after every waiting sequence of its priority or a more urgent one."""
        p = seq.params.priority
        if not self.waiting or self.waiting[-1].params.priority <= p:
            self.waiting.append(seq)  # the common case: one priority, plain FIFO
            return
        i = next(i for i, w in enumerate(self.waiting) if w.params.priority > p)
        self.waiting.insert(i, seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        # 1. running sequences, most urgent then oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            draft: list[int] = []
            if seq.draft and n == 1 and seq.num_tokens - seq.num_computed == 1:
                draft = seq.draft[:budget - 1]
                # never preempt anyone for a draft: its extra blocks must leave one free
                # block for each running sequence after it
                if not self.blocks.can_spare(seq, seq.num_computed + 1 + len(draft),
                                             len(self.running) - i - 1,
                                             base_tokens=seq.num_computed + 1):
                    draft = []
                n += len(draft)
            seq.draft = draft
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq itself was preempted: nothing newer is left running either
            self.blocks.allocate(seq, seq.num_computed + n)
            scheduled.append(ScheduledSeq(seq, n, draft))
            budget -= n
            i += 1
        for seq in self.running[i:]:  # not scheduled this step: no draft to verify
            seq.draft = []
        # 2. waiting sequences, by priority then first come first served
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
            self._add_running(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def _add_running(self, seq: Sequence) -> None:
        """Append ``seq`` after every running sequence of its priority or a more urgent one."""
        p = seq.params.priority
        if not self.running or self.running[-1].params.priority <= p:
            self.running.append(seq)
            return
        i = next(i for i, r in enumerate(self.running) if r.params.priority > p)
        self.running.insert(i, seq)

    def _largest_fit(self, seq: Sequence, n: int) -> int:
        free_tokens = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
        return min(n, free_tokens - seq.num_computed)


    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft = []
        seq.draft_computed = 0
        self.blocks.free_sequence(seq)
        seq.num_computed = 0
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        # first among the waiting sequences of its priority (after any more urgent one)
        p = seq.params.priority
        i = next((i for i, w in enumerate(self.waiting) if w.params.priority >= p),
                 len(self.waiting))
        self.waiting.insert(i, seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
