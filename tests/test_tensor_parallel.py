"""Tensor parallelism (`souverain.distributed`): K=2 gloo processes against K=1 in this process.

Each scenario runs the same steps through the paged KV cache on both: a batch of two
sequences (A: 20 tokens, longer than the tiny Mistral's window of 6, prefilled in two chunks;
B: 7 tokens), on scattered blocks, then greedy decode steps of both at once, each side fed its
own argmax tokens. The two-rank run is a real `torch.distributed` group (gloo on 127.0.0.1),
spawned once per scenario and stopped as soon as its steps are done.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from souverain.distributed.launch import LocalTensorParallel, TPConfig
from souverain.distributed.tensor_parallel import (
    TPShard,
    _int4_codes,
    _int4_codes_by_kernel,
    check_shardable,
    shard_linear_cols,
    shard_linear_rows,
    shard_model_,
    shard_of,
    tensor_parallel_sizes,
)
from souverain.distributed.worker import StepInputs, TPWorker, load_shard, local_kv_cache
from souverain.engine.paged_attention import SeqSlice
from souverain.errors import CheckpointError, RequestError
from souverain.models.int4_linear import Int4Linear
from souverain.models.int8_linear import Int8Linear
from souverain.weights import load

PROMPT_A = [1, 1500, 2300, 900, 17, 4000, 123, 31000, 555, 9000, 42, 77, 6000, 6001, 12, 13,
            20000, 3, 4, 25000]
PROMPT_B = [1, 700, 8000, 29000, 64, 5, 11111]
CHUNK = 12  # A's first prefill chunk; its other 8 tokens come with B's first decode
DECODE_STEPS = 6
BLOCK_SIZE = 4
TABLE_A = [3, 9, 1, 12, 5, 7, 2]  # 7 blocks of 4 >= 20 + 7 positions, not in order
TABLE_B = [10, 4, 8, 6]
NUM_BLOCKS = 13  # block 0: the zero padding block
FLOAT_TOL = 1e-5
# int8: the row-parallel linears (wo, w2) quantize their activations per row over their own
# half of the features, the unsharded ones over the whole row; each keeps ~15 bits of its
# row's max (relative error <= 1/(2*127*254) = 1.6e-5 per matmul), so the two differ by about
# that at each of the 2 x n_layers row-parallel matmuls, amplified by the layers above:
# bounded here by 2e-4 of the largest logit (measured on this machine: 7e-5 Mistral, 5e-5
# Mixtral; float32 alone differs by ~5e-7 of it).
INT8_REL_TOL = 2e-4


@dataclass
class Run:
    """What one side produced: the logits of every step, and each sequence's tokens."""

    logits: list[torch.Tensor]
    tokens_a: list[int]
    tokens_b: list[int]


def drive(run) -> Run:
    """The scenario (module docstring) through ``run(StepInputs) -> logits``."""
    n_a, n_b = len(PROMPT_A), len(PROMPT_B)
    logits = [run(StepInputs(
        PROMPT_A[:CHUNK] + PROMPT_B, list(range(CHUNK)) + list(range(n_b)),
        [SeqSlice(0, CHUNK, TABLE_A, n_a), SeqSlice(0, n_b, TABLE_B, n_b)]))]
    b = [int(logits[-1][-1].argmax())]  # B's last prompt row
    logits.append(run(StepInputs(
        PROMPT_A[CHUNK:] + b[-1:], list(range(CHUNK, n_a)) + [n_b],
        [SeqSlice(CHUNK, n_a - CHUNK, TABLE_A, n_a), SeqSlice(n_b, 1, TABLE_B, n_b)])))
    a = [int(logits[-1][n_a - CHUNK - 1].argmax())]
    b.append(int(logits[-1][-1].argmax()))
    for i in range(DECODE_STEPS):
        pa, pb = n_a + i, n_b + 1 + i
        logits.append(run(StepInputs(
            [a[-1], b[-1]], [pa, pb],
            [SeqSlice(pa, 1, TABLE_A, n_a), SeqSlice(pb, 1, TABLE_B, n_b)],
            logits_indices=[0, 1])))
        a.append(int(logits[-1][0].argmax()))
        b.append(int(logits[-1][1].argmax()))
    return Run(logits, a, b)


@pytest.fixture(scope="module")
def scenario(tiny_mistral, tiny_mixtral):
    """``(name, quantization) -> (TP=1 Run, TP=2 Run)``, each run once per module."""
    paths = {"mistral": tiny_mistral["consolidated"], "mixtral": tiny_mixtral["consolidated"]}
    done: dict[tuple[str, str], tuple[Run, Run]] = {}

    def get(name: str, quantization: str) -> tuple[Run, Run]:
        if (name, quantization) not in done:
            path = str(paths[name])
            model = load_shard(path, 0, 1, quantization=quantization)
            ref = drive(TPWorker(model, local_kv_cache(model, NUM_BLOCKS, BLOCK_SIZE)).run)
            config = TPConfig(path, world=2, quantization=quantization, num_blocks=NUM_BLOCKS,
                              block_size=BLOCK_SIZE, threads=1, timeout_s=300)
            with LocalTensorParallel(config) as tp:
                got = drive(tp.run)
            done[(name, quantization)] = (ref, got)
        return done[(name, quantization)]

    return get


def _max_diff(ref: Run, got: Run, steps: slice) -> float:
    diffs = []
    for a, b in zip(ref.logits[steps], got.logits[steps]):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        diffs.append((a - b).abs().max().item())
    return max(diffs)


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_prefill_logits_match_one_rank(scenario, name):
    ref, got = scenario(name, "none")
    assert ref.logits[0].shape == (CHUNK + len(PROMPT_B), 32768)
    assert ref.logits[0].abs().max() > 1.0  # not two near-zero tensors
    diff = _max_diff(ref, got, slice(0, 2))
    assert diff <= FLOAT_TOL, f"{name}: prefill max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_decode_logits_and_greedy_tokens_match_one_rank(scenario, name):
    ref, got = scenario(name, "none")
    assert len(ref.logits) == 2 + DECODE_STEPS and ref.logits[-1].shape == (2, 32768)
    diff = _max_diff(ref, got, slice(2, None))
    assert diff <= FLOAT_TOL, f"{name}: decode max |logit diff| {diff:.2e}"
    assert got.tokens_a == ref.tokens_a and got.tokens_b == ref.tokens_b
    assert len(set(ref.tokens_a)) > 1  # a real continuation, not one token repeated


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_int8_model_shards(scenario, name):
    """int8 (fused wqkv / w13 on Mistral, per-expert linears on Mixtral) at TP=2 against
    TP=1 int8: within `INT8_REL_TOL` of the largest logit (see there), same greedy tokens."""
    ref, got = scenario(name, "int8")
    scale = max(t.abs().max().item() for t in ref.logits)
    diff = _max_diff(ref, got, slice(None))
    assert diff <= INT8_REL_TOL * scale, f"{name}: int8 max |logit diff| {diff:.2e}"
    assert got.tokens_a == ref.tokens_a and got.tokens_b == ref.tokens_b
    # the bound is far below what int8 itself changes (so it says something)
    float_ref, _ = scenario(name, "none")
    assert (ref.logits[0] - float_ref.logits[0]).abs().max().item() > 10 * diff


# --------------------------------------------------------------------------------------
# In this process: what does not need a group
# --------------------------------------------------------------------------------------


def test_unshardable_configs_are_refused(tiny_mistral):
    args = load(tiny_mistral["consolidated"]).args  # 4 heads, 2 kv heads, hidden 160
    assert tensor_parallel_sizes(args) == [1, 2]
    with pytest.raises(CheckpointError, match=r"over 4 .*n_kv_heads = 2 is not divisible by 4"
                       r".*among 1, 2"):
        check_shardable(args, 4)
    with pytest.raises(CheckpointError, match=r"n_heads = 4; n_kv_heads = 2; hidden_dim = 160 "
                       r"are not divisible by 3"):
        check_shardable(args, 3)
    with pytest.raises(RequestError, match="at least 1"):
        check_shardable(args, 0)
    # the launcher refuses before it starts any process
    with pytest.raises(CheckpointError, match="n_kv_heads = 2"):
        LocalTensorParallel(TPConfig(str(tiny_mistral["consolidated"]), world=4))
    model = load_shard(tiny_mistral["consolidated"], 0, 1)
    with pytest.raises(CheckpointError, match="n_kv_heads = 2"):
        shard_model_(model, 0, 4)
    with pytest.raises(ValueError, match="outside"):
        shard_model_(model, 2, 2)


def test_int4_shard_off_its_groups_is_refused_and_leaves_the_model_whole(tiny_mistral):
    """Tiny Mistral's w2 has 160 input features in int4 groups of 32: half of it (80) cuts a
    group, so sharding refuses, naming the linear and the fix, before swapping anything."""
    model = load_shard(tiny_mistral["consolidated"], 0, 1, quantization="int4")
    wqkv = model.layers[0].attention.wqkv
    with pytest.raises(CheckpointError, match=r"layers\.0\.feed_forward\.w2: int4 groups of 32 "
                       r".*\[0, 80\).*quantization 'int8'"):
        shard_model_(model, 0, 2)
    assert model.layers[0].attention.wqkv is wqkv and model.layers[0].attention.n_heads == 4
    assert shard_of(model).world == 1  # (load_shard marked it whole)


def test_one_rank_is_the_model_untouched(tiny_mistral):
    model = load_shard(tiny_mistral["consolidated"], 0, 1)
    assert shard_of(model) == TPShard(rank=0, world=1, n_heads=4, n_kv_heads=2, hidden_dim=160)
    assert not any(m._forward_hooks for m in model.modules())  # no collective at all
    assert local_kv_cache(model, 3, 4).k.shape == (3, 12, 2, 32)


def test_rank_one_shard_holds_its_heads_and_units(tiny_mixtral):
    """Sharding needs no group (the all-reduces run at forward time): rank 1 of 2 keeps q
    heads 2-3, kv head 1, hidden units 48-95 of every expert, a gate and head whole."""
    whole = load_shard(tiny_mixtral["consolidated"], 0, 1)
    model = shard_model_(load_shard(tiny_mixtral["consolidated"], 0, 1), 1, 2)
    att, ref = model.layers[1].attention, whole.layers[1].attention
    assert (att.n_heads, att.n_kv_heads) == (2, 1)
    assert torch.equal(att.wq.weight, ref.wq.weight[32:64])  # head_dim 16
    assert torch.equal(att.wk.weight, ref.wk.weight[16:32])
    assert torch.equal(att.wo.weight, ref.wo.weight[:, 32:64])
    expert, ref_expert = model.layers[1].feed_forward.experts[3], whole.layers[1].feed_forward.experts[3]
    assert torch.equal(expert.w1.weight, ref_expert.w1.weight[48:96])
    assert torch.equal(expert.w2.weight, ref_expert.w2.weight[:, 48:96])
    assert torch.equal(model.layers[1].feed_forward.gate.weight,
                       whole.layers[1].feed_forward.gate.weight)
    assert torch.equal(model.output.weight, whole.output.weight)
    assert local_kv_cache(model, 3, 4).k.shape == (2, 12, 1, 16)
    with pytest.raises(ValueError, match="rank 1 of 2's shard already"):
        shard_model_(model, 0, 2)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_quantized_linears_shard_their_codes_exactly(compute_dtype):
    """Rows and columns of an int8 / int4 linear keep the exact codes and scales: the shard's
    weight is bitwise the slice of the whole one's (int4: read back through the kernel)."""
    w = torch.randn(128, 192, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([torch.arange(16, 48), torch.arange(96, 128)])
    int8 = Int8Linear.from_float(w)
    int4 = Int4Linear.from_float(w, 32, compute_dtype)
    for whole in (int8, int4):
        by_rows = shard_linear_rows(whole, rows)
        by_cols = shard_linear_cols(whole, 64, 160)
        assert type(by_rows) is type(by_cols) is type(whole)
        assert torch.equal(by_rows.dequantize(), whole.dequantize()[rows])
        assert torch.equal(by_cols.dequantize(), whole.dequantize()[:, 64:160])
    # the codes unpacked through the learnt layout are those the kernel multiplies by
    for n in (128, 176):  # whole tiles of 64 rows, and a tail of 48
        lin = Int4Linear.from_float(torch.randn(n, 96), 32, compute_dtype)
        if lin.layout == "aten":
            assert torch.equal(_int4_codes(lin)[0], _int4_codes_by_kernel(lin))
        else:  # souverain's q4 layout (bf16 compute on AVX2 CPUs): the codes are in order
            q, scales, zeros = _int4_codes(lin)
            w = (q.view(n, 3, 32).float() - 8) * scales[..., None] + zeros[..., None]
            assert torch.allclose(w.view(n, 96), lin.dequantize(), rtol=0, atol=1e-6)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(1))
    assert torch.equal(shard_linear_rows(int8, rows)(x), int8(x)[:, rows])  # same activations
    with pytest.raises(CheckpointError, match=r"int4 groups of 32 .*\[0, 80\)"):
        shard_linear_cols(int4, 0, 80)
    with pytest.raises(CheckpointError, match="does not fit the int4 kernel"):
        shard_linear_rows(int4, torch.arange(8))
