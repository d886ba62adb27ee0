"""Paged KV storage and the attention backend the model runner hands to `Transformer.forward`.

Keys and values of every layer live in flat slot arrays ``(num_blocks * block_size, n_kv_heads,
head_dim)``; the block tables of the `BlockManager` say which slots a sequence owns. One
`PagedAttention` is built per step from the scheduled sequences: it precomputes, once for all
layers, where each new token's K/V goes and which slots each query may read.

Generated positions (decode rows, and generated tokens recomputed after a preemption) are
attended by the fused ``paged_attention`` kernel straight from the pages (no gather, no
padding); prompt rows by SDPA one sequence at a time with a causal (and window) mask. Without
the kernels, decode rows go through one padded SDPA call over gathered blocks instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from souverain import kernels
from souverain.models.attention import sdpa_heads, visibility_mask


class PagedKVCache:
    """K and V for every layer: ``(n_layers, num_blocks * block_size, n_kv_heads, head_dim)``."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (n_layers, num_blocks * block_size, n_kv_heads, head_dim)
        # empty, not zeros: pages are only touched (and counted in RSS) once written. Block 0
        # is reserved by the BlockManager as the zeroed padding block.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, :block_size].zero_()
        self.v[:, :block_size].zero_()
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class SeqSlice:
    """One sequence's part of the flat batch."""

    start: int  # absolute position of its first new token
    q_len: int  # new tokens this step
    block_table: list[int]
    # positions from here on are generated tokens (recomputed ones too, after a preemption):
    # they are attended by the decode kernel wherever they are computed
    prompt_len: int = 0


class PagedAttention:
    """`AttentionBackend` for one engine step over a `PagedKVCache`.

    With the fused kernels (`souverain.kernels`), every row of a *generated* position (a
    decode row, or a generated token recomputed after a preemption) is attended by
    ``paged_attention``, straight from the cache pages, and prompt rows by SDPA, one sequence
    at a time. Which path a token takes depends only on its sequence and position, never on
    the rest of the batch, so outputs stay batch invariant. Without the kernels, decode rows
    (one new token) go through one padded SDPA call over gathered blocks."""

    def __init__(self, cache: PagedKVCache, seqs: list[SeqSlice], device: torch.device):
        self.cache = cache
        self.seqs = seqs
        self.device = device
        bs = cache.block_size
        slots = []
        for s in seqs:
            pos = torch.arange(s.start, s.start + s.q_len)
            table = torch.tensor(s.block_table, dtype=torch.long)
            slots.append(table[pos // bs] * bs + pos % bs)
        self.slot_mapping = torch.cat(slots).to(device)  # (T,): where each new token's K/V goes
        offsets = [0]
        for s in seqs:
            offsets.append(offsets[-1] + s.q_len)
        self.offsets = offsets
        self.fused = kernels.usable(cache.k)
        if self.fused:  # (seq index, prompt rows) and the kernel's rows
            self.prefill_parts = [(i, min(s.q_len, max(0, s.prompt_len - s.start)))
                                  for i, s in enumerate(seqs)]
            self.prefill_parts = [(i, n) for i, n in self.prefill_parts if n > 0]
            self.kernel_rows = [(i, p) for i, s in enumerate(seqs)
                                for p in range(max(s.start, s.prompt_len), s.start + s.q_len)]
        else:
            self.decode_rows = [i for i, s in enumerate(seqs) if s.q_len == 1]
            self.prefill_parts = [(i, s.q_len) for i, s in enumerate(seqs) if s.q_len > 1]
        self._plans: dict[int | None, tuple] = {}  # window -> precomputed gather indices

    def _key_blocks(self, s: SeqSlice, start: int, end: int, window: int | None
                    ) -> tuple[list[int], int, int]:
        """The blocks holding the keys that queries of ``s`` at positions ``[start, end)``
        may see, and that key range ``[lo, end)`` relative to the first of those blocks."""
        lo = 0 if window is None else max(0, start - window + 1)
        bs = self.cache.block_size
        first, last = lo // bs, (end - 1) // bs
        return s.block_table[first:last + 1], lo - first * bs, end - first * bs

    @staticmethod
    def _padded_tables(spans: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """The spans' block lists as one (rows, widest) table, padded with the zero block."""
        tables = torch.zeros(len(spans), max(len(b) for b, _, _ in spans), dtype=torch.long)
        for r, (blocks, _, _) in enumerate(spans):
            tables[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return tables

    def _kernel_plan(self, window: int | None) -> tuple:
        """Per kernel row: its block table (padded with the zero block) and key range."""
        spans = [self._key_blocks(self.seqs[i], p, p + 1, window) for i, p in self.kernel_rows]
        tables = self._padded_tables(spans)
        lo = torch.tensor([lo for _, lo, _ in spans], dtype=torch.long)
        hi = torch.tensor([hi for _, _, hi in spans], dtype=torch.long)
        rows = [self.offsets[i] + p - self.seqs[i].start for i, p in self.kernel_rows]
        all_rows = rows == list(range(self.offsets[-1]))  # the whole batch, in order
        return (None if all_rows else torch.tensor(rows, device=self.device),
                tables.to(self.device), lo.to(self.device), hi.to(self.device))

    def _decode_plan(self, window: int | None) -> tuple:
        """Without the kernels: block gathers and masks of the padded decode SDPA call.

        Keys are gathered a whole block at a time (a few KB per copy, not one row per token)
        and the partial blocks at both ends are masked (or sliced, for a single sequence)."""
        bs = self.cache.block_size
        spans = [self._key_blocks(self.seqs[i], self.seqs[i].start, self.seqs[i].start + 1,
                                  window) for i in self.decode_rows]
        index = self._padded_tables(spans)
        mask = torch.zeros(len(spans), 1, 1, index.shape[1] * bs, dtype=torch.bool)
        for r, (_, lo, hi) in enumerate(spans):
            mask[r, ..., lo:hi] = True
        rows = torch.tensor([self.offsets[i] for i in self.decode_rows])
        cut = (spans[0][1], spans[0][2]) if len(spans) == 1 else None
        contig = None  # one sequence on consecutive blocks: read its slots in place
        if cut is not None:
            blocks = spans[0][0]
            if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
                contig = (blocks[0] * bs + cut[0], blocks[0] * bs + cut[1])
        return (rows.to(self.device), index.to(self.device),
                None if cut is not None else mask.to(self.device), cut, contig)

    def _plan(self, window: int | None) -> tuple:
        """Everything each layer with this window needs, computed once per step."""
        plan = self._plans.get(window)
        if plan is not None:
            return plan
        kernel = decode = None
        if self.fused and self.kernel_rows:
            kernel = self._kernel_plan(window)
        elif not self.fused and self.decode_rows:
            decode = self._decode_plan(window)
        prefills = []
        for i, n in self.prefill_parts:
            s = self.seqs[i]
            blocks, lo, hi = self._key_blocks(s, s.start, s.start + n, window)
            first = s.start + n - (hi - lo)  # absolute position of the first key kept
            q_pos = torch.arange(s.start, s.start + n)
            k_pos = torch.arange(first, s.start + n)
            causal_only = first == 0 and s.start == 0 and (window is None or window >= n)
            mask = None if causal_only else visibility_mask(q_pos, k_pos, window).to(self.device)
            prefills.append((self.offsets[i], n,
                             torch.tensor(blocks, dtype=torch.long, device=self.device),
                             lo, hi, mask))
        plan = (kernel, decode, prefills)
        self._plans[window] = plan
        return plan

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        # q (T, H, D); k, v (T, KVH, D)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        bs = self.cache.block_size
        k_blocks = k_cache.view(-1, bs, *k_cache.shape[1:])  # (num_blocks, bs, KVH, D)
        v_blocks = v_cache.view(-1, bs, *v_cache.shape[1:])
        kernel, decode, prefills = self._plan(window)
        if kernel is not None:
            rows, tables, lo, hi = kernel
            if rows is None:  # every row of the batch: nothing to scatter
                return kernels.paged_attention(q, k_cache, v_cache, tables, lo, hi, bs)
        out = q.new_empty(q.shape)
        if kernel is not None:
            out.index_copy_(0, rows, kernels.paged_attention(q.index_select(0, rows), k_cache,
                                                             v_cache, tables, lo, hi, bs))
        if decode is not None:
            rows, index, mask, cut, contig = decode
            B, width = index.shape
            if contig is not None:  # no copy at all: a view of the cache
                keys = k_cache[contig[0]:contig[1]].unsqueeze(0)
                values = v_cache[contig[0]:contig[1]].unsqueeze(0)
            else:
                # index_select, not k_blocks[index]: advanced indexing is several times slower
                keys = k_blocks.index_select(0, index.view(-1)).view(B, width * bs, *k.shape[1:])
                values = v_blocks.index_select(0, index.view(-1)).view(B, width * bs,
                                                                        *v.shape[1:])
                if cut is not None:  # one sequence: slice instead of masking
                    keys, values = keys[:, cut[0]:cut[1]], values[:, cut[0]:cut[1]]
            # One query per head and no causality inside a step: the g query heads sharing a
            # KV head become g "query positions" of that head, so SDPA sees no GQA at all.
            H, D = q.shape[1], q.shape[2]
            kvh = k.shape[1]
            all_rows = not prefills  # a pure decode step: row i is sequence i, no gather
            qd = (q if all_rows else q.index_select(0, rows)).view(B, kvh, H // kvh, D)
            o = F.scaled_dot_product_attention(qd, keys.transpose(1, 2), values.transpose(1, 2),
                                               attn_mask=mask)
            if all_rows:
                return o.reshape(B, H, D)
            out.index_copy_(0, rows, o.reshape(B, H, D))
        for offset, n, blocks, lo, hi, mask in prefills:
            qs = q[offset:offset + n].transpose(0, 1)  # (H, n, D)
            keys = k_blocks.index_select(0, blocks).flatten(0, 1)[lo:hi].transpose(0, 1)
            values = v_blocks.index_select(0, blocks).flatten(0, 1)[lo:hi].transpose(0, 1)
            o = sdpa_heads(qs, keys, values, mask, causal=mask is None)
            out[offset:offset + n] = o.transpose(0, 1)
        return out
