"""`BlockManager`: the only owner of KV-cache memory.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence's
``block_table`` lists its blocks in order; position ``p`` lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Prefix caching: a *full* block whose keys/values have been computed is registered under a
chained hash of (previous block's hash, its token ids), which pins down every token before it
too; the chain starts from the sequence's ``hash_seed`` (0, or its LoRA adapter's identity:
KV computed under one adapter is never reused by another). A later sequence whose prompt
starts with the same tokens (and adapter) reuses those blocks (reference
counted) instead of recomputing them: a long system prompt or RAG context shared by requests
is computed once. A freed block keeps its hash and contents until the slot is reallocated,
so the cache also serves requests that arrive after the first one finished.

Sliding window: when every layer has a window W, blocks that fall entirely before the
oldest position any future query can see are released (their table entry becomes -1), so a
sequence holds at most about W tokens of KV.
"""

from __future__ import annotations

from collections import OrderedDict

from souverain.engine.sequence import Sequence

_NO_HASH = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window  # free blocks outside this window (None: keep everything)
        self.ref_count = [0] * num_blocks
        self.block_hash = [_NO_HASH] * num_blocks
        # Free blocks in LRU order (oldest first). Hashed free blocks stay findable until reused.
        # Block 0 is never handed out: it stays zero and pads batched gathers (an unwritten
        # slot could hold NaN bytes, and 0 * NaN would poison the attention output).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.hash_to_block: dict[int, int] = {}
        # hashed block -> (hash seed, its tokens), to verify a hit
        self.block_tokens: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._seq_hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its full blocks

    # -- accounting ----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed first
        h = self.block_hash[block]
        if h != _NO_HASH:  # its old contents are about to be overwritten
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_tokens.pop(block, None)
            self.block_hash[block] = _NO_HASH
        self.ref_count[block] = 1
        return block

    def _hash_chain(self, tokens: list[int], n_blocks: int, seed: int = 0) -> list[int]:
        hashes, prev = [], seed
        bs = self.block_size
        for i in range(n_blocks):
            prev = hash((prev, tuple(tokens[i * bs:(i + 1) * bs])))
            hashes.append(prev)
        return hashes

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that start ``seq``'s tokens; return how many tokens they
        cover. Called once when a waiting sequence is admitted (its table is empty). At least
        one token is always left to compute, since its logits are needed."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        n_full = (seq.num_tokens - 1) // bs
        hashes = self._hash_chain(seq.token_ids, n_full, seq.hash_seed)
        for i, h in enumerate(hashes):
            block = self.hash_to_block.get(h)
            tokens = (seq.hash_seed, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            if block is None or self.block_tokens.get(block) != tokens:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        self._seq_hashes[seq.seq_id] = hashes[:len(seq.block_table)]
        return len(seq.block_table) * bs

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` can grow to hold ``num_tokens`` tokens of KV."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= len(self.free)

    def can_spare(self, seq: Sequence, num_tokens: int, reserve: int,
                  base_tokens: int = 0) -> bool:
        """Whether ``seq`` can grow to ``num_tokens`` tokens and still leave ``reserve`` free
        blocks, counting only the blocks beyond those ``base_tokens`` need anyway (for
        optional growth, such as speculative drafts, that must never cost a preemption)."""
        extra = self.blocks_needed(num_tokens) - max(len(seq.block_table),
                                                     self.blocks_needed(base_tokens))
        return extra <= 0 or extra <= len(self.free) - reserve

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` blocks for its first ``num_tokens`` tokens (call `can_allocate` first)."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError("KV cache out of blocks: the scheduler must check can_allocate")
        for _ in range(need):
            seq.block_table.append(self._take_free_block())

    def free_sequence(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (finished, aborted or preempted)."""
        for block in reversed(seq.block_table):  # tail first: reused last, prefix kept longest
            if block >= 0:
                self._release(block)
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released twice"
        if self.ref_count[block] == 0:
            self.free[block] = None

    # -- after a forward pass ----------------------------------------------------------------
    def commit_computed(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that became full with computed KV, so later
        requests with the same prefix can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        n_full = seq.num_computed // bs
        prev = hashes[-1] if hashes else seq.hash_seed
        for i in range(len(hashes), n_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = hash((prev, tokens))
            hashes.append(prev)
            block = seq.block_table[i]
            if block < 0:
                continue
            if self.block_hash[block] == _NO_HASH and prev not in self.hash_to_block:
                self.block_hash[block] = prev
                self.hash_to_block[prev] = block
                self.block_tokens[block] = (seq.hash_seed, tokens)

    def release_outside_window(self, seq: Sequence) -> None:
        """Free blocks no future query of ``seq`` can see (all layers windowed)."""
        if self.window is None:
            return
        # The next query is at position num_computed; it sees keys > num_computed - window.
        oldest_needed = seq.num_computed - self.window + 1
        for i in range(max(0, oldest_needed) // self.block_size):
            block = seq.block_table[i]
            if block >= 0:
                self._release(block)
                seq.block_table[i] = -1
