"""What the server keeps on ``app.state``, and the getters that routes read it through.

`create_app` puts there, once: ``registry`` (`ModelRegistry`), ``config`` (`ServerConfig`),
``metrics`` (`ServerMetrics`), ``admission`` (`AdmissionQueue`), ``limiter`` (`RateLimiter`, or
None without rate limits), ``chat`` (`ChatService`), ``embeddings`` (`EmbeddingService`, or None
with ``--embed-model none``), ``libraries`` (`LibraryService`, or None with
``--no-libraries``), ``jobs`` (`JobStore`, or None without fine-tuning), ``worker`` (the
fine-tuning `WorkerProcess`, or None) and ``batch`` (`BatchService`, or None without the files
API or with ``--no-batch``), ``classifiers`` (`ClassifierService`, or None without
fine-tuning), ``moderation`` (`ModerationService`), ``lifecycle`` (`LifecycleService`), ``evaluations``
(`EvaluationService`). Nothing else writes them; a route reads them with a
getter below, so one request's state is always one app's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from souverain.finetune.store import JobStore
    from souverain.server.app import ServerConfig
    from souverain.server.batch import BatchService
    from souverain.server.chat_service import ChatService
    from souverain.server.classifications import ClassifierService
    from souverain.server.embeddings import EmbeddingService
    from souverain.server.evaluations import EvaluationService
    from souverain.server.libraries import LibraryService
    from souverain.server.lifecycle import LifecycleService
    from souverain.server.metrics import ServerMetrics
    from souverain.server.moderation import ModerationService
    from souverain.server.ratelimit import AdmissionQueue, RateLimiter
    from souverain.server.registry import ModelRegistry


def registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def config(request: Request) -> ServerConfig:
    return request.app.state.config


def metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def admission(request: Request) -> AdmissionQueue:
    return request.app.state.admission


def limiter(request: Request) -> RateLimiter | None:
    return request.app.state.limiter


def chat_service(request: Request) -> ChatService:
    return request.app.state.chat


def embeddings(request: Request) -> EmbeddingService | None:
    return request.app.state.embeddings


def libraries(request: Request) -> LibraryService:
    """The document libraries (their routes are mounted only when they are on)."""
    return request.app.state.libraries


def jobs(request: Request) -> JobStore:
    """The fine-tuning store (its routes are mounted only with fine-tuning on)."""
    return request.app.state.jobs


def batch(request: Request) -> BatchService:
    """The batch jobs (their routes are mounted only when they are on)."""
    return request.app.state.batch


def classifiers(request: Request) -> ClassifierService | None:
    """The classifier models of finished classifier jobs (None without fine-tuning)."""
    return request.app.state.classifiers


def moderation(request: Request) -> ModerationService:
    """The moderation model's service (moderation routes and chat guardrails)."""
    return request.app.state.moderation


def lifecycle(request: Request) -> LifecycleService:
    """The models' deprecations, withdrawals and fine-tuned models' archive/delete rows."""
    return request.app.state.lifecycle


def evaluations(request: Request) -> EvaluationService:
    """Evaluation runs, and the models the release gate holds."""
    return request.app.state.evaluations
