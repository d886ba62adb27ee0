"""`CompletionService`: OpenAI's legacy ``POST /v1/completions`` over the chat service's
machinery (model permission, resolution, admission, engine, disconnects, SSE, accounting).

A request holds one or more raw prompts (strings are encoded with BOS, token ids are taken as
given; never a chat template); each prompt is one engine request of ``n`` samples, and choice
``i * n + j`` is sample ``j`` of prompt ``i`` (OpenAI's order). ``echo`` puts the prompt before
the completion; with ``logprobs=k`` every returned token gets its logprob and its ``k`` most
likely alternatives (plus itself), the prompt's from the engine's prompt logprobs (its first
token has none: null) -- what lm-evaluation-harness's ``local-completions`` reads for
loglikelihoods. ``max_tokens=0`` (with ``echo``) scores the prompt only: the engine samples
one token, which is dropped. ``text_offset`` counts characters from the start of the echoed
prompt (where the completion alone is returned, from where it would start), as OpenAI did.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from souverain.audit import note
from souverain.engine.async_engine import AsyncLLMEngine
from souverain.engine.engine import LLMEngine
from souverain.engine.sampling import SamplingParams, TokenLogprob
from souverain.engine.sequence import CompletionOutput, RequestOutput
from souverain.errors import RequestError, TokenizerError
from souverain.server import chat as chatmod
from souverain.server.access import check_model
from souverain.server.chat_service import DONE, ChatService, _Generation, sse_response
from souverain.server.errors import APIError, in_thread
from souverain.server.keyfile import KeyInfo
from souverain.server.protocol import CompletionRequest
from souverain.tokenizer.base import Tokenizer

MAX_CHOICES = 256  # prompts x n of one request: more is a 400 (send several requests)


@dataclass
class _Prompt:
    """One prompt of the request, its ids and text, and its latest engine output."""

    ids: list[int]
    text: str
    last: RequestOutput | None = None
    sent: list[int] = field(default_factory=list)  # per sample: characters streamed
    lp_sent: list[int] = field(default_factory=list)  # per sample: logprobs streamed


@dataclass
class CompletionService:
    """Serves ``POST /v1/completions`` with the app's `ChatService` (see module docstring)."""

    chat: ChatService

    async def create(self, request: Request, body: CompletionRequest,
                     key: KeyInfo | None) -> Response:
        note(request)["model"] = body.model
        body.model = check_model(request, key, body.model)  # a withdrawn model's replacement
        _refuse_unsupported(body)
        served, ft = await in_thread(self.chat.registry.resolve, body.model)
        engine, release = await self.chat._admit(served)
        try:
            if ft is not None:
                await in_thread(self.chat.registry.ensure_adapter, engine, ft)
            eng = engine.engine
            if eng.tokenizer is None:
                raise APIError(400, f"Model {body.model!r} has no tokenizer, so its completions "
                                    "cannot be returned as text.", param="model")
            prompts = await in_thread(_prompts, body, eng)
            params = self._params(body, eng, prompts)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            notes = note(request)
            notes["request_id"] = request_id
            gen = _Generation(request_id=request_id, model=body.model, created=int(time.time()),
                              plan=chatmod.ChatPlan(prompts[0].ids, params), tok=eng.tokenizer,
                              key=key, rag=None, audit=notes)
            for p in prompts:
                p.sent, p.lp_sent = [0] * params.n, [0] * params.n
            merged = _merge(engine, prompts, params, request_id,
                            lora=ft.name if ft is not None else None)
            if body.stream:
                return sse_response(self._stream(gen, body, prompts, merged), release)
            return await self._complete(request, gen, body, prompts, merged)
        finally:
            if not release.handed_over:
                release()

    def _params(self, body: CompletionRequest, eng: LLMEngine,
                prompts: list[_Prompt]) -> SamplingParams:
        """Sampling parameters of every prompt (400 when one does not fit the context)."""
        max_tokens = body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 generates nothing; set echo=true to score the "
                                "prompt, or ask for at least 1 token.", param="max_tokens")
        if len(prompts) * (body.n or 1) > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n or 1} make "
                                f"{len(prompts) * (body.n or 1)} completions; at most "
                                f"{MAX_CHOICES} per request: split it.", param="prompt")
        longest = max(len(p.ids) for p in prompts)
        room = eng.max_model_len - longest
        want = 1 if max_tokens is None else max(1, max_tokens)
        if room < want:
            raise APIError(400, f"A prompt has {longest} tokens and max_tokens is "
                                f"{max_tokens}: over the model's context of {eng.max_model_len}; "
                                "shorten the prompt or lower max_tokens (a prompt is never "
                                "truncated).", param="prompt", code="context_length_exceeded")
        k = body.logprobs
        temperature = (body.temperature if body.temperature is not None
                       else self.chat.default_temperature)
        try:
            return SamplingParams(
                temperature=temperature, top_p=body.top_p if body.top_p is not None else 1.0,
                max_tokens=room if max_tokens is None else want, stop=chatmod._stops(body.stop),
                seed=body.seed, n=body.n or 1, logprobs=k is not None, top_logprobs=k or 0,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                prompt_logprobs=k if body.echo and k is not None else None)
        except RequestError as exc:
            raise APIError(400, str(exc)) from exc

    # -- one JSON body ----------------------------------------------------------------------
    async def _complete(self, request: Request, gen: _Generation, body: CompletionRequest,
                        prompts: list[_Prompt], merged: AsyncIterator[RequestOutput]
                        ) -> Response:
        if await self.chat._collect(request, gen, merged) is None:
            return Response(status_code=499)  # the client left
        choices = []
        for i, p in enumerate(prompts):
            assert p.last is not None
            for o in p.last.outputs:
                choices.append(_choice(gen, body, p, o, i * gen.plan.params.n + o.index))
        prompt, completion = _counts(body, prompts)
        self.chat._account(gen, prompt, completion)
        return JSONResponse({"id": gen.request_id, "object": "text_completion",
                             "created": gen.created, "model": gen.model, "choices": choices,
                             "usage": chatmod.usage(prompt, completion)})

    # -- SSE --------------------------------------------------------------------------------
    async def _stream(self, gen: _Generation, body: CompletionRequest, prompts: list[_Prompt],
                      merged: AsyncIterator[RequestOutput]) -> AsyncGenerator[bytes, None]:
        n = gen.plan.params.n
        left = len(prompts) * n
        ok = False
        try:
            echoed: set[int] = set()
            async for out in merged:
                i = int(out.request_id.rsplit("-", 1)[1])
                p = prompts[i]
                for o in out.outputs:
                    index = i * n + o.index
                    if p.sent[o.index] < 0:
                        continue  # finished and sent
                    if body.echo and index not in echoed:
                        # the prompt first (its logprobs are complete once a token is out)
                        echoed.add(index)
                        yield _event(gen, index, p.text,
                                     None if body.logprobs is None
                                     else _legacy_prompt_logprobs(out, gen.tok, p), None)
                    drop = body.max_tokens == 0
                    text = "" if drop else o.text
                    lps = None
                    if body.logprobs is not None and not drop:
                        new = (o.logprobs or [])[p.lp_sent[o.index]:]
                        if new:
                            start = (len(p.text) if body.echo else 0) + p.sent[o.index]
                            lps = _legacy_logprobs(new, gen.tok, start)
                            p.lp_sent[o.index] += len(new)
                    delta = text[p.sent[o.index]:]
                    if not o.finished:
                        if delta or lps is not None:
                            p.sent[o.index] += len(delta)
                            yield _event(gen, index, delta, lps, None)
                        continue
                    p.sent[o.index] = -1
                    left -= 1
                    usage = None
                    if left == 0:
                        prompt, completion = _counts(body, prompts)
                        self.chat._account(gen, prompt, completion)
                        usage = chatmod.usage(prompt, completion)
                    yield _event(gen, index, delta, lps, _finish(o), usage)
            ok = True
            yield DONE
        finally:
            if not ok:
                self.chat.metrics.observe_abort(gen.model)


# -- prompts ------------------------------------------------------------------------------

def _refuse_unsupported(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(400, "suffix is not supported by /v1/completions here; use POST "
                            "/v1/fim/completions for fill-in-the-middle.", param="suffix")


def _prompts(body: CompletionRequest, eng: LLMEngine) -> list[_Prompt]:
    """Each prompt's ids (checked against the vocabulary) and text (400 when bad)."""
    raw = body.prompt
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise APIError(400, "prompt is an empty list; give at least one prompt.", param="prompt")
    tok = eng.tokenizer
    assert tok is not None
    out = []
    for item in items:
        try:
            if isinstance(item, str):
                ids = eng.encode_prompt(item)
                text = item
            else:
                ids = list(item)
                eng.check_token_ids(ids)
                text = tok.decode(ids, skip_special_tokens=True)
            eng.check_token_ids(ids)
        except (RequestError, TokenizerError) as exc:
            raise APIError(400, str(exc), param="prompt") from exc
        out.append(_Prompt(ids, text))
    return out


def _merge(engine: AsyncLLMEngine, prompts: list[_Prompt], params: SamplingParams,
           request_id: str, lora: str | None) -> AsyncIterator[RequestOutput]:
    """Every prompt's engine outputs as one stream; each prompt's latest output is kept in
    its `_Prompt`. The yielded outputs carry ``{request_id}-{prompt index}`` ids."""

    async def merged() -> AsyncGenerator[RequestOutput, None]:
        queue: asyncio.Queue[RequestOutput | Exception | None] = asyncio.Queue()

        async def pump(i: int, p: _Prompt) -> None:
            try:
                async for out in engine.generate(p.ids, params, f"{request_id}-{i}", lora=lora):
                    p.last = out
                    await queue.put(out)
            except Exception as exc:  # handed to the consumer
                await queue.put(exc)
                return
            await queue.put(None)

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:  # closing a pump's stream aborts its engine request
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return merged()


# -- responses ---------------------------------------------------------------------------

def _counts(body: CompletionRequest, prompts: list[_Prompt]) -> tuple[int, int]:
    """Usage: prompt tokens once per prompt; completion tokens of every sample (none are
    returned with max_tokens=0)."""
    prompt = sum(len(p.ids) for p in prompts)
    if body.max_tokens == 0:
        return prompt, 0
    return prompt, sum(len(o.token_ids) for p in prompts if p.last is not None
                       for o in p.last.outputs)


def _finish(o: CompletionOutput) -> str:
    return "stop" if o.finish_reason == "stop" else "length"


def _choice(gen: _Generation, body: CompletionRequest, p: _Prompt, o: CompletionOutput,
            index: int) -> dict[str, Any]:
    drop = body.max_tokens == 0  # the one sampled token is not part of the answer
    text = "" if drop else o.text
    lps = None
    if body.logprobs is not None:
        start = len(p.text) if body.echo else 0
        lps = _legacy_logprobs([] if drop else (o.logprobs or []), gen.tok, start)
        if body.echo:
            assert p.last is not None
            lps = _merge_logprobs(_legacy_prompt_logprobs(p.last, gen.tok, p), lps)
    return {"index": index, "text": (p.text if body.echo else "") + text, "logprobs": lps,
            "finish_reason": _finish(o)}


def _event(gen: _Generation, index: int, text: str, logprobs: dict[str, Any] | None,
           finish: str | None, usage: dict[str, int] | None = None) -> bytes:
    body: dict[str, Any] = {"id": gen.request_id, "object": "text_completion",
                            "created": gen.created, "model": gen.model,
                            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return chatmod.sse(body)


def _legacy_logprobs(lps: list[TokenLogprob], tok: Tokenizer | None,
                     start: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for ``lps``; offsets count from ``start``."""
    body = chatmod.logprobs_body(lps, tok) or {"content": []}
    tokens, values, tops, offsets = [], [], [], []
    at = start
    for d in body["content"]:
        tokens.append(d["token"])
        values.append(d["logprob"])
        top = {t["token"]: t["logprob"] for t in d["top_logprobs"]}
        top.setdefault(d["token"], d["logprob"])  # the chosen token, always (OpenAI)
        tops.append(top)
        offsets.append(at)
        at += len(d["token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def _legacy_prompt_logprobs(out: RequestOutput, tok: Tokenizer | None,
                            p: _Prompt) -> dict[str, Any]:
    """The prompt's part: its first token has no logprob (null, as OpenAI)."""
    lps = out.prompt_logprobs
    if lps is None or len(lps) != len(p.ids):
        raise RuntimeError("the engine returned no prompt logprobs for an echo request")
    first = TokenLogprob(p.ids[0], 0.0)
    body = _legacy_logprobs([first] + [x for x in lps[1:] if x is not None], tok, 0)
    body["token_logprobs"][0] = None
    body["top_logprobs"][0] = None
    offsets = prompt_text_offsets(p.ids, tok, p.text)
    if offsets is not None:
        body["text_offset"] = offsets
    return body


def prompt_text_offsets(ids: list[int], tok: Tokenizer | None, text: str) -> list[int] | None:
    """Where each prompt token's text starts in the echoed ``text`` (OpenAI's ``text_offset``,
    in characters): control tokens (BOS, ``[INST]``...) take no characters, SentencePiece's
    dummy-prefix space is not in the text, and a token holding part of a character starts at
    that character. None when the token bytes do not spell ``text`` (the caller keeps its
    piece-length offsets)."""
    if tok is None:
        return None
    import codecs

    from souverain.grammar.vocab import cached_token_table

    try:
        table, special = cached_token_table(tok)
    except Exception:  # a tokenizer kind without exact byte tables
        return None
    pieces = [b"" if t in special or not 0 <= t < len(table) else table[t] for t in ids]
    spelled = b"".join(pieces).decode("utf-8", errors="replace")
    if spelled == text:
        skip = 0
    elif spelled.startswith(" ") and spelled[1:] == text:
        skip = 1  # the dummy prefix
    else:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, chars = [], 0
    for piece in pieces:
        offsets.append(max(0, chars - skip))
        chars += len(decoder.decode(piece))
    return offsets


def _merge_logprobs(a: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any]:
    if b is None:
        return a
    return {k: a[k] + b[k] for k in a}
