"""`ChatService`: one chat or FIM completion, from its checked request body to the response
(as vLLM's `OpenAIServingChat`).

The path: model permission (403) -> model (404) -> admission queue (429) -> engine (lazy
load, memory budget, 503) -> the fine-tuned model's adapter -> for a ``document_library``
tool, grounding (`souverain.server.grounding`) -> prompt plan (`souverain.server.chat`: 400)
-> `AsyncLLMEngine.generate` -> one JSON body, or SSE chunks ending with ``data: [DONE]``.

A client that leaves aborts its request: the JSON path polls for the disconnect, the SSE path
is cancelled by Starlette; either way the engine's stream is closed, which aborts the request
and frees its KV blocks at once. The admission slot and the model are released exactly once,
when the body is sent or the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from souverain.audit import note
from souverain.engine.async_engine import AsyncLLMEngine
from souverain.engine.engine import LLMEngine
from souverain.engine.sequence import CompletionOutput, RequestOutput
from souverain.rag.answer import Grounding
from souverain.server import chat as chatmod
from souverain.server import grounding
from souverain.server import guardrails as guardmod
from souverain.server.access import charge_tokens, check_model
from souverain.server.errors import APIError, error_body, in_thread
from souverain.server.keyfile import KeyInfo
from souverain.server.libraries import LibraryService
from souverain.server.metrics import ServerMetrics
from souverain.server.moderation import ModerationService
from souverain.server.protocol import ChatCompletionRequest, FIMCompletionRequest
from souverain.server.ratelimit import AdmissionQueue, RateLimiter
from souverain.server.registry import FineTuned, ModelRegistry, ServedModel
from souverain.tokenizer.base import Tokenizer

log = logging.getLogger("souverain.server")

DONE = b"data: [DONE]\n\n"
CompletionRequest = ChatCompletionRequest | FIMCompletionRequest


class _Release:
    """Run a release callback exactly once, whoever gets there first."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn
        self.done = False
        self.handed_over = False  # a streaming response releases, not the handler

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.fn()


@dataclass
class _Generation:
    """One admitted request on its way through the engine."""

    request_id: str
    model: str  # the name the client asked for
    created: int
    plan: chatmod.ChatPlan
    tok: Tokenizer
    key: KeyInfo | None
    rag: Grounding | None  # the passages of a document_library request
    audit: dict[str, Any]  # the request's audit notes (token counts)
    guard: guardmod.Guard | None = None  # the request's guardrails (souverain.server.guardrails)
    chat: bool = True  # a chat completion (False: FIM), whose answers /metrics counts


class _Timer:
    """Time to first token and inter-token latency of one request, into the metrics."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.metrics, self.model = metrics, model
        self.start = time.perf_counter()
        self.last: float | None = None
        self.tokens = 0

    def tick(self, total_tokens: int) -> None:
        new = total_tokens - self.tokens
        if new <= 0:
            return
        t = time.perf_counter()
        if self.last is None:
            self.metrics.observe_ttft(self.model, t - self.start)
            new -= 1
        else:
            per = (t - self.last) / new
            for _ in range(new):
                self.metrics.observe_itl(self.model, per)
        self.last = t
        self.tokens = total_tokens


@dataclass
class ChatService:
    """Serves ``POST /v1/chat/completions`` and ``POST /v1/fim/completions`` (see the module
    docstring for the path of a request). Shares the app's registry, admission queue, metrics,
    rate limiter and libraries; owns no state of its own."""

    registry: ModelRegistry
    admission: AdmissionQueue
    metrics: ServerMetrics
    limiter: RateLimiter | None
    libraries: LibraryService | None
    default_temperature: float
    moderation: ModerationService | None = None  # the chat guardrails' moderation model

    async def create(self, request: Request, body: CompletionRequest,
                     key: KeyInfo | None) -> Response:
        """The response to one chat or FIM request: JSON, or an SSE stream."""
        note(request)["model"] = body.model
        body.model = check_model(request, key, body.model)  # a withdrawn model's replacement
        served, ft = await in_thread(self.registry.resolve, body.model)
        # guardrails, 1 of 3: the conversation is moderated before anything is admitted
        guard = await self._guard_input(request, body)
        if isinstance(guard, Response):
            return guard
        engine, release = await self._admit(served)
        try:
            return await self._generate(request, body, key, engine, ft, release, guard)
        finally:
            if not release.handed_over:
                release()

    async def _guard_input(self, request: Request, body: CompletionRequest
                           ) -> guardmod.Guard | Response | None:
        """The request's guardrails after checking its conversation, or their 403."""
        if not isinstance(body, ChatCompletionRequest) or not body.guardrails:
            return None
        try:
            guard = await guardmod.check_input(
                self.moderation, body.guardrails, body.messages,
                on_flag=lambda category: self.metrics.observe_guardrail_flag(body.model,
                                                                             category))
        except guardmod.GuardrailBlocked as blocked:
            note(request)["moderation"] = {"source": "guardrails", "blocked": blocked.stage,
                                           "results": _violations(blocked.results)}
            return blocked.response()
        if guard is not None:
            note(request)["moderation"] = guard.audit()
        return guard

    async def _admit(self, served: ServedModel) -> tuple[AsyncLLMEngine, _Release]:
        """An admission slot and the model's engine (loaded if needed), with their release."""
        if not self.admission.try_acquire():
            raise APIError(429, f"The server is at capacity ({self.admission.max_pending} "
                                "requests running or queued); retry shortly.",
                           code="queue_full", headers={"Retry-After": "1"})
        try:
            served, engine = await self.registry.acquire(served.name)
        except BaseException:
            self.admission.release()
            raise

        def release() -> None:
            self.registry.release(served)
            self.admission.release()

        return engine, _Release(release)

    async def _generate(self, request: Request, body: CompletionRequest, key: KeyInfo | None,
                        engine: AsyncLLMEngine, ft: FineTuned | None,
                        release: _Release, guard: guardmod.Guard | None = None) -> Response:
        """Adapter, grounding, plan, then the engine's outputs as one body or a stream."""
        eng = engine.engine
        if ft is not None:  # a fine-tuned model: its adapter on the base model's engine
            await in_thread(self.registry.ensure_adapter, engine, ft)
        tok = chatmod.require_tokenizer(body, eng.tokenizer)
        rag = None
        if isinstance(body, ChatCompletionRequest) and body.tools:
            body, rag = await grounding.ground_chat(body, self.libraries, tok, eng.max_model_len)
            if rag is not None and not rag.found:
                return grounding.not_found_response(body, rag)
        plan = self._plan(body, tok, eng)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        notes = note(request)
        notes["request_id"] = request_id
        outputs = engine.generate(plan.prompt_ids, plan.params, request_id,
                                  lora=ft.name if ft is not None else None)
        gen = _Generation(request_id=request_id, model=body.model, created=int(time.time()),
                          plan=plan, tok=tok, key=key, rag=rag, audit=notes, guard=guard,
                          chat=isinstance(body, ChatCompletionRequest))
        if not body.stream:
            return await self._complete(request, gen, outputs)
        return self._stream_response(gen, outputs, release)

    def _plan(self, body: CompletionRequest, tok: Tokenizer, eng: LLMEngine) -> chatmod.ChatPlan:
        """Prompt ids + sampling parameters (400 for what the request may not ask)."""
        if isinstance(body, ChatCompletionRequest):
            return chatmod.plan_chat(body, tok, vocab_size=eng.args.vocab_size,
                                     max_model_len=eng.max_model_len,
                                     default_temperature=self.default_temperature)
        return chatmod.plan_fim(body, tok, max_model_len=eng.max_model_len,
                                default_temperature=self.default_temperature)

    def _account(self, gen: _Generation, prompt: int, completion: int) -> None:
        """A finished request's tokens: metrics, its key's token budget, the audit notes."""
        self.metrics.observe_tokens(gen.model, prompt, completion)
        charge_tokens(self.limiter, gen.key, prompt + completion)
        gen.audit.update(prompt_tokens=prompt, completion_tokens=completion)

    # -- one JSON body ----------------------------------------------------------------------
    async def _complete(self, request: Request, gen: _Generation,
                        outputs: AsyncIterator[RequestOutput]) -> Response:
        final = await self._collect(request, gen, outputs)
        if final is None:  # the client left
            return Response(status_code=499)
        choices = [_choice(gen, o) for o in final.outputs]
        if gen.chat:  # monitoring: answers and refusals per model
            for c in choices:
                self.metrics.observe_answer(gen.model, c["message"]["content"] or "")
        prompt = len(final.prompt_token_ids)
        completion = sum(len(o.token_ids) for o in final.outputs)
        self._account(gen, prompt, completion)
        body: dict[str, Any] = {"id": gen.request_id, "object": "chat.completion",
                                "created": gen.created, "model": gen.model, "choices": choices,
                                "usage": chatmod.usage(prompt, completion)}
        if gen.guard is not None:  # guardrails, 3 of 3: the answers, before they are sent
            try:
                await gen.guard.check_answer([c["message"]["content"] or "" for c in choices])
            except guardmod.GuardrailBlocked as blocked:
                gen.audit["moderation"] = gen.guard.audit()
                return blocked.response()
            gen.audit["moderation"] = gen.guard.audit()
            body["guardrails"] = gen.guard.body()
        return JSONResponse(body)

    async def _collect(self, request: Request, gen: _Generation,
                       outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
        """The last output of the request, or None when the client left first (the
        request is then aborted in the engine)."""
        timer = _Timer(self.metrics, gen.model)

        async def collect() -> RequestOutput:
            last = None
            async for out in outputs:
                timer.tick(sum(len(o.token_ids) for o in out.outputs))
                last = out
            if last is None:
                raise RuntimeError(f"the engine gave no output for {gen.request_id}")
            return last

        task = asyncio.create_task(collect())
        try:
            while True:
                # a client that left is noticed within 0.1 s: its sequence stops and frees its
                # KV blocks (a tiny model finishes 400 tokens in well under a second)
                done, _ = await asyncio.wait({task}, timeout=0.1)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    self.metrics.observe_abort(gen.model)
                    return None
        except asyncio.CancelledError:
            task.cancel()
            self.metrics.observe_abort(gen.model)
            raise
        return task.result()

    # -- SSE --------------------------------------------------------------------------------
    def _stream_response(self, gen: _Generation, outputs: AsyncIterator[RequestOutput],
                         release: _Release) -> StreamingResponse:
        return sse_response(self._stream(gen, outputs), release)

    async def _stream(self, gen: _Generation,
                      outputs: AsyncIterator[RequestOutput]) -> AsyncGenerator[bytes, None]:
        plan = gen.plan
        timer = _Timer(self.metrics, gen.model)
        n = plan.params.n
        sent = [0] * n  # characters of content sent per choice
        lp_sent = [0] * n
        done = [False] * n
        finished_ok = False
        try:
            for i in range(n):
                yield _chunk(gen, i, {"role": "assistant", "content": plan.prefix})
            async for out in outputs:
                timer.tick(sum(len(o.token_ids) for o in out.outputs))
                for o in out.outputs:
                    i = o.index
                    if done[i]:
                        continue
                    lp = None
                    if plan.params.logprobs and o.logprobs is not None \
                            and len(o.logprobs) > lp_sent[i]:
                        lp = chatmod.logprobs_body(o.logprobs[lp_sent[i]:], gen.tok)
                        lp_sent[i] = len(o.logprobs)
                    if o.finish_reason is None:
                        text = chatmod.streamable_text(plan, o)
                        # guardrails, 2 of 3: the answer as it grows (a window every N chars)
                        if gen.guard is not None and (cut := await gen.guard.check_stream(
                                i, text)) is not None:
                            done[i] = True
                            yield self._guard_cut(gen, i, cut, out, all(done))
                            if all(done):  # nothing left to send: stop the generation now
                                with contextlib.suppress(Exception):
                                    await outputs.aclose()  # type: ignore[attr-defined]
                                break
                            continue
                        if len(text) > sent[i] or lp is not None:
                            yield _chunk(gen, i, {"content": text[sent[i]:]}, logprobs=lp)
                            sent[i] = max(sent[i], len(text))
                        continue
                    delta, reason = _final_delta(gen, o, sent[i])
                    done[i] = True
                    if gen.chat:  # monitoring: answers and refusals per model
                        self.metrics.observe_answer(
                            gen.model, chatmod.final_message(plan, o, gen.tok)[0] or "")
                    if gen.guard is not None and (cut := await gen.guard.check_final(
                            i, chatmod.final_message(plan, o, gen.tok)[0] or "")) is not None:
                        yield self._guard_cut(gen, i, cut, out, all(done))
                        continue
                    usage = self._usage(gen, out) if all(done) else None
                    yield _chunk(gen, i, delta, reason, logprobs=lp, usage=usage,
                                 extra=_guard_extra(gen) if all(done) else None)
            finished_ok = True
            yield DONE
        except Exception as exc:  # a bug after the 200 went out: say so in the stream, then end
            log.exception("stream %s failed", gen.request_id)
            yield chatmod.sse(error_body(500, "Internal server error while streaming ("
                                              f"{type(exc).__name__}); the server log has the "
                                              "details."))
            yield DONE
        finally:
            if not finished_ok:
                self.metrics.observe_abort(gen.model)

    def _guard_cut(self, gen: _Generation, index: int, results: dict[str, Any],
                   out: RequestOutput, last: bool) -> bytes:
        """The chunk that ends a choice a guardrail blocked mid-stream."""
        gen.audit["moderation"] = gen.guard.audit() if gen.guard is not None else None
        return _chunk(gen, index, {"content": ""}, "content_filter",
                      usage=self._usage(gen, out) if last else None,
                      extra={"guardrails": {"stage": "output", "blocked": True,
                                            "message": guardmod.BLOCKED, "results": results}})

    def _usage(self, gen: _Generation, out: RequestOutput) -> dict[str, int]:
        """The usage of the last chunk, once every choice has finished (and accounted)."""
        prompt = len(out.prompt_token_ids)
        completion = sum(len(x.token_ids) for x in out.outputs)
        self._account(gen, prompt, completion)
        return chatmod.usage(prompt, completion)


def sse_response(stream: AsyncGenerator[bytes, None], release: _Release) -> StreamingResponse:
    """``stream`` as an SSE response; ``release`` runs once, when the stream ends, or by the
    background task if it never starts (the handler no longer releases: handed over)."""

    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()
            release()

    response = StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(release))
    release.handed_over = True
    return response


def _choice(gen: _Generation, o: CompletionOutput) -> dict[str, Any]:
    """One finished choice of a JSON response (with references for a grounded answer)."""
    content, calls, reason = chatmod.final_message(gen.plan, o, gen.tok)
    message: dict[str, Any] = {"role": "assistant", "content": content,
                               "tool_calls": calls or None, "prefix": False}
    if gen.rag is not None:
        message["references"] = gen.rag.references(content or "")
        if not calls:
            message["content"] = (content or "") + gen.rag.sources_footer(content or "")
    choice: dict[str, Any] = {"index": o.index, "message": message, "finish_reason": reason}
    if gen.plan.params.logprobs:
        choice["logprobs"] = chatmod.logprobs_body(o.logprobs, gen.tok)
    return choice


def _final_delta(gen: _Generation, o: CompletionOutput, sent: int) -> tuple[dict[str, Any], str]:
    """The last delta of a streamed choice (content not sent yet, tool calls, references)
    and its finish reason."""
    plan = gen.plan
    content, calls, reason = chatmod.final_message(plan, o, gen.tok)
    content = content[len(plan.prefix):]
    delta: dict[str, Any] = {"content": content[sent:] if len(content) > sent else ""}
    if calls:
        delta["tool_calls"] = calls
    if gen.rag is not None:
        delta["references"] = gen.rag.references(content)
        if not calls:
            delta["content"] += gen.rag.sources_footer(plan.prefix + content)
    return delta, reason


def _chunk(gen: _Generation, index: int, delta: dict[str, Any], finish: str | None = None,
           logprobs: dict[str, Any] | None = None, usage: dict[str, int] | None = None,
           extra: dict[str, Any] | None = None) -> bytes:
    """One ``chat.completion.chunk`` event of choice ``index`` (``extra``: more top-level
    fields, e.g. the guardrails' results)."""
    c: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
    if logprobs is not None:
        c["logprobs"] = logprobs
    body: dict[str, Any] = {"id": gen.request_id, "object": "chat.completion.chunk",
                            "created": gen.created, "model": gen.model, "choices": [c]}
    if usage is not None:
        body["usage"] = usage
    if extra:
        body.update(extra)
    return chatmod.sse(body)


def _guard_extra(gen: _Generation) -> dict[str, Any] | None:
    """The guardrails' results for a stream's last chunk (and its audit notes)."""
    if gen.guard is None:
        return None
    gen.audit["moderation"] = gen.guard.audit()
    return {"guardrails": gen.guard.body()}


def _violations(results: dict[str, Any]) -> dict[str, list[str]]:
    return {k: [c for c, v in r.get("violations", {}).items() if v] for k, r in results.items()}
