"""The harness path of `souverain eval`: lm-evaluation-harness -> `SouverainLM` -> `ApiTarget`
-> a real `souverain serve` (started by `local_server`) on a tiny random float32 Mistral.

(a) the proof issue 18 asks for: a local multiple-choice task scored through souverain's
    backend gives, per choice, the loglikelihood transformers gives on the same weights and
    tokens (lm-eval's tokenization convention), within 1e-4; a merged context/continuation
    boundary is scored as `souverain.eval.target` documents;
(b) rolling loglikelihood = transformers' sum of token logprobs after BOS;
(c) the quality suite (perplexity + the bundled lm-eval tasks + a user's text file and task
    YAML) gives metrics with intervals and per-example samples;
(d) `serve --lora-modules`: the adapter is listed and served (its loglikelihoods differ from
    the base's and equal a merged checkpoint's); bad specs exit 2 with one sentence.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from checkpoints import hf_reference_logits
from safetensors.torch import load_file, save_file

from souverain.eval.suite import SuiteOptions
from souverain.eval.target import ApiTarget, ServerStartError, local_server
from souverain.weights import load
from souverain.weights.adapter import LoRAAdapter, save_adapter

TINY = "tiny"
ADAPTER = "tiny-adapted"
MC_DOCS = [
    {"id": "q1", "question": "The capital of France is", "choices": [" Paris", " Rome",
                                                                       " a small fish"],
     "answer": 0},
    {"id": "q2", "question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"id": "q3", "question": "Water freezes at zero degrees",
     "choices": [" Celsius", " Fahrenheit", " Kelvin"], "answer": 0},
    {"id": "q4", "question": "Le ciel est souvent", "choices": [" bleu", " vert", " gris",
                                                                 " rouge"], "answer": 0},
]


def random_adapter(path: Path, seed: int = 5, rank: int = 4) -> LoRAAdapter:
    """A LoRA adapter of every projection, Gaussian A and B (as tests/test_multi_lora.py)."""
    args = load(str(path)).args
    gen = torch.Generator().manual_seed(seed)
    q, kv, d, h = (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.dim,
                   args.hidden_dim)
    shapes = {"attention.wq": (q, d), "attention.wk": (kv, d), "attention.wv": (kv, d),
              "attention.wo": (d, q), "feed_forward.w1": (h, d), "feed_forward.w2": (d, h),
              "feed_forward.w3": (h, d)}
    weights = {}
    for layer in range(args.n_layers):
        for mod, (out_f, in_f) in shapes.items():
            a = torch.randn(rank, in_f, generator=gen) * 0.2
            b = torch.randn(out_f, rank, generator=gen) * 0.2
            weights[f"layers.{layer}.{mod}"] = (a, b)
    return LoRAAdapter(rank, 2.0, weights, name="adapted")


@pytest.fixture(scope="module")
def adapter(tiny_mistral, tmp_path_factory) -> tuple[LoRAAdapter, Path]:
    a = random_adapter(tiny_mistral["consolidated"])
    return a, save_adapter(a, tmp_path_factory.mktemp("adapter") / "final")


@pytest.fixture(scope="module")
def server(tiny_mistral, adapter, tmp_path_factory):
    """One server for the module, started the way `souverain eval` starts a local model."""
    with local_server(str(tiny_mistral["consolidated"]), extra_args=[
            "--name", TINY, "--dtype", "float32", "--kv-cache-gib", "0.05",
            "--lora-modules", f"{ADAPTER}={adapter[1]}@{TINY}", "--no-finetune",
            "--no-libraries", "--embed-model", "none", "--no-audit"],
            data_dir=tmp_path_factory.mktemp("eval-harness-data")) as url:
        yield url


@pytest.fixture(scope="module")
def tok(tiny_mistral):
    return load(str(tiny_mistral["consolidated"])).tokenizer


def reference_ll(hf_dir: Path, tok, context: str, continuation: str) -> tuple[float, bool]:
    """transformers' loglikelihood of ``continuation`` after ``context`` with lm-eval's
    convention (trailing context whitespace moved to the continuation; the continuation's
    tokens = tok(context + continuation)[len(tok(context)):] ; with a merged boundary, from
    the longest common prefix)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, bos=True)
    whole = tok.encode(context + continuation, bos=True)
    split = 0
    while split < min(len(ctx), len(whole)) and ctx[split] == whole[split]:
        split += 1
    lsm = torch.log_softmax(hf_reference_logits(hf_dir, whole), dim=-1)
    ll = sum(lsm[p - 1, whole[p]].item() for p in range(split, len(whole)))
    greedy = all(int(lsm[p - 1].argmax()) == whole[p] for p in range(split, len(whole)))
    return ll, greedy


def write_task(folder: Path) -> Path:
    """A user's multiple-choice task: YAML + JSONL data named relative to the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "tiny_mc.yaml").write_text(
        "task: user_tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: docs.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder / "tiny_mc.yaml"


# -- (a) the proof ----------------------------------------------------------------------------
def test_multiple_choice_loglikelihoods_equal_transformers(server, tiny_mistral, tok,
                                                            tmp_path, monkeypatch):
    from souverain.eval.harness import run_tasks

    monkeypatch.chdir(tmp_path.parent)  # data_files resolve against the YAML, not the cwd
    task = write_task(tmp_path / "tasks")
    results = run_tasks(ApiTarget(server, TINY), [task], limit=None)
    samples = results["samples"]["user_tiny_mc"]
    assert len(samples) == len(MC_DOCS)
    checked = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            ll, greedy = resp[0]
            want, want_greedy = reference_ll(tiny_mistral["hf"], tok, context, continuation)
            assert abs(ll - want) < 1e-4, (context, continuation, ll, want)
            assert greedy == want_greedy
            checked += 1
        # lm-eval's own metric from these loglikelihoods
        lls = [r[0][0] for r in s["resps"]]
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)
    assert results["results"]["user_tiny_mc"]["acc,none"] == pytest.approx(
        sum(s["acc"] for s in samples) / len(samples))


def test_boundaries_as_documented(server, tiny_mistral, tok):
    """Trailing context whitespace moves to the continuation; a merged boundary (a context
    ending inside a word) scores from the longest common token prefix; an empty context
    scores after BOS."""
    pairs = [("The capital of France is ", "Paris"), ("The capital of Fr", "ance is Paris"),
             ("", "Hello world")]
    got = ApiTarget(server, TINY).loglikelihood(pairs)
    ctx, whole = tok.encode("The capital of Fr", bos=True), tok.encode(
        "The capital of France is Paris", bos=True)
    assert whole[:len(ctx)] != ctx  # the boundary does merge
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = reference_ll(tiny_mistral["hf"], tok, context, continuation)
        assert abs(ll - want) < 1e-4, (context, continuation)
        assert greedy == want_greedy


# -- (b) rolling --------------------------------------------------------------------------------
def test_rolling_loglikelihood_equals_transformers(server, tiny_mistral, tok):
    texts = ["The river that runs through the old town is narrow in summer.",
             "Chaque samedi, le marché remplit la place."]
    got = ApiTarget(server, TINY).loglikelihood_rolling(texts)
    for text, (ll, n) in zip(texts, got, strict=True):
        ids = tok.encode(text, bos=True)
        lsm = torch.log_softmax(hf_reference_logits(tiny_mistral["hf"], ids), dim=-1)
        assert n == len(ids) - 1  # every token after BOS
        assert abs(ll - sum(lsm[p - 1, ids[p]].item() for p in range(1, len(ids)))) < 1e-4


# -- (c) the quality suite ----------------------------------------------------------------------
def test_quality_suite_metrics_have_intervals_and_samples(server, tmp_path):
    from souverain.eval.suites.quality import QualitySuite

    notes = tmp_path / "notes.md"
    notes.write_text("First paragraph of my own notes.\n\nA second one, longer than the "
                     "first, about rivers and bridges.\n\nA third.\n")
    options = SuiteOptions(limit=2, files=[notes, write_task(tmp_path / "tasks")],
                           concurrency=2)
    suite = QualitySuite()
    done = []
    result = suite.run(ApiTarget(server, TINY), options, done.append)
    assert sum(done) == suite.size(options) == 2 + 3 * 2  # 2 paragraphs + 2 docs x 3 tasks
    m = result.metrics
    assert set(m) == {"perplexity.notes", "souverain_mc.acc", "souverain_mc.acc_norm",
                      "souverain_gen.exact_match", "user_tiny_mc.acc", "user_tiny_mc.acc_norm"}
    ppl = m["perplexity.notes"]
    assert not ppl.higher_is_better and ppl.n == 2 and len(ppl.samples) == 2
    nll = sum(ppl.samples.values()) / 2  # samples: mean NLL per token of each paragraph
    assert ppl.value == pytest.approx(math.exp(nll))
    assert ppl.low is not None and ppl.high is not None and ppl.low <= ppl.value <= ppl.high
    for name in ("souverain_mc.acc", "souverain_gen.exact_match", "user_tiny_mc.acc"):
        metric = m[name]
        assert metric.n == 2 and metric.higher_is_better
        assert metric.low is not None and metric.high is not None
        assert metric.low <= metric.value <= metric.high
        assert set(metric.samples.values()) <= {0.0, 1.0}
    assert set(m["souverain_mc.acc"].samples) == {"souverain_mc/mc000", "souverain_mc/mc001"}
    assert set(m["user_tiny_mc.acc"].samples) == {"user_tiny_mc/q1", "user_tiny_mc/q2"}
    worst = {e.id for e in result.examples}
    assert "souverain_gen/gen000" in worst and "perplexity.notes/0" in worst
    mc = next(e for e in result.examples if e.id.startswith("souverain_mc/"))
    assert mc.expected and len(mc.detail["loglikelihoods"]) == 4
    assert result.to_json()["suite"] == "quality"


def test_quality_suite_refuses_unknown_files(tmp_path):
    from souverain.eval import EvalError
    from souverain.eval.suites.quality import QualitySuite

    bad = tmp_path / "data.bin"
    bad.write_bytes(b"\0")
    with pytest.raises(EvalError, match="neither a text file"):
        QualitySuite().size(SuiteOptions(files=[bad]))


# -- (d) --lora-modules -------------------------------------------------------------------------
def test_lora_module_is_served_on_its_base(server, tiny_mistral, adapter, tok, tmp_path):
    base, adapted = ApiTarget(server, TINY), ApiTarget(server, ADAPTER)
    cards = {c["id"]: c for c in base.models()}
    assert cards[ADAPTER]["root"] == TINY and cards[ADAPTER]["type"] == "fine-tuned"
    text = "The capital of France is Paris."
    (ll_base, _), = base.loglikelihood_rolling([text])
    (ll_adapted, n), = adapted.loglikelihood_rolling([text])
    assert abs(ll_base - ll_adapted) > 1e-2
    # = transformers on the merged weights (W + scaling B A), converted to HF's layout
    from checkpoints import mistral_to_hf_state_dict

    merged_dir = tmp_path / "merged"
    shutil.copytree(tiny_mistral["consolidated"], merged_dir)
    state = load_file(str(merged_dir / "consolidated.safetensors"))
    for mod in adapter[0].weights:
        state[f"{mod}.weight"] = state[f"{mod}.weight"] + adapter[0].delta(mod)
    hf_dir = tmp_path / "merged-hf"
    shutil.copytree(tiny_mistral["hf"], hf_dir)
    params = json.loads((merged_dir / "params.json").read_text())
    hf_state = mistral_to_hf_state_dict(state, params)
    for f in hf_dir.glob("*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in hf_state.items()},
              str(hf_dir / "model.safetensors"))
    ids = tok.encode(text, bos=True)
    lsm = torch.log_softmax(hf_reference_logits(hf_dir, ids), dim=-1)
    assert n == len(ids) - 1
    assert abs(ll_adapted - sum(lsm[p - 1, ids[p]].item() for p in range(1, len(ids)))) < 1e-4


@pytest.mark.parametrize("spec, message", [
    ("x=/no/such/adapter", "no adapter at /no/such/adapter"),
    ("x={adapter}@mistral-large", "names base model 'mistral-large', which is not served"),
    ("justaname", "must be NAME=ADAPTER_DIR"),
    ("x={base}", "holds neither lora.safetensors nor a PEFT adapter"),
    ("x={small}", "trained for another model"),
    (f"{TINY}={{adapter}}", "given twice"),
], ids=["bad-path", "unknown-base", "no-equals", "not-an-adapter", "wrong-shapes", "taken"])
def test_bad_lora_modules_are_refused(tiny_mistral, adapter, tmp_path, spec, message):
    """`serve` turns these into one sentence and exit 2 (the subprocess case below)."""
    from souverain.engine.config import EngineConfig
    from souverain.errors import SouverainError
    from souverain.server.registry import ModelRegistry, ServedModel, lora_module

    small = random_adapter(tiny_mistral["consolidated"])
    small.weights = {k: (a[:, :8], b) for k, (a, b) in small.weights.items()}
    spec = spec.format(adapter=adapter[1], base=tiny_mistral["consolidated"],
                       small=save_adapter(small, tmp_path / "small"))
    served = [ServedModel(TINY, str(tiny_mistral["consolidated"]), EngineConfig())]
    with pytest.raises(SouverainError, match=message):
        ModelRegistry(served, None, [lora_module(spec, served)])


def test_local_server_failure_names_the_cause(tiny_mistral, tmp_path):
    """A bad --lora-modules stops `serve` with exit 2 and one sentence; `local_server` raises
    `ServerStartError` with the exit code and the server's last log lines."""
    with pytest.raises(ServerStartError, match="exited with 2") as caught:
        with local_server(str(tiny_mistral["consolidated"]),
                          extra_args=["--lora-modules", f"x={tiny_mistral['consolidated']}"],
                          data_dir=tmp_path):
            pass
    text = " ".join(str(caught.value).split())
    assert "error: --lora-modules x:" in text and "holds neither lora.safetensors" in text
    assert "Traceback" not in text


def test_paragraphs_and_overlong_text_are_split():
    """Paragraphs at blank lines, over-long ones cut at whitespace; a text the server finds
    longer than the context (HTTP 400) is scored in halves whose sums add up."""
    from souverain.eval import EvalError
    from souverain.eval.suites.quality import _rolling, paragraphs

    assert paragraphs("a b\n c\n\n\n d  e\n") == ["a b c", "d e"]
    assert paragraphs("one two three four", max_chars=9) == ["one two", "three", "four"]

    class ShortContext:  # a stand-in for a server with a 40-character context
        model, url = "m", "http://127.0.0.1:1/v1"

        def loglikelihood_rolling(self, texts):
            if len(texts[0]) > 40:
                raise EvalError("… refused the request (HTTP 400: A prompt has 99 tokens …: "
                                "over the model's context of 10 …)")
            return [(-1.0 * len(texts[0].split()), len(texts[0].split()))]

    text = " ".join(f"word{i}" for i in range(30))
    assert _rolling(ShortContext(), text) == (-30.0, 30)
