"""Attention over a flat batch of several sequences, with or without a KV cache.

The model never knows how keys and values are stored: each attention layer hands its new
``q, k, v`` for the flat batch to an *attention backend* prepared for this forward pass, and
gets the attended values back. The backend owns the KV layout (none, a contiguous per-sequence
buffer here, pages in the engine) and the masking rules, so the engine can batch and page
without touching the model.

Masking rule (the same everywhere): a query at absolute position ``p`` sees key positions
``j`` with ``p - W < j <= p`` — exactly ``W`` keys including itself — when the layer has a
sliding window ``W``, and ``0 <= j <= p`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    """What a `Transformer` forward needs to run attention for one flat batch."""

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # (T, n_heads, head_dim), RoPE applied
        k: torch.Tensor,  # (T, n_kv_heads, head_dim), RoPE applied
        v: torch.Tensor,  # (T, n_kv_heads, head_dim)
        window: int | None,
    ) -> torch.Tensor:  # (T, n_heads, head_dim)
        ...


def visibility_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean (len(q_pos), len(k_pos)) mask: True where a query may attend to a key."""
    diff = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk): how far back each key is
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
    """SDPA on (H, Tq, D) queries and (KVH, Tk, D) keys/values, GQA included.

    Inputs and mask get batch (and head) dimensions: on the CPU, 3-D inputs or a 2-D/3-D mask
    send SDPA to its math path (bmm, softmax and masking ops) while 4-D ones take the flash
    kernel, GQA and boolean masks included: SmolLM2's 512-token prefill attention drops from
    11.3 to 3.1 ms a layer, a masked 256x768 chunk from 6.8 to 2.8 ms (float32 or bfloat16)."""
    if mask is not None:
        mask = mask.view(*(1,) * (4 - mask.dim()), *mask.shape)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                          is_causal=causal,
                                          enable_gqa=q.shape[0] != k.shape[0])[0]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool) -> torch.Tensor:
    # q (Tq, H, D), k/v (Tk, KVH, D) -> (Tq, H, D)
    return sdpa_heads(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask,
                      causal).transpose(0, 1)


@dataclass
class PrefillAttention:
    """No cache: each sequence of the flat batch is a whole prompt starting at position 0."""

    seq_lens: Sequence[int]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        outs, start = [], 0
        for n in self.seq_lens:
            sl = slice(start, start + n)
            if window is None or window >= n:
                outs.append(_sdpa(q[sl], k[sl], v[sl], None, causal=True))
            else:
                pos = torch.arange(n, device=q.device)
                outs.append(_sdpa(q[sl], k[sl], v[sl], visibility_mask(pos, pos, window), False))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class ContiguousKVCache:
    """A simple KV cache: one contiguous buffer of ``max_len`` positions per sequence slot.

    Keys and values are stored at their absolute position, so the sliding window is a mask,
    not a ring. The paged cache of the engine replaces this for serving; this one keeps
    `LLM` usable on its own and is the reference the paged cache is tested against.
    """

    def __init__(self, n_layers: int, n_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (n_layers, n_slots, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def batch(self, slots: Sequence[int], starts: Sequence[int],
              q_lens: Sequence[int]) -> CachedAttention:
        """Attention for a flat batch: sequence ``i`` lives in ``slots[i]`` and brings
        ``q_lens[i]`` new tokens at positions ``starts[i] ..``."""
        for s, n in zip(starts, q_lens):
            if s + n > self.max_len:
                raise ValueError(f"KV cache of {self.max_len} positions cannot hold {s + n}")
        return CachedAttention(self, list(slots), list(starts), list(q_lens))


@dataclass
class CachedAttention:
    """The `AttentionBackend` of one forward pass over a `ContiguousKVCache`."""

    cache: ContiguousKVCache
    slots: list[int]
    starts: list[int]
    q_lens: list[int]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        outs, t = [], 0
        for slot, start, n in zip(self.slots, self.starts, self.q_lens):
            end = start + n
            self.cache.k[layer, slot, start:end] = k[t:t + n]
            self.cache.v[layer, slot, start:end] = v[t:t + n]
            lo = 0 if window is None else max(0, end - n - window + 1)  # oldest key any query sees
            keys = self.cache.k[layer, slot, lo:end]
            values = self.cache.v[layer, slot, lo:end]
            if n == 1 and (window is None or end - lo <= window):
                mask = None  # a single query sees every key kept
            else:
                q_pos = torch.arange(start, end, device=q.device)
                k_pos = torch.arange(lo, end, device=q.device)
                mask = visibility_mask(q_pos, k_pos, window)
            outs.append(_sdpa(q[t:t + n], keys, values, mask, causal=False))
            t += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]
