"""A model's lifecycle over HTTP (administration: `lifecycle.require_admin`):
``POST /v1/models/{id}/deprecate|withdraw|restore`` (souverain's admin routes, the same
changes as ``souverain models``), and La Plateforme's routes for fine-tuned models as the SDK
calls them: ``DELETE /v1/models/{id}`` (`client.models.delete`), ``POST|DELETE
/v1/fine_tuning/models/{id}/archive`` (`archive` / `unarchive`; ``POST .../unarchive`` too)
and ``PATCH /v1/fine_tuning/models/{id}`` (`update`: name, description). Every change goes to
the audit note as ``{"action", "old", "new"}`` with the key that made it."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from souverain.audit import note
from souverain.finetune.lifecycle import Lifecycle, LifecycleError
from souverain.server import state
from souverain.server.access import authorize
from souverain.server.errors import APIError, in_thread
from souverain.server.keyfile import KeyInfo
from souverain.server.lifecycle import erase_adapter, require_admin
from souverain.server.openapi import error_responses
from souverain.server.protocol import ModelCard
from souverain.server.registry import FineTuned
from souverain.server.routers.models import get_model, model_card

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 404, 409, 429)


class LifecycleChange(BaseModel):
    """The body of ``POST /v1/models/{id}/withdraw`` (all optional)."""

    model_config = ConfigDict(extra="forbid")
    replacement: str | None = Field(default=None, description=(
        "The model to use instead (the card's deprecation_replacement_model)."))
    date: dt.date | None = Field(default=None, description=(
        "When the model is retired (YYYY-MM-DD; default: today for a withdrawal)."))
    fallback: bool | None = Field(default=None, description=(
        "Serve the withdrawn model's requests with the replacement (default: the server's "
        "--withdrawn-fallback)."))


class Deprecation(LifecycleChange):
    """The body of ``POST /v1/models/{id}/deprecate``: the retirement date is required."""

    date: dt.date = Field(description="When the model is retired (YYYY-MM-DD).")


class ModelUpdate(BaseModel):
    """``PATCH /v1/fine_tuning/models/{id}`` (the SDK's UpdateModelRequest)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str | None = None


def _audit(request: Request, action: str, old: Lifecycle, new: Lifecycle) -> None:
    note(request)["lifecycle"] = {"action": action, "model": new.model_id,
                                  "old": old.summary(), "new": new.summary()}


async def _change(request: Request, key: KeyInfo | None, model_id: str, action: str,
                  change: LifecycleChange) -> ModelCard:
    require_admin(request, key)
    note(request)["model"] = model_id
    await get_model(model_id, request, key)  # 404 for a model not served here
    if change.replacement is not None:
        try:
            await get_model(change.replacement, request, key)
        except APIError:
            raise APIError(404, f"The replacement {change.replacement!r} is not a model served "
                                "here; GET /v1/models lists them.", param="replacement",
                           code="model_not_found") from None
    lifecycle = state.lifecycle(request)
    try:
        old, new = await in_thread(
            lifecycle.store.apply, action, model_id, key.key_id if key else None,
            replacement=change.replacement, fallback=change.fallback,
            date=change.date.isoformat() if change.date is not None else None)
    except LifecycleError as exc:  # a deleted model, a model replacing itself
        raise APIError(409, str(exc), code="lifecycle_conflict") from None
    lifecycle.invalidate()
    _audit(request, action, old, new)
    return await get_model(model_id, request, key)


@router.post("/v1/models/{model_id}/deprecate", response_model=ModelCard, responses=_ERRORS,
             tags=["models"], summary="Deprecate a model (date, replacement): it keeps working")
async def deprecate(model_id: str, change: Deprecation, request: Request,
                    key: KeyInfo | None = Depends(authorize)) -> ModelCard:
    return await _change(request, key, model_id, "deprecate", change)


@router.post("/v1/models/{model_id}/withdraw", response_model=ModelCard, responses=_ERRORS,
             tags=["models"], summary="Withdraw a model: requests get 410 naming the replacement")
async def withdraw(model_id: str, request: Request,
                   change: LifecycleChange = Body(default_factory=LifecycleChange),
                   key: KeyInfo | None = Depends(authorize)) -> ModelCard:
    return await _change(request, key, model_id, "withdraw", change)


@router.post("/v1/models/{model_id}/restore", response_model=ModelCard, responses=_ERRORS,
             tags=["models"], summary="Put a deprecated or withdrawn model back in service")
async def restore(model_id: str, request: Request,
                  key: KeyInfo | None = Depends(authorize)) -> ModelCard:
    return await _change(request, key, model_id, "restore", LifecycleChange())


async def _fine_tuned(request: Request, key: KeyInfo | None, model_id: str) -> FineTuned:
    """An admin request's fine-tuned model (404 unknown, 400 for a base model)."""
    require_admin(request, key)
    note(request)["model"] = model_id
    registry = state.registry(request)
    found = next((ft for ft in await in_thread(registry.fine_tuned) if ft.name == model_id),
                 None)
    if found is None:
        await get_model(model_id, request, key)  # 404 naming what is served
        classifiers = state.classifiers(request)
        if classifiers is not None and await in_thread(classifiers.serves, model_id):
            raise APIError(400, f"{model_id} is a fine-tuned classifier: deleting, archiving "
                                "and renaming classifiers is not supported yet; withdraw it "
                                f"(POST /v1/models/{model_id}/withdraw) to stop serving it.",
                           param="model_id", code="not_supported_for_classifiers")
        raise APIError(400, f"{model_id} is not a fine-tuned model; only fine-tuned models can "
                            "be deleted, archived or renamed (withdraw a base model: POST "
                            f"/v1/models/{model_id}/withdraw).", param="model_id",
                       code="not_fine_tuned")
    return found


@router.delete("/v1/models/{model_id}", responses=_ERRORS, tags=["models"],
               summary="Delete a fine-tuned model: no longer served, its adapter files erased")
async def delete_model(model_id: str, request: Request,
                       key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    ft = await _fine_tuned(request, key, model_id)
    lifecycle = state.lifecycle(request)
    # metadata first: from here no server on the database serves it
    old, new = await in_thread(lifecycle.change, request, key, model_id,
                               deleted_at=time.time())
    registry = state.registry(request)
    registry.forget_fine_tuned()
    served = registry.find(ft.base)
    if served.engine is not None and ft.name in served.engine.list_loras():
        try:
            await in_thread(served.engine.remove_lora, ft.name)
        except Exception:  # in use by a request still running: evicted later like any other
            pass
    files, size = await in_thread(erase_adapter, Path(ft.adapter_dir))
    _audit(request, "delete", old, new)
    note(request)["erased"] = {"model": model_id, "files": files, "bytes": size}
    return {"id": model_id, "object": "model", "deleted": True}


def _ft_model(request: Request, ft: FineTuned, row: Lifecycle) -> dict[str, Any]:
    """The SDK's CompletionFineTunedModel for ``ft``."""
    registry = state.registry(request)
    card = model_card(request, registry.find(ft.base), ft.name, ft)
    return {"id": ft.name, "object": "model", "created": card.created, "owned_by": card.owned_by,
            "workspace_id": "souverain", "root": ft.base, "root_version": "local",
            "archived": row.archived, "name": row.name if row.name is not None else card.name,
            "description": row.description if row.description is not None
            else card.description,
            "capabilities": {"completion_chat": card.capabilities.completion_chat,
                             "completion_fim": card.capabilities.completion_fim,
                             "function_calling": card.capabilities.function_calling,
                             "fine_tuning": False, "classification": False},
            "max_context_length": card.max_context_length, "aliases": [], "job": ft.job,
            "model_type": "completion"}


async def _archive(request: Request, key: KeyInfo | None, model_id: str,
                   archived: bool) -> dict[str, Any]:
    await _fine_tuned(request, key, model_id)
    old, new = await in_thread(state.lifecycle(request).change, request, key, model_id,
                               archived=archived)
    _audit(request, "archive" if archived else "unarchive", old, new)
    return {"id": model_id, "object": "model", "archived": archived}


@router.post("/v1/fine_tuning/models/{model_id}/archive", responses=_ERRORS,
             tags=["fine-tuning"], summary="Archive a fine-tuned model")
async def archive(model_id: str, request: Request,
                  key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _archive(request, key, model_id, True)


@router.delete("/v1/fine_tuning/models/{model_id}/archive", responses=_ERRORS,
               tags=["fine-tuning"], summary="Unarchive a fine-tuned model (the SDK's call)")
async def unarchive(model_id: str, request: Request,
                    key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _archive(request, key, model_id, False)


@router.post("/v1/fine_tuning/models/{model_id}/unarchive", responses=_ERRORS,
             tags=["fine-tuning"], summary="Unarchive a fine-tuned model")
async def unarchive_post(model_id: str, request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _archive(request, key, model_id, False)


@router.patch("/v1/fine_tuning/models/{model_id}", responses=_ERRORS, tags=["fine-tuning"],
              summary="Rename or describe a fine-tuned model")
async def update(model_id: str, body: ModelUpdate, request: Request,
                 key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    ft = await _fine_tuned(request, key, model_id)
    values = body.model_dump(exclude_unset=True)
    if not values:
        raise APIError(400, "Nothing to change: give name and/or description.", param="name")
    old, new = await in_thread(state.lifecycle(request).change, request, key, model_id,
                               **values)
    _audit(request, "update", old, new)
    return _ft_model(request, ft, new)
