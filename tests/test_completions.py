"""Legacy completions (`POST /v1/completions`) and the prompt logprobs behind them.

The engine's prompt logprobs equal `LLM.logits` (a whole-prompt forward without the KV cache)
under batching, chunked prefill, preemption and a warm prefix cache; the OpenAI SDK's
`client.completions.create` works against a real server; and EleutherAI's
lm-evaluation-harness (`local-completions`) scores a local multiple-choice task through it,
with the loglikelihoods `LLM.logits` gives on the same tokens.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from souverain import LLM
from souverain.engine.sampling import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def reference(llm: LLM, ids: list[int]) -> list[torch.Tensor]:
    """log_softmax of the whole-prompt logits: row p scores token p + 1."""
    return list(torch.log_softmax(llm.logits(ids).float(), dim=-1))


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, object]:
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 1000) for _ in range(12)]
    return [[1] + shared + [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 30))]
            for _ in range(4)]


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 7},  # chunked prefill
    {"kv_cache_tokens": 32, "max_num_batched_tokens": 16},  # preemption
], ids=["batched", "chunked-prefill", "preemption"])
def test_prompt_logprobs_equal_full_prefill_logits(tiny_mistral, prompts, options):
    llm = LLM(tiny_mistral["consolidated"], dtype="float32", block_size=4, **options)
    # warm the prefix cache with the shared prefix: the prompt-logprob requests must not use it
    run(llm, [prompts[0]], SamplingParams(max_tokens=2, **GREEDY))
    final = run(llm, prompts, SamplingParams(max_tokens=8, prompt_logprobs=3, **GREEDY))
    for i, ids in enumerate(prompts):
        out = final[f"r{i}"]
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(ids) and lps[0] is None
        ref = reference(llm, ids)
        for p in range(1, len(ids)):
            lp = lps[p]
            assert lp.token_id == ids[p]
            assert abs(lp.logprob - ref[p - 1][ids[p]].item()) < 1e-4
            top_v, top_i = ref[p - 1].topk(3)
            assert [t for t, _ in lp.top] == top_i.tolist()
            assert all(abs(v - w) < 1e-4 for (_, v), w in zip(lp.top, top_v.tolist()))
        assert len(out.token_ids) == 8  # generation goes on as usual
    # a request without them gets none, and the prefix cache is used again
    plain = run(llm, [prompts[0]], SamplingParams(max_tokens=1, **GREEDY))["r0"]
    assert plain.prompt_logprobs is None
    if "kv_cache_tokens" in options:
        assert llm.engine.scheduler.num_preemptions > 0
    else:  # (a tiny KV budget evicts the cached blocks)
        assert plain.num_cached_tokens > 0
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_usable_blocks


# -- the server ---------------------------------------------------------------------------

TINY = "tiny"
MC_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a small fish"],
     "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Fahrenheit",
                                                               " Kelvin"], "answer": 0},
]


@pytest.fixture(scope="module")
def server(tiny_mistral, tmp_path_factory):
    from server_utils import ServerProcess

    srv = ServerProcess(str(tiny_mistral["consolidated"]), "--name", TINY, "--dtype", "float32",
                        "--kv-cache-gib", "0.05",
                        "--data-dir", str(tmp_path_factory.mktemp("completions-data")))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def llm(tiny_mistral) -> LLM:
    return LLM(tiny_mistral["consolidated"], dtype="float32")


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(api_key="unused-on-loopback", base_url=server.url + "/v1")


def test_sdk_echo_logprobs_score_the_prompt(client, llm):
    ids = llm.encode("The capital of France is Paris")
    r = client.completions.create(model=TINY, prompt=ids, max_tokens=0, echo=True, logprobs=2,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == TINY and len(r.choices) == 1
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(llm, ids)
    for p in range(1, len(ids)):
        assert abs(lp.token_logprobs[p] - ref[p - 1][ids[p]].item()) < 1e-4
        best = ref[p - 1].max().item()
        assert abs(max(lp.top_logprobs[p].values()) - best) < 1e-4
        assert 2 <= len(lp.top_logprobs[p]) <= 3  # top 2, and the prompt token itself
    assert c.text == llm.tokenizer.decode(ids)
    # offsets index into the echoed text: token i starts where the first i tokens' text ends
    assert lp.text_offset == [len(llm.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_sdk_generation_matches_llm(client, llm):
    prompt = "Once upon a time"
    want = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0))[0]
    r = client.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=1)
    c = r.choices[0]
    assert c.text == want.text and c.finish_reason in ("length", "stop")
    assert len(c.logprobs.tokens) == len(want.token_ids) == r.usage.completion_tokens
    # with echo: the prompt, then the same completion; offsets index into the text
    e = client.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0,
                                  echo=True, logprobs=1).choices[0]
    assert e.text == prompt + want.text
    n_prompt = len(llm.encode(prompt))
    assert e.logprobs.token_logprobs[n_prompt:] == pytest.approx(c.logprobs.token_logprobs,
                                                                 abs=1e-5)
    assert e.logprobs.text_offset[n_prompt] == len(prompt)
    # streamed with echo: the same text and logprobs, assembled from the events
    text, tokens, values = "", [], []
    for ev in client.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0,
                                        echo=True, logprobs=1, stream=True):
        c = ev.choices[0]
        text += c.text
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            values += c.logprobs.token_logprobs
    assert text == e.text
    assert tokens == e.logprobs.tokens
    assert values[0] is None
    assert values[1:] == pytest.approx(e.logprobs.token_logprobs[1:], abs=1e-5)


def test_sdk_list_prompts_n_and_stream(client, llm):
    prompts = ["Once upon a time", "The weather today"]
    r = client.completions.create(model=TINY, prompt=prompts, max_tokens=4, temperature=0.8,
                                  n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model=TINY, prompt=prompts, max_tokens=4,
                                      temperature=0.8, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded
    solo = client.completions.create(model=TINY, prompt=prompts[1], max_tokens=4,
                                     temperature=0.8, seed=3)
    assert solo.choices[0].text == r.choices[2].text  # prompt 1, sample 0
    ids = [llm.encode(p) for p in prompts]
    by_ids = client.completions.create(model=TINY, prompt=ids, max_tokens=4, temperature=0.8,
                                       n=2, seed=3)
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]
    # streaming: the same texts, assembled from text_completion events
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for ev in client.completions.create(model=TINY, prompt=prompts, max_tokens=4,
                                        temperature=0.8, n=2, seed=3, stream=True):
        assert ev.object == "text_completion"
        for c in ev.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in r.choices]
    assert set(reasons) == {0, 1, 2, 3}


def test_bad_requests_are_400(server, llm):
    import httpx

    url = server.url + "/v1/completions"
    long = [1] + [5] * 40000
    cases = [
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": long, "max_tokens": 1}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a"] * 129, "n": 2}, "prompt"),  # over 256 completions
    ]
    for extra, param in cases:
        r = httpx.post(url, json={"model": TINY, **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["param"] == param, r.text
    r = httpx.post(url, json={"model": TINY, "prompt": "hi", "logprobs": 21}, timeout=60)
    assert r.status_code == 422


def test_lm_eval_multiple_choice_matches_llm_logits(server, llm, tmp_path, monkeypatch):
    """lm-evaluation-harness's own `local-completions` model scores a local multiple-choice
    task through the server; each choice's loglikelihood equals `LLM.logits`' on the same
    tokens (lm-eval tokenizes with a Hugging Face tokenizer made from the model's own
    sentencepiece file)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import shutil

    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    shutil.copyfile(llm.checkpoint.path / "tokenizer.model.v3", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: souverain_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=TINY,
                             tokenizer_backend="huggingface", tokenizer=str(tok_dir),
                             max_retries=1, num_concurrent=1, batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=["souverain_tiny_mc"],
                                      task_manager=TaskManager(include_path=str(tasks)),
                                      log_samples=True, bootstrap_iters=0)
    samples = results["samples"]["souverain_tiny_mc"]
    assert len(samples) == len(MC_DOCS)
    checked = 0
    for s in samples:
        doc = s["doc"]
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            ll, _greedy = resp[0] if len(resp) == 1 else resp  # [(loglikelihood, is_greedy)]
            assert ll < 0
            ctx, cont = lm._encode_pair(context, continuation)
            ids = ctx + cont
            ref = reference(llm, ids)
            want = sum(ref[p - 1][ids[p]].item() for p in range(len(ctx), len(ids)))
            assert math.isclose(ll, want, abs_tol=1e-4), (doc["question"], continuation)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)
    assert "acc,none" in results["results"]["souverain_tiny_mc"]
