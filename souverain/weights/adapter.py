"""LoRA adapters on disk and in memory, in the two formats users meet.

In memory a `LoRAAdapter` holds, per adapted linear (named as in mistral-inference, e.g.
``layers.0.attention.wq``), ``A [rank, in]`` and ``B [out, rank]``; the adapted layer computes
``W x + scaling * B (A x)``; merging is ``W + scaling * B @ A``. Query/key rows are in the
interleaved RoPE layout, like every weight souverain holds.

On disk, `save_adapter` writes both:
- mistral-finetune's ``lora.safetensors`` (keys ``layers.0.attention.wq.lora_A.weight``) with
  ``lora_config.json`` ``{"rank", "scaling", "alpha", "target_modules", "base_model"}``;
- PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` with Hugging Face module names
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), q/k rows of B permuted
  back to Hugging Face's rotate-half layout, so that ``peft.PeftModel.from_pretrained`` loads
  it on the transformers model of the same base. (Mixture-of-experts adapters are written in
  the mistral-finetune format only: transformers 5 fuses experts into 3-D parameters.)
`load_adapter` reads either (a folder holding one of them, or a ``lora.safetensors`` file).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from souverain.errors import CheckpointError
from souverain.weights.huggingface import TO_HF_LAYER, hf_to_interleaved, interleaved_to_hf

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

# native module suffix <-> Hugging Face module suffix of the projections (dense Mistral / Llama)
_TO_HF = {m: TO_HF_LAYER[f"{m}.weight"].removesuffix(".weight")
          for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
_FROM_HF = {v: k for k, v in _TO_HF.items()}
_NATIVE = re.compile(r"^(layers\.\d+\.[a-z_.0-9]+)\.lora_([AB])\.weight$")
_PEFT = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.([a-z_]+\.[a-z_]+)"
                   r"\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoRAAdapter:
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    base_model: str | None = None
    name: str | None = None

    @property
    def targets(self) -> list[str]:
        """Module short names adapted (``wq``, ``w1``...), in a stable order."""
        return sorted({k.rsplit(".", 1)[-1] for k in self.weights})

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values())

    def delta(self, module: str) -> torch.Tensor | None:
        """``scaling * B @ A`` for one module (float32), or None if it is not adapted."""
        if module not in self.weights:
            return None
        a, b = self.weights[module]
        return (b.float() @ a.float()) * self.scaling


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_adapter(adapter: LoRAAdapter, folder: str | os.PathLike[str], *,
                 n_heads: int | None = None, n_kv_heads: int | None = None,
                 alpha: float | None = None, dropout: float = 0.0) -> Path:
    """Write both formats into `folder` (created). `n_heads`/`n_kv_heads` are needed for the
    PEFT copy's q/k permutation; without them (or for MoE adapters) only lora.safetensors is
    written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    native: dict[str, torch.Tensor] = {}
    for mod, (a, b) in sorted(adapter.weights.items()):
        native[f"{mod}.lora_A.weight"] = a
        native[f"{mod}.lora_B.weight"] = b
    _atomic_save(native, out / "lora.safetensors")
    _atomic_json({"rank": adapter.rank, "scaling": adapter.scaling,
                  "alpha": alpha if alpha is not None else adapter.scaling * adapter.rank,
                  "dropout": dropout, "target_modules": adapter.targets,
                  "base_model": adapter.base_model}, out / "lora_config.json")
    moe = any(".experts." in m for m in adapter.weights)
    if n_heads is None or n_kv_heads is None or moe:
        return out
    peft: dict[str, torch.Tensor] = {}
    hf_targets = set()
    for mod, (a, b) in adapter.weights.items():
        layer, rest = mod.split(".", 2)[1], mod.split(".", 2)[2]
        hf = _TO_HF[rest]
        hf_targets.add(hf.split(".")[-1])
        if rest == "attention.wq":
            b = interleaved_to_hf(b, n_heads)
        elif rest == "attention.wk":
            b = interleaved_to_hf(b, n_kv_heads)
        prefix = f"base_model.model.model.layers.{layer}.{hf}"
        peft[f"{prefix}.lora_A.weight"] = a
        peft[f"{prefix}.lora_B.weight"] = b
    _atomic_save(peft, out / "adapter_model.safetensors", metadata={"format": "pt"})
    _atomic_json({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank,
        "lora_alpha": alpha if alpha is not None else adapter.scaling * adapter.rank,
        "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(hf_targets), "base_model_name_or_path": adapter.base_model,
        "inference_mode": True, "use_rslora": False, "use_dora": False,
    }, out / "adapter_config.json")
    return out


def load_adapter(path: str | os.PathLike[str], *, n_heads: int | None = None,
                 n_kv_heads: int | None = None) -> LoRAAdapter:
    """Read an adapter folder (lora.safetensors + lora_config.json, or PEFT's
    adapter_config.json + adapter_model.safetensors) or a lora.safetensors file. A PEFT
    adapter needs `n_heads`/`n_kv_heads` (the base model's) to put q/k rows back in the
    interleaved layout."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        folder, native_file = p.parent, p
    else:
        folder, native_file = p, p / "lora.safetensors"
    if not folder.exists():
        raise CheckpointError(f"No adapter at {p}; give the folder a fine-tuning run wrote "
                              "(runs/NAME/checkpoints/final) or a lora.safetensors file.")
    name = folder.name
    if native_file.is_file():
        cfg_path = folder / "lora_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tensors = load_file(str(native_file))
        weights: dict[str, list[Any]] = {}
        for key, t in tensors.items():
            m = _NATIVE.match(key)
            if m is None:
                raise CheckpointError(f"{native_file}: unexpected tensor {key!r}; a LoRA "
                                      "file holds only *.lora_A.weight / *.lora_B.weight.")
            weights.setdefault(m.group(1), [None, None])[0 if m.group(2) == "A" else 1] = t
        rank = int(cfg.get("rank") or next(iter(weights.values()))[0].shape[0])
        scaling = float(cfg.get("scaling", 2.0))
        return LoRAAdapter(rank, scaling, _pairs(weights, native_file), cfg.get("base_model"),
                           name)
    peft_cfg = folder / "adapter_config.json"
    peft_file = folder / "adapter_model.safetensors"
    if not (peft_cfg.is_file() and peft_file.is_file()):
        raise CheckpointError(f"{folder} holds neither lora.safetensors nor a PEFT adapter "
                              "(adapter_config.json + adapter_model.safetensors).")
    cfg = json.loads(peft_cfg.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise CheckpointError(f"{peft_cfg}: only plain LoRA adapters are supported "
                              "(not DoRA, rsLoRA or other PEFT methods).")
    if n_heads is None or n_kv_heads is None:
        raise CheckpointError("Loading a PEFT adapter needs the base model's head counts.")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    weights = {}
    for key, t in load_file(str(peft_file)).items():
        m = _PEFT.match(key)
        if m is None or m.group(2) not in _FROM_HF:
            raise CheckpointError(f"{peft_file}: tensor {key!r} is not a LoRA weight of a "
                                  "Mistral/Llama attention or MLP projection.")
        rest = _FROM_HF[m.group(2)]
        if m.group(3) == "B" and rest in ("attention.wq", "attention.wk"):
            t = hf_to_interleaved(t, n_heads if rest == "attention.wq" else n_kv_heads)
        mod = f"layers.{m.group(1)}.{rest}"
        weights.setdefault(mod, [None, None])[0 if m.group(3) == "A" else 1] = t
    return LoRAAdapter(rank, alpha / rank, _pairs(weights, peft_file),
                       cfg.get("base_model_name_or_path"), name)


def _pairs(weights: dict[str, list[Any]], source: Path) -> dict[str, tuple[torch.Tensor,
                                                                         torch.Tensor]]:
    out = {}
    for mod, (a, b) in weights.items():
        if a is None or b is None:
            raise CheckpointError(f"{source}: {mod} has lora_{'A' if a is None else 'B'} "
                                  "missing; the adapter file is incomplete.")
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{source}: {mod} lora_A {tuple(a.shape)} and lora_B "
                                  f"{tuple(b.shape)} disagree on the rank.")
        out[mod] = (a, b)
    return out
