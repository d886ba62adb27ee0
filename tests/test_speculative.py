"""Speculative decoding: outputs with drafts equal the outputs without them.

The reference is always the same engine setting without speculation (itself checked against
transformers in test_engine.py). Random tiny models never repeat themselves, so prompt lookup
would draft nothing there: the engine tests plant an `Oracle` proposer (drafts = the reference
continuation with a share of tokens corrupted, seeded), which drives every path (full
acceptance, rejection at each position, drafts cut by the limit, the budget or the KV cache).
The real proposer runs on the bundled SmolLM2, on a prompt whose answer copies the prompt.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from test_engine import make_prompts
from test_multi_lora import random_adapter

from souverain import EngineConfig, LLMEngine, SamplingParams
from souverain.engine.speculative import NgramIndex, SpecState, best_k
from souverain.errors import RequestError

GREEDY = dict(temperature=0, ignore_eos=True)


class Oracle:
    """Drafts the tokens a reference run produced after ``ids`` (a ``wrong`` share of them
    replaced by another token), so acceptance and rejection both happen."""

    def __init__(self, reference: list[int], rng: random.Random, wrong: float = 0.25,
                 vocab: int = 32000):
        self.reference, self.rng, self.wrong, self.vocab = reference, rng, wrong, vocab
        self.proposed = 0

    def propose(self, ids: list[int], k: int) -> list[int]:
        if ids != self.reference[:len(ids)]:
            return []  # the run left the reference: nothing sensible to draft
        draft = self.reference[len(ids):len(ids) + k]
        draft = [t if self.rng.random() >= self.wrong else (t + 1) % self.vocab for t in draft]
        self.proposed += len(draft)
        return draft


def engine(entry: dict, speculative: bool | str, **options) -> LLMEngine:
    """``speculative``: False (off), True (prompt lookup) or a draft model's path."""
    options.setdefault("block_size", 4)
    options.setdefault("kv_cache_tokens", 4096)
    if speculative:  # not measured: a loaded machine must not turn drafting off here
        options.setdefault("speculative_row_cost", 0.1)
    options["speculative"] = (speculative if isinstance(speculative, str)
                              else "ngram" if speculative else None)
    return LLMEngine(entry["consolidated"], EngineConfig(dtype="float32", **options))


def run(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams | list,
        reference: dict[str, list[int]] | None = None, *, every: int = 1, lora: str | None = None,
        k: int = 5, seed: int = 0) -> dict[str, tuple[list[int], str | None]]:
    """Submit one request every ``every`` steps (with `Oracle` drafts from ``reference``);
    returns each request's (generated ids, finish reason)."""
    rng = random.Random(seed)
    out: dict[str, tuple[list[int], str | None]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or eng.has_unfinished():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            req = eng.prepare_request(f"r{i}", p, params[i] if isinstance(params, list)
                                      else params, lora=lora)
            if reference is not None:
                for s in req.seqs:
                    s.spec = SpecState(Oracle(p + reference[f"r{i}"][0], rng), k)
            eng.submit(req)
        for o in eng.step():
            if o.finished:
                out[o.request_id] = (o.token_ids, o.finish_reason)
        step += 1
    return out


def check_spec_run(eng: LLMEngine) -> None:
    """Drafts were verified, some accepted and some rejected, and every block is free."""
    s = eng.stats()
    assert s["spec_verify_steps"] > 0
    assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
    assert s["spec_emitted_tokens"] == s["spec_accepted_tokens"] + s["spec_verify_steps"]
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_greedy_equal_with_drafts_in_mixed_batches(name, tiny_models):
    """Requests joining every other step (prefills beside verifications), chunked prefill
    (16-token budget cuts drafts too), max_tokens cutting drafts at the limit."""
    entry = tiny_models[name]
    prompts = make_prompts(8, seed=1)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (24, 9, 30, 1, 17, 24, 2, 20)]
    plain = run(engine(entry, False, max_num_batched_tokens=16), prompts, params, every=2)
    spec_eng = engine(entry, True, max_num_batched_tokens=16)
    spec = run(spec_eng, prompts, params, plain, every=2)
    assert spec == plain
    check_spec_run(spec_eng)


def test_greedy_equal_under_preemption(tiny_mistral):
    """A KV budget so small that sequences are preempted and recomputed mid-generation;
    drafts never cause a preemption (they are dropped first)."""
    prompts = make_prompts(6, seed=2)
    params = SamplingParams(max_tokens=32, **GREEDY)
    plain_eng = engine(tiny_mistral, False, kv_cache_tokens=48, max_num_batched_tokens=16)
    plain = run(plain_eng, prompts, params)
    spec_eng = engine(tiny_mistral, True, kv_cache_tokens=48, max_num_batched_tokens=16)
    spec = run(spec_eng, prompts, params, plain)
    assert spec == plain
    assert spec_eng.stats()["preemptions"] > 0
    assert spec_eng.stats()["preemptions"] <= plain_eng.stats()["preemptions"]
    check_spec_run(spec_eng)


def test_greedy_equal_with_lora(tiny_mistral):
    adapter = random_adapter(LLMEngine(tiny_mistral["consolidated"],
                                       EngineConfig(dtype="float32")).args, rank=4, seed=3)
    prompts = make_prompts(4, seed=3)
    params = SamplingParams(max_tokens=20, **GREEDY)
    results = []
    for speculative in (False, True):
        eng = engine(tiny_mistral, speculative)
        eng.add_lora("a", adapter)
        results.append(run(eng, prompts, params, results[0] if results else None, lora="a"))
    assert results[1] == results[0]
    check_spec_run(eng)


def test_stops_min_tokens_and_penalties(tiny_mistral):
    """A stop token or stop string met inside an accepted draft ends the request there, with
    the text cut as without drafts; min_tokens bans stops on every verified row; penalties
    see the tokens accepted earlier in the same step."""
    prompts = make_prompts(4, seed=4)
    free = run(engine(tiny_mistral, False), prompts, SamplingParams(max_tokens=30, **GREEDY))
    tok = LLMEngine(tiny_mistral["consolidated"], EngineConfig(dtype="float32")).tokenizer
    assert tok is not None
    params = []
    for i in range(4):
        ids = free[f"r{i}"][0]
        if i == 0:  # a stop token in the middle of the answer
            params.append(SamplingParams(max_tokens=30, stop_token_ids=[ids[11]], **GREEDY))
        elif i == 1:  # the same stop token, banned for 20 tokens
            params.append(SamplingParams(max_tokens=30, stop_token_ids=[ids[3]],
                                         min_tokens=20, **GREEDY))
        elif i == 2:  # a stop string spanning a token boundary
            text = tok.decode(ids[:16]).strip()
            assert len(text) >= 6
            params.append(SamplingParams(max_tokens=30, stop=[text[-6:-1]], **GREEDY))
        else:
            params.append(SamplingParams(max_tokens=30, repetition_penalty=1.3,
                                         frequency_penalty=0.5, **GREEDY))
    plain = run(engine(tiny_mistral, False), prompts, params)
    spec_eng = engine(tiny_mistral, True)
    spec = run(spec_eng, prompts, params, plain)
    assert spec == plain
    assert plain["r0"][1] == "stop" and len(plain["r0"][0]) <= 12
    check_spec_run(spec_eng)


def test_abort_mid_verification_frees_every_block(tiny_mistral):
    prompts = make_prompts(3, seed=5)
    params = SamplingParams(max_tokens=40, **GREEDY)
    plain = run(engine(tiny_mistral, False), prompts, params)
    eng = engine(tiny_mistral, True)
    rng = random.Random(0)
    for i, p in enumerate(prompts):
        req = eng.prepare_request(f"r{i}", p, params)
        req.seqs[0].spec = SpecState(Oracle(p + plain[f"r{i}"][0], rng), 5)
        eng.submit(req)
    for _ in range(4):
        eng.step()
    assert eng.stats()["spec_verify_steps"] > 0
    # blocks taken for drafts (accepted or not) are held when the requests go
    for i in range(3):
        assert eng.abort(f"r{i}")
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
    assert not eng.has_unfinished()


def test_speculation_pauses_for_large_batches(tiny_mistral):
    prompts = make_prompts(4, seed=6)
    params = SamplingParams(max_tokens=12, **GREEDY)
    plain = run(engine(tiny_mistral, False), prompts, params)
    eng = engine(tiny_mistral, True, speculative_disable_batch_size=3)
    rng = random.Random(0)
    for i, p in enumerate(prompts):  # all at once: 4 decode together until the end
        req = eng.prepare_request(f"r{i}", p, params)
        req.seqs[0].spec = SpecState(Oracle(p + plain[f"r{i}"][0], rng, wrong=0.0), 5)
        eng.submit(req)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["spec_verify_steps"] == 0


def test_sampled_distribution_unchanged(tiny_mistral):
    """Seeded sampling with drafts (right or deliberately wrong) draws every emitted token
    from the target distribution: chi-square of the tokens' counts against the model's own
    probabilities (full-prefill logits, temperature 2, top-k 4), over 600 seeds. The first
    token comes from the prefill; then drafts [d1, d2] are verified: d1 (the 2nd most likely
    token) is rejected often and accepted sometimes, d2 is checked only after d1."""
    eng = engine(tiny_mistral, True, speculative_disable_batch_size=64, max_num_seqs=64,
                 max_num_batched_tokens=2048)
    prompt = make_prompts(1, seed=7)[0]
    temp = 2.0

    def top4(ids: list[int]) -> tuple[list[int], list[float]]:
        top = torch.softmax(eng.runner.prompt_logits(ids)[-1] / temp, -1).topk(4)
        return top.indices.tolist(), top.values.double().tolist()

    (first, *_), _ = top4(prompt)
    ids1, p1 = top4(prompt + [first])
    d1 = ids1[1]
    ids2, p2 = top4(prompt + [first, d1])
    draft = [d1, ids2[0]]

    class Fixed:
        def propose(self, ids: list[int], k: int) -> list[int]:
            return draft[:k] if ids == prompt + [first] else []

    seconds: Counter[int] = Counter()
    thirds: Counter[int] = Counter()
    n = 600
    for batch in range(n // 100):
        for j in range(100):
            params = SamplingParams(max_tokens=3, temperature=temp, top_k=4,
                                    seed=batch * 100 + j, ignore_eos=True)
            req = eng.prepare_request(f"s{batch}-{j}", prompt, params)
            req.seqs[0].spec = SpecState(Fixed(), 2)
            eng.submit(req)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished and o.token_ids[0] == first:
                    seconds[o.token_ids[1]] += 1
                    if o.token_ids[1] == d1:
                        thirds[o.token_ids[2]] += 1
    s = eng.stats()
    assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
    for counts, ids, probs in ((seconds, ids1, p1), (thirds, ids2, p2)):
        m = sum(counts.values())
        observed = [counts[t] for t in ids]
        assert sum(observed) == m > 40
        expected = [p * m / sum(probs) for p in probs]  # float32 sums: renormalise in float64
        assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(1, 4),
       st.integers(1, 4), st.integers(1, 6), st.integers(1, 5))
def test_ngram_index_matches_brute_force(ids, n_min, span, k, steps):
    """Incremental indexing proposes what a full rescan would: the tokens after the latest
    earlier occurrence of the longest matching suffix."""
    n_max = n_min + span - 1
    index = NgramIndex(n_min, n_max)
    cuts = sorted({max(1, len(ids) * (i + 1) // steps) for i in range(steps)})
    for cut in cuts:
        seq = ids[:cut]
        expected: list[int] = []
        for n in range(min(n_max, len(seq) - 1), n_min - 1, -1):
            ends = [e for e in range(n, len(seq)) if seq[e - n:e] == seq[len(seq) - n:]]
            if ends:
                expected = seq[max(ends):max(ends) + k]
                break
        assert index.propose(seq, k) == expected


def test_bad_settings_refused():
    for bad in (dict(speculative=" "), dict(speculative_quantization="int3"),
                dict(num_speculative_tokens=0), dict(speculative_row_cost=-1),
                dict(prompt_lookup_min=3, prompt_lookup_max=2),
                dict(speculative_disable_batch_size=0)):
        with pytest.raises(RequestError, match="invalid engine setting"):
            EngineConfig(**bad)


def test_row_cost_measured_and_a_costly_row_turns_speculation_off(tiny_mistral):
    eng = LLMEngine(tiny_mistral["consolidated"], EngineConfig(
        dtype="float32", speculative="ngram", kv_cache_tokens=2048))
    assert eng.spec_row_cost is not None and eng.spec_row_cost >= 0
    off = engine(tiny_mistral, True, speculative_row_cost=1.5)
    assert off.speculative is None
    req = off.prepare_request("r", [1, 2, 3], SamplingParams(max_tokens=2, **GREEDY))
    assert req.seqs[0].spec is None


def test_best_k_follows_acceptance_and_cost():
    assert best_k(0.9, 0.0, 5) == 5  # free rows: draft the most
    assert best_k(0.99, 1.0, 5) == 0  # a row costs a step: never pays
    assert best_k(0.1, 0.15, 5) == 0
    assert best_k(0.5, 0.15, 5) < best_k(0.9, 0.15, 5)
    state = SpecState(NgramIndex(1, 2), 5, row_cost=0.3)
    for _ in range(6):
        state.update(5, 0)  # every draft rejected: it stops drafting, with backoff
    ids = [1, 2, 3, 1, 2]
    proposals = [state.propose(ids, 5) for _ in range(8)]
    assert proposals[0] == [3] and sum(1 for p in proposals if p) <= 3


@pytest.fixture(scope="module")
def smollm2_engines():
    # float32: its matmuls batch the verification rows (int8 / int4 kernels may not, on
    # CPUs without VNNI: the engine then turns speculation off; see the row-cost test)
    return {spec: LLMEngine("smollm2-135m-instruct", EngineConfig(
        speculative=spec, kv_cache_tokens=4096, speculative_row_cost=0.2))
        for spec in (None, "ngram")}


def test_prompt_lookup_on_a_copying_answer(smollm2_engines):
    """The real proposer on the bundled model: an answer that copies its prompt is drafted
    well, and the greedy answer is token for token the same (plain and JSON-constrained)."""
    from souverain.bench.workload import copy_prompt
    from souverain.grammar import json_processor

    results = {}
    for spec, eng in smollm2_engines.items():
        assert eng.tokenizer is not None
        prompt = copy_prompt(eng.tokenizer)
        out = run(eng, [prompt], SamplingParams(max_tokens=48, **GREEDY))
        schema = {"type": "object", "properties": {"report": {"type": "string"},
                                                   "date": {"type": "string"}},
                  "required": ["report", "date"]}
        params = SamplingParams(max_tokens=48, temperature=0,
                                logits_processors=[json_processor(eng.tokenizer, schema,
                                                                 vocab_size=eng.args.vocab_size)])
        out_json = run(eng, [prompt], params)
        results[spec] = (out, out_json)
    assert results["ngram"] == results[None]
    s = smollm2_engines["ngram"].stats()
    assert s["spec_accepted_tokens"] > 0.5 * s["spec_draft_tokens"] > 0
    assert s["spec_emitted_tokens"] / s["spec_verify_steps"] > 2


@pytest.mark.parametrize("draft", ["llama", "mixtral"])
def test_draft_model_greedy_equal(draft, tiny_models):
    """A draft model (the target itself: nearly every draft accepted; an unrelated random
    model: nearly every draft rejected) never changes the greedy outputs, in staggered
    batches with chunked prefill and under preemption; its K/V lives in the target's blocks,
    all free at the end."""
    target = tiny_models["llama"]
    prompts = make_prompts(6, seed=8)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (20, 7, 25, 2, 16, 20)]
    for options in (dict(max_num_batched_tokens=16), dict(kv_cache_tokens=64,
                                                          max_num_batched_tokens=16)):
        plain = run(engine(target, False, **options), prompts, params, every=2)
        eng = engine(target, str(tiny_models[draft]["consolidated"]), **options)
        assert eng.drafter is not None
        spec = run(eng, prompts, params, every=2)
        assert spec == plain
        s = eng.stats()
        assert s["spec_verify_steps"] > 0
        rate = s["spec_accepted_tokens"] / s["spec_draft_tokens"]
        assert rate > 0.9 if draft == "llama" else rate < 0.5
        assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks


def test_draft_model_refusals(tiny_mistral, tiny_llama):
    with pytest.raises(RequestError, match="sliding window"):  # tiny Mistral has one
        engine(tiny_mistral, str(tiny_llama["consolidated"]))
    with pytest.raises(RequestError, match="vocabulary"):
        engine(tiny_llama, "smollm2-135m-instruct")
