"""Build a `Transformer` on the meta device and fill it from a `Checkpoint`, one tensor at a time.

No parameter is ever allocated twice: the model is created without storage (meta device), each
tensor is read, converted to the target dtype (a no-op view of the memory map when it already
has it) and handed to ``load_state_dict(assign=True)``. Peak memory stays near the size of the
final weights plus one tensor in flight.
"""

from __future__ import annotations

from typing import Callable

import torch

from souverain.errors import CheckpointError
from souverain.models.transformer import Transformer
from souverain.weights.checkpoint import Checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ProgressFn = Callable[[int, int], None]  # (tensors done, tensors total)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise CheckpointError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}.")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_model(ckpt: Checkpoint, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu",
               progress: ProgressFn | None = None) -> Transformer:
    """Instantiate ``ckpt``'s model in ``dtype`` on ``device`` (inference mode, no grads)."""
    target = parse_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    names = list(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        tensor = ckpt.read(name, target)
        if tensor.device != torch.device(device):
            tensor = tensor.to(device=device)
        state[name] = tensor
        if progress is not None:
            progress(i + 1, len(names))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.requires_grad_(False)
    return model.eval()
