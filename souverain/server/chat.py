"""From a La Plateforme chat/FIM request to prompt ids + `SamplingParams`, and from engine
outputs back to response bodies and stream chunks.

Tools: Mistral tokenizers with native tool tokens get the tools through mistral-common and
answer with ``[TOOL_CALLS]``; other chat templates get the tools in a system prompt (unless the
template renders ``tools`` itself) and answer with ``<tool_call>{...}</tool_call>``. Either
way, ``tool_choice`` any/required/named is enforced by grammar-constrained decoding
(`souverain.grammar`), and calls are parsed back into ``tool_calls`` with 9-character ids.
``response_format`` json_object/json_schema is enforced the same way. If both a forced tool
call and a JSON response format are asked, the tool call wins (its arguments are JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from souverain.engine.sampling import LogitsProcessor, SamplingParams, TokenLogprob
from souverain.engine.sequence import CompletionOutput
from souverain.server.errors import APIError
from souverain.server.protocol import (
    MAX_STOP_STRINGS,
    SAFE_PROMPT,
    ChatCompletionRequest,
    FIMCompletionRequest,
    ResponseFormat,
)
from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.mistral import MistralCommonTokenizer

TAG_OPEN = "<tool_call>"


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    params: SamplingParams
    tools_active: bool = False  # parse tool calls out of the output
    forced_tools: bool = False  # the output is only tool calls (never stream content)
    native_tools: bool = False  # [TOOL_CALLS] token (else <tool_call> tags)
    tool_calls_id: int | None = None
    prefix: str = ""  # assistant prefix the answer starts with


# -- requests --------------------------------------------------------------------------------

def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, chunk in enumerate(content):
        if getattr(chunk, "type", None) != "text":
            raise APIError(400, f"{where}.content[{i}] is a {chunk.type!r} chunk, but the models "
                                "served here read text only; send text chunks.",
                           param=f"{where}.content")
        parts.append(chunk.text)
    return "".join(parts)


def can_chat(tok: Tokenizer) -> bool:
    return isinstance(tok, MistralCommonTokenizer) or bool(tok.chat_template)


def fim_capable(tok: Tokenizer | None) -> bool:
    if tok is None:
        return False
    try:
        tok.encode_fim("a", "b")
    except Exception:
        return False
    return True


def _template_renders_tools(tok: Tokenizer) -> bool:
    src = tok.chat_template or ""
    return "tools" in src and "tool_calls" in src


def _messages(body: ChatCompletionRequest, tok: Tokenizer, native: bool,
              tool_prompt: str | None) -> tuple[list[dict[str, Any]], str]:
    """The conversation as plain dicts for `Tokenizer.encode_chat`, and the assistant prefix."""
    out: list[dict[str, Any]] = []
    prefix = ""
    plain_template = not native and not _template_renders_tools(tok)
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": _text(m.content, where)}
        if m.prefix:
            if role != "assistant" or i != len(body.messages) - 1:
                raise APIError(400, f"{where} has prefix=true, which only the last message may "
                                    "have, and only if it is an assistant message.",
                               param=f"{where}.prefix")
            d["prefix"] = True
            prefix = d["content"]
        if m.tool_calls:
            if role != "assistant":
                raise APIError(400, f"{where} has tool_calls but role {m.role!r}; only "
                                    "assistant messages carry tool calls.",
                               param=f"{where}.tool_calls")
            calls, tags = [], []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):
                    try:
                        parsed = json.loads(args)
                    except ValueError:
                        raise APIError(400, f"{where}.tool_calls: the arguments of "
                                            f"{c.function.name!r} are not valid JSON.",
                                       param=f"{where}.tool_calls") from None
                else:
                    parsed, args = args, json.dumps(args, ensure_ascii=False)
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": args}})
                call = json.dumps({"name": c.function.name, "arguments": parsed},
                                  ensure_ascii=False)
                tags.append(f"<tool_call>\n{call}\n</tool_call>")
            if plain_template:
                d["content"] += "".join(tags)
            else:
                d["tool_calls"] = calls
        if role == "tool":
            if plain_template:
                d = {"role": "user",
                     "content": f"<tool_response>\n{d['content']}\n</tool_response>"}
            else:
                if m.tool_call_id is not None:
                    d["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    d["name"] = m.name
        out.append(d)
    if body.safe_prompt or tool_prompt:
        # the guardrail first, then the user's system prompt, then tool instructions
        first = next((d for d in out if d["role"] == "system"), None)
        parts = [SAFE_PROMPT] if body.safe_prompt else []
        parts += [first["content"]] if first is not None and first["content"] else []
        parts += [tool_prompt] if tool_prompt else []
        if first is None:
            out.insert(0, {"role": "system", "content": "\n\n".join(parts)})
        else:
            first["content"] = "\n\n".join(parts)
    return out, prefix


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise APIError(400, "stop strings must be non-empty.", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"{len(stops)} stop strings given; at most {MAX_STOP_STRINGS}.",
                       param="stop")
    return stops


def _sampling(body: ChatCompletionRequest | FIMCompletionRequest, *, default_temperature: float,
              prompt_len: int, max_model_len: int, processors: list[LogitsProcessor], n: int = 1, logprobs: bool = False,
              top_logprobs: int = 0, extra: dict[str, Any] | None = None) -> SamplingParams:
    max_tokens = getattr(body, "max_tokens", None)
    if max_tokens is None:
        max_tokens = getattr(body, "max_completion_tokens", None)
    room = max_model_len - prompt_len
    if room <= 0:
        raise APIError(400, f"The prompt has {prompt_len} tokens but the model's context is "
                            f"{max_model_len} tokens, leaving no room for an answer; shorten "
                            "the conversation (it is never truncated silently).",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"The prompt has {prompt_len} tokens and max_tokens is {max_tokens}: "
                            f"{prompt_len + max_tokens} tokens, over the model's context of "
                            f"{max_model_len}; lower max_tokens to at most {room} or shorten "
                            "the prompt (it is never truncated silently).",
                       param="max_tokens", code="context_length_exceeded")
    seed = getattr(body, "random_seed", None)
    if seed is None:
        seed = getattr(body, "seed", None)
    temperature = body.temperature if body.temperature is not None else default_temperature
    kwargs: dict[str, Any] = dict(
        temperature=temperature,
        top_p=body.top_p if body.top_p is not None else 1.0,
        max_tokens=max_tokens,
        min_tokens=min(getattr(body, "min_tokens", None) or 0, max_tokens),
        stop=_stops(body.stop),
        seed=seed,
        n=n,
        logits_processors=processors,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    kwargs.update(extra or {})
    return SamplingParams(**kwargs)


def require_tokenizer(body: ChatCompletionRequest | FIMCompletionRequest,
                      tok: Tokenizer | None) -> Tokenizer:
    """The model's tokenizer, or a 400: without one it can neither chat nor fill in."""
    if tok is None:
        if isinstance(body, ChatCompletionRequest):
            raise APIError(400, f"Model {body.model!r} has no tokenizer, so it cannot chat.",
                           param="model")
        raise APIError(400, f"Model {body.model!r} has no tokenizer.", param="model")
    return tok


def plan_chat(body: ChatCompletionRequest, tok: Tokenizer, *, vocab_size: int,
              max_model_len: int, default_temperature: float) -> ChatPlan:
    """Messages -> prompt ids (safe prompt, tools, assistant prefix) and the sampling
    parameters, with the grammar processors that tool_choice and response_format ask for."""
    _refuse_unsupported(body)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else []
    mode = _tool_mode(body, tools)
    native_id = tok.control_id("[TOOL_CALLS]")  # None: no native tool tokens (e.g. v1)
    tools_active = bool(tools) and mode != "none"
    renders_tools = native_id is not None or _template_renders_tools(tok)
    tool_prompt = None
    if tools_active and not renders_tools:
        from souverain.grammar import tools_system_prompt

        tool_prompt = tools_system_prompt(tools)
    messages, prefix = _messages(body, tok, native_id is not None, tool_prompt)
    if prefix and tools_active and mode != "auto":
        raise APIError(400, "An assistant prefix cannot be combined with a forced tool call; "
                            "use tool_choice auto or none.", param="tool_choice")
    ids = tok.encode_chat(messages, tools=(tools or None) if renders_tools else None)
    forced = tools_active and mode != "auto"
    processors = _processors(body, tok, tools, mode, native_id, vocab_size)
    params = _sampling(body, default_temperature=default_temperature, prompt_len=len(ids),
                       max_model_len=max_model_len, processors=processors, n=body.n or 1,
                       logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0,
                       extra=_penalties(body))
    _budget_grammars(params, asked=body.max_tokens is not None
                     or body.max_completion_tokens is not None)
    return ChatPlan(ids, params, tools_active=tools_active, forced_tools=forced,
                    native_tools=native_id is not None, tool_calls_id=native_id, prefix=prefix)


def _budget_grammars(params: SamplingParams, asked: bool) -> None:
    """Give each grammar its token budget, so that it closes the answer in time (valid JSON,
    whole tool calls, even when max_tokens ends it); a budget below the shortest answer the
    grammar can guarantee is a 400 that names the minimum."""
    from souverain.grammar import GrammarProcessor

    budget = params.max_tokens
    for proc in params.logits_processors:
        if not isinstance(proc, GrammarProcessor) or budget is None:
            continue
        shortest = proc.shortest
        if shortest is not None and shortest > budget:
            if asked:
                raise APIError(400, f"max_tokens={budget} is below the shortest answer the "
                                    f"{proc.what} allows ({shortest} tokens); raise max_tokens "
                                    f"to at least {shortest}.", param="max_tokens")
            raise APIError(400, f"Only {budget} tokens of the model's context are left for the "
                                f"answer, below the shortest answer the {proc.what} allows "
                                f"({shortest} tokens); shorten the conversation.",
                           param="messages", code="context_length_exceeded")
        proc.budget = budget


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """A 400 for the fields that ask for what no model served here can do."""
    if body.prompt_logprobs:
        raise APIError(400, "prompt_logprobs is not supported by this server; leave it unset.",
                       param="prompt_logprobs")
    if body.reasoning_effort not in (None, "none"):
        raise APIError(400, "reasoning_effort is not supported: the models served here have no "
                            "reasoning mode; leave it unset.", param="reasoning_effort")
    if body.prompt_mode is not None:
        raise APIError(400, "prompt_mode is not supported here (no reasoning models); leave "
                            "it unset.", param="prompt_mode")


def _tool_mode(body: ChatCompletionRequest, tools: list[dict[str, Any]]) -> str:
    """``tool_choice`` as one string: auto, none, any, required, or the function's name."""
    choice = body.tool_choice
    mode: str
    if isinstance(choice, str) or choice is None:
        mode = choice or "auto"
    else:
        mode = choice.function.name
        if not any(t["function"]["name"] == mode for t in tools):
            raise APIError(400, f"tool_choice names {mode!r}, which is not one of the tools "
                                "given.", param="tool_choice")
    if mode in ("any", "required") and not tools:
        raise APIError(400, f"tool_choice={mode!r} needs at least one tool in tools.",
                       param="tool_choice")
    return mode


def _processors(body: ChatCompletionRequest, tok: Tokenizer, tools: list[dict[str, Any]],
                mode: str, native_id: int | None, vocab_size: int) -> list[LogitsProcessor]:
    """The logits processors of a chat: a forced tool call wins over a JSON format, then
    auto tool calls, the [TOOL_CALLS] ban of tool_choice none, and logit_bias."""
    processors: list[LogitsProcessor] = []
    tools_active = bool(tools) and mode != "none"
    parallel = body.parallel_tool_calls if body.parallel_tool_calls is not None else True
    rf = body.response_format
    if tools_active and mode != "auto":
        from souverain.grammar import tool_call_processor

        proc = tool_call_processor(tok, tools, choice="any" if mode == "required" else mode,
                                   vocab_size=vocab_size,
                                   parallel=parallel and mode in ("any", "required"))
        if proc is not None:  # never None for a forced choice
            processors.append(proc)
    elif rf is not None and rf.type != "text":
        processors.append(_json_format(rf, tok, vocab_size))
    elif tools_active:
        from souverain.grammar import tool_call_processor

        proc = tool_call_processor(tok, tools, choice="auto", vocab_size=vocab_size,
                                   parallel=parallel)
        if proc is not None:
            processors.append(proc)
    if tools and mode == "none" and native_id is not None:
        processors.append(_BanTokens([native_id]))
    if body.logit_bias:
        processors.append(_logit_bias(body.logit_bias, vocab_size))
    return processors


def _json_format(rf: ResponseFormat, tok: Tokenizer, vocab_size: int) -> LogitsProcessor:
    """The processor of response_format json_object / json_schema."""
    from souverain.grammar import json_processor

    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError(400, "response_format type json_schema needs a json_schema "
                                "object with the schema.", param="response_format")
        return json_processor(tok, rf.json_schema.schema_, vocab_size=vocab_size)
    return json_processor(tok, None, vocab_size=vocab_size)


def _penalties(body: ChatCompletionRequest) -> dict[str, Any]:
    """The sampling fields a chat request sets beyond FIM's (penalties, top_k)."""
    extra: dict[str, Any] = {}
    if body.presence_penalty is not None:
        extra["presence_penalty"] = body.presence_penalty
    if body.frequency_penalty is not None:
        extra["frequency_penalty"] = body.frequency_penalty
    if body.repetition_penalty is not None:
        extra["repetition_penalty"] = body.repetition_penalty
    if body.top_k is not None:
        extra["top_k"] = body.top_k
    return extra


def plan_fim(body: FIMCompletionRequest, tok: Tokenizer, *, max_model_len: int,
             default_temperature: float) -> ChatPlan:
    """Prompt and suffix -> fill-in-the-middle prompt ids and the sampling parameters."""
    ids = tok.encode_fim(body.prompt, body.suffix or "")
    params = _sampling(body, default_temperature=default_temperature, prompt_len=len(ids),
                       max_model_len=max_model_len, processors=[])
    return ChatPlan(ids, params)


class _BanTokens:
    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, generated: list[int], row: torch.Tensor) -> torch.Tensor:
        row[self.ids] = float("-inf")
        return row


def _logit_bias(bias: dict[str, float], vocab_size: int) -> LogitsProcessor:
    ids, values = [], []
    for k, v in bias.items():
        try:
            i = int(k)
        except ValueError:
            raise APIError(400, f"logit_bias key {k!r} is not a token id.",
                           param="logit_bias") from None
        if not 0 <= i < vocab_size or not -100 <= v <= 100:
            raise APIError(400, f"logit_bias {k}: {v} must be a token id in [0, {vocab_size}) "
                                "with a bias in [-100, 100].", param="logit_bias")
        ids.append(i)
        values.append(v)
    idx = torch.tensor(ids, dtype=torch.long)
    val = torch.tensor(values, dtype=torch.float32)

    def apply(generated: list[int], row: torch.Tensor) -> torch.Tensor:
        row.index_add_(0, idx, val)
        return row

    return apply


# -- responses -------------------------------------------------------------------------------

FINISH = {"stop": "stop", "length": "length", "model_length": "model_length", "abort": "error"}


def tool_marker_index(plan: ChatPlan, out: CompletionOutput) -> int | None:
    """Where tool-call output starts in ``out.text`` (None: no sign of a call yet).
    Returns len(text) for native calls (the JSON after [TOOL_CALLS] is never content)."""
    if not plan.tools_active:
        return None
    if plan.native_tools:
        if plan.tool_calls_id in out.token_ids:
            return 0
        return None
    i = out.text.find(TAG_OPEN)
    return i if i >= 0 else None


def streamable_text(plan: ChatPlan, out: CompletionOutput) -> str:
    """The part of ``out.text`` that is certainly content (safe to stream now)."""
    if plan.forced_tools:
        return ""
    text = out.text
    if not plan.tools_active:
        return text
    if plan.native_tools:
        return "" if plan.tool_calls_id in out.token_ids else text
    i = text.find(TAG_OPEN)
    if i >= 0:
        return text[:i]
    # hold back a tail that may grow into "<tool_call>"
    keep = max((k for k in range(1, len(TAG_OPEN)) if text.endswith(TAG_OPEN[:k])), default=0)
    return text[:len(text) - keep]


def final_message(plan: ChatPlan, out: CompletionOutput,
                  tok: Tokenizer) -> tuple[str, list[dict], str]:
    """(content, tool_calls, finish_reason) of a finished choice.

    The finish reason is the engine's whenever the budget ended the answer (``length``), even
    with calls; ``tool_calls`` only when the model ended it after whole calls. Tool-call
    markup never reaches the content: a call that does not parse (cut where no grammar
    steered it) is dropped with everything after its tag."""
    calls: list[dict] = []
    content = out.text
    if plan.tools_active:
        ids = list(out.token_ids)
        text, calls = tok.parse_tool_calls(ids)
        if plan.native_tools:
            if plan.tool_calls_id in ids:
                content = text if calls else tok.decode(ids[:ids.index(plan.tool_calls_id)])
        else:
            i = out.text.find(TAG_OPEN)
            if i >= 0:
                content = out.text[:i]
            elif calls:
                content = text
        for j, c in enumerate(calls):
            c["index"] = j
    engine = FINISH.get(out.finish_reason or "stop", "stop")
    reason = "tool_calls" if calls and engine == "stop" else engine
    return plan.prefix + content.rstrip() if calls else plan.prefix + content, calls, reason


def usage(prompt: int, completion: int) -> dict[str, int]:
    """A response's ``usage`` object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def logprobs_body(lps: list[TokenLogprob] | None,
                  tok: Tokenizer | None) -> dict[str, Any] | None:
    if lps is None:
        return None

    table = _byte_table(tok)

    def one(tid: int, lp: float) -> dict[str, Any]:
        if table is not None and 0 <= tid < len(table):
            raw = table[tid]  # exact: a byte-fallback token may hold part of a character
            piece = raw.decode("utf-8", errors="replace")
        else:
            piece = tok.decode([tid], skip_special_tokens=False) if tok is not None else ""
            raw = piece.encode("utf-8")
        return {"token": piece, "logprob": float(lp), "bytes": list(raw), "token_id": int(tid)}

    content = []
    for t in lps:
        d = one(t.token_id, t.logprob)
        d["top_logprobs"] = [one(i, v) for i, v in t.top]
        content.append(d)
    return {"content": content}


def _byte_table(tok: Tokenizer | None) -> list[bytes] | None:
    """Every token's bytes (from the grammar's exact tables), or None for an unknown kind."""
    if tok is None:
        return None
    try:
        from souverain.grammar.vocab import cached_token_table

        return cached_token_table(tok)[0]
    except Exception:
        return None
