"""Golden tests: our Mistral tokenizer wrapper against mistral-common used directly.

The reference side builds every request with mistral-common's own classes; our side sends the
La Plateforme JSON shapes through `Tokenizer.encode_chat` / `encode_fim`. Ids must be identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from souverain.errors import TokenizerError
from souverain.tokenizer import Tokenizer, load_tokenizer_file

DATA = Path(os.path.dirname(mistral_common.__file__)) / "data"
FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": "tekken_240911.json",
}

MULTILINGUAL = (
    "Hello, world! Bonjour, ça va ? Grüß Gott. ¿Qué tal? Привет, мир. 你好，世界。"
    " こんにちは世界 안녕하세요 مرحبا بالعالم नमस्ते दुनिया Γειά σου κόσμε שלום עולם"
    " 🦜🚀👩‍👩‍👧 3.14159 1,234,567\n\tdef f(x):\n\t\treturn x  # ok"
)

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"],
    },
}
CALL_ID = "aB3dE6gH9"
ARGS = {"city": "Paris", "unit": "c"}


@pytest.fixture(scope="module", params=list(FILES))
def pair(request: pytest.FixtureRequest) -> tuple[str, Tokenizer, MistralTokenizer]:
    """(version label, our tokenizer, an independent mistral-common reference)."""
    path = DATA / FILES[request.param]
    return request.param, load_tokenizer_file(path), MistralTokenizer.from_file(str(path))


def _ref_ids(ref: MistralTokenizer, messages: list, tools: list | None = None) -> list[int]:
    return ref.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens


def test_metadata(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    label, tok, ref = pair
    raw = ref.instruct_tokenizer.tokenizer
    assert tok.vocab_size == raw.n_words
    assert tok.bos_id == raw.bos_id
    assert tok.eos_ids == [raw.eos_id]
    assert tok.chat_template is None
    assert ("tekken" in tok.kind) == (label == "tekken")
    assert tok.kind.startswith(f"mistral {raw.version.value}")


def test_encode_decode_round_trip(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    _, tok, ref = pair
    raw = ref.instruct_tokenizer.tokenizer
    ids = tok.encode(MULTILINGUAL)
    assert ids == raw.encode(MULTILINGUAL, bos=True, eos=False)
    assert tok.encode(MULTILINGUAL, bos=False, eos=True) == raw.encode(
        MULTILINGUAL, bos=False, eos=True
    )
    assert tok.decode(ids) == MULTILINGUAL


def test_chat_system_and_multi_turn(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    _, tok, ref = pair
    ours = tok.encode_chat(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi! ça va ?"},
            {"role": "assistant", "content": "Oui. 🦜"},
            {"role": "user", "content": "你好"},
        ]
    )
    expected = _ref_ids(
        ref,
        [
            SystemMessage(content="You are terse."),
            UserMessage(content="Hi! ça va ?"),
            AssistantMessage(content="Oui. 🦜"),
            UserMessage(content="你好"),
        ],
    )
    assert ours == expected


def test_chat_assistant_prefix(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    _, tok, ref = pair
    ours = tok.encode_chat(
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue", "prefix": True},
        ]
    )
    expected = _ref_ids(
        ref, [UserMessage(content="Name a colour."), AssistantMessage(content="Blue", prefix=True)]
    )
    assert ours == expected


def _tool_conversation_json() -> tuple[list[dict], list[dict]]:
    messages = [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": CALL_ID,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(ARGS)},
                }
            ],
        },
        {"role": "tool", "name": "get_weather", "tool_call_id": CALL_ID, "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 °C in Paris."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    return messages, [{"type": "function", "function": WEATHER}]


def _tool_conversation_ref() -> tuple[list, list]:
    messages = [
        SystemMessage(content="Use tools when useful."),
        UserMessage(content="Weather in Paris?"),
        AssistantMessage(
            tool_calls=[
                ToolCall(
                    id=CALL_ID,
                    function=FunctionCall(name="get_weather", arguments=json.dumps(ARGS)),
                )
            ]
        ),
        ToolMessage(name="get_weather", tool_call_id=CALL_ID, content='{"temp": 21}'),
        AssistantMessage(content="21 °C in Paris."),
        UserMessage(content="And tomorrow?"),
    ]
    return messages, [Tool(function=Function(**WEATHER))]


def test_chat_tools_calls_and_results(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    label, tok, ref = pair
    if label == "v1":
        pytest.skip("v1 has no tool tokens")
    messages, tools = _tool_conversation_json()
    ref_messages, ref_tools = _tool_conversation_ref()
    assert tok.encode_chat(messages, tools) == _ref_ids(ref, ref_messages, ref_tools)
    # Ending on the tool result: the model is asked to answer from it.
    assert tok.encode_chat(messages[:4], tools) == _ref_ids(ref, ref_messages[:4], ref_tools)
    # The tool-call turn really is in there (guards against both sides dropping it).
    if label != "v2":
        text = tok.decode(tok.encode_chat(messages, tools), skip_special_tokens=False)
        assert "[TOOL_CALLS]" in text and "[TOOL_RESULTS]" in text and "[AVAILABLE_TOOLS]" in text


def test_fim(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    label, tok, ref = pair
    prompt, suffix = "def add(a, b):\n    ", "\n    return c\n"
    if label == "v1":
        with pytest.raises(TokenizerError, match="fill-in-the-middle"):
            tok.encode_fim(prompt, suffix)
        return
    assert (
        tok.encode_fim(prompt, suffix)
        == ref.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
    )


def _generated_tool_call_ids(ref: MistralTokenizer) -> list[int]:
    """The ids a model emits for a tool call: the assistant turn of a conversation encoded by
    mistral-common, cut out between the prompt and the end of the turn (EOS included)."""
    call = ToolCall(
        id=CALL_ID, function=FunctionCall(name="get_weather", arguments=json.dumps(ARGS))
    )
    user = UserMessage(content="Weather in Paris?")
    prompt = _ref_ids(ref, [user])
    full = _ref_ids(
        ref,
        [
            user,
            AssistantMessage(tool_calls=[call]),
            ToolMessage(tool_call_id=CALL_ID, content="21"),
        ],
    )
    assert full[: len(prompt)] == prompt
    eos = ref.instruct_tokenizer.tokenizer.eos_id
    rest = full[len(prompt) :]
    return rest[: rest.index(eos) + 1]


def test_parse_tool_calls(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    label, tok, ref = pair
    if label == "v1":
        assert tok.parse_tool_calls(tok.encode("plain", bos=False)) == ("plain", [])
        return
    generated = _generated_tool_call_ids(ref)
    content, calls = tok.parse_tool_calls(generated)
    assert content == ""
    assert len(calls) == 1
    call = calls[0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == ARGS
    if label == "v2":  # v2 does not encode call ids: a fresh 9-character one is made
        assert len(call["id"]) == 9 and call["id"].isalnum()
    else:
        assert call["id"] == CALL_ID
    # The parsed call goes back through encode_chat to the same ids mistral-common produced.
    again = tok.encode_chat(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": calls},
            {"role": "tool", "tool_call_id": call["id"], "content": "21"},
        ]
    )
    if label != "v2":
        assert (
            again[len(_ref_ids(ref, [UserMessage(content="Weather in Paris?")])) :][
                : len(generated)
            ]
            == generated
        )


def test_parse_tool_calls_cut_short_is_text(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    label, tok, ref = pair
    if label == "v1":
        pytest.skip("v1 has no tool tokens")
    generated = _generated_tool_call_ids(ref)[:-4]  # max_tokens hit inside the JSON
    content, calls = tok.parse_tool_calls(generated)
    assert calls == []
    assert '"get_weather"' in content


def test_content_without_tool_calls(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    _, tok, _ = pair
    ids = tok.encode("Il fait 21 °C.", bos=False, eos=True)
    assert tok.parse_tool_calls(ids) == ("Il fait 21 °C.", [])


def test_decode_keeping_special_tokens(pair: tuple[str, Tokenizer, MistralTokenizer]) -> None:
    label, tok, _ = pair
    ids = tok.encode_chat([{"role": "user", "content": "Hello there"}])
    text = tok.decode(ids, skip_special_tokens=False)
    # the documented chat strings (REFERENCE.md section 3)
    expected = {
        "v1": "<s> [INST] Hello there [/INST]",  # v1's [INST] is plain text, not a control token
        "tekken": "<s>[INST]Hello there[/INST]",
    }.get(label, "<s>[INST] Hello there[/INST]")
    assert text == expected
    assert tok.decode(ids) == ("[INST] Hello there [/INST]" if label == "v1" else "Hello there")


def test_bad_conversation_is_a_tokenizer_error(
    pair: tuple[str, Tokenizer, MistralTokenizer],
) -> None:
    _, tok, _ = pair
    with pytest.raises(TokenizerError, match="cannot be encoded"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(TokenizerError, match="unknown role"):
        tok.encode_chat([{"role": "robot", "content": "a"}])
