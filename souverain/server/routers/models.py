"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the cards of the served models, of
the fine-tuned models on them, and of the embedding model (context length, capabilities,
and the lifecycle fields: deprecation, replacement, archived). Deleted fine-tuned models are
not listed."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from souverain.moderation.categories import MODEL_IDS as MODERATION_IDS
from souverain.server import chat as chatmod
from souverain.server import state
from souverain.server.access import authorize
from souverain.server.errors import APIError, in_thread
from souverain.server.keyfile import KeyInfo
from souverain.server.openapi import error_responses
from souverain.server.protocol import ModelCapabilities, ModelCard, ModelList
from souverain.server.registry import FineTuned, ServedModel
from souverain.tokenizer.base import Tokenizer

router = APIRouter()


def model_card(request: Request, m: ServedModel, name: str | None = None,
               ft: FineTuned | None = None) -> ModelCard:
    """A served model's card (or, with ``ft``, a fine-tuned model's on it); a model that is
    not loaded is described from its checkpoint's header, without reading its tensors."""
    config = state.config(request)
    tok: Tokenizer | None = None
    ctx = m.config.max_model_len
    if m.engine is not None:
        tok = m.engine.engine.tokenizer
        ctx = m.engine.engine.max_model_len
    else:
        try:
            ckpt = m.checkpoint()
            tok, ctx = ckpt.tokenizer, ctx or ckpt.args.max_seq_len or 32768
        except Exception:
            pass
    return ModelCard(
        id=name or m.name, created=m.created, name=m.name,
        aliases=[] if ft else m.aliases,
        description=(f"LoRA adapter {ft.adapter_dir} on {m.name}" if ft
                     else f"{m.model} served by souverain"),
        max_context_length=int(ctx or 0),
        default_model_temperature=config.default_temperature,
        capabilities=ModelCapabilities(
            completion_chat=tok is not None and chatmod.can_chat(tok),
            completion_fim=chatmod.fim_capable(tok),
            function_calling=tok is not None,
            fine_tuning=config.finetune and ft is None),
        loaded=m.loaded,
        type="fine-tuned" if ft else "base",
        root=m.name if ft else None,
        job=(ft.job or None) if ft else None,  # None: an adapter from --lora-modules
        quantization=m.config.quantization,
        dtype=(str(m.engine.engine.dtype).removeprefix("torch.") if m.engine is not None
               else m.config.dtype),
        memory_bytes=None if ft else _memory(m),  # an adapter shares its base's memory
    )


def _memory(m: ServedModel) -> int | None:
    """Weights + KV when loaded; the load-time estimate otherwise (None: no header to read)."""
    try:
        return m.memory_bytes() if m.loaded else m.estimate_bytes()
    except Exception:  # an unreadable checkpoint: its load will say why
        return None


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 429),
            tags=["models"], summary="List the models served here")
async def list_models(request: Request,
                      key: KeyInfo | None = Depends(authorize)) -> ModelList:
    registry = state.registry(request)
    fine_tuned = [model_card(request, registry.find(ft.base), ft.name, ft)
                  for ft in await in_thread(registry.fine_tuned)]
    embed = state.embeddings(request)
    classifiers = state.classifiers(request)
    classifier_cards = await in_thread(classifiers.cards) if classifiers is not None else []
    cards = ([model_card(request, m) for m in registry.models] + fine_tuned
             + ([embed.card()] if embed is not None else []) + classifier_cards
             + [state.moderation(request).card()])
    lifecycle = state.lifecycle(request)
    await in_thread(lifecycle.rows)  # read the rows once, off the event loop
    evaluations = state.evaluations(request)
    held = await in_thread(evaluations.held)  # models the release gate holds: not listed
    await in_thread(evaluations.latest)
    if held and evaluations.privileged(request, key):
        held = {}
    return ModelList(data=[with_evaluation(request, with_lifecycle(request, c)) for c in cards
                           if not lifecycle.deleted(c.id) and c.id not in held
                           and _key_may_use(key, c)])


def _key_may_use(key: KeyInfo | None, card: ModelCard) -> bool:
    """A key restricted to some models (``models=a,b``) lists only those (by id or alias)."""
    return key is None or key.models is None or any(map(key.allows, [card.id, *card.aliases]))


def with_evaluation(request: Request, card: ModelCard) -> ModelCard:
    """``card`` with a link to its model's latest evaluation run (souverain extension)."""
    found = state.evaluations(request).card_field(card.id)
    return card.model_copy(update={"evaluation": found}) if found is not None else card


def with_lifecycle(request: Request, card: ModelCard) -> ModelCard:
    """``card`` with its model's deprecation, replacement (and archived, fine-tuned)."""
    fields = state.lifecycle(request).card_fields(card.id, card.type == "fine-tuned")
    return card.model_copy(update=fields)


@router.get("/v1/models/{model_id}", response_model=ModelCard,
            responses=error_responses(401, 403, 404, 429), tags=["models"],
            summary="One model: context length and capabilities")
async def get_model(model_id: str, request: Request,
                    key: KeyInfo | None = Depends(authorize)) -> ModelCard:
    lifecycle = state.lifecycle(request)
    if await in_thread(lifecycle.deleted, model_id):
        raise APIError(404, f"Model {model_id!r} was deleted; GET /v1/models lists the "
                            "models served here.", param="model_id", code="model_not_found")
    evaluations = state.evaluations(request)
    await in_thread(evaluations.latest)
    # 403 for a held model
    await in_thread(evaluations.check_released, request, key, model_id)
    return with_evaluation(request, with_lifecycle(request, await _card(request, model_id)))


async def _card(request: Request, model_id: str) -> ModelCard:
    embed = state.embeddings(request)
    if embed is not None and embed.serves(model_id):
        return embed.card(model_id)
    if model_id in MODERATION_IDS:
        return state.moderation(request).card(model_id)
    classifiers = state.classifiers(request)
    if classifiers is not None and model_id.startswith("ft:"):
        found = (await in_thread(classifiers.models)).get(model_id)
        if found is not None:
            return classifiers.card(model_id, found)
    m, ft = await in_thread(state.registry(request).resolve, model_id)
    return model_card(request, m, model_id, ft)
