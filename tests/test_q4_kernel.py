"""souverain's own int4 kernel (`torch.ops.souverain.q4_linear`, the "q4" layout of
`Int4Linear`): against the float64 product of the very weights it stores, against GGUF's own
dequantization, batch invariance, the ATen layout it falls back to, and the ways a model uses
an int4 linear (fused concatenation, tensor-parallel shards). Skipped, with the reason, on a
CPU without AVX2 + FMA + F16C or where the kernels cannot be built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import souverain.models.int4_linear as il
from souverain import kernels
from souverain.distributed.tensor_parallel import shard_linear_cols, shard_linear_rows
from souverain.models.int4_linear import Int4Linear, gguf_int4_groups, int4_from_gguf

pytestmark = pytest.mark.skipif(
    not (kernels.available() and torch.ops.souverain.has_q4()),
    reason="souverain's q4 kernel needs AVX2 + FMA + F16C and the fused kernels built "
           f"({kernels.status()})")


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides the kernel afresh (SOUVERAIN_INT4_KERNEL is read once)."""
    monkeypatch.delenv("SOUVERAIN_INT4_KERNEL", raising=False)
    il._q4.clear()
    yield
    il._q4.clear()


def _codes(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3
    zeros = torch.randn(n, k // 32, generator=g) * 0.05
    return q, scales, zeros


@pytest.mark.parametrize("k", [32, 64, 288, 576, 1024])  # 288: 9 blocks, padded to 16
@pytest.mark.parametrize("m", [1, 3, 4, 5, 33])
def test_q4_equals_the_float64_product_of_its_weights(k: int, m: int) -> None:
    n = 48
    lin = Int4Linear.from_int4(*_codes(n, k), 32)
    assert lin.layout == "q4"
    w = lin.dequantize().double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)) * 3
    ref = x.double() @ w.t()
    got = lin(x)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # int16 activations per block of 32 (~16 bits), float32 sums: ~1e-5 of the largest output
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4
    # bfloat16 in, bfloat16 out: one rounding of the input and of the output
    got16 = lin(x.bfloat16())
    ref16 = x.bfloat16().double() @ w.t()
    assert got16.dtype == torch.bfloat16
    assert ((got16.double() - ref16).abs().max() / ref16.abs().max()).item() < 1e-2


def test_q4_is_more_exact_than_the_bf16_aten_path(monkeypatch: pytest.MonkeyPatch) -> None:
    q, s, z = _codes(256, 576, seed=1)
    fast = Int4Linear.from_int4(q, s, z, 32)
    monkeypatch.setenv("SOUVERAIN_INT4_KERNEL", "aten")
    il._q4.clear()
    aten = Int4Linear.from_int4(q, s, z, 32)
    assert (fast.layout, aten.layout) == ("q4", "aten")
    x = torch.randn(8, 576)
    ref = x.double() @ fast.dequantize().double().t()

    def rms(y: torch.Tensor) -> float:
        return ((y.double() - ref).norm() / ref.norm()).item()

    assert rms(fast(x)) < rms(aten(x)) / 10


def test_q4_rows_keep_their_leading_dims() -> None:
    """(Batch invariance at any batch size and thread count is
    test_quantize.py::test_kernels_are_batch_invariant[Int4Linear], which runs this layout
    wherever this module does.)"""
    lin = Int4Linear.from_float(torch.randn(1536, 576) * 0.05)
    assert lin.layout == "q4"
    x = torch.randn(16, 576)
    assert torch.equal(lin(x.view(4, 4, 576)), lin(x).view(4, 4, -1))


@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_keep_their_float16_scales(qtype_name: str) -> None:
    """Q4_0 (w = (q - 8) d) and Q4_1 (w = q d + m) store d and m in float16: the q4 layout
    (w = q d + m) holds GGUF's d bit for bit, and m = -8 d (exact) or GGUF's m, so the weight
    differs from what gguf-py dequantizes only by where float32 rounds q d + m."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    qtype = getattr(T, qtype_name)
    w = (np.random.default_rng(0).standard_normal((64, 256)) * 0.05).astype(np.float32)
    blocks = quantize(w, qtype)
    lin = int4_from_gguf(blocks.copy(), qtype)  # (it drops the pages it read: a copy)
    assert lin.layout == "q4"
    _, d, zero = gguf_int4_groups(blocks, qtype)  # GGUF's d; zero = m + 8 d (tested vs gguf)
    got_d, got_m = lin.scales_and_zeros.float()[:, :, :8]
    assert torch.equal(got_d, torch.from_numpy(d))  # float16 values: held exactly
    m = torch.from_numpy(zero - 8 * d)  # Q4_0: -8 d, Q4_1: GGUF's m
    assert torch.equal(got_m, m.half().float()) and torch.allclose(got_m, m, rtol=1e-3, atol=0)
    ref = torch.from_numpy(dequantize(blocks, qtype))
    assert torch.allclose(lin.dequantize(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())


def test_scales_float16_cannot_hold_keep_the_aten_layout() -> None:
    q, s, z = _codes(128, 64)
    s[100, 1] = 1e5  # beyond float16's range (65504)
    lin = Int4Linear.from_int4(q, s, z, 32)
    assert lin.layout == "aten"  # the whole weight, rows packed before included
    x = torch.randn(2, 64)
    w = (q.view(128, 2, 32).float() - 8) * s[..., None] + z[..., None]
    ref = x.double() @ w.view(128, 64).double().t()
    assert ((lin(x).double() - ref).abs().max() / ref.abs().max()).item() < 2e-2  # bf16 path
    tiny = Int4Linear.from_int4(q, torch.full_like(s, 1e-7), z, 32)  # float16 subnormals: kept
    assert tiny.layout == "q4"
    w = (q.view(128, 2, 32).float() - 8) * 1e-7 + z[..., None]
    # d's subnormal rounding: <= 15 * 2^-25 per weight; m's float16 rounding: half an ulp
    atol = 15 * 2.0 ** -25 + 2.0 ** -11 * z.abs().max().item()
    assert torch.allclose(tiny.dequantize(), w.view(128, 64), rtol=0, atol=atol)


def test_env_keeps_pytorchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUVERAIN_INT4_KERNEL", "aten")
    assert Int4Linear.from_float(torch.randn(64, 64)).layout == "aten"
    assert "aten" in repr(Int4Linear.from_float(torch.randn(64, 64)))


def test_q4_concat_and_tensor_parallel_shards_are_exact() -> None:
    parts = [Int4Linear.from_int4(*_codes(n, 128, seed=n), 32) for n in (48, 80, 16)]
    fused = Int4Linear.concat(parts)  # q4 rows are independent: no 64-row tiles needed
    assert fused is not None and fused.layout == "q4"
    x = torch.randn(5, 128)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    lin = parts[1]
    rows = torch.tensor([3, 17, 40, 41, 60, 79, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
    shard = shard_linear_rows(lin, rows)
    assert shard.layout == "q4" and torch.equal(shard(x), lin(x)[:, rows])
    a, b = shard_linear_cols(lin, 0, 64), shard_linear_cols(lin, 64, 128)
    assert torch.equal(a.dequantize(), lin.dequantize()[:, :64])
    assert torch.equal(b.dequantize(), lin.dequantize()[:, 64:])
