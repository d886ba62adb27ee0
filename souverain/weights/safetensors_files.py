"""Lazy access to one or several safetensors files (sharded checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from souverain.errors import CheckpointError


class SafetensorsFiles:
    """Opens each file once; reads one tensor at a time from its memory map."""

    def __init__(self, files: list[Path]):
        self.handles = {}
        self.where: dict[str, object] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{path} is not a readable safetensors file ({exc}); it is probably truncated "
                    "or corrupt: download it again."
                ) from None
            self.handles[path] = handle
            for key in keys:
                if key in self.where:
                    raise CheckpointError(
                        f"tensor {key} appears in two files ({self._file_of(key)} and {path}): "
                        "remove the stray file from the folder."
                    )
                self.where[key] = handle
        self._paths = {id(h): p for p, h in self.handles.items()}

    def _file_of(self, key: str) -> Path:
        return self._paths[id(self.where[key])]

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].get_slice(key).get_shape())  # type: ignore[attr-defined]

    def dtype(self, key: str) -> str:
        return str(self.where[key].get_slice(key).get_dtype())  # type: ignore[attr-defined]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.where[key].get_tensor(key)  # type: ignore[attr-defined]
        except Exception as exc:
            raise CheckpointError(
                f"could not read tensor {key} from {self._file_of(key)} ({exc}); the file is "
                "probably truncated or corrupt: download it again."
            ) from None

    def get_slice(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` without reading the rest (fused expert stacks)."""
        return self.where[key].get_slice(key)[index]  # type: ignore[attr-defined]

    def close(self) -> None:
        self.handles.clear()
        self.where.clear()
