"""Our model against Hugging Face transformers (the reference), in every format we read.

The tiny checkpoints (tests/checkpoints.py) are written by transformers; each is converted
into consolidated safetensors, consolidated .pth, sharded HF safetensors and GGUF. Logits of a
prompt longer than the Mistral sliding window must match transformers' within 1e-4 (fp32).
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import hf_greedy, hf_reference_logits
from souverain import LLM, SamplingParams
from souverain.models.attention import ContiguousKVCache
from souverain.weights import load

NAMES = ["mistral", "mixtral", "llama"]
EXACT_FORMATS = ["hf", "consolidated", "pth", "gguf_f32"]
# 20 tokens: longer than the tiny Mistral's window (6), so the window is exercised.
PROMPT = [1, 1500, 2300, 900, 17, 4000, 123, 31000, 555, 9000, 42, 77, 6000, 6001, 12, 13,
          20000, 3, 4, 25000]
TOL = 1e-4


@pytest.fixture(scope="module")
def llms(tiny_models):
    cache: dict[tuple[str, str], LLM] = {}

    def get(name: str, fmt: str) -> LLM:
        if (name, fmt) not in cache:
            cache[(name, fmt)] = LLM(tiny_models[name][fmt], dtype="float32")
        return cache[(name, fmt)]

    return get


@pytest.mark.parametrize("fmt", EXACT_FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(tiny_models, llms, name, fmt):
    ref = hf_reference_logits(tiny_models[name]["hf"], PROMPT)
    ours = llms(name, fmt).logits(PROMPT)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (len(PROMPT), 32768)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{name}/{fmt}: max |logit diff| {diff:.2e} > {TOL}"
    assert ref.abs().max() > 1.0  # the comparison is not between two near-zero tensors


def test_args_from_every_format_agree(tiny_models):
    for name in NAMES:
        args = {fmt: load(tiny_models[name][fmt]).args for fmt in EXACT_FORMATS + ["gguf_q8_0"]}
        ref = args["consolidated"]
        for fmt, a in args.items():
            for field in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                          "vocab_size", "rope_theta", "sliding_window", "moe", "tied_embeddings"):
                assert getattr(a, field) == getattr(ref, field), (name, fmt, field)
    assert load(tiny_models["mistral"]["hf"]).args.head_dim == 32  # != dim / n_heads
    assert load(tiny_models["mistral"]["gguf_f32"]).args.sliding_window == 6


@pytest.mark.parametrize("qtype,tol,min_agree", [("gguf_f16", 2e-2, 0.95), ("gguf_q8_0", 0.25, 0.8)])
def test_quantized_gguf_close_to_reference(tiny_models, qtype, tol, min_agree):
    """F16 / Q8_0 GGUFs are dequantized at load: close to fp32, mostly the same top token
    (the random tiny models have top-1/top-2 gaps down to 1e-4, so Q8_0 rounding flips a few;
    exact Q8_0 dequantization is checked against transformers' GGUF loader below)."""
    for name in NAMES:
        ref = hf_reference_logits(tiny_models[name]["hf"], PROMPT)
        ours = LLM(tiny_models[name][qtype], dtype="float32").logits(PROMPT)
        assert (ours - ref).abs().max().item() <= tol * ref.abs().max().item(), (name, qtype)
        agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert agree >= min_agree, (name, qtype, agree)


def test_gguf_dequantization_matches_transformers_gguf_loader(tiny_models):
    """transformers dequantizes GGUF with the same gguf package: identical logits for the
    tied Llama in Q8_0 (no window, so transformers' GGUF loader knows everything)."""
    from transformers import AutoModelForCausalLM

    path = tiny_models["llama"]["gguf_q8_0"]
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    ours = LLM(path, dtype="float32").logits(PROMPT)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_incremental_decode_equals_full_prefill(llms, name):
    """One token at a time through the KV cache (past the sliding window) == one prefill."""
    llm = llms(name, "consolidated")
    model, a = llm.model, llm.args
    full = llm.logits(PROMPT)
    cache = ContiguousKVCache(a.n_layers, 1, len(PROMPT), a.n_kv_heads, a.head_dim, model.dtype)
    steps = []
    with torch.inference_mode():
        for pos, tok in enumerate(PROMPT):
            attn = cache.batch([0], [pos], [1])
            steps.append(model(torch.tensor([tok]), torch.tensor([pos]), attn))
    inc = torch.cat(steps)
    assert (inc - full).abs().max().item() <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_flat_batch_mixing_prefill_chunks_and_decodes(llms, name):
    """One forward over a flat batch: sequence A prefills a 7-token chunk while sequence B
    decodes one token and sequence C prefills its whole prompt; each equals its own prefill."""
    llm = llms(name, "consolidated")
    model, a = llm.model, llm.args
    A, B, C = PROMPT, PROMPT[::-1], PROMPT[3:15]
    full = {k: llm.logits(p) for k, p in (("A", A), ("B", B), ("C", C))}
    cache = ContiguousKVCache(a.n_layers, 3, 32, a.n_kv_heads, a.head_dim, model.dtype)
    with torch.inference_mode():
        # step 1: A's first 9 tokens, B's first 12
        model(torch.tensor(A[:9] + B[:12]), torch.tensor(list(range(9)) + list(range(12))),
              cache.batch([0, 1], [0, 0], [9, 12]))
        # step 2: A chunk of 7 (positions 9..15), B one token (position 12), C whole prompt
        tokens = A[9:16] + B[12:13] + C
        positions = list(range(9, 16)) + [12] + list(range(len(C)))
        out = model(torch.tensor(tokens), torch.tensor(positions),
                    cache.batch([0, 1, 2], [9, 12, 0], [7, 1, len(C)]))
    assert (out[:7] - full["A"][9:16]).abs().max().item() <= TOL
    assert (out[7] - full["B"][12]).abs().max().item() <= TOL
    assert (out[8:] - full["C"]).abs().max().item() <= TOL


@pytest.mark.parametrize("name,fmt", [("mistral", "consolidated"), ("mixtral", "hf"),
                                      ("llama", "gguf_f32")])
def test_greedy_64_tokens_equal_transformers_generate(tiny_models, llms, name, fmt):
    ref = hf_greedy(tiny_models[name]["hf"], PROMPT, 64)
    assert len(set(ref)) > 4, "degenerate reference continuation"
    out = llms(name, fmt).generate([PROMPT], SamplingParams(temperature=0, max_tokens=64,
                                                            ignore_eos=True))[0]
    assert out.token_ids == ref
    assert out.finish_reason == "length"


def test_batched_generate_equals_one_by_one(llms):
    llm = llms("mistral", "consolidated")
    prompts = [PROMPT, PROMPT[:5], PROMPT[7:], [1, 99]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert llm.generate([p], params)[0].token_ids == b.token_ids


def test_text_prompt_and_tokenizer_from_folder(llms):
    llm = llms("mistral", "consolidated")
    assert llm.tokenizer is not None
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8,
                                                          ignore_eos=True))[0]
    assert out.prompt_token_ids[0] == llm.tokenizer.bos_id
    assert len(out.token_ids) == 8
    # the generated text continues the prompt (SentencePiece's leading space is kept)
    assert llm.tokenizer.decode(out.prompt_token_ids + out.token_ids) == "Once upon a time" + out.text
