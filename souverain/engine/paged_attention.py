"""Paged KV storage and the attention backend the model runner hands to `Transformer.forward`.

Keys and values of every layer live in flat slot arrays ``(num_blocks * block_size, n_kv_heads,
head_dim)``; the block tables of the `BlockManager` say which slots a sequence owns. One
`PagedAttention` is built per step from the scheduled sequences: it precomputes, once for all
layers, where each new token's K/V goes and which slots each query may read.

Decode rows (one new token) of all sequences are attended together in one padded SDPA call;
prefill chunks are attended one sequence at a time with a causal (and window) mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


class PagedAttention:
    """`AttentionBackend` for one engine step over a `PagedKVCache`."""

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
        self.decode_rows = [i for i, s in enumerate(seqs) if s.q_len == 1]
        self.prefill_rows = [i for i, s in enumerate(seqs) if s.q_len > 1]
        self._plans: dict[int | None, tuple] = {}  # window -> precomputed gather indices

    def _key_blocks(self, s: SeqSlice, window: int | None) -> tuple[list[int], int, int]:
        """The blocks holding the keys the queries of ``s`` may see, and that key range
        ``[lo, end)`` relative to the first of those blocks."""
        end = s.start + s.q_len
        lo = 0 if window is None else max(0, s.start - window + 1)
        bs = self.cache.block_size
        first, last = lo // bs, (end - 1) // bs
        return s.block_table[first:last + 1], lo - first * bs, end - first * bs

    def _plan(self, window: int | None) -> tuple:
        """Block gathers and masks for this window, shared by every layer that has it.

        Keys are gathered a whole block at a time (a few KB per copy, not one row per token)
        and the partial blocks at both ends are masked (or sliced, for a single sequence)."""
        plan = self._plans.get(window)
        if plan is not None:
            return plan
        bs = self.cache.block_size
        decode = None
        if self.decode_rows:
            spans = [self._key_blocks(self.seqs[i], window) for i in self.decode_rows]
            width = max(len(b) for b, _, _ in spans)
            index = torch.zeros(len(spans), width, dtype=torch.long)  # pad with the zero block
            mask = torch.zeros(len(spans), 1, 1, width * bs, dtype=torch.bool)
            for r, (blocks, lo, hi) in enumerate(spans):
                index[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
                mask[r, ..., lo:hi] = True
            rows = torch.tensor([self.offsets[i] for i in self.decode_rows])
            cut = (spans[0][1], spans[0][2]) if len(spans) == 1 else None
            contig = None  # one sequence on consecutive blocks: read its slots in place
            if cut is not None:
                blocks = spans[0][0]
                if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
                    contig = (blocks[0] * bs + cut[0], blocks[0] * bs + cut[1])
            decode = (rows.to(self.device), index.to(self.device),
                      None if cut is not None else mask.to(self.device), cut, contig)
        prefills = []
        for i in self.prefill_rows:
            s = self.seqs[i]
            blocks, lo, hi = self._key_blocks(s, window)
            first = s.start - (hi - lo) + s.q_len  # absolute position of the first key kept
            q_pos = torch.arange(s.start, s.start + s.q_len)
            k_pos = torch.arange(first, s.start + s.q_len)
            causal_only = first == 0 and s.start == 0 and (window is None or window >= s.q_len)
            mask = None if causal_only else visibility_mask(q_pos, k_pos, window).to(self.device)
            prefills.append((self.offsets[i], s.q_len,
                             torch.tensor(blocks, dtype=torch.long, device=self.device),
                             lo, hi, mask))
        plan = (decode, prefills)
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
        decode, prefills = self._plan(window)
        out = q.new_empty(q.shape)
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
