"""The batched sampler against straightforward float64 reference maths (no mocks).

Every random draw is seeded, so each statistical check is deterministic.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from souverain.engine.sampler import SamplingRow, _process_, sample, sample_batch
from souverain.engine.sampling import SamplingParams, TokenLogprob
from souverain.errors import RequestError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: extra threads only add contention (the thread test below uses two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers -------------------------------------------------------------------------------
def rows_for(params, prompts=None, outputs=None):
    prompts = prompts or [[] for _ in params]
    outputs = outputs or [[] for _ in params]
    return [SamplingRow(p, p.make_generator(), pr, out)
            for p, pr, out in zip(params, prompts, outputs)]


def ref_penalized(raw, p: SamplingParams, prompt, output) -> torch.Tensor:
    """HF repetition penalty over prompt+output, then OpenAI frequency/presence over output."""
    x = raw.double().clone()
    r = p.repetition_penalty
    if r != 1:
        for t in set(prompt) | set(output):
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t, c in Counter(output).items():
        x[t] -= c * p.frequency_penalty + (1.0 if c > 0 else 0.0) * p.presence_penalty
    return x


def ref_probs(raw, p: SamplingParams, prompt=(), output=()) -> torch.Tensor:
    """The exact distribution the sampler should draw from (float64, vocab-long)."""
    x = ref_penalized(raw, p, prompt, output)
    if p.temperature == 0:
        out = torch.zeros_like(x)
        out[int(torch.argmax(x))] = 1
        return out
    x = x / p.temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < p.top_k < len(x):
        kth = torch.sort(x, descending=True).values[p.top_k - 1]
        keep &= x >= kth
    probs = torch.softmax(x.masked_fill(~keep, -math.inf), 0)
    if p.top_p < 1:
        s, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(s, 0)
        n_keep = int((cum < p.top_p).sum()) + 1  # smallest prefix reaching top_p
        threshold = s[n_keep - 1]
        keep &= probs >= threshold
        probs = torch.softmax(x.masked_fill(~keep, -math.inf), 0)
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
        probs = torch.softmax(x.masked_fill(~keep, -math.inf), 0)
    return probs


def draw_many(raw, p: SamplingParams, n: int, seed0: int = 0) -> Counter:
    """n independent draws: batches of copies of the row, each copy with its own seed."""
    counts = Counter()
    for start in range(0, n, 500):
        params = [SamplingParams(**{**_fields(p), "seed": seed0 + i})
                  for i in range(start, min(n, start + 500))]
        tokens, _ = sample_batch(raw.unsqueeze(0).expand(len(params), -1), rows_for(params))
        counts.update(tokens)
    return counts


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def chi_square_ok(counts: Counter, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson chi-square with bins of expected count < 5 pooled; returns (stat, dof)."""
    expected = probs * n
    assert all(probs[t] > 0 for t in counts), "drew a token with zero probability"
    big = [t for t in range(len(probs)) if expected[t] >= 5]
    small = [t for t in range(len(probs)) if 0 < expected[t] < 5]
    stat, bins = 0.0, 0
    for t in big:
        stat += (counts.get(t, 0) - float(expected[t])) ** 2 / float(expected[t])
        bins += 1
    if small:
        e = float(sum(expected[t] for t in small))
        o = sum(counts.get(t, 0) for t in small)
        if e >= 5:
            stat += (o - e) ** 2 / e
            bins += 1
    return stat, bins - 1


def assert_distribution(counts: Counter, probs: torch.Tensor, n: int) -> None:
    stat, dof = chi_square_ok(counts, probs, n)
    # ~ p < 1e-6 for these dofs; the draws are seeded, so this is deterministic
    assert stat < dof + 7 * math.sqrt(2 * max(dof, 1)) + 10, (stat, dof)


def llm_like(V: int, seed: int, head: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 1.5
    x[torch.randperm(V, generator=g)[:head]] += 4 + torch.rand(head, generator=g) * 4
    return x


# -- SamplingParams ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed="7"), "seed"),
    (dict(seed=2 ** 64), "seed"),
    (dict(n=0), "n="),
    (dict(n=1.5), "n="),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(logprobs="yes"), "logprobs"),
    (dict(top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=-1), "top_logprobs"),
    (dict(logits_processors=[42]), "logits_processors"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert field in msg and msg.startswith("invalid sampling parameter") and msg.endswith(".")
    assert msg.count(". ") == 0  # one sentence


def test_param_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1, 0, 0, 1)
    assert (p.logprobs, p.top_logprobs, p.logits_processors) == (False, 0, [])
    assert SamplingParams(top_logprobs=3).logprobs is True
    assert SamplingParams(stop="###").stop == ["###"]
    SamplingParams(presence_penalty=-2, frequency_penalty=2, top_logprobs=20, seed=-5,
                   top_k=-1, min_tokens=4, max_tokens=4)


# -- greedy -----------------------------------------------------------------------------------
def test_greedy_is_argmax_and_ties_go_to_lowest_id():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 5000, generator=g)
    logits[3, [17, 40, 4000]] = 50.0  # a three-way tie
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.2)] * 9
    tokens, lps = sample_batch(logits, rows_for(params))
    assert tokens == logits.argmax(-1).tolist()
    assert tokens[3] == 17
    assert lps == [None] * 9
    assert all(r.generator is None for r in rows_for(params))


def test_greedy_unaffected_by_batch_neighbours():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3000, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=3, top_p=0.8),
              SamplingParams(temperature=0), SamplingParams(temperature=1.2, top_k=7),
              SamplingParams(temperature=0.5, frequency_penalty=1.0),
              SamplingParams(temperature=0)]
    tokens, _ = sample_batch(logits, rows_for(params, outputs=[[1, 2]] * 6))
    for i in (0, 2, 5):
        assert tokens[i] == int(torch.argmax(logits[i]))
        assert sample(logits[i], params[i], None) == tokens[i]


def test_logits_are_not_modified():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 700, generator=g)
    before = logits.clone()
    params = [SamplingParams(temperature=0.8, seed=1, top_p=0.9, repetition_penalty=1.3),
              SamplingParams(temperature=0, frequency_penalty=0.5,
                             logits_processors=[lambda ids, row: row.mul_(2)]),
              SamplingParams(temperature=1.5, min_p=0.1, seed=2),
              SamplingParams(temperature=0.3, top_k=5, seed=3)]
    sample_batch(logits, rows_for(params, [[1, 2, 3]] * 4, [[4, 4]] * 4))
    assert torch.equal(logits, before)


# -- top-k / top-p / min-p ----------------------------------------------------------------------
@pytest.mark.parametrize("V", [50, 3000])
def test_top_k_1_and_tiny_top_p_are_greedy(V):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, V, generator=g) * 3
    greedy = logits.argmax(-1).tolist()
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        params = [SamplingParams(temperature=1.3, seed=i, **kw) for i in range(16)]
        assert sample_batch(logits, rows_for(params))[0] == greedy, kw


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.3, min_p=0.15),
    dict(temperature=0.9, top_k=10, top_p=0.7, min_p=0.05),
    dict(temperature=2.0, top_p=0.9),
])
def test_small_vocab_distribution_matches_reference(kw):
    V, N = 24, 6000
    raw = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 1.5
    p = SamplingParams(**kw)
    probs = ref_probs(raw, p)
    counts = draw_many(raw, p, N)
    assert set(counts) <= set(torch.nonzero(probs).flatten().tolist())
    assert_distribution(counts, probs, N)


@pytest.mark.parametrize("V, kw", [
    (32768, dict(temperature=1.0)),  # whole-vocabulary draw, many blocks
    (5003, dict(temperature=0.8, top_p=0.95)),  # vocab not a multiple of 256; wide nucleus
    (5000, dict(temperature=3.0, top_p=0.97)),  # nucleus past the 1024 tier: full sort
    (20000, dict(temperature=1.0, top_p=0.9, top_k=300)),
    (20000, dict(temperature=1.0, min_p=0.02)),
])
def test_large_vocab_support_and_distribution(V, kw):
    N = 2000
    raw = llm_like(V, seed=V)
    p = SamplingParams(**kw)
    probs = ref_probs(raw, p)
    counts = draw_many(raw, p, N, seed0=11)
    kept = set(torch.nonzero(probs).flatten().tolist())
    assert set(counts) <= kept
    # pool tokens into 30 bins of roughly equal reference mass (ordered by id), then chi-square
    cum = torch.cumsum(probs, 0)
    bin_of = torch.clamp((cum * 30).floor().long(), max=29)
    bin_probs = torch.zeros(30, dtype=torch.float64).index_add_(0, bin_of, probs)
    bin_counts = Counter()
    for t, c in counts.items():
        bin_counts[int(bin_of[t])] += c
    assert_distribution(bin_counts, bin_probs, N)


def test_top_p_nucleus_is_the_smallest_prefix():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.79 keeps 2 tokens, 0.81 keeps 3
    raw = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    for top_p, kept in ((0.45, {1}), (0.79, {1, 3}), (0.81, {1, 3, 2}), (0.99, {0, 1, 2, 3})):
        counts = draw_many(raw, SamplingParams(top_p=top_p), 400)
        assert set(counts) == kept, top_p


def test_min_p_filters_relative_to_the_top_token():
    raw = torch.log(torch.tensor([0.4, 0.3, 0.11, 0.09, 0.06, 0.04]))
    counts = draw_many(raw, SamplingParams(min_p=0.25), 2000)
    assert set(counts) == {0, 1, 2}  # 0.11 >= 0.25 * 0.4 > 0.09
    assert_distribution(counts, ref_probs(raw, SamplingParams(min_p=0.25)), 2000)


# -- reproducibility -----------------------------------------------------------------------------
TARGETS = [
    dict(temperature=0.8),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.1, top_k=20, top_p=0.95, min_p=0.02),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=1.0, frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.2),
    dict(temperature=1.0, top_logprobs=3),
]


def random_neighbour(g: torch.Generator, i: int) -> SamplingParams:
    kind = int(torch.randint(0, 6, (1,), generator=g))
    if kind == 0:
        return SamplingParams(temperature=0)
    if kind == 1:
        return SamplingParams(temperature=0.5, seed=1000 + i, top_p=0.5)
    if kind == 2:
        return SamplingParams(temperature=1.4)  # unseeded
    if kind == 3:
        return SamplingParams(temperature=0.9, top_k=1000, seed=77)
    if kind == 4:
        return SamplingParams(temperature=0.6, repetition_penalty=1.5, frequency_penalty=1.0,
                              logprobs=True)
    return SamplingParams(temperature=1.0, min_p=0.3, top_p=0.99,
                          logits_processors=[lambda ids, row: row.clamp(max=5.0)])


@pytest.mark.parametrize("kw", TARGETS)
@pytest.mark.parametrize("V", [3000, 40000])
def test_same_seed_same_tokens_whatever_the_batch(kw, V):
    steps = 8
    logit_gen = torch.Generator().manual_seed(V)
    step_logits = [llm_like(V, seed=100 + s) for s in range(steps)]
    prompt = [5, 6, 7, 5]

    def run(batch_size: int, position: int) -> list[int]:
        target = SamplingParams(seed=1234, **kw)
        row = SamplingRow(target, target.make_generator(), prompt, [])
        others = []
        for i in range(batch_size - 1):
            p = random_neighbour(logit_gen, i)
            others.append(SamplingRow(p, p.make_generator(), [1, 2], []))
        out = []
        for s in range(steps):
            rows = others[:position] + [row] + others[position:]
            logits = torch.randn(len(rows), V, generator=logit_gen) * 3
            logits[position] = step_logits[s]
            tokens, lps = sample_batch(logits, rows)
            out.append(tokens[position])
            row.output_token_ids = row.output_token_ids + [tokens[position]]
            for r, t in zip(rows, tokens):
                if r is not row:
                    r.output_token_ids = list(r.output_token_ids) + [t]
        return out

    alone = run(1, 0)
    assert run(1, 0) == alone
    assert run(7, 3) == alone
    assert run(12, 11) == alone
    assert len(set(alone)) > 1


def test_thread_count_does_not_change_tokens():
    V = 40000
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(16, V, generator=g) * 3
    logits[:, :50] += 8

    def run():
        params = [SamplingParams(seed=i, **TARGETS[i % len(TARGETS)]) for i in range(15)]
        params.append(SamplingParams(temperature=0, top_logprobs=2))
        rows = rows_for(params, [[1, 2, 3]] * 16, [[4, 5]] * 16)
        return [sample_batch(logits, rows) for _ in range(3)]

    one = run()
    torch.set_num_threads(2)
    try:
        two = run()
    finally:
        torch.set_num_threads(1)
    assert [t for t, _ in one] == [t for t, _ in two]


def test_each_sampled_row_consumes_exactly_one_uniform():
    for kw in TARGETS + [dict(temperature=3.0, top_p=0.97)]:
        p = SamplingParams(seed=99, **kw)
        row = SamplingRow(p, p.make_generator(), [1], [2])
        sample_batch(llm_like(5000, seed=1).unsqueeze(0), [row])
        expected = torch.Generator().manual_seed(99)
        torch.rand(1, dtype=torch.float64, generator=expected)
        assert torch.equal(row.generator.get_state(), expected.get_state()), kw


def test_clone_for_gives_distinct_reproducible_streams():
    base = SamplingParams(temperature=1.0, seed=42, n=4, top_p=0.95,
                          logits_processors=[lambda ids, row: row])
    clones = [base.clone_for(i) for i in range(4)]
    assert [c.seed for c in clones] == [42, 43, 44, 45]
    assert clones[0] == base or clones[0].seed == base.seed
    assert all(c.n == 4 and c.top_p == 0.95 for c in clones)
    assert clones[1].logits_processors is not base.logits_processors
    assert SamplingParams(seed=2 ** 64 - 1).clone_for(2).seed == 1  # wraps modulo 2**64
    assert SamplingParams().clone_for(3).seed is None

    raw = llm_like(3000, seed=8)

    def streams():
        rows = [SamplingRow(c, c.make_generator(), [], []) for c in clones]
        out = [[] for _ in rows]
        for _ in range(12):
            tokens, _ = sample_batch(raw.unsqueeze(0).expand(4, -1), rows)
            for o, t in zip(out, tokens):
                o.append(t)
        return out

    a, b = streams(), streams()
    assert a == b
    assert len({tuple(s) for s in a}) == 4
    # sample 0 is exactly what the n=1 request would produce
    single = SamplingParams(temperature=1.0, seed=42, top_p=0.95)
    row = SamplingRow(single, single.make_generator(), [], [])
    assert [sample_batch(raw.unsqueeze(0), [row])[0][0] for _ in range(12)] == a[0]


def test_unseeded_rows_differ():
    raw = torch.zeros(1000)
    p = SamplingParams(temperature=1.0)
    draws = {sample(raw, p, p.make_generator()) for _ in range(10)}
    assert len(draws) > 1


# -- penalties ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(frequency_penalty=0.8),
    dict(presence_penalty=-1.5),
    dict(frequency_penalty=-0.4, presence_penalty=1.1, repetition_penalty=1.8),
])
def test_penalties_match_reference_formulas(kw):
    V = 300
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5, V, generator=g) * 4
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (0, 5, 40, 1, 17)]
    outputs = [torch.randint(0, 20, (n,), generator=g).tolist() for n in (6, 0, 30, 3, 12)]
    params = [SamplingParams(temperature=0.0, **kw)] * 5
    rows = rows_for(params, prompts, outputs)
    got = _process_(logits.clone(), rows)
    for i in range(5):
        want = ref_penalized(logits[i], params[i], prompts[i], outputs[i])
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-5)
    # the public path picks the argmax of the penalized row
    tokens, _ = sample_batch(logits, rows)
    assert tokens == [int(torch.argmax(ref_penalized(logits[i], params[i], prompts[i],
                                                     outputs[i]))) for i in range(5)]


def test_frequency_presence_ignore_prompt_tokens_and_repetition_uses_them():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    p = SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert sample_batch(logits, rows_for([p], [[0, 0, 0]], [[]]))[0] == [0]
    assert sample_batch(logits, rows_for([p], [[]], [[0]]))[0] == [1]
    r = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_batch(logits, rows_for([r], [[0]], [[]]))[0] == [1]  # 2.0/2 < 1.9
    r = SamplingParams(temperature=0, repetition_penalty=1.2)
    neg = torch.tensor([[-1.0, -1.1, -5.0, -9.0]])
    assert sample_batch(neg, rows_for([r], [[0]], [[]]))[0] == [1]  # -1.2 < -1.1


def test_penalised_distribution_matches_reference():
    V, N = 30, 5000
    raw = torch.randn(V, generator=torch.Generator().manual_seed(10))
    p = SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.6, presence_penalty=0.3,
                       repetition_penalty=1.4)
    prompt, output = [1, 2, 3, 3], [3, 4, 4, 4, 9]
    params = [SamplingParams(**{**_fields(p), "seed": i}) for i in range(N)]
    rows = rows_for(params, [prompt] * N, [output] * N)
    tokens, _ = sample_batch(raw.unsqueeze(0).expand(N, -1), rows)
    assert_distribution(Counter(tokens), ref_probs(raw, p, prompt, output), N)


# -- logprobs ------------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_of_raw_logits():
    g = torch.Generator().manual_seed(11)
    V = 2000
    logits = torch.randn(6, V, generator=g) * 3
    params = [SamplingParams(temperature=0, logprobs=True),
              SamplingParams(temperature=0.5, seed=1, top_logprobs=5, top_p=0.5,
                             repetition_penalty=2.0),
              SamplingParams(temperature=1.0, seed=2),  # no logprobs
              SamplingParams(temperature=2.0, seed=3, top_logprobs=20, top_k=3,
                             frequency_penalty=1.0),
              SamplingParams(temperature=0, top_logprobs=1,
                             logits_processors=[lambda ids, row: -row]),
              SamplingParams(temperature=0.7, seed=4, logprobs=True, min_p=0.5)]
    tokens, lps = sample_batch(logits, rows_for(params, [[1, 2]] * 6, [[3]] * 6))
    ref = torch.log_softmax(logits, -1)
    assert lps[2] is None
    for i in (0, 1, 3, 4, 5):
        lp = lps[i]
        assert isinstance(lp, TokenLogprob) and lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-5)
        k = params[i].top_logprobs
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        want = torch.topk(ref[i], k) if k else None
        if k:
            assert [t for t, _ in lp.top] == want.indices.tolist()
            assert values == pytest.approx(want.values.tolist(), abs=1e-5)
    assert lps[4].token_id == int(torch.argmin(logits[4]))  # the processor ran...
    assert lps[4].top[0][0] == int(torch.argmax(logits[4]))  # ...but logprobs are raw


# -- logits processors ----------------------------------------------------------------------------
def test_logits_processor_restricts_tokens_and_sees_the_output_ids():
    allowed = [3, 77, 500, 1999]
    seen = []

    def only_allowed(ids, row):
        seen.append((list(ids), row.dtype, tuple(row.shape)))
        out = torch.full_like(row, float("-inf"))
        out[allowed] = row[allowed]
        return out

    V = 2000
    logits = torch.randn(40, V, generator=torch.Generator().manual_seed(12)) * 5
    params = [SamplingParams(temperature=0 if i % 4 == 0 else 1.5, seed=i, top_p=0.99,
                             logits_processors=[only_allowed]) for i in range(40)]
    tokens, _ = sample_batch(logits, rows_for(params, outputs=[[i, 9] for i in range(40)]))
    assert set(tokens) <= set(allowed) and len(set(tokens)) > 1
    assert sorted(seen) == [([i, 9], torch.float32, (V,)) for i in range(40)]  # once per row
    for i in range(0, 40, 4):
        assert tokens[i] == allowed[int(torch.argmax(logits[i, allowed]))]


def test_logits_processors_chain_in_order_and_can_force_with_inf():
    def ban_even(ids, row):
        row = row.clone()
        row[0::2] = float("-inf")
        return row

    def force_seven(ids, row):
        row = row.clone()
        row[7] = float("inf")
        return row

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(13))
    p_ban = SamplingParams(temperature=1.0, seed=1, logits_processors=[ban_even])
    p_force = SamplingParams(temperature=1.0, seed=1, logits_processors=[ban_even, force_seven])
    p_greedy_force = SamplingParams(temperature=0, logits_processors=[force_seven])
    for _ in range(20):
        tokens, _ = sample_batch(logits, rows_for([p_ban, p_force, p_greedy_force]))
        assert tokens[0] % 2 == 1 and tokens[1:] == [7, 7]


def test_banning_every_token_is_a_request_error():
    ban_all = lambda ids, row: torch.full_like(row, float("-inf"))  # noqa: E731
    for t in (0, 1.0):
        p = SamplingParams(temperature=t, logits_processors=[ban_all])
        with pytest.raises(RequestError, match="banned every token"):
            sample_batch(torch.randn(1, 10), rows_for([p]))


# -- the single-row helper and odd inputs ---------------------------------------------------
def test_sample_helper_matches_sample_batch():
    raw = llm_like(4000, seed=14)
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=5, presence_penalty=0.5)
    a = sample(raw, p, p.make_generator(), [1, 2], [3, 4])
    b = sample_batch(raw.unsqueeze(0), rows_for([p], [[1, 2]], [[3, 4]]))[0][0]
    assert a == b
    assert sample(raw, SamplingParams(temperature=0), None) == int(torch.argmax(raw))


def test_bfloat16_logits_and_empty_batch():
    logits = torch.randn(2, 300).to(torch.bfloat16)
    tokens, _ = sample_batch(logits, rows_for([SamplingParams(temperature=0),
                                               SamplingParams(seed=1)]))
    assert tokens[0] == int(torch.argmax(logits[0].float()))
    assert sample_batch(torch.zeros(0, 10), []) == ([], [])
    with pytest.raises(ValueError):
        sample_batch(torch.zeros(3, 10), rows_for([SamplingParams()]))


def test_tiny_temperatures_are_greedy_not_nan():
    """Found by fuzzing the server: 2.7e-254 is 0 in float32, and logits / 0 made NaN (an
    IndexError deep in the draw). Below 1e-5 a temperature is greedy, as in vLLM."""
    torch.manual_seed(0)
    for t, p in [(2.7e-254, 3.5e-88), (1e-30, 1.0), (1e-300, 0.5), (9e-6, 1.0)]:
        for V in (128, 32768):
            x = torch.randn(V)
            params = SamplingParams(temperature=t, top_p=p, seed=1)
            assert params.greedy and params.make_generator() is None
            assert sample(x, params, None) == int(x.argmax())
    assert not SamplingParams(temperature=1e-5).greedy


@pytest.mark.parametrize("penalty", [5e-324, 1e-30, 1e-40])
@pytest.mark.parametrize("temperature, top_k", [(0, 0), (0.7, 0), (1.0, 5)])
def test_a_vanishing_repetition_penalty_still_draws_a_seen_token(penalty, temperature, top_k):
    """Schemathesis's request (POST /v1/chat/completions, repetition_penalty 5e-324) was a
    500: the penalty is 0 in float32, v / 0 = inf, and the draw indexed past the vocabulary.
    Any penalty > 0 the API accepts must give a token; this small, it favours the seen tokens
    whose logits are positive (v / penalty: the largest by far), as the float64 maths says."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 3000, generator=g)
    seen = [7, 11, 2999]
    logits[:, seen] = torch.tensor([0.5, 1.5, -0.2])
    p = SamplingParams(temperature=temperature, top_k=top_k, seed=5, repetition_penalty=penalty)
    tokens, _ = sample_batch(logits, rows_for([p] * 3, [seen] * 3))
    assert all(0 <= t < 3000 for t in tokens)
    assert set(tokens) <= {7, 11}, tokens  # the only logits sent to +inf (or float32's max)
    if temperature == 0:
        assert tokens == [11, 11, 11] or tokens == [7, 7, 7]
