"""Bytes of weights read per generated token at batch 1: every weight once, one row of the
token embedding (KV cache reads not counted). Multiplied by decode tok/s this gives the GB/s
column, set against the measured read bandwidth.

One rule, two readers: a GGUF file (what llama.cpp reads) and an in-memory torch model (what
souverain and transformers hold after their own conversions and quantization).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def gguf_bytes_per_token(path: Path) -> dict[str, Any]:
    """Every tensor once except the token embedding (one row per token), unless the file has
    no ``output.weight`` (tied embeddings: the embedding is read whole as the output head)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(sizes.values())
    tied = "output.weight" not in sizes
    per_token = total if tied else total - sizes.get("token_embd.weight", 0)
    main = max(types, key=lambda name: types[name])
    return {"file_bytes": path.stat().st_size, "weights_bytes": total,
            "bytes_per_token": per_token, "format": main, "types": types}


def torch_bytes_per_token(module: Any) -> int:
    """Same rule for an in-memory torch model: unique parameters and buffers, minus the token
    embedding table when a separate output head exists."""
    import torch

    from souverain.models.int8_linear import Int8Linear

    seen: set[int] = set()
    total = 0
    names: dict[str, int] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n = t.untyped_storage().nbytes()
        total += n
        names[name] = n
    for name, m in module.named_modules():  # oneDNN-packed int8 weights are not buffers
        if isinstance(m, Int8Linear):
            names[f"{name}.qweight"] = m.packed_nbytes
            total += m.packed_nbytes
    embeds = [m for m in module.modules() if isinstance(m, torch.nn.Embedding)]
    has_head = any(k.split(".")[0] in ("output", "lm_head") or ".output." in k or "lm_head" in k
                   for k in names)
    if embeds and has_head:
        w = embeds[0].weight
        if w.untyped_storage().data_ptr() in seen:
            head_ptrs = {t.untyped_storage().data_ptr() for k, t in module.named_parameters()
                         if "lm_head" in k or k.startswith("output")}
            if w.untyped_storage().data_ptr() not in head_ptrs:
                total -= w.untyped_storage().nbytes()
    return total


def find_module(obj: Any, depth: int = 3) -> Any:
    """The torch model inside an engine object (attribute names are not fixed yet)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    if depth == 0:
        return None
    for attr in ("model", "runner", "model_runner", "executor", "worker", "llm"):
        found = find_module(getattr(obj, attr, None), depth - 1) if hasattr(obj, attr) else None
        if found is not None:
            return found
    for v in getattr(obj, "__dict__", {}).values():
        if isinstance(v, torch.nn.Module):
            return v
    return None
