"""Reader for mistral-inference's official "consolidated" folders.

``params.json`` + ``consolidated.safetensors`` (or the older ``consolidated.00.pth``) + one
tokenizer file. Tensor names and the RoPE layout are already ours: nothing to rename.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from souverain.errors import CheckpointError
from souverain.weights.args import ModelArgs
from souverain.weights.checkpoint import (
    Checkpoint,
    TensorInfo,
    convert_mapped,
    mapped_reader,
    validate,
)
from souverain.weights.safetensors_files import SafetensorsFiles

_TORCH_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
}


def read_params(folder: Path) -> ModelArgs:
    path = folder / "params.json"
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or re-download it.") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object of model parameters.")
    return ModelArgs.from_params_json(params, source=str(path))


def open_consolidated(folder: Path) -> Checkpoint:
    """Open an official folder; the tokenizer is attached by the caller."""
    args = read_params(folder)
    st = sorted(folder.glob("consolidated*.safetensors"))
    pth = sorted(folder.glob("consolidated.*.pth"))
    if st and pth:
        raise CheckpointError(
            f"{folder} holds both {st[0].name} and {pth[0].name}: they are two copies of the "
            "weights in different formats; delete one (keep the .safetensors)."
        )
    if not st and not pth:
        raise CheckpointError(
            f"{folder} has params.json but no consolidated.safetensors or consolidated.00.pth: "
            "the weights file is missing; download it into this folder."
        )
    tensors: dict[str, TensorInfo] = {}
    closers: list[Callable[[], None]] = []
    if st:
        files = SafetensorsFiles(st)
        closers.append(files.close)
        for key in files.keys():
            tensors[key] = TensorInfo(files.shape(key), files.dtype(key),
                                      mapped_reader(partial(files.get, key)))
    else:
        if len(pth) > 1:
            raise CheckpointError(
                f"{folder} holds {len(pth)} consolidated.*.pth shards: tensor-parallel shards "
                "are not supported; use the single-file consolidated.safetensors release."
            )
        try:
            state = torch.load(pth[0], map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{pth[0]} could not be read as a PyTorch checkpoint ({exc}); it is probably "
                "truncated or corrupt: download it again."
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{pth[0]} does not hold a state dict of tensors.")
        for key, t in state.items():
            tensors[key] = TensorInfo(tuple(t.shape), _TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)),
                                      partial(convert_mapped, t))
    if args.tied_embeddings:
        tensors.pop("output.weight", None)
    ckpt = Checkpoint(path=folder, format="consolidated", args=args, tensors=tensors,
                      closers=closers,
                      metadata={"weights_file": (st or pth)[0].name})
    validate(ckpt, "params.json")
    return ckpt
