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

from souverain.models.attention import visibility_mask


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

    def _key_slots(self, s: SeqSlice, window: int | None) -> tuple[torch.Tensor, int]:
        """Slots of the keys the queries of ``s`` may see, oldest first, and the first position."""
        end = s.start + s.q_len
        lo = 0 if window is None else max(0, s.start - window + 1)
        pos = torch.arange(lo, end)
        table = torch.tensor(s.block_table, dtype=torch.long)
        bs = self.cache.block_size
        return table[pos // bs] * bs + pos % bs, lo

    def _plan(self, window: int | None) -> tuple:
        """Gather indices and masks for this window, shared by every layer that has it."""
        plan = self._plans.get(window)
        if plan is not None:
            return plan
        decode = None
        if self.decode_rows:
            keys = [self._key_slots(self.seqs[i], window)[0] for i in self.decode_rows]
            longest = max(len(k) for k in keys)
            index = torch.zeros(len(keys), longest, dtype=torch.long)
            mask = torch.zeros(len(keys), 1, 1, longest, dtype=torch.bool)
            for r, k in enumerate(keys):
                index[r, :len(k)] = k
                mask[r, ..., :len(k)] = True
            rows = torch.tensor([self.offsets[i] for i in self.decode_rows])
            all_full = all(len(k) == longest for k in keys)
            decode = (rows.to(self.device), index.to(self.device),
                      None if all_full else mask.to(self.device))
        prefills = []
        for i in self.prefill_rows:
            s = self.seqs[i]
            slots, lo = self._key_slots(s, window)
            q_pos = torch.arange(s.start, s.start + s.q_len)
            k_pos = torch.arange(lo, s.start + s.q_len)
            mask = visibility_mask(q_pos, k_pos, window)
            causal_only = lo == 0 and s.start == 0 and (window is None or window >= s.q_len)
            prefills.append((self.offsets[i], s.q_len, slots.to(self.device),
                             None if causal_only else mask.to(self.device)))
        plan = (decode, prefills)
        self._plans[window] = plan
        return plan

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        # q (T, H, D); k, v (T, KVH, D)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        decode, prefills = self._plan(window)
        gqa = q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        if decode is not None:
            rows, index, mask = decode
            keys = k_cache[index].transpose(1, 2)  # (B, KVH, L, D)
            values = v_cache[index].transpose(1, 2)
            qd = q[rows].unsqueeze(2)  # (B, H, 1, D)
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask, enable_gqa=gqa)
            out[rows] = o.squeeze(2)
        for offset, n, slots, mask in prefills:
            qs = q[offset:offset + n].transpose(0, 1)  # (H, n, D)
            keys = k_cache[slots].transpose(0, 1)  # (KVH, L, D)
            values = v_cache[slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=gqa)
            out[offset:offset + n] = o.transpose(0, 1)
        return out
