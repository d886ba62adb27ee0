"""Real weights: the bundled SmolLM2-135M-Instruct Q4_1 GGUF against transformers loading
the very same file (``gguf_file=``), which dequantizes it with the same gguf package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from souverain import LLM, SamplingParams
from souverain.weights import resolve

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smol() -> LLM:
    return LLM("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def hf_smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def test_alias_resolves_to_installed_package_file():
    path = resolve("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6


def test_logits_match_transformers(smol, hf_smol):
    model, tok = hf_smol
    ids = tok("The capital of France is Paris, and the capital of Germany is")["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = smol.logits(ids)
    assert (ours - ref).abs().max().item() <= 1e-3


def test_greedy_chat_answer_identical_for_64_tokens(smol, hf_smol):
    model, tok = hf_smol
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert smol.tokenizer.encode_chat(CHAT) == list(ids)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=64, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    out = smol.generate([ids], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    assert out.token_ids == ref
    assert "Paris" in out.text


def test_chat_stops_at_end_of_turn(smol):
    out = smol.chat(CHAT, SamplingParams(temperature=0, max_tokens=64))[0]
    assert out.finish_reason == "stop" and "Paris" in out.text
    assert "<|im_end|>" not in out.text


def test_seeded_chat_is_reproducible(smol):
    msgs = [{"role": "user", "content": "Bonjour !"}]
    a = smol.chat(msgs, SamplingParams(max_tokens=32, seed=1))[0]
    b = smol.chat(msgs, SamplingParams(max_tokens=32, seed=1))[0]
    assert a.text == b.text and a.token_ids == b.token_ids and a.text


def test_stream_deltas_concatenate_to_text(smol):
    pieces = list(smol.stream("The capital of France is", SamplingParams(temperature=0, max_tokens=16)))
    assert "".join(pieces) == smol.last_output.text
    ref = smol.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))[0]
    assert ref.text == smol.last_output.text


def test_stop_string(smol):
    out = smol.generate(["1, 2, 3, 4, 5,"], SamplingParams(temperature=0, max_tokens=32, stop=[" 8"]))[0]
    assert out.finish_reason == "stop" and " 8" not in out.text and "7" in out.text


def test_cli_generate_and_inspect():
    r = subprocess.run([sys.executable, "-m", "souverain.cli", "generate", "smollm2-135m-instruct",
                        "The capital of France is", "-n", "8"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "tok/s" in r.stderr
    r = subprocess.run([sys.executable, "-m", "souverain.cli", "inspect", "smollm2-135m-instruct",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for needle in ('"format": "gguf"', '"Q4_1"', '"n_kv_heads": 3', "im_start", '"parameters"'):
        assert needle in r.stdout


def test_cli_chat_piped():
    r = subprocess.run([sys.executable, "-m", "souverain.cli", "chat", "--temperature", "0",
                        "-n", "24"], input="What is the capital of France?\n/exit\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
