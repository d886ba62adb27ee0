"""The Mistral-family decoder: GQA + RoPE + RMSNorm + SwiGLU (dense or sparse MoE).

Module and parameter names are mistral-inference's (``layers.0.attention.wq.weight``), so an
official consolidated checkpoint loads strictly; the readers in `souverain.weights` rename every
other format to these names, with q/k rows in the interleaved-pair RoPE layout.

The forward takes a *flat* batch: the tokens of several sequences concatenated, their absolute
positions, and an attention backend that knows which tokens belong to which sequence and
where their keys and values live (see `souverain.models.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from souverain import kernels
from souverain.models.attention import AttentionBackend, PrefillAttention
from souverain.weights.args import ModelArgs


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x * rsqrt(mean(x**2) + eps) * weight`` computed in fp32 and
    rounded once to ``x``'s dtype (mistral-inference and transformers also round before the
    scaling, a second rounding for bf16 models). One fused kernel per call
    (`souverain.kernels`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add before this norm fused with it: ``(norm(x + residual), x +
        residual)``."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Rotary:
    """Rotary embedding in the interleaved-pair layout: dims (2i, 2i+1) rotate together by
    ``pos * theta**(-2i/head_dim)``. Angles and rotation are computed in fp32, as a complex
    product (mistral-inference's ``view_as_complex`` form: one op instead of the five of the
    rotate-half form, which counts at batch 1)."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def factors(self, positions: torch.Tensor) -> torch.Tensor:
        """``exp(i * pos * freq)`` per position, (T, 1, head_dim/2) complex64, shared by every
        layer of a step (broadcast over heads)."""
        dev = positions.device
        if dev not in self._inv_freq:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=dev).float()
            self._inv_freq[dev] = 1.0 / (self.theta ** (exponents / self.head_dim))
        angles = positions.float()[:, None] * self._inv_freq[dev][None, :]  # (T, head_dim/2)
        return torch.polar(torch.ones_like(angles), angles)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """``x`` rotated: (x0 cos - x1 sin, x1 cos + x0 sin) per pair. May rotate ``x`` in
        place (a fresh matmul output here): use the returned tensor."""
        return kernels.rotary(x, rope)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.window_for_layer(layer)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # wq|wk|wv as one matmul (set by `souverain.models.quantize.fuse_block_`, which
        # then removes wq, wk and wv): one kernel call instead of three per token
        self.wqkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn: AttentionBackend
                ) -> torch.Tensor:
        T = x.shape[0]
        if self.wqkv is not None:  # q and k are adjacent: one rotary call for both
            nqk = (self.n_heads + self.n_kv_heads) * self.head_dim
            qkv = self.wqkv(x)
            qk = Rotary.apply(qkv[:, :nqk].view(T, -1, self.head_dim), rope)
            q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]
            v = qkv[:, nqk:].view(T, self.n_kv_heads, self.head_dim)
        else:
            q = self.wq(x).view(T, self.n_heads, self.head_dim)
            k = self.wk(x).view(T, self.n_kv_heads, self.head_dim)
            v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)
            q, k = Rotary.apply(q, rope), Rotary.apply(k, rope)
        out = attn.attend(self.layer, q, k, v, self.window)  # (T, n_heads, head_dim)
        return self.wo(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1|w3 fused (see Attention.wqkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:  # gate|up in one output: silu and product in one kernel
            return self.w2(kernels.silu_mul(self.w13(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    """Mixtral sparse MoE: pick the top-k experts by gate logit, softmax over those k logits
    only (fp32), and sum the experts' outputs with these weights (no renormalisation)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.moe is not None
        self.k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)  # (T, n_experts)
        top_logits, chosen = torch.topk(logits, self.k, dim=-1)  # (T, k)
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            rows, nth = torch.where(chosen == i)
            if rows.numel():
                out.index_add_(0, rows, weights[rows, nth, None] * expert(x.index_select(0, rows)))
        return out


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention = Attention(args, layer)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = (
            MoeLayer(args) if args.moe is not None else FeedForward(args.dim, args.hidden_dim)
        )

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn: AttentionBackend
                ) -> torch.Tensor:
        normed, h = self.ffn_norm.add_forward(
            self.attention(self.attention_norm(x), rope, attn), x)
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    """A Mistral / Mixtral / Llama-architecture decoder over a flat batch of sequences."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # a module, not a Linear: quantization may swap it (and adds one for a tied head)
        self.output: nn.Module | None = (
            None if args.tied_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )
        self.rotary = Rotary(args.head_dim, args.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def forward(
        self,
        tokens: torch.Tensor,  # (T,) token ids of all sequences, concatenated
        positions: torch.Tensor,  # (T,) absolute position of each token in its sequence
        attn: AttentionBackend | None = None,  # None: one whole prompt starting at 0
        logits_indices: torch.Tensor | None = None,  # rows of T to compute logits for
    ) -> torch.Tensor:  # (len(logits_indices) or T, vocab) float32
        h = self.hidden(tokens, positions, attn)
        if logits_indices is not None:
            h = h.index_select(0, logits_indices)
        return self.head(h)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor,
               attn: AttentionBackend | None = None) -> torch.Tensor:
        """The last layer's output of every token, ``(T, dim)`` (before the final norm)."""
        if attn is None:
            attn = PrefillAttention([tokens.shape[0]])
        h = self.tok_embeddings(tokens)  # (T, dim)
        rope = self.rotary.factors(positions)
        for layer in self.layers:
            h = layer(h, rope, attn)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + output head over rows of `hidden`: float32 ``(rows, vocab)``."""
        h = self.norm(h)
        if self.output is None:  # tied: the embedding matrix is the head
            return F.linear(h, self.tok_embeddings.weight).float()
        return self.output(h).float()  # a module: quantization may have swapped it
