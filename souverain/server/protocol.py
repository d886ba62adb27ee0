"""The La Plateforme request and response schemas, as pydantic v2 models.

Source of truth: Mistral's public OpenAPI spec and the official `mistralai` SDK (3.x) models.
Request models reject unknown fields (422, as La Plateforme does) but accept every field the
`mistralai` and `openai` SDKs send; fields that cannot change anything on this server are
accepted and documented in their description (``prediction``, ``prompt_cache_key``,
``service_tier``, ``metadata``, ``user``). These models also generate `/openapi.json`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from souverain.moderation.guardrails import GuardrailConfig

SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
    "and positivity."
)
"""Mistral's guardrail system prompt, verbatim, prepended when ``safe_prompt`` is true."""

MAX_N = 16
MAX_STOP_STRINGS = 16
# The largest seed: /openapi.json writes numeric bounds as floats (FastAPI), and 2**63 - 1 would
# read back as 2**63; 2**63 - 1024 is the largest int64 a float64 holds exactly.
MAX_SEED = 2**63 - 1024
# Token counts and indexes: beyond any context, and within the int32 that torch and SQLite
# take, so that a huge integer is a 422 naming its field, never an overflow further down.
MAX_INT = 2**31 - 1


class _Request(BaseModel):
    # strict: JSON types as the schema says ("5" is not an integer, true is not a number), as
    # /openapi.json documents and La Plateforme enforces
    # allow_inf_nan=False: JSON has no NaN/Infinity (the body check refuses them first;
    # this keeps the models right for bodies built in Python)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _integral(cls, v: Any) -> Any:
        """JSON Schema counts 10.0 as an integer (strict pydantic does not): read it as 10.
        Harmless for float fields, which take integers."""
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- messages -------------------------------------------------------------------------------

class TextChunk(_Request):
    type: Literal["text"] = "text"
    text: str


class OtherChunk(_Open):
    """Image, audio, document or reference chunks: accepted by the schema, then refused with a
    400 naming the chunk type, since the models served here read text only."""

    type: str


ContentChunk = TextChunk | OtherChunk
Content = str | list[ContentChunk] | None


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] = Field(
        description="A JSON string (or object) with the call's arguments.")


class ToolCall(_Request):
    id: str | None = Field(default=None, description="9 characters [a-zA-Z0-9] for Mistral models.")
    type: Literal["function"] | None = "function"
    function: FunctionCall
    index: int | None = Field(default=None, ge=0, le=MAX_INT)


class Message(_Request):
    """A message of the conversation; which fields apply depends on ``role``."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Content = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant only")
    tool_call_id: str | None = Field(default=None, description="tool only")
    prefix: bool = Field(default=False, description=(
        "assistant only, last message only: the answer continues this text (and starts "
        "with it)."))


# -- tools and formats -----------------------------------------------------------------------

class Function(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: Function


class DocumentLibraryTool(_Request):
    """Retrieval over document libraries (Mistral's ``document_library`` tool): the answer is
    grounded in passages retrieved from these libraries and cites them. souverain extension:
    the answer message carries ``references`` (the passages, with document and position)."""

    type: Literal["document_library"]
    library_ids: list[str] = Field(min_length=1, max_length=16,
                                   description="Library ids (or names) to search.")
    tool_configuration: dict[str, Any] | None = Field(default=None,
                                                      description="Accepted; not used.")


class FunctionName(_Request):
    name: str


class ToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


class JsonSchema(_Request):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True,
                              allow_inf_nan=False)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None


class Prediction(_Request):
    type: Literal["content"] = "content"
    content: str = ""


class StreamOptions(_Request):
    include_usage: bool | None = None


Guardrail = GuardrailConfig  # checked strictly: souverain.moderation.guardrails


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "mistral-small-latest",
        "messages": [{"role": "system", "content": "Answer in one sentence."},
                     {"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0.3, "max_tokens": 64}]})

    model: str = Field(description="A model id from GET /v1/models.")
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description=(
        "Default: the model's default_model_temperature (GET /v1/models/{id})."))
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT, description=(
        "Default: until the end of the answer or of the context. Prompt + max_tokens over "
        "the context is a 400, never a truncation."))
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT,
                                              description="OpenAI name of max_tokens.")
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    random_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED,
                             description="OpenAI name of random_seed.")
    response_format: ResponseFormat | None = None
    tools: list[Tool | DocumentLibraryTool] | None = None
    tool_choice: Literal["auto", "none", "any", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = Field(default=None, description=(
        "OpenAI: token id (as a string) -> bias in [-100, 100] added to its logit."))
    safe_prompt: bool | None = False
    prediction: Prediction | None = Field(default=None, description=(
        "Accepted; a speed hint that never changes the output. Not used here."))
    prompt_cache_key: str | None = Field(default=None, description=(
        "Accepted; prefix caching is automatic here, for every request."))
    service_tier: str | None = Field(default=None, description="Accepted; one tier here.")
    metadata: dict[str, Any] | None = Field(default=None, description="Accepted; not stored.")
    user: str | None = Field(default=None, description="OpenAI; accepted, not stored.")
    prompt_logprobs: bool | None = Field(default=None, description="Only false/null here.")
    top_prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_INT,
                                            description="Only 0/null here.")
    reasoning_effort: str | None = Field(default=None, description=(
        "Only null/'none' here: the served models have no reasoning mode."))
    prompt_mode: str | None = Field(default=None, description="Only null here.")
    guardrails: list[Guardrail] | None = Field(default=None, description=(
        "Moderation of the conversation before generation and of the answer after it (and "
        "as it streams) by the server's moderation model; a blocked request is a 403."))


class FIMCompletionRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "codestral-latest", "prompt": "def fibonacci(n: int) -> int:\n",
        "suffix": "\n\nprint(fibonacci(10))", "max_tokens": 64}]})

    model: str
    prompt: str
    suffix: str | None = ""
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)
    stream: bool = False
    stop: str | list[str] | None = None
    random_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    metadata: dict[str, Any] | None = None
    prompt_cache_key: str | None = None


# -- responses -------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall
    index: int | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    token_id: int


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobs]


# content_filter (souverain, OpenAI's name): a guardrail ended the answer mid-stream
FinishReason = Literal["stop", "length", "model_length", "error", "tool_calls", "content_filter"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None
    prefix: bool = False


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    guardrails: dict[str, Any] | None = Field(default=None, description=(
        "With guardrails: each stage's (input, output) results per config."))


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class StreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event (``data: {...}``); the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: UsageInfo | None = None
    guardrails: dict[str, Any] | None = Field(default=None, description=(
        "With guardrails, on the last chunk: the results (and the block, if any)."))


class ModelCapabilities(BaseModel):
    completion_chat: bool
    completion_fim: bool
    function_calling: bool
    fine_tuning: bool = False
    vision: bool = False
    classification: bool = False
    moderation: bool = False
    embeddings: bool = Field(default=False,
                             description="souverain: the model serves POST /v1/embeddings.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "souverain"
    name: str | None = None
    description: str | None = None
    max_context_length: int
    aliases: list[str] = []
    default_model_temperature: float | None = None
    capabilities: ModelCapabilities
    type: Literal["base", "fine-tuned"] = "base"
    root: str | None = Field(default=None, description="A fine-tuned model's base model.")
    job: str | None = Field(default=None, description="The job that made a fine-tuned model.")
    loaded: bool = Field(description="souverain: whether the weights are in memory now.")
    deprecation: str | None = Field(default=None, description=(
        "When the model is retired (ISO 8601); set by `souverain models deprecate|withdraw`."))
    deprecation_replacement_model: str | None = Field(
        default=None, description="The model to use instead once this one is retired.")
    archived: bool | None = Field(default=None, description="A fine-tuned model's archived flag.")
    quantization: str | None = Field(default=None, description=(
        "souverain: the weights' format as served: none, int8 or int4 (with --quantization)."))
    dtype: str | None = Field(default=None, description=(
        "souverain: the dtype of activations and KV cache (e.g. float32, bfloat16); 'auto' "
        "until a lazy model is loaded."))
    memory_bytes: int | None = Field(default=None, description=(
        "souverain: the memory the model holds (weights + KV cache) when loaded, else the "
        "estimate from its checkpoint's header that the memory budget uses."))
    evaluation: dict[str, Any] | None = Field(default=None, description=(
        "souverain: the model's latest evaluation run {latest_run_id, report_url, created_at, "
        "passed} (GET /v1/observability/evaluation-runs_v2/{id})."))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """Every error: La Plateforme's shape. 422s add pydantic's ``detail`` list."""

    object: Literal["error"] = "error"
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    detail: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: Literal["ok", "draining"]
    models: dict[str, str] = Field(description="model id -> loaded | not loaded")
    api_keys: bool = Field(default=False, description=(
        "souverain: whether API calls need a key (Authorization: Bearer); the console asks "
        "for one before its first call."))
    version: str | None = Field(default=None, description="souverain: the server's version.")
    features: dict[str, bool] = Field(default_factory=dict, description=(
        "souverain: which optional API families this server serves: libraries (/v1/libraries),"
        " fine_tuning (/v1/files, /v1/fine_tuning), batch (/v1/batch/jobs)."))


# -- legacy completions (OpenAI) ------------------------------------------------------------

class CompletionRequest(_Request):
    """OpenAI's legacy ``POST /v1/completions`` (what lm-evaluation-harness's
    ``local-completions`` sends): raw prompts, no chat template."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "mistral-small-latest", "prompt": "The capital of France is",
        "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}]})

    model: str = Field(description="A model id from GET /v1/models.")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description=(
        "A string, a list of strings, token ids, or a list of token-id lists: one completion "
        "(or n) per prompt. Strings are encoded as the model's tokenizer does, with BOS; token "
        "ids are taken as given."))
    suffix: str | None = Field(default=None, description="Only null/empty here.")
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_INT, description=(
        "Default 16; 0 only with echo (score the prompt). Prompt + max_tokens over the "
        "context is a 400, never a truncation."))
    echo: bool = Field(default=False, description="Return the prompt before the completion "
                                                  "(with its tokens' logprobs if asked).")
    logprobs: int | None = Field(default=None, ge=0, le=20, description=(
        "Logprobs of each returned token and of its `logprobs` most likely alternatives."))
    temperature: float | None = Field(default=None, ge=0, le=2, description=(
        "Default: the model's default_model_temperature (GET /v1/models/{id})."))
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, description="Accepted, not stored.")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
