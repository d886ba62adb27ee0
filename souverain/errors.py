"""Typed errors: each carries one sentence naming the problem and the fix.

The CLI turns any `SouverainError` into that sentence and exit code 2; the HTTP server turns
it into a 4xx JSON body. Nothing else should reach a user as a traceback.
"""

from __future__ import annotations


class SouverainError(Exception):
    """Base class of every error a user can cause and fix."""


class CheckpointError(SouverainError):
    """A model folder or file is missing, ambiguous, corrupt or of an unsupported kind."""


class UnknownModelError(CheckpointError):
    """A model name is neither a path nor a known alias."""


class TokenizerError(SouverainError):
    """A tokenizer is missing, unreadable, or cannot do what was asked (e.g. FIM, chat)."""


class RequestError(SouverainError):
    """A generation request is invalid (bad sampling parameter, prompt too long, ...)."""


class EmbeddingError(SouverainError):
    """An embedding request is invalid (input too long, unknown model, bad dimension, ...)."""


class RAGError(SouverainError):
    """A document library operation failed because of its input (unsupported or corrupt file,
    empty document, unknown library or document, path outside the allowed roots, ...)."""


class FinetuneError(SouverainError):
    """A fine-tuning run cannot start or go on because of its input (invalid training data,
    unknown config key, resume without a checkpoint, adapter that does not fit the base, ...)."""
