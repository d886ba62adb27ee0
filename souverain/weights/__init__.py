"""Weight readers: one `load` for official consolidated folders, Hugging Face folders and GGUF.

Every reader returns a `Checkpoint` whose tensors carry mistral-inference names, with q/k in the
interleaved RoPE layout, read lazily one at a time.

Importing this package is cheap (no torch): `Checkpoint`, `TensorInfo` and `expected_shapes`
are imported on first access (PEP 562) and the readers inside `load`, so the CLI can name
`DEFAULT_MODEL` without loading torch.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from souverain.errors import CheckpointError, UnknownModelError
from souverain.weights.registry import BUNDLED, DEFAULT_MODEL, resolve_alias

if TYPE_CHECKING:
    from souverain.weights.checkpoint import Checkpoint, TensorInfo, expected_shapes

__all__ = ["Checkpoint", "TensorInfo", "expected_shapes", "load", "resolve", "BUNDLED",
           "DEFAULT_MODEL"]

_FROM_CHECKPOINT = ("Checkpoint", "TensorInfo", "expected_shapes")


def __getattr__(name: str) -> Any:
    if name not in _FROM_CHECKPOINT:
        raise AttributeError(f"module 'souverain.weights' has no attribute {name!r}")
    value = getattr(importlib.import_module("souverain.weights.checkpoint"), name)
    globals()[name] = value
    return value


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(model: str | os.PathLike[str]) -> Path:
    """A path for ``model``: an existing file or folder, or a bundled alias."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    if name.lower() in BUNDLED:
        return resolve_alias(name)
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        raise UnknownModelError(
            f"{name!r} looks like a Hugging Face Hub id, but souverain never downloads models: "
            "download the folder yourself (e.g. `huggingface-cli download "
            f"{name} --local-dir ./model`) and pass its path."
        )
    return resolve_alias(name)  # raises the unknown-alias error


def load(model: str | os.PathLike[str]) -> Checkpoint:
    """Open a model (folder, .gguf file or alias) without reading its tensors yet."""
    from souverain.tokenizer import find_tokenizer_in_dir
    from souverain.weights.consolidated import open_consolidated
    from souverain.weights.gguf_file import open_gguf
    from souverain.weights.huggingface import open_huggingface

    path = resolve(model)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return open_gguf(path)
        raise CheckpointError(
            f"{path} is a file but not a GGUF; pass the folder holding params.json (official "
            "consolidated) or config.json (Hugging Face) instead."
        )
    if (path / "params.json").exists():
        ckpt = open_consolidated(path)
    elif (path / "config.json").exists():
        ckpt = open_huggingface(path)
    else:
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return open_gguf(ggufs[0])
        found = ", ".join(p.name for p in sorted(path.iterdir())[:6]) or "nothing"
        raise CheckpointError(
            f"{path} has no params.json (official consolidated format) or config.json "
            f"(Hugging Face format){' and several .gguf files' if ggufs else ''} (found: "
            f"{found}); pass a complete model folder or a single .gguf file."
        )
    ckpt.tokenizer = find_tokenizer_in_dir(path)
    return ckpt


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
