"""The official clients against a real `souverain serve` on 127.0.0.1.

The `mistralai` SDK (3.x, as pip installs it today), the `openai` SDK and LangChain's
`ChatMistralAI` talk to the server exactly as they talk to La Plateforme, with only the URL
changed. The bundled SmolLM2-135M-Instruct answers (a real chat model, ChatML, tool calls in
`<tool_call>` tags); a tiny random Mistral model with the real v3 tokenizer covers native
`[TOOL_CALLS]` tool calls and FIM, where the grammar, not the random weights, makes the output
valid.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from server_utils import ServerProcess

mistralai = pytest.importorskip("mistralai")
from mistralai.client import Mistral  # noqa: E402

SMOL = "smollm2"
TINY = "tiny-mistral"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20},
                      "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_mistral: dict):
    srv = ServerProcess("smollm2-135m-instruct", "--name", SMOL,
                        "--model", f"{TINY}={tiny_mistral['consolidated']}",
                        "--kv-cache-gib", "0.5")
    yield srv
    assert srv.stop() == 0, srv.log()  # SIGTERM: drain, then a clean exit


@pytest.fixture(scope="module")
def client(server) -> Mistral:
    return Mistral(api_key="unused-on-loopback", server_url=server.url)


def ask(text: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": text}]


# -- mistralai ----------------------------------------------------------------------------

def test_complete(client: Mistral) -> None:
    r = client.chat.complete(model=SMOL, messages=ask("What is the capital of France?"),
                             temperature=0, max_tokens=30)
    assert r.object == "chat.completion" and r.model == SMOL and r.id
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert "Paris" in choice.message.content
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_complete(client: Mistral) -> None:
    messages = ask("Name three colors.")
    full = client.chat.complete(model=SMOL, messages=messages, temperature=0, max_tokens=24)
    events = list(client.chat.stream(model=SMOL, messages=messages, temperature=0,
                                     max_tokens=24))
    chunks = [e.data for e in events]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_multi_turn(client: Mistral) -> None:
    from souverain.weights import load

    messages = [
        {"role": "user", "content": "I would like to talk about France."},
        {"role": "assistant", "content": "Sure! France is a country in Western Europe."},
        {"role": "user", "content": "What is its capital city?"},
    ]
    r = client.chat.complete(model=SMOL, messages=messages, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    # the whole history reached the model, in the model's own chat format
    tok = load("smollm2-135m-instruct").tokenizer
    assert r.usage.prompt_tokens == len(tok.encode_chat(messages))


def test_system_prompt(client: Mistral) -> None:
    from souverain.weights import load

    question = ask("Who are you?")
    plain = client.chat.complete(model=SMOL, messages=question, temperature=0, max_tokens=30)
    system = ask("Who are you?", system="You are Captain Nemo, commander of the Nautilus.")
    nemo = client.chat.complete(model=SMOL, messages=system, temperature=0, max_tokens=30)
    tok = load("smollm2-135m-instruct").tokenizer
    assert nemo.usage.prompt_tokens == len(tok.encode_chat(system))
    assert "Nemo" in nemo.choices[0].message.content
    assert "Nemo" not in plain.choices[0].message.content


def test_safe_prompt_prepends_mistral_guardrail(client: Mistral) -> None:
    from souverain.server.protocol import SAFE_PROMPT
    from souverain.weights import load

    assert SAFE_PROMPT == (
        "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
        "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote "
        "fairness and positivity.")
    messages = ask("Hello!")
    plain = client.chat.complete(model=SMOL, messages=messages, temperature=0, max_tokens=5)
    safe = client.chat.complete(model=SMOL, messages=messages, temperature=0, max_tokens=5,
                                safe_prompt=True)
    tok = load("smollm2-135m-instruct").tokenizer
    expected = len(tok.encode_chat([{"role": "system", "content": SAFE_PROMPT}, *messages]))
    assert safe.usage.prompt_tokens == expected != plain.usage.prompt_tokens


def test_stop(client: Mistral) -> None:
    r = client.chat.complete(model=SMOL, messages=ask("What is the capital of France?"),
                             temperature=0, max_tokens=30, stop=["Paris"])
    content = r.choices[0].message.content
    assert "Paris" not in content and content.startswith("The capital of France is")
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducible_and_n(client: Mistral) -> None:
    kw = dict(model=SMOL, messages=ask("Write a short poem about the sea."), temperature=1.0,
              max_tokens=24)
    a = client.chat.complete(random_seed=1234, **kw)
    b = client.chat.complete(random_seed=1234, **kw)
    c = client.chat.complete(random_seed=4321, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content
    two = client.chat.complete(random_seed=1234, n=2, **kw)
    assert [ch.index for ch in two.choices] == [0, 1]
    # sample 0 of n=2 is the n=1 request with the same seed; sample 1 has its own stream
    assert two.choices[0].message.content == a.choices[0].message.content
    assert two.choices[1].message.content != two.choices[0].message.content
    assert two.usage.completion_tokens > a.usage.completion_tokens  # both samples counted


def test_json_object(client: Mistral) -> None:
    r = client.chat.complete(model=SMOL, messages=ask("Give me a JSON object describing a cat."),
                             response_format={"type": "json_object"}, temperature=0.7,
                             random_seed=4, max_tokens=120)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema(client: Mistral) -> None:
    r = client.chat.complete(
        model=SMOL, messages=ask("Describe a fictional programmer as JSON."), temperature=0.7,
        random_seed=5, max_tokens=150,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON_SCHEMA,
                                         "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON_SCHEMA)


def _tool_round_trip(client: Mistral, model: str) -> None:
    messages = ask("What is the weather like in Paris, in celsius?")
    r = client.chat.complete(model=model, messages=messages, tools=[WEATHER_TOOL],
                             tool_choice="any", temperature=0.7, random_seed=11, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]},
        *[{"role": "tool", "name": c.function.name, "tool_call_id": c.id,
           "content": json.dumps({"temperature": 21, "unit": "celsius"})} for c in calls],
    ]
    answer = client.chat.complete(model=model, messages=messages, tools=[WEATHER_TOOL],
                                  tool_choice="none", temperature=0, max_tokens=30)
    assert answer.choices[0].message.tool_calls in (None, [])
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_tools_round_trip_tagged(client: Mistral) -> None:
    _tool_round_trip(client, SMOL)


def test_tools_round_trip_native_mistral(client: Mistral) -> None:
    _tool_round_trip(client, TINY)


def test_named_tool_choice_and_stream(client: Mistral) -> None:
    other = {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}}
    events = list(client.chat.stream(
        model=SMOL, messages=ask("What time is it in Tokyo?"), tools=[WEATHER_TOOL, other],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0.5,
        random_seed=2, max_tokens=60))
    last = events[-1].data
    assert last.choices[0].finish_reason == "tool_calls"
    calls = last.choices[0].delta.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert "city" in json.loads(calls[0].function.arguments)
    # nothing of the call leaks into content deltas
    assert "".join(e.data.choices[0].delta.content or "" for e in events) == ""


def test_fim(client: Mistral) -> None:
    r = client.fim.complete(model=TINY, prompt="def add(a, b):\n    return ",
                            suffix="\n\nprint(add(1, 2))", temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(mistralai.client.errors.SDKError) as err:
        client.fim.complete(model=SMOL, prompt="def f():", suffix="", max_tokens=4)
    assert err.value.status_code == 400
    assert "fill-in-the-middle" in err.value.body.lower()


def test_models(client: Mistral) -> None:
    models = {m.id: m for m in client.models.list().data}
    # + the embedding model and the moderation model's card
    assert set(models) == {SMOL, TINY, "souverain-embed", "mistral-moderation-latest"}
    smol = client.models.retrieve(model_id=SMOL)
    assert smol.max_context_length == 8192
    assert smol.capabilities.completion_chat and not smol.capabilities.completion_fim
    assert client.models.retrieve(model_id=TINY).capabilities.completion_fim


def test_context_overflow_is_400_not_truncation(client: Mistral) -> None:
    with pytest.raises(mistralai.client.errors.SDKError) as err:
        client.chat.complete(model=SMOL, messages=ask("hi"), max_tokens=9000)
    assert err.value.status_code == 400
    body = json.loads(err.value.body)
    assert body["object"] == "error" and "8192" in body["message"] and "9000" in body["message"]


# -- openai ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(api_key="unused-on-loopback", base_url=server.url + "/v1")


def test_openai_create_and_stream(oai) -> None:
    r = oai.chat.completions.create(model=SMOL, messages=ask("What is the capital of France?"),
                                    temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    stream = oai.chat.completions.create(model=SMOL, messages=ask("What is the capital of "
                                                                  "France?"),
                                         temperature=0, max_tokens=30, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == r.choices[0].message.content


def test_openai_tools(oai) -> None:
    r = oai.chat.completions.create(model=SMOL, messages=ask("Weather in Berlin in fahrenheit?"),
                                    tools=[WEATHER_TOOL], tool_choice="required", temperature=0.5,
                                    seed=7, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER_TOOL["function"]["parameters"])


def test_openai_json_schema(oai) -> None:
    r = oai.chat.completions.create(
        model=SMOL, messages=ask("Describe a fictional person as JSON."), temperature=0.7, seed=9,
        max_tokens=150,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON_SCHEMA,
                                         "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON_SCHEMA)


# -- LangChain ------------------------------------------------------------------------------

def test_langchain_invoke_and_stream(server) -> None:
    lc = pytest.importorskip("langchain_mistralai")
    llm = lc.ChatMistralAI(model=SMOL, api_key="unused-on-loopback", endpoint=server.url + "/v1",
                           temperature=0, max_tokens=30)
    msg = llm.invoke("What is the capital of France?")
    assert "Paris" in msg.content
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert streamed == msg.content


def test_openai_logprobs_bytes_spell_the_answer(oai) -> None:
    r = oai.chat.completions.create(model=SMOL, messages=ask("Write one emoji and a word."),
                                    temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    items = choice.logprobs.content
    assert len(items) == r.usage.completion_tokens
    spelled = b"".join(bytes(t.bytes) for t in items)
    # exact token bytes (a byte-fallback token holds part of a character), EOS spells nothing
    assert spelled.decode("utf-8").replace("<|im_end|>", "") == choice.message.content
    for t in items:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob <= 0 and abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5  # greedy


# -- structured output that always closes (issue 16, item 1) -------------------------------

CITY_SCHEMA = {  # the runaway: no maxLength, an unbounded integer
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                   "population": {"type": "integer"}},
    "required": ["name", "country", "population"],
    "additionalProperties": False,
}


def _city_format() -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}}


def _minimum_max_tokens(oai, model: str, **kwargs) -> int:
    """The 400 for a max_tokens below the shortest valid answer names the minimum."""
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=ask("A city as JSON."), max_tokens=3,
                                    **kwargs)
    body = err.value.response.json()
    assert body["param"] == "max_tokens", body
    assert "at least" in body["message"], body
    return int(body["message"].rsplit("at least ", 1)[1].rstrip("."))


@pytest.mark.parametrize("model", [SMOL, TINY])
def test_json_schema_closes_within_max_tokens(oai, model: str) -> None:
    """From the minimum up, every answer parses and validates, never passes max_tokens, and
    says `length` when the budget (not the model) ended it, streamed or not."""
    minimum = _minimum_max_tokens(oai, model, response_format=_city_format())
    assert 8 <= minimum <= 40
    for extra, seed in ((0, 1), (3, 2), (25, 3)):
        budget = minimum + extra
        r = oai.chat.completions.create(
            model=model, messages=ask("Describe Paris as JSON."), temperature=1.0, seed=seed,
            max_tokens=budget, response_format=_city_format())
        choice = r.choices[0]
        jsonschema.validate(json.loads(choice.message.content), CITY_SCHEMA)
        assert r.usage.completion_tokens <= budget
        if r.usage.completion_tokens == budget:
            assert choice.finish_reason == "length"
        stream = oai.chat.completions.create(
            model=model, messages=ask("Describe Paris as JSON."), temperature=1.0, seed=seed,
            max_tokens=budget, response_format=_city_format(), stream=True)
        chunks = [ch for ch in stream if ch.choices]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert text == choice.message.content  # same seed, same answer
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason


@pytest.mark.parametrize("model", [SMOL, TINY])
def test_forced_tool_call_closes_within_max_tokens(oai, model: str) -> None:
    """A forced call at its minimum budget: a whole call, `length` when the budget ended it,
    and no tool-call markup in the content."""
    tools = [{"type": "function", "function": {"name": "locate", "parameters": CITY_SCHEMA}}]
    minimum = _minimum_max_tokens(oai, model, tools=tools, tool_choice="required")
    for extra, seed in ((0, 4), (6, 5)):
        budget = minimum + extra
        r = oai.chat.completions.create(model=model, messages=ask("Where is Lyon?"),
                                        tools=tools, tool_choice="required", temperature=1.0,
                                        seed=seed, max_tokens=budget)
        choice = r.choices[0]
        assert choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert call.function.name == "locate"
            jsonschema.validate(json.loads(call.function.arguments), CITY_SCHEMA)
        assert "<tool_call>" not in (choice.message.content or "")
        assert "[TOOL_CALLS]" not in (choice.message.content or "")
        assert r.usage.completion_tokens <= budget
        expected = "length" if r.usage.completion_tokens == budget else "tool_calls"
        assert choice.finish_reason == expected
