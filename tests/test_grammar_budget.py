"""Structured output that always closes (issue 16, item 1): the grammar knows the token budget.

A property test over random JSON schemas (objects, arrays, enums, integers, numbers, nested)
and random budgets from the minimum the processor announces: random logits drive the choice (a
random model: the worst case), the answer stops at the budget or at EOS, and it must parse,
validate against the schema and never pass the budget. The same for forced tool calls, in the
Hermes (SmolLM2) and Mistral ([TOOL_CALLS], v3) formats. And the bound on numbers: logits that
push digits (the issue's ``1111111…``) still end in bounded tokens with no budget at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import mistral_common
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from souverain.grammar import json_processor, token_table, tool_call_processor
from souverain.grammar.budget import FRAC_DIGITS, INT_DIGITS
from souverain.tokenizer import load_tokenizer_file
from souverain.weights import load

V3 = Path(os.path.dirname(mistral_common.__file__)) / "data" / \
    "mistral_instruct_tokenizer_240323.model.v3"


@pytest.fixture(scope="module")
def smol_tok():
    return load("smollm2-135m-instruct").tokenizer


@pytest.fixture(scope="module")
def v3_tok():
    return load_tokenizer_file(V3)


# -- random schemas -------------------------------------------------------------------------

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
LEAF = st.one_of(
    st.just({"type": "string"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 20)),
    st.just({"type": "integer"}),
    st.builds(lambda lo, w: {"type": "integer", "minimum": lo, "maximum": lo + w},
              st.integers(-1000, 1000), st.integers(0, 10**6)),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda vs: {"type": "string", "enum": vs},
              st.lists(NAMES, min_size=1, max_size=4, unique=True)),
)


def _object(props: dict, n_required: int, closed: bool) -> dict:
    names = list(props)
    schema = {"type": "object", "properties": props, "required": names[:n_required]}
    if closed:
        schema["additionalProperties"] = False
    return schema


SCHEMA = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.builds(lambda items, lo: {"type": "array", "items": items, "minItems": lo},
                  inner, st.integers(0, 2)),
        st.builds(_object, st.dictionaries(NAMES, inner, min_size=1, max_size=4),
                  st.integers(0, 4), st.booleans()),
    ),
    max_leaves=8,
)
OBJECT_SCHEMA = st.builds(_object, st.dictionaries(NAMES, SCHEMA, min_size=1, max_size=4),
                          st.integers(0, 4), st.booleans())


def run(proc, tok, vocab: int, seed: int, budget: int | None, steps: int = 4000,
        bias: torch.Tensor | None = None) -> tuple[list[int], bool]:
    """Sample from random logits through ``proc`` until EOS or ``budget`` tokens:
    ``(ids, ended by EOS)``."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    limit = budget if budget is not None else steps
    while len(ids) < limit:
        logits = torch.randn(vocab, generator=g) * 3
        if bias is not None:
            logits += bias
        row = proc(list(ids), logits)
        token = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
        if token in tok.eos_ids:
            return ids, True
        ids.append(token)
    return ids, False


SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("kind", ["smol_tok", "v3_tok"])
def test_json_schema_always_closes_within_the_budget(kind, request):
    tok = request.getfixturevalue(kind)
    vocab = tok.vocab_size

    @SETTINGS
    @given(schema=OBJECT_SCHEMA, extra=st.integers(0, 60), seed=st.integers(0, 2**16))
    def check(schema, extra, seed):
        proc = json_processor(tok, schema, vocab_size=vocab)
        assert proc.shortest is not None and proc.shortest >= 1
        budget = proc.shortest + extra
        proc.budget = budget
        ids, _ = run(proc, tok, vocab, seed, budget)
        assert len(ids) <= budget
        value = json.loads(tok.decode(ids))
        jsonschema.validate(value, schema)

    check()


def test_budget_below_the_shortest_answer_is_known(smol_tok):
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "country": {"type": "string"},
        "population": {"type": "integer"}}, "required": ["name", "country", "population"]}
    proc = json_processor(smol_tok, schema, vocab_size=smol_tok.vocab_size)
    # {"name": "", "country": "", "population": 0}: the keys alone need several tokens
    assert 8 <= proc.shortest <= 30
    # exactly the minimum is enough
    proc.budget = proc.shortest
    ids, _ = run(proc, smol_tok, smol_tok.vocab_size, 3, proc.shortest)
    jsonschema.validate(json.loads(smol_tok.decode(ids)), schema)


TOOL_SCHEMAS = st.lists(OBJECT_SCHEMA, min_size=1, max_size=3)


@pytest.mark.parametrize("kind", ["smol_tok", "v3_tok"])
def test_forced_tool_calls_always_close_within_the_budget(kind, request):
    tok = request.getfixturevalue(kind)
    vocab = tok.vocab_size

    @SETTINGS
    @given(schemas=TOOL_SCHEMAS, extra=st.integers(0, 60), seed=st.integers(0, 2**16),
           named=st.booleans())
    def check(schemas, extra, seed, named):
        tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": s}}
                 for i, s in enumerate(schemas)]
        choice = "f0" if named else "any"
        proc = tool_call_processor(tok, tools, choice=choice, vocab_size=vocab)
        assert proc.shortest is not None
        budget = proc.shortest + extra
        proc.budget = budget
        ids, _ = run(proc, tok, vocab, seed, budget)
        assert len(ids) <= budget
        text, calls = tok.parse_tool_calls(ids)
        assert calls, (tok.decode(ids), text)
        for call in calls:
            i = int(call["function"]["name"][1:])
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[i])

    check()


def test_numbers_are_bounded_without_any_budget(smol_tok):
    """The issue's runaway: digits pushed hard, no max_tokens. Integers stop at 16 digits,
    fractions at 16, and the answer ends."""
    schema = {"type": "object", "properties": {"population": {"type": "integer"},
                                               "ratio": {"type": "number"}},
              "required": ["population", "ratio"], "additionalProperties": False}
    table, special = token_table(smol_tok)
    vocab = smol_tok.vocab_size
    bias = torch.zeros(vocab)
    digits = [i for i, b in enumerate(table) if i not in special and b[:1].isdigit()]
    bias[digits] = 30.0  # a model that loves digits
    for seed in range(3):
        proc = json_processor(smol_tok, schema, vocab_size=vocab)
        ids, ended = run(proc, smol_tok, vocab, seed, None, steps=400, bias=bias)
        assert ended, smol_tok.decode(ids)
        text = smol_tok.decode(ids)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        whole = text.split('"population": ')[1].split(",")[0].lstrip("-")
        assert 1 <= len(whole) <= INT_DIGITS, text
        ratio = text.split('"ratio": ')[1].rstrip("}")
        mantissa = ratio.lstrip("-").split("e")[0].split("E")[0]
        head, _, frac = mantissa.partition(".")
        assert len(head) <= INT_DIGITS and len(frac) <= FRAC_DIGITS, text


# -- what the server makes of an answer the budget cut -------------------------------------

def test_cut_tool_call_markup_never_reaches_content(smol_tok, v3_tok):
    """A call cut where no grammar steered it does not parse: its tag and what follows are
    dropped, and the reason is `length` (also with whole calls, when the budget ended it)."""
    from souverain.engine.sampling import SamplingParams
    from souverain.engine.sequence import CompletionOutput
    from souverain.server.chat import ChatPlan, final_message

    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    ids = smol_tok.encode(text, bos=False)
    plan = ChatPlan(prompt_ids=[], params=SamplingParams(), tools_active=True)
    out = CompletionOutput(index=0, text=text, token_ids=ids, finish_reason="length")
    content, calls, reason = final_message(plan, out, smol_tok)
    assert (content, calls, reason) == ("Let me check.", [], "length")

    whole = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
            '</tool_call>'
    out = CompletionOutput(index=0, text=whole, token_ids=smol_tok.encode(whole, bos=False),
                           finish_reason="length")
    content, calls, reason = final_message(plan, out, smol_tok)
    assert content == "Sure." and len(calls) == 1 and reason == "length"
    out.finish_reason = "stop"
    assert final_message(plan, out, smol_tok)[2] == "tool_calls"

    native = v3_tok.control_id("[TOOL_CALLS]")
    head = v3_tok.encode("Checking", bos=False)
    cut = head + [native] + v3_tok.encode('[{"name": "get_weather", "arguments": {"ci', bos=False)
    plan = ChatPlan(prompt_ids=[], params=SamplingParams(), tools_active=True,
                    native_tools=True, tool_calls_id=native)
    out = CompletionOutput(index=0, text=v3_tok.decode(cut), token_ids=cut,
                           finish_reason="length")
    content, calls, reason = final_message(plan, out, v3_tok)
    assert calls == [] and reason == "length" and "get_weather" not in content
    assert content.strip() == v3_tok.decode(head).strip()
