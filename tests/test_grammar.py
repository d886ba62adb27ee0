"""Grammar-constrained decoding (llguidance): token bytes, JSON output, tool calls.

Real tokenizers and the real engine throughout. The tiny Mistral checkpoint has random
weights, so with temperature 1.0 its choices are noise: whatever it writes is valid only
because the grammar allows nothing else. Its schemas bound string lengths (a random model
almost never picks one of the few tokens that close a string); SmolLM2 answers for real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import mistral_common
import pytest
import torch

from souverain import LLM, SamplingParams
from souverain.errors import RequestError
from souverain.grammar import (
    GrammarError,
    GrammarProcessor,
    json_processor,
    ll_tokenizer,
    token_table,
    tool_call_processor,
    tools_system_prompt,
)
from souverain.tokenizer import load_tokenizer_file
from souverain.tokenizer.huggingface import load_hf_tokenizer
from souverain.weights import load

DATA = Path(os.path.dirname(mistral_common.__file__)) / "data"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"

TEXTS = [
    "Hello, world!",
    "  two leading spaces",
    " one leading space",
    "ça va ? Grüß Gott. ¿Qué tal? Привет",
    "你好，世界。こんにちは 안녕하세요",
    "🦜🚀👩‍👩‍👧 emoji",
    "def f(x):\n\treturn x  # ok\n",
    "\n\nfoo  bar ",
    '{"a": [1, 2.5e-3, null], "b": "\\u00e9"}',
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two small integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -50, "maximum": 50},
                "b": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# required properties, enums, bounded integers, arrays, a nested object, $defs/$ref
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1,
                 "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": -5, "maximum": 5},
                "verified": {"type": "boolean"},
            },
            "required": ["id", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
    "$defs": {"tag": {"type": "string", "enum": ["red", "blue", "green"]}},
}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tok():
    return load("smollm2-135m-instruct").tokenizer


@pytest.fixture(scope="module")
def v3_tok():
    return load_tokenizer_file(V3)


@pytest.fixture(scope="module")
def tekken_tok():
    return load_tokenizer_file(DATA / "tekken_240911.json")


@pytest.fixture(scope="module")
def v11_tok(tmp_path_factory):
    """A v11 tekken file ([ARGS], [CALL_ID]): tekken_240911's vocabulary, v11 specials."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads((DATA / "tekken_240911.json").read_text())
    data["config"]["version"] = "v11"
    specials = [{"rank": s["rank"], "token_str": str(s["token_str"]), "is_control": True}
                for s in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    specials += [{"rank": len(specials), "token_str": "[ARGS]", "is_control": True},
                 {"rank": len(specials) + 1, "token_str": "[CALL_ID]", "is_control": True}]
    data["special_tokens"] = specials
    path = tmp_path_factory.mktemp("v11") / "tekken.json"
    path.write_text(json.dumps(data))
    tok = load_tokenizer_file(path)
    assert tok.kind == "mistral v11 (tekken)"
    return tok


@pytest.fixture(scope="module")
def gguf_spm_tok(tmp_path_factory):
    """A GGUF holding v3's SentencePiece vocabulary as llama.cpp metadata (tokenizer only)."""
    import gguf

    from souverain.bench.formats import add_sentencepiece_vocab

    path = tmp_path_factory.mktemp("gguf-spm") / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    add_sentencepiece_vocab(writer, V3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = load_tokenizer_file(path)
    assert tok.kind == "gguf llama SentencePiece"
    return tok


def _hf_folder(root: Path, backend_json: str, eos: str, extra_eos: list[int] = ()) -> object:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(backend_json)
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    if extra_eos:
        (root / "generation_config.json").write_text(json.dumps({"eos_token_id": extra_eos}))
    return load_hf_tokenizer(root)


@pytest.fixture(scope="module")
def hf_bytelevel_tok(smol_tok, tmp_path_factory):
    """A Hugging Face tokenizer.json folder (SmolLM2's byte-level BPE, two stop ids)."""
    tok = _hf_folder(tmp_path_factory.mktemp("hf-bl"), smol_tok.backend.to_str(),
                     "<|im_end|>", [2, 0])
    assert tok.eos_ids == [2, 0]
    return tok


@pytest.fixture(scope="module")
def hf_spm_tok(gguf_spm_tok, tmp_path_factory):
    """A Hugging Face tokenizer.json folder with a SentencePiece (Metaspace, byte-fallback) BPE."""
    return _hf_folder(tmp_path_factory.mktemp("hf-spm"), gguf_spm_tok.backend.to_str(), "</s>")


@pytest.fixture(scope="module")
def tiny_llm(tiny_mistral):
    return LLM(tiny_mistral["consolidated"], dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def smol_llm():
    return LLM("smollm2-135m-instruct", dtype="float32")


# -- helpers ------------------------------------------------------------------------------------


def drive(proc, tok, vocab: int, seed: int, prefix=(), steps: int = 400):
    """Sample from random logits through ``proc`` until EOS: ``(ids after prefix, ended)``."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prefix)
    for _ in range(steps):
        row = proc(list(ids), torch.randn(vocab, generator=g) * 3)
        token = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
        if token in tok.eos_ids:
            return ids[len(prefix):], True
        ids.append(token)
    return ids[len(prefix):], False


def check_calls(calls, names=None):
    assert calls
    for call in calls:
        name = call["function"]["name"]
        assert name in (names or PARAMS)
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[name])


# -- token bytes --------------------------------------------------------------------------------

KINDS = ["smol_tok", "v3_tok", "tekken_tok", "gguf_spm_tok", "hf_bytelevel_tok", "hf_spm_tok"]


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_spell_the_text(kind, request):
    tok = request.getfixturevalue(kind)
    tokens, special = token_table(tok)
    assert len(tokens) >= tok.vocab_size
    assert set(tok.eos_ids) <= special and set(tok.special_ids) <= special
    spm = kind in ("v3_tok", "gguf_spm_tok", "hf_spm_tok")
    ll = ll_tokenizer(tok)
    assert ll_tokenizer(tok) is ll  # built once per tokenizer
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        got = b"".join(tokens[i] for i in ids)
        assert not set(ids) & special
        if spm and kind == "v3_tok":  # SentencePiece's dummy prefix: one space before the text
            assert got == b" " + text.encode(), text
        elif spm:
            assert got in (text.encode(), b" " + text.encode()), text
        else:
            assert got == text.encode(), text
        assert ll.decode_bytes(ids) == got
        # the encoder llguidance uses for grammar literals spells text exactly
        assert ll.decode_bytes(ll.tokenize_str(text)) == text.encode()
    for i in special:
        assert ll.is_special_token(i)


def test_bytelevel_table_matches_single_token_decode(smol_tok):
    tokens, special = token_table(smol_tok)
    for i in range(smol_tok.vocab_size):
        if i in special:
            continue
        try:
            text = tokens[i].decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character
        assert smol_tok.decode([i]) == text, i


def test_control_tokens_are_special(v3_tok, smol_tok):
    ll = ll_tokenizer(v3_tok)
    for piece in ("[INST]", "[/INST]", "[TOOL_CALLS]", "<s>", "</s>"):
        assert ll.is_special_token(v3_tok.mistral.instruct_tokenizer.tokenizer
                                   .get_special_token(piece))
    ll = ll_tokenizer(smol_tok)
    assert ll.is_special_token(smol_tok.backend.token_to_id("<|im_end|>"))
    assert not ll.is_special_token(smol_tok.encode("hello", bos=False)[0])


# -- the processor ------------------------------------------------------------------------------


def test_processor_masks_and_forces_eos_when_complete(smol_tok):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    V = smol_tok.vocab_size + 64  # the model may be wider than the tokenizer
    proc = json_processor(smol_tok, schema, vocab_size=V)
    row = proc([], torch.zeros(V))
    allowed = torch.isfinite(row).nonzero().squeeze(1).tolist()
    assert allowed and all(smol_tok.decode([i]).startswith("{") for i in allowed)
    assert torch.isinf(row[smol_tok.vocab_size:]).all()
    ids = smol_tok.encode('{"ok": true}', bos=False)
    row = proc(ids, torch.zeros(V))
    assert torch.isfinite(row).nonzero().squeeze(1).tolist() == sorted(smol_tok.eos_ids)
    assert proc.error is None


def test_processor_allows_every_stop_id(hf_bytelevel_tok):
    tok = hf_bytelevel_tok  # <|im_end|> and <|endoftext|>
    proc = json_processor(tok, {"enum": [1]}, vocab_size=tok.vocab_size)
    row = proc(tok.encode("1", bos=False), torch.zeros(tok.vocab_size))
    assert torch.isfinite(row).nonzero().squeeze(1).tolist() == sorted(tok.eos_ids)


def test_processor_rebuilds_for_other_ids_and_clones(smol_tok):
    V = smol_tok.vocab_size
    proc = json_processor(smol_tok, None, vocab_size=V)
    a = smol_tok.encode('{"a": 1', bos=False)
    b = smol_tok.encode('{"xyz": [', bos=False)
    proc(a, torch.zeros(V))
    got = proc(b, torch.zeros(V))  # not an extension of a: starts over
    fresh = json_processor(smol_tok, None, vocab_size=V)
    assert torch.equal(got, fresh(b, torch.zeros(V)))
    twin = proc.clone()
    assert isinstance(twin, GrammarProcessor) and twin is not proc
    assert torch.equal(twin([], torch.zeros(V)), fresh.clone()([], torch.zeros(V)))
    assert torch.equal(proc(b + smol_tok.encode("1", bos=False), torch.zeros(V)),
                       fresh(b + smol_tok.encode("1", bos=False), torch.zeros(V)))


def test_processor_error_forces_eos(smol_tok):
    V = smol_tok.vocab_size
    proc = json_processor(smol_tok, None, vocab_size=V)
    row = proc(smol_tok.encode("hello", bos=False), torch.zeros(V))
    assert proc.error
    assert torch.isfinite(row).nonzero().squeeze(1).tolist() == sorted(smol_tok.eos_ids)


def test_clone_for_clones_grammar_processors(smol_tok):
    proc = json_processor(smol_tok, None, vocab_size=smol_tok.vocab_size)
    params = SamplingParams(n=2, seed=3, logits_processors=[proc])
    first, second = params.clone_for(0), params.clone_for(1)
    for p in (first, second):
        assert isinstance(p.logits_processors[0], GrammarProcessor)
        assert p.logits_processors[0] is not proc
    assert first.logits_processors[0] is not second.logits_processors[0]


# -- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [
    {"type": "nope"},
    {"type": "object", "properties": 3},
    {"type": "integer", "minimum": "zero"},
    {"type": "string", "pattern": "(?<=x)y"},  # lookbehind: valid JSON Schema, not enforceable
    ["not", "a", "schema"],
])
def test_invalid_schema_is_a_grammar_error(smol_tok, schema):
    with pytest.raises(GrammarError) as err:
        json_processor(smol_tok, schema, vocab_size=smol_tok.vocab_size)
    assert isinstance(err.value, RequestError)
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_bad_tools_are_grammar_errors(smol_tok, v3_tok):
    V = smol_tok.vocab_size
    with pytest.raises(GrammarError, match="not among the tools"):
        tool_call_processor(smol_tok, TOOLS, choice="nope", vocab_size=V)
    with pytest.raises(GrammarError, match="name"):
        bad = {"type": "function", "function": {"name": "bad name!", "parameters": {}}}
        tool_call_processor(smol_tok, [bad], choice="any", vocab_size=V)
    with pytest.raises(GrammarError, match="invalid"):
        bad = {"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}
        tool_call_processor(v3_tok, [bad], choice="any", vocab_size=V)
    with pytest.raises(GrammarError):
        tool_call_processor(smol_tok, [], choice="any", vocab_size=V)


def test_v1_tokenizer_has_no_tool_calls():
    tok = load_tokenizer_file(DATA / "tokenizer.model.v1")
    with pytest.raises(GrammarError, match="no tool-call format"):
        tool_call_processor(tok, TOOLS, choice="any", vocab_size=tok.vocab_size)
    assert tool_call_processor(tok, TOOLS, choice="auto", vocab_size=tok.vocab_size) is None


def test_tools_system_prompt():
    text = tools_system_prompt(TOOLS)
    assert "<tool_call>" in text and "</tool_call>" in text
    for tool in TOOLS:
        f = tool["function"]
        assert f["name"] in text and f["description"] in text
        assert json.dumps(f["parameters"]) in text


# -- every tool-call format, driven by random logits --------------------------------------------


@pytest.mark.parametrize("kind", ["v3_tok", "tekken_tok", "v11_tok", "gguf_spm_tok", "smol_tok"])
def test_tool_call_formats_parse_back(kind, request):
    tok = request.getfixturevalue(kind)
    V = tok.vocab_size
    proc = tool_call_processor(tok, TOOLS, choice="any", vocab_size=V)
    for seed in range(3):
        ids, ended = drive(proc.clone(), tok, V, seed)
        assert ended
        content, calls = tok.parse_tool_calls(ids)
        assert content.strip() == ""
        check_calls(calls)
    single = tool_call_processor(tok, TOOLS, choice="add", vocab_size=V)
    ids, ended = drive(single, tok, V, 7)
    content, calls = tok.parse_tool_calls(ids)
    assert ended and len(calls) == 1 and calls[0]["function"]["name"] == "add"
    check_calls(calls)


def test_mistral_auto_text_or_calls(v3_tok, v11_tok):
    for tok in (v3_tok, v11_tok):
        V = tok.vocab_size
        proc = tool_call_processor(tok, TOOLS, choice="auto", vocab_size=V)
        raw = tok.mistral.instruct_tokenizer.tokenizer
        text = tok.encode("Let me check.", bos=False)
        # free text: EOS and ordinary tokens allowed, control tokens ([INST]) not
        row = proc(text, torch.zeros(V))
        assert all(torch.isfinite(row[tok.eos_ids]))
        assert torch.isinf(row[raw.get_special_token("[INST]")])
        assert torch.isfinite(row[raw.get_special_token("[TOOL_CALLS]")])
        # once [TOOL_CALLS] is written, only valid calls can follow
        prefix = text + [raw.get_special_token("[TOOL_CALLS]")]
        ids, ended = drive(proc.clone(), tok, V, 1, prefix=prefix)
        content, calls = tok.parse_tool_calls(prefix + ids)
        assert ended and content.strip() == "Let me check."
        check_calls(calls)


def test_hermes_auto_text_or_calls(smol_tok):
    V = smol_tok.vocab_size
    proc = tool_call_processor(smol_tok, TOOLS, choice="auto", vocab_size=V, parallel=False)
    prefix = smol_tok.encode("Let me check. <tool_call>", bos=False)
    ids, ended = drive(proc, smol_tok, V, 2, prefix=prefix)
    content, calls = smol_tok.parse_tool_calls(prefix + ids)
    assert ended and content == "Let me check." and len(calls) == 1
    check_calls(calls)
    row = proc.clone()(smol_tok.encode("Plain answer.", bos=False), torch.zeros(V))
    assert all(torch.isfinite(row[smol_tok.eos_ids]))


# -- end to end with the engine: the tiny random Mistral ------------------------------------------


def chat_prompt(tok, text: str, tools=None) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}], tools=tools)


def test_tiny_json_object(tiny_llm):
    tok, V = tiny_llm.tokenizer, tiny_llm.args.vocab_size
    prompt = chat_prompt(tok, "Answer in JSON.")
    procs = [json_processor(tok, None, vocab_size=V) for _ in range(8)]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=48, logits_processors=[p])
              for s, p in enumerate(procs)]
    outs = tiny_llm.generate([prompt] * 8, params)
    stopped = 0
    for out, proc in zip(outs, procs):
        o = out.outputs[0]
        assert proc.error is None
        if o.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(o.text), dict)
    assert stopped >= 2


def test_tiny_json_schema(tiny_llm):
    tok, V = tiny_llm.tokenizer, tiny_llm.args.vocab_size
    prompt = chat_prompt(tok, "Describe a pet.")
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300,
                             logits_processors=[json_processor(tok, PET, vocab_size=V)])
              for s in range(4)]
    for out in tiny_llm.generate([prompt] * 4, params):
        o = out.outputs[0]
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), PET)


@pytest.mark.parametrize("choice,parallel", [("any", True), ("any", False), ("add", True)])
def test_tiny_tool_calls(tiny_llm, choice, parallel):
    tok, V = tiny_llm.tokenizer, tiny_llm.args.vocab_size
    prompt = chat_prompt(tok, "What is 2 + 3?", tools=TOOLS)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, logits_processors=[
        tool_call_processor(tok, TOOLS, choice=choice, vocab_size=V, parallel=parallel)])
        for s in range(3)]
    for out in tiny_llm.generate([prompt] * 3, params):
        o = out.outputs[0]
        assert o.finish_reason == "stop"
        content, calls = tok.parse_tool_calls(o.token_ids)
        assert content.strip() == ""
        check_calls(calls, names=["add"] if choice == "add" else None)
        if not parallel or choice == "add":
            assert len(calls) == 1


def test_tiny_n2_clones_the_processor(tiny_llm):
    tok, V = tiny_llm.tokenizer, tiny_llm.args.vocab_size
    proc = tool_call_processor(tok, TOOLS, choice="any", vocab_size=V)
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=200,
                            logits_processors=[proc])
    out = tiny_llm.generate([chat_prompt(tok, "Weather?", tools=TOOLS)], params)[0]
    assert len(out.outputs) == 2
    for o in out.outputs:
        assert o.finish_reason == "stop"
        content, calls = tok.parse_tool_calls(o.token_ids)
        assert content.strip() == ""
        check_calls(calls)
    assert out.outputs[0].token_ids != out.outputs[1].token_ids


# -- end to end with the engine: SmolLM2 ----------------------------------------------------------


def test_smollm2_json_schema(smol_llm):
    tok, V = smol_llm.tokenizer, smol_llm.args.vocab_size
    person = {"type": "object",
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
    out = smol_llm.chat(msgs, SamplingParams(temperature=1.0, seed=0, max_tokens=40,
                                             logits_processors=[json_processor(
                                                 tok, person, vocab_size=V)]))[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), person)


def test_smollm2_hermes_tool_calls(smol_llm):
    tok, V = smol_llm.tokenizer, smol_llm.args.vocab_size
    weather = json.loads(json.dumps(WEATHER))
    del weather["function"]["parameters"]["properties"]["city"]["maxLength"]
    msgs = [{"role": "system", "content": tools_system_prompt([weather, ADD])},
            {"role": "user", "content": "What's the weather in Paris?"}]
    for choice in ("any", "get_weather"):
        proc = tool_call_processor(tok, [weather, ADD], choice=choice, vocab_size=V,
                                   parallel=False)
        out = smol_llm.chat(msgs, SamplingParams(temperature=1.0, seed=0, max_tokens=60,
                                                 logits_processors=[proc]))[0].outputs[0]
        assert out.finish_reason == "stop"
        content, calls = tok.parse_tool_calls(out.token_ids)
        assert content == "" and len(calls) == 1
        name = calls[0]["function"]["name"]
        schema = weather["function"]["parameters"] if name == "get_weather" else PARAMS[name]
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schema)
        if choice == "get_weather":
            assert name == "get_weather"
