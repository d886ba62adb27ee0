"""`ModelArgs`: one configuration dataclass for every weight format.

Field names follow mistral-inference's ``params.json`` so an official checkpoint maps 1:1;
the Hugging Face and GGUF readers translate their own keys into these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from souverain.errors import CheckpointError


@dataclass(frozen=True)
class MoeArgs:
    """Sparse mixture of experts (Mixtral): ``num_experts`` FFNs, top-``num_experts_per_tok`` each token."""

    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class ModelArgs:
    """Shape and maths of a Mistral-family decoder.

    ``sliding_window`` is ``None`` (full attention), an int (every layer), or a list giving a
    per-layer pattern that repeats over the layers (``None`` entries mean full attention).
    ``head_dim`` is explicit: it is *not* always ``dim // n_heads`` (Mistral NeMo).
    """

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float
    sliding_window: int | tuple[int | None, ...] | None = None
    moe: MoeArgs | None = None
    tied_embeddings: bool = False
    max_seq_len: int | None = None
    model_type: str = "transformer"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = []
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not problems and self.n_heads % self.n_kv_heads != 0:
            problems.append(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta={self.rope_theta} must be positive")
        if self.model_type != "transformer":
            problems.append(f"model_type={self.model_type!r} is not supported (only 'transformer')")
        windows = self.sliding_window if isinstance(self.sliding_window, tuple) else (self.sliding_window,)
        for w in windows:
            if w is not None and (not isinstance(w, int) or w <= 0):
                problems.append(f"sliding_window entry {w!r} must be a positive integer or null")
        if self.moe is not None and not (
            0 < self.moe.num_experts_per_tok <= self.moe.num_experts
        ):
            problems.append(
                f"moe.num_experts_per_tok={self.moe.num_experts_per_tok} must be in "
                f"1..num_experts={self.moe.num_experts}"
            )
        if problems:
            raise CheckpointError("invalid model configuration: " + "; ".join(problems) + ".")

    def window_for_layer(self, layer: int) -> int | None:
        """The attention window (keys per query, itself included) of ``layer``; ``None`` = full."""
        if isinstance(self.sliding_window, tuple):
            return self.sliding_window[layer % len(self.sliding_window)]
        return self.sliding_window

    @property
    def n_params(self) -> int:
        """Parameter count of the model these args describe (tied head counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        if self.moe is not None:
            ffn = ffn * self.moe.num_experts + self.dim * self.moe.num_experts
        per_layer = attn + ffn + 2 * self.dim
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    @classmethod
    def from_params_json(cls, params: dict[str, Any], *, source: str = "params.json") -> ModelArgs:
        """Build from an official ``params.json`` dictionary.

        ``rope_theta`` absent: mistral-inference falls back to 1e6, right for Mixtral 8x7B whose
        params.json omits it, but wrong for Mistral 7B v0.1, whose params.json also omits it and
        which was trained with 1e4 (its Hugging Face config says so; it is the only release with
        a 4096 sliding window and no theta). So: no theta + a sliding window -> 1e4, else 1e6.
        The choice is recorded in ``extra`` so ``souverain inspect`` shows it.
        """
        required = ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size")
        missing = [k for k in required if k not in params]
        if missing:
            raise CheckpointError(
                f"{source} lacks required field(s) {', '.join(missing)}: it is not a "
                "mistral-inference params.json (fields dim, n_layers, hidden_dim, n_heads, ...)."
            )
        extra: dict[str, Any] = {}
        n_heads = int(params["n_heads"])
        head_dim = params.get("head_dim") or params["dim"] // n_heads
        rope_theta = params.get("rope_theta")
        window = params.get("sliding_window")
        if rope_theta is None:
            rope_theta = 1e4 if window is not None else 1e6
            extra["rope_theta_defaulted"] = rope_theta
        if isinstance(window, list):
            window = tuple(window)
        moe = params.get("moe")
        moe_args = (
            MoeArgs(int(moe["num_experts"]), int(moe["num_experts_per_tok"])) if moe else None
        )
        if params.get("vision_encoder"):
            extra["ignored"] = "vision_encoder"
        return cls(
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            head_dim=int(head_dim),
            hidden_dim=int(params["hidden_dim"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads", n_heads)),
            norm_eps=float(params["norm_eps"]),
            vocab_size=int(params["vocab_size"]),
            rope_theta=float(rope_theta),
            sliding_window=window,
            moe=moe_args,
            tied_embeddings=bool(params.get("tied_embeddings", False)),
            max_seq_len=params.get("max_seq_len") or params.get("max_position_embeddings"),
            model_type=params.get("model_type", "transformer"),
            extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict in params.json spelling (what ``souverain inspect`` prints)."""
        d = dataclasses.asdict(self)
        if isinstance(self.sliding_window, tuple):
            d["sliding_window"] = list(self.sliding_window)
        if not d["extra"]:
            d.pop("extra")
        return d
