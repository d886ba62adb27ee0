"""`souverain.kernels`: the fused C++ CPU kernels against the maths they replace (float64
references), their batch invariance, and the PyTorch fallback the model takes without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from souverain import kernels
from souverain.models.transformer import Rotary

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built():
    # CI machines carry g++: the kernels must build there (the engine builds them at load)
    assert kernels.available(), kernels.status()


@pytest.fixture
def fallback(monkeypatch):
    """The PyTorch ops the model runs where the kernels cannot be built."""
    monkeypatch.setattr(kernels, "_state", {"ok": False, "reason": "test"})


def ulp(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]


def rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def close_to(out: torch.Tensor, ref: torch.Tensor, ulps: float,
             scale: torch.Tensor | None = None) -> None:
    """``out`` (rounded once from float32 maths) within ``ulps`` units of its dtype of ``ref``
    (relative to ``scale`` where given: a rotation's outputs can cancel to ~0)."""
    err = (out.double() - ref).abs()
    bound = ulps * ulp(out.dtype) * (ref.abs() if scale is None else scale).clamp_min(1e-3)
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.2f}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (2, 3, 1000)])
def test_rms_norm_matches_float64(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    out = kernels.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    close_to(out, rms_reference(x, w, 1e-5), 1.0 if dtype != torch.float32 else 8.0)


def test_rms_norm_strided_rows_and_float32_weight():
    x = torch.randn(5, 2 * 576).bfloat16()[:, :576]  # rows of a wider matrix
    w = torch.randn(576)
    close_to(kernels.rms_norm(x, w, 1e-6), rms_reference(x, w, 1e-6), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_sum_is_exactly_x_plus_residual(dtype):
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(9, 320, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(320, generator=g).to(dtype)
    normed, h = kernels.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, x + r)  # the residual stream: the same rounding as the add
    close_to(normed, rms_reference(h, w, 1e-5), 1.0 if dtype != torch.float32 else 8.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_matches_complex_product(dtype):
    T, heads, kv, hd = 6, 4, 2, 64
    rope = Rotary(hd, 10000.0).factors(torch.tensor([0, 1, 5, 100, 4095, 30000]))
    qkv = torch.randn(T, (heads + 2 * kv) * hd).to(dtype)
    v_before = qkv[:, (heads + kv) * hd:].clone()
    qk = qkv[:, :(heads + kv) * hd].view(T, -1, hd)  # strided rows, as in Attention
    ref = torch.view_as_real(torch.view_as_complex(qk.double().unflatten(-1, (-1, 2)))
                             * rope.to(torch.complex128)).flatten(-2)
    pair_norm = qk.double().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True)
    out = kernels.rotary(qk, rope)
    assert out.data_ptr() == qk.data_ptr()  # in place
    close_to(out, ref, 1.0 if dtype != torch.float32 else 8.0,
             scale=pair_norm.expand(-1, -1, -1, 2).flatten(-2))
    assert torch.equal(qkv[:, (heads + kv) * hd:], v_before)  # v untouched


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_are_batch_invariant(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(33, 576).bfloat16()
        r = torch.randn(33, 576).bfloat16()
        w = torch.randn(576).bfloat16()
        rope = Rotary(64, 1e4).factors(torch.arange(33))
        qk = torch.randn(33, 12, 64).bfloat16()
        full_norm, full_h = kernels.add_rms_norm(x, r, w, 1e-5)
        full_rot = kernels.rotary(qk.clone(), rope)
        for n in (1, 2, 5, 17):
            assert torch.equal(kernels.rms_norm(x[:n], w, 1e-5), kernels.rms_norm(x, w, 1e-5)[:n])
            normed, h = kernels.add_rms_norm(x[:n], r[:n], w, 1e-5)
            assert torch.equal(normed, full_norm[:n]) and torch.equal(h, full_h[:n])
            assert torch.equal(kernels.rotary(qk[:n].clone(), rope[:n]), full_rot[:n])
    finally:
        torch.set_num_threads(prev)


def test_fallback_matches_kernels(fallback):
    x, r = torch.randn(3, 576).bfloat16(), torch.randn(3, 576).bfloat16()
    w = torch.randn(576).bfloat16()
    qk = torch.randn(3, 12, 64).bfloat16()
    rope = Rotary(64, 1e4).factors(torch.arange(3))
    slow = (kernels.add_rms_norm(x, r, w, 1e-5), kernels.rotary(qk.clone(), rope))
    kernels._state.update(ok=True)
    fast = (kernels.add_rms_norm(x, r, w, 1e-5), kernels.rotary(qk.clone(), rope))
    assert torch.equal(slow[0][1], fast[0][1])
    # the fallback rounds its float32 maths once too: at most one bf16 ulp apart
    for a, b in ((slow[0][0], fast[0][0]), (slow[1], fast[1])):
        assert (a.float() - b.float()).abs().max() <= 2 ** -7 * b.float().abs().max()


def test_autograd_takes_the_pytorch_ops():
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    out = kernels.rms_norm(x, w, 1e-5)
    assert out.grad_fn is not None  # the kernels have no backward: fine-tuning needs the graph
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        assert torch.allclose(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5),
                              rtol=1e-6, atol=1e-6)


def test_bad_input_names_the_problem():
    with pytest.raises(RuntimeError, match="weight must be a contiguous vector of 64"):
        torch.ops.souverain.rms_norm(torch.randn(2, 64), torch.randn(32), 1e-5)
    with pytest.raises(RuntimeError, match="same shape and dtype"):
        torch.ops.souverain.add_rms_norm(torch.randn(2, 64), torch.randn(3, 64),
                                         torch.randn(64), 1e-5)
    with pytest.raises(RuntimeError, match="rope must be float32"):
        torch.ops.souverain.rotary_(torch.randn(2, 3, 64), torch.randn(2, 16, 2))


def test_model_logits_same_with_and_without_kernels(tiny_mistral, monkeypatch):
    """The whole model on the kernels vs on the PyTorch ops: the same maths, float32."""
    from souverain.models.loader import load_model
    from souverain.weights import load

    model = load_model(load(tiny_mistral["hf"]), torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast = model(tokens, torch.arange(40))
        monkeypatch.setattr(kernels, "_state", {"ok": False, "reason": "test"})
        slow = model(tokens, torch.arange(40))
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-4), (fast - slow).abs().max()


def sdpa_reference(q, keys, values):
    """float64 attention of q (H, D) over keys/values (n, KVH, D), GQA by head groups."""
    H, KVH = q.shape[0], keys.shape[1]
    k = keys.double().repeat_interleave(H // KVH, dim=1).transpose(0, 1)  # (H, n, D)
    v = values.double().repeat_interleave(H // KVH, dim=1).transpose(0, 1)
    w = torch.softmax((k @ q.double()[:, :, None]).squeeze(-1) / q.shape[-1] ** 0.5, dim=-1)
    return (w[:, None, :] @ v).squeeze(1)  # (H, D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3), (8, 8), (32, 8), (12, 2), (16, 2)])  # G = 3, 1, 4, 6, 8
@pytest.mark.parametrize("D", [32, 64, 128])  # 64 and 128 have an AVX-512 path, 32 not
def test_paged_attention_matches_float64(dtype, heads, D):
    H, KVH = heads
    bs, num_blocks = 4, 40
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(num_blocks * bs, KVH, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * bs, KVH, D, generator=g).to(dtype)
    # rows: (block table, lo, hi) -- one key, a partial first block (a window), a long row
    specs = [([7], 2, 3), ([3, 9, 1], 1, 11), ([12, 13, 2, 30, 31, 5, 6, 8], 0, 29)]
    width = max(len(t) for t, _, _ in specs)
    tables = torch.zeros(len(specs), width, dtype=torch.long)
    for r, (t, _, _) in enumerate(specs):
        tables[r, :len(t)] = torch.tensor(t)
    lo = torch.tensor([s[1] for s in specs])
    hi = torch.tensor([s[2] for s in specs])
    q = torch.randn(len(specs), H, D, generator=g).to(dtype)
    out = kernels.paged_attention(q, k_cache, v_cache, tables, lo, hi, bs)
    assert out.shape == q.shape and out.dtype == dtype
    for r, (t, a, b) in enumerate(specs):
        slots = torch.cat([torch.arange(blk * bs, (blk + 1) * bs) for blk in t])[a:b]
        ref = sdpa_reference(q[r], k_cache[slots], v_cache[slots])
        tol = 1e-5 if dtype == torch.float32 else 2 * ulp(dtype)
        assert (out[r].double() - ref).abs().max() <= tol * max(1.0, ref.abs().max())


@pytest.mark.parametrize("threads", [1, 2])
def test_paged_attention_rows_are_batch_invariant(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        D, bs, B = 64, 16, 16
        k_cache = torch.randn(64 * bs, 3, D).bfloat16()
        v_cache = torch.randn(64 * bs, 3, D).bfloat16()
        tables = torch.randperm(63)[:B * 3].view(B, 3) + 1
        lo = torch.randint(0, 10, (B,))
        hi = torch.randint(20, 48, (B,))
        q = torch.randn(B, 9, D).bfloat16()
        full = kernels.paged_attention(q, k_cache, v_cache, tables, lo, hi, bs)  # threaded
        for r in range(B):
            one = kernels.paged_attention(q[r:r + 1], k_cache, v_cache, tables[r:r + 1],
                                          lo[r:r + 1], hi[r:r + 1], bs)
            assert torch.equal(one[0], full[r])
    finally:
        torch.set_num_threads(prev)


def test_paged_attention_rejects_bad_tables():
    k = torch.randn(8 * 4, 2, 64)
    q = torch.randn(1, 4, 64)
    with pytest.raises(RuntimeError, match="block 9 is outside the cache"):
        kernels.paged_attention(q, k, k, torch.tensor([[9]]), torch.tensor([0]),
                                torch.tensor([2]), 4)
    with pytest.raises(RuntimeError, match="empty or beyond its block table"):
        kernels.paged_attention(q, k, k, torch.tensor([[1]]), torch.tensor([0]),
                                torch.tensor([6]), 4)


def test_paged_backend_same_with_and_without_kernels(monkeypatch):
    """A mixed step: a prompt chunk, decode rows, and a preempted sequence recomputing its
    prompt and generated tokens in one chunk (those go to the kernel), with a window."""
    from souverain.engine.paged_attention import PagedAttention, PagedKVCache, SeqSlice

    torch.manual_seed(7)
    bs, KVH, H, D = 4, 2, 6, 32
    cache = PagedKVCache(1, 32, bs, KVH, D, torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    seqs = [SeqSlice(0, 9, [3, 4, 5], prompt_len=9),           # a whole prompt
            SeqSlice(13, 1, [6, 7, 8, 9], prompt_len=5),        # decode row
            SeqSlice(4, 6, [10, 11, 12], prompt_len=7),         # prompt tail + 3 generated
            SeqSlice(2, 1, [13], prompt_len=2)]                 # decode row, short
    T = sum(s.q_len for s in seqs)
    q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    outs = []
    for ok in (True, False):
        monkeypatch.setattr(kernels, "_state", {"ok": ok, "reason": "test"})
        for window in (None, 5):
            attn = PagedAttention(cache, seqs, torch.device("cpu"))
            assert attn.fused is ok
            outs.append(attn.attend(0, q, k, v, window))
    assert torch.allclose(outs[0], outs[2], atol=1e-5) and torch.allclose(outs[1], outs[3], atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_int8_planes_are_the_pytorch_bytes(dtype, seed):
    """The fused quantizer gives byte for byte the planes of Int8Linear's PyTorch ops."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(7, 576, generator=g) * torch.logspace(-3, 2, 7)[:, None]).to(dtype)
    x[3] = 0  # an all-zero row: amax clamps to 1e-30
    planes, amax = kernels.int8_planes(x)
    xf = x.float()
    ref_amax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    xs = torch.mul(xf, 127.0 / ref_amax)  # as Int8Linear.forward
    hi = torch.round(xs)
    lo = torch.round((xs - hi) * 254.0)
    assert torch.equal(amax, ref_amax)
    assert torch.equal(planes, (torch.cat([hi, lo]) + 128).to(torch.uint8))


def test_int8_linear_same_with_and_without_kernels(monkeypatch):
    from souverain.models.int8_linear import Int8Linear, _HAS_QLINEAR

    if not _HAS_QLINEAR:
        pytest.skip("no exact oneDNN int8 matmul on this torch build or CPU (needs VNNI or AMX)")
    lin = Int8Linear.from_float(torch.randn(640, 256) / 16)
    x = torch.randn(5, 256).bfloat16()
    with torch.inference_mode():
        fast = lin(x)
        for r in range(5):
            assert torch.equal(lin(x[r:r + 1])[0], fast[r])  # batch invariant
        monkeypatch.setattr(kernels, "_state", {"ok": False, "reason": "test"})
        slow = lin(x)
    assert fast.dtype == slow.dtype == torch.bfloat16
    assert (fast.float() - slow.float()).abs().max() <= 2 ** -7 * slow.float().abs().max()


def test_int8_epilogue_into_a_column_block():
    acc = torch.randn(6, 40)
    amax = torch.rand(3, 1) + 0.5
    out = torch.zeros(3, 100, dtype=torch.bfloat16)
    kernels.int8_epilogue_(out[:, 30:70], acc, amax)
    ref = ((acc[:3] + acc[3:] / 254) * amax).bfloat16()
    assert (out[:, 30:70].float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert not out[:, :30].any() and not out[:, 70:].any()


# --- Int8Linear's own VNNI matmul -------------------------------------------------------------

vnni = pytest.mark.skipif(not kernels.has_vnni(), reason="this CPU has no AVX-512 VNNI")


def _int8_pair(monkeypatch, n: int, k: int, seed: int = 0):
    """The same int8 weight in the VNNI kernel's layout and in oneDNN's."""
    from souverain.models import int8_linear as Q

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    w[:, 1] *= 30  # an outlier input channel, as in real models
    ours = Q.Int8Linear.from_float(w)
    with monkeypatch.context() as m:
        m.setattr(Q, "_vnni_layout", lambda: False)
        onednn = Q.Int8Linear.from_float(w)
    assert ours._vnni is not None and onednn._vnni is None
    return ours, onednn


@vnni
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(960, 576), (200, 70), (40, 8), (49, 1536)])
def test_vnni_int8_linear_is_bitwise_the_onednn_path(monkeypatch, dtype, shape):
    """Integer products are exact and the epilogue is oneDNN's float ops in the same order: the
    VNNI kernel reproduces the oneDNN path bit for bit (a reference this machine also runs),
    over tails in N (not a multiple of 16 / 48), in K (not a multiple of 4) and in rows (not
    a multiple of 8 plane rows)."""
    from souverain.models.int8_linear import _HAS_QLINEAR

    if not _HAS_QLINEAR:
        pytest.skip("no exact oneDNN int8 matmul on this torch build or CPU (needs VNNI or AMX)")
    n, k = shape
    ours, onednn = _int8_pair(monkeypatch, n, k)
    assert torch.equal(ours.qweight, onednn.qweight) and torch.equal(ours.scales, onednn.scales)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for m in (1, 2, 3, 7, 16, 33):
            x = (torch.randn(m, k, generator=g) * 4).to(dtype)
            got = ours(x)
            assert got.dtype == dtype and got.shape == (m, n)
            assert torch.equal(got, onednn(x)), m
        x = torch.randn(2, 5, k, generator=g).to(dtype)  # leading dims kept
        assert torch.equal(ours(x), onednn(x)) and ours(x).shape == (2, 5, n)


@vnni
@pytest.mark.parametrize("threads", [1, 2])
def test_vnni_int8_linear_rows_are_batch_invariant(monkeypatch, threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, _ = _int8_pair(monkeypatch, 300, 200, seed=3)
        x = torch.randn(37, 200, generator=torch.Generator().manual_seed(4)).bfloat16()
        with torch.inference_mode():
            full = ours(x)
            for r in (0, 5, 36):
                assert torch.equal(ours(x[r:r + 1])[0], full[r])
            assert torch.equal(ours(x[8:24]), full[8:24])
    finally:
        torch.set_num_threads(prev)


@vnni
def test_vnni_int8_linear_matches_the_dequantized_weight(monkeypatch):
    """Against plain float64 maths: x @ dequantize().T, within the two planes' activation
    rounding (<= 1/(2*127*254) of each row's largest magnitude per element)."""
    ours, _ = _int8_pair(monkeypatch, 130, 96, seed=5)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(6))
    ref = x.double() @ ours.dequantize().double().t()
    bound = x.abs().amax(-1, keepdim=True).double() / (2 * 127 * 254) * \
        ours.dequantize().abs().double().sum(-1)[None, :]
    with torch.inference_mode():
        assert ((ours(x).double() - ref).abs() <= bound * 1.01 + 1e-6).all()


@vnni
def test_vnni_fused_projection_is_the_parts_side_by_side(monkeypatch):
    """wq|wk|wv fusion concatenates the packed blocks (parts of whole 16-row blocks) or repacks
    (a ragged part): either way, the fused output is the parts' outputs side by side."""
    from souverain.models.quantize import fuse_linears

    for rows in ((64, 32, 32), (40, 24, 24)):
        parts = [_int8_pair(monkeypatch, r, 48, seed=i)[0] for i, r in enumerate(rows)]
        fused = fuse_linears(parts)
        assert fused is not None and fused._vnni is not None
        x = torch.randn(5, 48, generator=torch.Generator().manual_seed(7))
        with torch.inference_mode():
            assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))
        assert torch.equal(fused.qweight, torch.cat([p.qweight for p in parts]))


@vnni
def test_vnni_int8_linear_fallback_and_bad_inputs(monkeypatch):
    """Without the kernels (here: disabled after the weight was packed) the module runs the
    PyTorch ops on its unpacked weight; the op itself names what is wrong with its inputs."""
    ours, _ = _int8_pair(monkeypatch, 64, 32)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        fast = ours(x)
        with monkeypatch.context() as m:
            m.setattr(kernels, "_state", {"ok": False, "reason": "test"})
            slow = ours(x)
    torch.testing.assert_close(slow, fast, rtol=1e-6, atol=1e-6)
    op = torch.ops.souverain.int8_linear.default
    with pytest.raises(RuntimeError, match="input columns"):
        op(torch.randn(3, 40), ours._vnni, ours._comp, ours._s127, 64)
    with pytest.raises(RuntimeError, match="n_out"):
        op(x, ours._vnni, ours._comp, ours._s127, 100)
    with pytest.raises(RuntimeError, match="comp"):
        op(x, ours._vnni, ours._comp[:16], ours._s127, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_float64(dtype):
    """SwiGLU's silu(gate) * up from the fused gate|up output, computed in float32 and rounded
    once: within one rounding of the activation dtype (plus float32's) of float64 maths."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(2, 5, 2 * 1000, generator=g) * 4).to(dtype)  # 1000: a chunk tail
    out = kernels.silu_mul(x)
    assert out.shape == (2, 5, 1000) and out.dtype == dtype
    gate, up = x.double().chunk(2, dim=-1)
    ref = F.silu(gate) * up
    tol = 1e-6 if dtype == torch.float32 else ulp(dtype)
    assert ((out.double() - ref).abs() <= tol * ref.abs() + 1e-6).all()
    for r in range(5):  # row by row: the same bits
        assert torch.equal(kernels.silu_mul(x[1, r:r + 1]), out[1, r:r + 1])


def test_silu_mul_fallback_is_the_pytorch_ops(fallback):
    x = torch.randn(3, 64)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(kernels.silu_mul(x), F.silu(gate) * up)
