"""Retrieval-augmented chat completions: the ``document_library`` tool.

A chat request whose ``tools`` hold ``{"type": "document_library", "library_ids": [...]}`` is
answered from the libraries: the last user message is the query, the relevant passages go in
a system message ahead of the conversation (numbered, with document and position), the answer
ends with a ``Sources:`` list, and the message carries ``references`` (a souverain extension
field: the passages given, their document, page, heading and offsets, and whether the answer
cites each). When no passage is relevant the server says so instead of letting the model guess.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from souverain.errors import RAGError
from souverain.rag.answer import Grounding, ground, last_user_text
from souverain.server import chat as chatmod
from souverain.server.errors import APIError, in_thread
from souverain.server.libraries import LibraryService, rag_api_error
from souverain.server.protocol import ChatCompletionRequest, DocumentLibraryTool, Message
from souverain.tokenizer.base import Tokenizer

# Tokens kept free for the answer when the request sets no max_tokens.
ANSWER_RESERVE = 512


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for c in content if isinstance(t := getattr(c, "text", None), str))
    return ""


async def ground_chat(body: ChatCompletionRequest, service: LibraryService | None, tok: Tokenizer,
                      max_model_len: int) -> tuple[ChatCompletionRequest, Grounding | None]:
    """(body without the library tools and with the passages as a system message, grounding)
    — or (body, None) when it names no library."""
    lib_tools = [t for t in (body.tools or []) if isinstance(t, DocumentLibraryTool)]
    if not lib_tools:
        return body, None
    if service is None:
        raise APIError(400, "Document libraries are turned off on this server (--no-libraries);"
                            " remove the document_library tool or restart without it.",
                       param="tools")
    library_ids = list(dict.fromkeys(i for t in lib_tools for i in t.library_ids))
    query = last_user_text(body.messages)
    if not query.strip():
        raise APIError(400, "A document_library request needs a user message with text to "
                            "search for.", param="messages")
    conversation = "\n".join(_text(m.content) for m in body.messages)
    reserve = body.max_tokens or body.max_completion_tokens or ANSWER_RESERVE
    budget = max(256, max_model_len - reserve - len(tok.encode(conversation)) - 64)

    def run() -> Grounding:
        return ground(service.store, library_ids, query).fit(budget,
                                                             lambda s: len(tok.encode(s)))
    try:
        grounding = await in_thread(run)
    except RAGError as exc:
        err = rag_api_error(exc)
        err.param = "tools"
        raise err from None
    function_tools = [t for t in body.tools or [] if not isinstance(t, DocumentLibraryTool)]
    update: dict[str, Any] = {"tools": function_tools or None}
    if not function_tools and body.tool_choice in ("auto", "any", "required"):
        update["tool_choice"] = None
    if grounding.found:
        messages = list(body.messages)
        context = grounding.system_prompt()
        if messages and messages[0].role == "system":
            own = _text(messages[0].content)
            messages[0] = Message(role="system", content=f"{context}\n\n{own}" if own
                                  else context)
        else:
            messages.insert(0, Message(role="system", content=context))
        update["messages"] = messages
    return body.model_copy(update=update), grounding


def not_found_response(body: ChatCompletionRequest, grounding: Grounding) -> Response:
    """The answer when no passage is relevant: said plainly, no tokens generated."""
    text = grounding.not_found_text()
    rid = f"cmpl-rag-{time.time_ns():x}"
    created = int(time.time())
    usage = chatmod.usage(0, 0)
    n = body.n or 1
    if not body.stream:
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": i, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text, "tool_calls": None,
                                     "prefix": False, "references": []}}
                        for i in range(n)],
            "usage": usage})
    sse = chatmod.sse
    base = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": body.model}

    async def events() -> AsyncIterator[bytes]:
        for i in range(n):
            yield sse(dict(base, choices=[{"index": i, "finish_reason": None,
                                           "delta": {"role": "assistant", "content": ""}}]))
        for i in range(n):
            last = dict(base, choices=[{"index": i, "finish_reason": "stop",
                                        "delta": {"content": text, "references": []}}])
            if i == n - 1:
                last["usage"] = usage
            yield sse(last)
        yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
