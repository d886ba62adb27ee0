"""`TrainConfig` / `LoRAConfig`: one fine-tuning run, from Python, a dict or a YAML file.

Our own field names are accepted, and so are mistral-finetune's YAML keys where they map
(``model_id_or_path``, ``data: {instruct_data, data, eval_instruct_data}``, ``lora: {rank,
scaling, dropout}``, ``optim: {lr, weight_decay, pct_start}``, ``num_microbatches``,
``ckpt_freq``, ``eval_freq``, ``num_ckpt_keep``), so an existing mistral-finetune config runs
unchanged. Anything else is an error naming the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from souverain.errors import FinetuneError

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the block linears. ``alpha`` None means scaling 2.0 (alpha =
    2 * rank), mistral-finetune's default; the adapted layer computes
    ``W x + (alpha / rank) * B A x``."""

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scaling(self) -> float:
        return 2.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class TrainConfig:
    """Everything one run needs. ``max_steps`` or ``epochs`` bounds it (neither: one epoch)."""

    model: str
    train_files: list[str]
    run_dir: str
    eval_files: list[str] = field(default_factory=list)
    method: Literal["sft", "dpo"] = "sft"
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    schedule: Literal["cosine", "one_cycle", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    checkpoint_every: int = 50
    eval_every: int | None = None
    keep_checkpoints: int = 3
    dpo_beta: float = 0.1
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _lora_from_dict(self.lora)
        if isinstance(self.train_files, (str, os.PathLike)):
            self.train_files = [str(self.train_files)]
        if isinstance(self.eval_files, (str, os.PathLike)):
            self.eval_files = [str(self.eval_files)]
        self.lora.target_modules = tuple(self.lora.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise `FinetuneError` naming the first bad field and its allowed values."""

        def bad(name: str, why: str) -> FinetuneError:
            return FinetuneError(f"config field {name}={getattr(self, name, None)!r} {why}.")

        if not self.train_files:
            raise FinetuneError("config field train_files is empty; give at least one JSONL file.")
        if self.method not in ("sft", "dpo"):
            raise bad("method", "must be 'sft' or 'dpo'")
        for name in ("seq_len", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive integer")
        if self.max_steps is not None and self.epochs is not None:
            raise FinetuneError("config sets both max_steps and epochs; keep only one.")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise bad("max_steps", "must be a positive integer")
        if self.epochs is not None and self.epochs <= 0:
            raise bad("epochs", "must be positive")
        if self.eval_every is not None and self.eval_every < 1:
            raise bad("eval_every", "must be a positive integer or null")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise bad("warmup_fraction", "must be in [0, 1)")
        if self.schedule not in ("cosine", "one_cycle", "constant"):
            raise bad("schedule", "must be cosine, one_cycle or constant")
        if self.dtype not in ("float32", "bfloat16"):
            raise bad("dtype", "must be float32 or bfloat16")
        if self.lora.rank < 1:
            raise FinetuneError(f"config field lora.rank={self.lora.rank} must be positive.")
        if not 0 <= self.lora.dropout < 1:
            raise FinetuneError(f"config field lora.dropout={self.lora.dropout} must be in [0, 1).")
        unknown = set(self.lora.target_modules) - set(DEFAULT_TARGETS)
        if unknown or not self.lora.target_modules:
            raise FinetuneError(
                f"config field lora.target_modules has {sorted(unknown) or 'none'}"
                f"; use some of {', '.join(DEFAULT_TARGETS)}."
            )

    # -- reading ----------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], *, base_dir: str | os.PathLike[str] | None = None
    ) -> TrainConfig:
        """Our keys or mistral-finetune's; relative file paths resolve against ``base_dir``."""
        if not isinstance(d, dict):
            raise FinetuneError("a fine-tuning config must be a mapping of keys to values.")
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key in names and key not in ("lora",):
                kw[key] = value
            elif key == "lora":
                kw["lora"] = _lora_from_dict(value or {})
            elif key in _MF_ALIASES:
                kw[_MF_ALIASES[key]] = value
            elif key == "model_id_or_path":
                kw["model"] = value
            elif key == "data":
                _mf_data(value or {}, kw)
            elif key == "optim":
                _mf_optim(value or {}, kw)
            elif key in _IGNORED:
                continue
            elif key in ("wandb", "mlflow"):
                if value and any(v for v in (value or {}).values()):
                    raise FinetuneError(
                        f"config key {key!r}: souverain never sends run data to "
                        "outside services; metrics go to run_dir/metrics.jsonl. "
                        f"Remove the {key} section."
                    )
            else:
                raise FinetuneError(
                    f"unknown config key {key!r}; known keys: "
                    f"{', '.join(sorted(names | set(_MF_ALIASES)))}."
                )
        for required in ("model", "train_files", "run_dir"):
            if not kw.get(required):
                raise FinetuneError(
                    f"config lacks {required!r} (mistral-finetune: {_MF_HINT[required]})."
                )
        for key in ("train_files", "eval_files"):
            if isinstance(kw.get(key), str):
                kw[key] = [p.strip() for p in kw[key].split(",") if p.strip()]
        if base_dir is not None:
            base = Path(base_dir)
            for key in ("train_files", "eval_files"):
                kw[key] = [
                    str(base / p) if not Path(p).is_absolute() else p for p in kw.get(key, [])
                ]
            if not Path(kw["run_dir"]).is_absolute():
                kw["run_dir"] = str(base / kw["run_dir"])
            m = base / str(kw["model"])
            if not Path(str(kw["model"])).is_absolute() and m.exists():
                kw["model"] = str(m)
        try:
            return cls(**kw)
        except TypeError as exc:
            raise FinetuneError(f"invalid fine-tuning config: {exc}.") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FinetuneError(
                f"config file {p} does not exist; pass a YAML file "
                "(see `souverain finetune run --help` for an example)."
            )
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise FinetuneError(f"{p} is not valid YAML ({str(exc).splitlines()[0]}).") from None
        return cls.from_dict(data or {}, base_dir=p.parent)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d


_MF_ALIASES = {
    "num_microbatches": "grad_accum",
    "ckpt_freq": "checkpoint_every",
    "eval_freq": "eval_every",
    "num_ckpt_keep": "keep_checkpoints",
    "lr": "learning_rate",
}
_IGNORED = {
    "log_freq",
    "save_adapters",
    "no_eval",
    "seq_len_warning",
    "world_size",
    "no_ckpt",
    "run_name",
}
_MF_HINT = {
    "model": "model_id_or_path",
    "train_files": "data.instruct_data or data.data",
    "run_dir": "run_dir",
}


def _lora_from_dict(d: dict[str, Any]) -> LoRAConfig:
    if not isinstance(d, dict):
        raise FinetuneError("config key 'lora' must be a mapping such as {rank: 16}.")
    kw: dict[str, Any] = {}
    for key, value in d.items():
        if key in ("rank", "alpha", "dropout"):
            kw[key] = value
        elif key == "target_modules":
            kw[key] = tuple(value)
        elif key == "scaling":  # mistral-finetune spelling
            kw["alpha_from_scaling"] = float(value)
        elif key == "enable":
            if value is False:
                raise FinetuneError(
                    "lora.enable: false asks for full fine-tuning, which "
                    "souverain does not do; only LoRA adapters are trained."
                )
        else:
            raise FinetuneError(
                f"unknown config key 'lora.{key}'; known: rank, alpha, "
                "scaling, dropout, target_modules."
            )
    scaling = kw.pop("alpha_from_scaling", None)
    cfg = LoRAConfig(**kw)
    if scaling is not None:
        cfg.alpha = scaling * cfg.rank
    return cfg


def _mf_data(d: dict[str, Any], kw: dict[str, Any]) -> None:
    train: list[str] = []
    for key, value in d.items():
        if key in ("instruct_data", "data"):
            if value:
                train += [p.strip() for p in str(value).split(",") if p.strip()]
        elif key == "eval_instruct_data":
            if value:
                kw["eval_files"] = [p.strip() for p in str(value).split(",") if p.strip()]
        elif key == "shuffle":
            continue
        else:
            raise FinetuneError(
                f"unknown config key 'data.{key}'; known: instruct_data, data, eval_instruct_data."
            )
    kw["train_files"] = train


def _mf_optim(d: dict[str, Any], kw: dict[str, Any]) -> None:
    names = {"lr": "learning_rate", "weight_decay": "weight_decay", "pct_start": "warmup_fraction"}
    for key, value in d.items():
        if key not in names:
            raise FinetuneError(
                f"unknown config key 'optim.{key}'; known: lr, weight_decay, pct_start."
            )
        kw[names[key]] = float(value)
