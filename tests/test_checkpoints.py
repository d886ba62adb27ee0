"""Independent checks of the tiny reference checkpoints (tests/checkpoints.py).

They do not use souverain at all: they prove the fixtures themselves are right, so a parity
failure elsewhere points at our loader/model and not at the fixtures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from checkpoints import (
    GGUF_QTYPES,
    SPECS,
    V3_TOKENIZER_NAME,
    build_hf_model,
    greedy_min_margin,
    hf_config,
    hf_greedy,
    hf_reference_logits,
    hf_state_dict,
    mistral_to_gguf_tensors,
    mistral_to_hf_state_dict,
    permute_interleaved_to_rotate_half,
    permute_rotate_half_to_interleaved,
)

NAMES = list(SPECS)
# 20 tokens: longer than the Mistral window (6), so the window matters.
LONG_PROMPT = [1, 1500, 2300, 900, 17, 4000, 123, 31000, 555, 9000, 42, 77, 6000, 6001, 12, 13,
               20000, 3, 4, 25000]


def _load_consolidated(entry: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(entry["consolidated"] / "consolidated.safetensors"))


# ------------------------------------------------------------------------------------ layout


EXPECTED_PARAMS = {
    "mistral": {"dim": 64, "n_layers": 3, "head_dim": 32, "hidden_dim": 160, "n_heads": 4,
                "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 32768, "rope_theta": 1e6,
                "sliding_window": 6},
    "mixtral": {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4,
                "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 32768, "rope_theta": 1e6,
                "moe": {"num_experts": 4, "num_experts_per_tok": 2}},
    "llama": {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4,
              "n_kv_heads": 1, "norm_eps": 1e-6, "vocab_size": 32768, "rope_theta": 10000.0,
              "tied_embeddings": True},
}


@pytest.mark.parametrize("name", NAMES)
def test_folder_layout_and_params(tiny_models, name):
    entry = tiny_models[name]
    hf = entry["hf"]
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "hf/ must be sharded"
    assert (hf / "config.json").is_file()
    for folder in ("hf", "consolidated", "pth"):
        assert (entry[folder] / V3_TOKENIZER_NAME).stat().st_size > 100_000
    for folder in ("consolidated", "pth"):
        assert json.loads((entry[folder] / "params.json").read_text()) == EXPECTED_PARAMS[name]
    assert entry["args"] == EXPECTED_PARAMS[name]
    assert (entry["consolidated"] / "consolidated.safetensors").is_file()
    assert (entry["pth"] / "consolidated.00.pth").is_file()
    for q in GGUF_QTYPES:
        assert entry[f"gguf_{q}"].name == f"model-{q}.gguf" and entry[f"gguf_{q}"].is_file()

    sd = _load_consolidated(entry)
    assert ("output.weight" in sd) == (name != "llama")  # the tied model has no head
    assert sd["layers.0.attention.wq.weight"].shape == (4 * entry["args"]["head_dim"], 64)
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_hf_mixtral_saved_layout(tiny_mixtral):
    """transformers 5.23 fuses experts in memory (mlp.experts.gate_up_proj [E, 2I, H],
    mlp.experts.down_proj [E, H, I]) but save_pretrained writes the legacy per-expert layout."""
    sd = hf_state_dict(tiny_mixtral["hf"])
    assert sd["model.layers.0.block_sparse_moe.gate.weight"].shape == (4, 64)
    for j in range(4):
        assert sd[f"model.layers.1.block_sparse_moe.experts.{j}.w1.weight"].shape == (96, 64)
        assert sd[f"model.layers.1.block_sparse_moe.experts.{j}.w2.weight"].shape == (64, 96)
        assert sd[f"model.layers.1.block_sparse_moe.experts.{j}.w3.weight"].shape == (96, 64)
    assert not any("gate_up_proj" in k or ".mlp." in k for k in sd)


# ------------------------------------------------------------------------ hf reload / greedy


@pytest.mark.parametrize("name", NAMES)
def test_hf_folder_reloads_with_identical_logits(tiny_models, name):
    """A fresh seeded build (deterministic) and the reloaded hf/ folder give the same logits."""
    fresh = build_hf_model(name)
    with torch.no_grad():
        want = fresh(torch.tensor([LONG_PROMPT]), use_cache=False).logits[0]
    got = hf_reference_logits(tiny_models[name]["hf"], LONG_PROMPT)
    assert got.shape == (len(LONG_PROMPT), 32768) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert got.std() > 0.5, "logits too close to 0 for meaningful parity tests"


@pytest.mark.parametrize("name", NAMES)
def test_hf_greedy_is_full_forward_argmax_and_varied(tiny_models, name):
    """generate() (KV cache, sliding-window cache for Mistral) == argmax of one full forward,
    and the 64-token continuation does not collapse onto a repeated token."""
    hf = tiny_models[name]["hf"]
    new = hf_greedy(hf, LONG_PROMPT, 64)
    assert len(new) == 64
    logits = hf_reference_logits(hf, LONG_PROMPT + new)
    assert logits[len(LONG_PROMPT) - 1: -1].argmax(-1).tolist() == new
    assert len(set(new)) >= 32, new
    assert greedy_min_margin(hf, LONG_PROMPT, new) > 1e-4


def test_transformers_sliding_window_is_w_keys_including_self():
    """Eager Mistral, window W=6, one layer: the query at position q sees keys q-W+1 .. q
    (exactly W keys, itself included) -- not W+1."""
    model = build_hf_model("mistral", num_hidden_layers=1)
    w = model.config.sliding_window
    assert w == 6
    ids = torch.tensor([LONG_PROMPT[:12]])
    q = 11
    with torch.no_grad():
        base = model(ids, use_cache=False).logits[0, q]
        for pos in range(q + 1):
            changed = ids.clone()
            changed[0, pos] = 31999 if ids[0, pos] != 31999 else 31998
            out = model(changed, use_cache=False).logits[0, q]
            sees = not torch.equal(out, base)
            assert sees == (pos > q - w), (pos, q, w)


# --------------------------------------------------------------- permutation / consolidated


def _rope_rotate_half(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """transformers' formulation: pairs (j, j + d/2)."""
    from transformers.models.llama.modeling_llama import rotate_half

    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    emb = torch.cat([ang, ang], dim=-1)
    return x.double() * emb.cos() + rotate_half(x.double()) * emb.sin()


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """mistral-inference / llama.cpp formulation: complex pairs (2j, 2j + 1)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)


@pytest.mark.parametrize("n_heads,head_dim", [(4, 32), (2, 16), (1, 8)])
def test_permutation_turns_rotate_half_into_interleaved_rope(n_heads, head_dim):
    """q = W x: interleaved RoPE of (permuted W) x == permuted (rotate-half RoPE of W x), so
    q.k dot products (attention scores) are identical in both layouts."""
    g = torch.Generator().manual_seed(0)
    w_hf = torch.randn(n_heads * head_dim, 24, generator=g, dtype=torch.float64)
    x = torch.randn(7, 24, generator=g, dtype=torch.float64)
    pos = torch.arange(7)
    q_hf = (x @ w_hf.T).reshape(7, n_heads, head_dim).transpose(0, 1)
    w_il = permute_rotate_half_to_interleaved(w_hf, n_heads)
    q_il = (x @ w_il.T).reshape(7, n_heads, head_dim).transpose(0, 1)
    r_hf = _rope_rotate_half(q_hf, pos, 1e4)
    r_il = _rope_interleaved(q_il, pos, 1e4)
    # Rows 2j / 2j+1 of the interleaved head are rows j / j + d/2 of the HF head.
    idx = torch.arange(head_dim).reshape(2, head_dim // 2).T.reshape(-1)
    torch.testing.assert_close(r_il, r_hf[..., idx], rtol=0, atol=1e-12)
    torch.testing.assert_close(r_il @ r_il.transpose(-1, -2), r_hf @ r_hf.transpose(-1, -2))
    assert torch.equal(permute_interleaved_to_rotate_half(w_il, n_heads), w_hf)


@pytest.mark.parametrize("name", NAMES)
def test_consolidated_unpermutes_to_hf_exactly(tiny_models, name):
    entry = tiny_models[name]
    hf_sd = hf_state_dict(entry["hf"])
    cons = _load_consolidated(entry)
    back = mistral_to_hf_state_dict(cons, entry["args"])
    expected_keys = set(hf_sd) - ({"lm_head.weight"} if name == "llama" else set())
    assert set(back) == expected_keys
    for k, v in back.items():
        assert torch.equal(v, hf_sd[k]), k
    if name == "llama":  # tied: the head is the embedding
        assert "lm_head.weight" not in hf_sd or torch.equal(
            hf_sd["lm_head.weight"], hf_sd["model.embed_tokens.weight"])
    # The permutation really moved rows (it is not the identity for these shapes).
    assert not torch.equal(cons["layers.0.attention.wq.weight"],
                           hf_sd["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("name", NAMES)
def test_pth_equals_safetensors(tiny_models, name):
    entry = tiny_models[name]
    pth = torch.load(entry["pth"] / "consolidated.00.pth", map_location="cpu", weights_only=True)
    cons = _load_consolidated(entry)
    assert set(pth) == set(cons)
    for k in cons:
        assert torch.equal(pth[k], cons[k]), k


# ---------------------------------------------------------------------------------- GGUF


def _field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_gguf_metadata_and_tensors(tiny_models, name, qtype):
    """Read the GGUF back with gguf.GGUFReader: metadata, tensor types, and dequantized values
    against the consolidated weights (exact for f32, f16 rounding, Q8_0 block error)."""
    import gguf

    entry = tiny_models[name]
    p = entry["args"]
    reader = gguf.GGUFReader(str(entry[f"gguf_{qtype}"]))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[qtype]
    expect = {
        "llama.block_count": p["n_layers"], "llama.context_length": 512,
        "llama.embedding_length": p["dim"], "llama.feed_forward_length": p["hidden_dim"],
        "llama.attention.head_count": p["n_heads"], "llama.attention.head_count_kv": p["n_kv_heads"],
        "llama.attention.key_length": p["head_dim"], "llama.attention.value_length": p["head_dim"],
        "llama.rope.dimension_count": p["head_dim"], "llama.vocab_size": p["vocab_size"],
    }
    for k, v in expect.items():
        assert _field(reader, k) == v, k
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(p["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(p["norm_eps"])
    assert ("llama.attention.sliding_window" in reader.fields) == (name == "mistral")
    if name == "mistral":
        assert _field(reader, "llama.attention.sliding_window") == 6
    if name == "mixtral":
        assert _field(reader, "llama.expert_count") == 4
        assert _field(reader, "llama.expert_used_count") == 2
    else:
        assert "llama.expert_count" not in reader.fields
    assert not any(k.startswith("tokenizer.") for k in reader.fields)

    want = mistral_to_gguf_tensors(_load_consolidated(entry), p)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    assert ("output.weight" in got) == (name != "llama")
    if name == "mixtral":
        assert want["blk.0.ffn_gate_exps.weight"].shape == (4, 96, 64)
        assert want["blk.0.ffn_down_exps.weight"].shape == (4, 64, 96)
        assert want["blk.0.ffn_gate_inp.weight"].shape == (4, 64)
    Q = gguf.GGMLQuantizationType
    for tname, ref in want.items():
        t = got[tname]
        keep_f32 = ref.ndim == 1 or "ffn_gate_inp" in tname
        assert t.tensor_type == (Q.F32 if keep_f32 or qtype == "f32" else
                                 {"f16": Q.F16, "q8_0": Q.Q8_0}[qtype]), tname
        assert list(t.shape) == list(reversed(ref.shape)), tname  # GGUF ne = reversed numpy shape
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(deq, ref, err_msg=tname)
        elif t.tensor_type == Q.F16:
            np.testing.assert_array_equal(deq, ref.astype(np.float16).astype(np.float32), err_msg=tname)
        else:  # Q8_0: per 32-block scale d = max|x| / 127 (stored as f16), q = round(x / d)
            blocks = ref.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            bound = d * (0.5 + 127 * 2.0**-11) * 1.001 + 1e-8  # rounding + f16 scale error
            err = np.abs(deq.reshape(-1, 32) - blocks)
            assert (err <= bound).all(), tname
            assert err.max() > 0, tname  # it really was quantized


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_gguf_f32_loads_in_transformers_with_same_logits(tiny_models, name):
    """transformers' own GGUF loader (un-permutes q/k) reproduces the original logits: proves
    the GGUF writer and our q/k permutation. Prompt shorter than the window (transformers'
    GGUF loader knows no window key for arch llama), no tokenizer metadata needed."""
    from transformers import AutoModelForCausalLM

    entry = tiny_models[name]
    path = entry["gguf_f32"]
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    assert model.config.head_dim == entry["args"]["head_dim"]
    assert model.config.tie_word_embeddings == (name == "llama")
    prompt = LONG_PROMPT[:5]
    with torch.no_grad():
        got = model(torch.tensor([prompt]), use_cache=False).logits[0]
    want = hf_reference_logits(entry["hf"], prompt)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_hf_config_round_trip(tiny_mistral):
    cfg = hf_config(tiny_mistral["hf"])
    assert cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["head_dim"] == 32 and cfg["sliding_window"] == 6


def test_gguf_optional_tokenizer_metadata_matches_v3(tiny_llama, tmp_path):
    """write_gguf(with_tokenizer=True) embeds a llama/SPM vocab that transformers' GGUF
    tokenizer reads back and that encodes exactly like mistral-common's v3 tokenizer."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import AutoTokenizer

    from checkpoints import v3_tokenizer_path, write_gguf

    path = write_gguf(tiny_llama["hf"], tmp_path, "q8_0", with_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ref = MistralTokenizer.from_file(str(v3_tokenizer_path())).instruct_tokenizer.tokenizer
    text = "Hello world, bonjour le monde! 1234 éà"
    assert tok.encode(text) == ref.encode(text, bos=True, eos=False)
