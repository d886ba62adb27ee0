"""LoRA layers for training: `LoRALinear` wraps a frozen ``nn.Linear`` of the `Transformer`.

Our own ~50-line layer rather than PEFT's ``inject_adapter_in_model``: PEFT would work on our
modules, but it would add a dependency (and its transformers coupling) for one formula; here
the names stay mistral-inference's (``layers.0.attention.wq``) so the tensors go straight into a
`LoRAAdapter`, the reference model for DPO is one context manager (`adapters_disabled`), and
the initialisation order is ours (it matters for bit-exact resume). The maths is PEFT's:
``y = W x + scaling * B (A dropout(x))``, A kaiming-uniform(a=sqrt(5)), B zeros.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from souverain.models.transformer import Transformer
from souverain.weights.adapter import LoRAAdapter


class LoRALinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))``; the base is frozen, A and B train in
    float32 whatever the base dtype (the update is cast to the activations' dtype)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.scaling = rank, scaling
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = dropout
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = x.to(torch.float32)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)


def _targets(model: Transformer, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and isinstance(child, (nn.Linear, LoRALinear)):
                if ".feed_forward.gate" in f"{name}.{child_name}":
                    continue
                found.append((f"{name}.{child_name}", module, child_name))
    return found


def inject_lora(
    model: Transformer,
    rank: int,
    scaling: float,
    dropout: float = 0.0,
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
) -> dict[str, LoRALinear]:
    """Wrap every target linear of the blocks (MoE experts included, never the router, the
    embeddings or the head) in place; every other parameter is frozen. Layers are created in
    module order, so the random A matrices depend only on the torch seed."""
    model.requires_grad_(False)
    layers: dict[str, LoRALinear] = {}
    for full, parent, child in _targets(model, targets):
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{full} is already adapted")
        if base.weight.device.type == "meta":
            raise TypeError(f"{full} has no weights")
        layer = LoRALinear(base, rank, scaling, dropout)
        setattr(parent, child, layer)
        layers[full] = layer
    if not layers:
        raise ValueError(f"no linear named {', '.join(targets)} in the model")
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model (every LoRA update off) inside the block: DPO's reference model."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def to_adapter(
    model: nn.Module, *, base_model: str | None = None, name: str | None = None
) -> LoRAAdapter:
    """The current A/B of every `LoRALinear` as a `LoRAAdapter` (detached float32 copies)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    weights = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in layers.items()}
    return LoRAAdapter(first.rank, first.scaling, weights, base_model, name)


@torch.no_grad()
def load_into(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Copy an adapter's A/B into the model's LoRA layers (same names and shapes)."""
    layers = lora_layers(model)
    if set(layers) != set(adapter.weights):
        missing = sorted(set(layers) ^ set(adapter.weights))[:3]
        raise ValueError(f"adapter and model disagree on the adapted modules ({missing})")
    for n, layer in layers.items():
        a, b = adapter.weights[n]
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
