"""The engine: continuous batching, paged KV cache, prefix cache, preemption, abort, streaming.

The reference for every batched run is the same request run alone; the reference for a
request run alone is transformers (greedy) or the model's own full-prefill logits.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import hf_greedy
from souverain import LLM, AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from souverain.errors import RequestError

GREEDY = dict(temperature=0, ignore_eos=True)


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts of mixed lengths (3..40 tokens; the tiny Mistral's window is 6); every third
    one starts with a shared 20-token prefix (a system prompt)."""
    rng = random.Random(seed)
    prefix = [1] + [rng.randrange(3, 32000) for _ in range(19)]
    prompts = []
    for i in range(n):
        body = [rng.randrange(3, 32000) for _ in range(rng.randrange(3, 41))]
        prompts.append(prefix + body if i % 3 == 0 else [1] + body)
    return prompts


def engine_for(entry: dict, **options) -> LLMEngine:
    options.setdefault("block_size", 4)
    return LLMEngine(entry["consolidated"], EngineConfig(dtype="float32", **options))


def run_alone(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("alone", prompt, params)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    return final.token_ids


def run_staggered(engine: LLMEngine, prompts, params, every: int = 2) -> dict[str, list[int]]:
    """Submit one request every ``every`` steps; return the final token ids by request id."""
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, params[i] if isinstance(params, list) else params)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    return results


@pytest.fixture(scope="module")
def mistral_alone(tiny_mistral):
    """Greedy 24-token continuations of 16 prompts, each run alone."""
    engine = engine_for(tiny_mistral)
    prompts = make_prompts(16)
    params = SamplingParams(max_tokens=24, **GREEDY)
    return prompts, [run_alone(engine, p, params) for p in prompts]


def test_alone_equals_transformers(tiny_mistral, mistral_alone):
    prompts, alone = mistral_alone
    for p, a in list(zip(prompts, alone))[:4]:
        assert a == hf_greedy(tiny_mistral["hf"], p, 24)


@pytest.mark.parametrize("options", [
    {},  # plain continuous batching
    {"max_num_batched_tokens": 7},  # chunked prefill forced (prompts up to 60 tokens)
    {"kv_cache_tokens": 48, "max_num_batched_tokens": 16},  # preemption forced
], ids=["batched", "chunked-prefill", "preemption"])
def test_batch_invariance(tiny_mistral, mistral_alone, options):
    prompts, alone = mistral_alone
    engine = engine_for(tiny_mistral, **options)
    got = run_staggered(engine, prompts, SamplingParams(max_tokens=24, **GREEDY))
    for i, expected in enumerate(alone):
        assert got[f"r{i}"] == expected, f"request {i} differs when batched ({options})"
    if "kv_cache_tokens" in options:
        assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks


def test_prefix_cache_hits_and_same_output(tiny_mistral, mistral_alone):
    prompts, alone = mistral_alone
    engine = engine_for(tiny_mistral)
    params = SamplingParams(max_tokens=24, **GREEDY)
    engine.add_request("first", prompts[0], params)
    while engine.has_unfinished():
        engine.step()
    # prompts[3] shares the 20-token prefix with prompts[0]: 5 full blocks of 4
    engine.add_request("second", prompts[3], params)
    cached, tokens = None, None
    while engine.has_unfinished():
        for out in engine.step():
            cached, tokens = out.num_cached_tokens, out.token_ids
    assert cached == 20
    assert tokens == alone[3]


def test_windowed_sequences_hold_at_most_the_window(tiny_mistral):
    engine = engine_for(tiny_mistral, block_size=2)
    assert engine.window == 6
    engine.add_request("long", make_prompts(1)[0], SamplingParams(max_tokens=40, **GREEDY))
    held = []
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:
            held.append(sum(1 for b in seq.block_table if b >= 0))
    # 6 visible keys (3 blocks of 2) + the block being written (+1 when unaligned)
    assert held and max(held[5:]) <= 5


def test_seeded_sampling_same_alone_and_in_busy_batch(tiny_mistral):
    engine = engine_for(tiny_mistral)
    prompt = make_prompts(3, seed=7)[1]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=1234,
                            ignore_eos=True)
    alone = run_alone(engine, prompt, seeded)
    others = make_prompts(10, seed=8)
    params = [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True) for _ in others]
    params[3] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = others[:5] + [prompt] + others[5:]
    params = params[:5] + [seeded] + params[5:]
    got = run_staggered(engine, prompts, params, every=1)
    assert got["r5"] == alone


def test_abort_frees_every_block(tiny_mistral):
    engine = engine_for(tiny_mistral)
    start = engine.blocks.num_free_blocks
    for i, p in enumerate(make_prompts(6)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(5):
        engine.step()
    assert engine.blocks.num_free_blocks < start
    for i in range(6):
        assert engine.abort(f"r{i}")
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == start
    assert all(c == 0 for c in engine.blocks.ref_count)
    assert not engine.abort("r0")  # already gone


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step"]),
                          st.integers(0, 7), st.integers(1, 30)), min_size=1, max_size=25))
def test_no_block_leaks_property(leak_engine, actions):
    engine = leak_engine
    live: set[str] = set()
    counter = 0
    for action, k, length in actions:
        if action == "add":
            rid = f"p{counter}"
            counter += 1
            prompt = [1] + [(k * 131 + j * 7) % 30000 + 3 for j in range(length)]
            engine.add_request(rid, prompt, SamplingParams(max_tokens=1 + k, **GREEDY))
            live.add(rid)
        elif action == "abort" and live:
            rid = sorted(live)[k % len(live)]
            engine.abort(rid)
            live.discard(rid)
        else:
            for out in engine.step():
                if out.finished:
                    live.discard(out.request_id)
    for rid in list(live):
        engine.abort(rid)
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks
    assert all(c == 0 for c in engine.blocks.ref_count)


@pytest.fixture(scope="module")
def leak_engine(tiny_llama):
    # a small KV budget so preemption and block reuse happen in the property test
    return LLMEngine(tiny_llama["consolidated"], EngineConfig(
        dtype="float32", block_size=4, kv_cache_tokens=96, max_num_batched_tokens=16))


def test_logprobs_equal_log_softmax_of_model_logits(tiny_mistral):
    llm = LLM(tiny_mistral["consolidated"], dtype="float32", block_size=4)
    prompt = make_prompts(2)[1]
    out = llm.generate([prompt], SamplingParams(temperature=0.8, seed=3, max_tokens=10,
                                                ignore_eos=True, logprobs=True,
                                                top_logprobs=3))[0]
    full = torch.log_softmax(llm.logits(prompt + out.token_ids[:-1]), dim=-1)
    lps = out.outputs[0].logprobs
    assert len(lps) == 10
    for i, (tok, lp) in enumerate(zip(out.token_ids, lps)):
        row = full[len(prompt) - 1 + i]
        assert lp.token_id == tok
        assert abs(lp.logprob - row[tok].item()) <= 1e-4
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()


def test_n_samples(tiny_mistral):
    llm = LLM(tiny_mistral["consolidated"], dtype="float32", block_size=4)
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    a = llm.generate([make_prompts(1)[0]], params)[0]
    b = llm.generate([make_prompts(1)[0]], params)[0]
    assert len(a.outputs) == 3
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3


def test_stop_string_across_token_boundary(tiny_mistral):
    llm = LLM(tiny_mistral["consolidated"], dtype="float32", block_size=4)
    prompt = make_prompts(1)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))[0]
    tok = llm.tokenizer
    base = tok.decode(prompt)
    upto = [tok.decode(prompt + free.token_ids[:k])[len(base):] for k in range(21)]
    assert upto[20] == free.text
    piece = None
    for k in range(2, 19):  # a boundary with >= 2 characters of text on each side
        cut = len(upto[k])
        if cut - len(upto[k - 1]) >= 2 and len(upto[k + 1]) - cut >= 2:
            candidate = free.text[cut - 2:cut + 2]
            if free.text.find(candidate) == cut - 2:
                piece = candidate
                break
    assert piece is not None, free.text
    out = llm.generate([prompt], SamplingParams(max_tokens=20, stop=[piece], **GREEDY))[0]
    assert out.finish_reason == "stop"
    assert piece not in out.text
    assert out.text == free.text[:free.text.find(piece)]


def test_utf8_split_across_tokens_streams_whole_characters(tiny_mistral):
    llm = LLM(tiny_mistral["consolidated"], dtype="float32", block_size=4)
    tok = llm.tokenizer
    target = tok.encode("é 😀 🦜 𝔘 龘 ok", bos=False)  # the last three need byte-fallback tokens
    forced = list(target)

    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[forced[len(generated)] if len(generated) < len(forced) else 2] = 0.0
        return out

    params = SamplingParams(temperature=0, max_tokens=len(target), logits_processors=[force])
    pieces = list(llm.stream([1, 1500], params))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == llm.last_output.text
    assert llm.last_output.text.strip() == "é 😀 🦜 𝔘 龘 ok"
    assert len(target) > len(pieces)  # some characters really were split across tokens


def test_prompt_longer_than_context_rejected(tiny_llama):
    engine = LLMEngine(tiny_llama["hf"], EngineConfig(dtype="float32"))
    assert engine.max_model_len == 512
    with pytest.raises(RequestError, match="never truncates"):
        engine.add_request(None, [5] * 512, SamplingParams())


def test_async_engine_streams_and_cancels(tiny_mistral):
    engine = AsyncLLMEngine(engine=engine_for(tiny_mistral))
    prompts = make_prompts(4)

    async def consume(i: int, limit: int | None) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompts[i], SamplingParams(max_tokens=16, **GREEDY),
                                         request_id=f"a{i}"):
            tokens = out.token_ids
            if limit is not None and len(tokens) >= limit:
                break  # the client goes away mid-generation
        return tokens

    async def main():
        return await asyncio.gather(consume(0, None), consume(1, 3), consume(2, None),
                                    consume(3, 5))

    results = asyncio.run(main())
    assert len(results[0]) == 16 and len(results[2]) == 16
    assert 3 <= len(results[1]) < 16 and 5 <= len(results[3]) < 16
    inner = engine.engine
    for _ in range(100):  # aborts are processed by the engine thread
        if not inner.has_unfinished():
            break
        import time
        time.sleep(0.05)
    assert inner.blocks.num_free_blocks == inner.blocks.num_usable_blocks
    engine.shutdown()
