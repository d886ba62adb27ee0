"""Why `Int8Linear` is built the way it is: the int8 kernels and activation schemes side by side.

    python benchmarks/int8_kernels.py [--threads 2] [--skip-accuracy]

1. Kernels, cold weights: every layer's linears and the head of SmolLM2-135M (30 layers) and
   of the 0.86B Mistral-shaped model of `souverain bench` (16 layers), as random int8
   weights, each matrix a distinct tensor so the weights stream from memory as in a real
   forward. Per row count M (1 = one plane at batch 1; 2 = both planes at batch 1; 32 = both
   planes at batch 16; 1024 = a 512-token prefill) it times the raw integer products
   (``aten._int_mm`` on the (K, N) view, oneDNN ``qlinear_pointwise`` on a pre-packed weight)
   and souverain's VNNI kernel (``kernels.int8_linear``: M/2 float rows in, their planes and
   the epilogue included), and prints ms per pass and the GB/s of weights read.
2. Whole block linears (no head) at 1, 16 and 512 rows: float32 ``F.linear``, `Int8Linear` (two planes,
   quantization and epilogue included) and `Int4Linear` (bf16 activations).
3. Accuracy on the bundled model (logits relative RMS vs the float32 model over three prompts):
   int8 weights with float activations, per-row int8 activations (one plane), two planes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = {  # (N, K) per layer, layers, extra (N, K) once (the head)
    "SmolLM2-135M": ([(960, 576), (576, 576), (3072, 576), (576, 1536)], 30, (49152, 576)),
    "Mistral-shaped 0.86B": ([(3072, 2048), (2048, 2048), (11264, 2048), (2048, 5632)], 16,
                             (32768, 2048)),
}


def _best(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def kernels() -> None:
    from souverain import kernels as K
    from souverain.models.int8_linear import _HAS_QLINEAR, _vnni_comp, _vnni_pack

    vnni = K.has_vnni()
    print("| model | rows | _int_mm ms (GB/s) | oneDNN packed ms (GB/s) "
          "| souverain VNNI ms (GB/s) |\n|---|---:|---:|---:|---:|")
    for name, (shapes, layers, head) in SHAPES.items():
        mats, ours = [], []
        for n, k in shapes * layers + [head]:
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            packed = torch.ops.onednn.qlinear_prepack(w, None) if _HAS_QLINEAR else None
            mats.append((w, packed, torch.rand(n), torch.zeros(1, dtype=torch.long)))
            if vnni:
                v = _vnni_pack(w)
                ours.append((v, _vnni_comp(v), torch.rand(v.shape[0] * 16), n, k))
        total = sum(w.numel() for w, *_ in mats)
        for m in (1, 2, 32, 1024):
            xs = {k: torch.randint(-127, 128, (m, k), dtype=torch.int8) for _, k in shapes + [head]}
            xu = {k: (x.to(torch.int16) + 128).to(torch.uint8) for k, x in xs.items()}

            def int_mm(mats=mats, xs=xs):
                for w, *_ in mats:
                    torch._int_mm(xs[w.shape[1]], w.t())

            def packed(mats=mats, xu=xu):
                for w, p, s, z in mats:
                    torch.ops.onednn.qlinear_pointwise(xu[w.shape[1]], 1.0, 128, p, s, z, None,
                                                       1.0, 0, torch.float32, "none", [], "")

            # the VNNI kernel is the whole linear: m/2 float rows in, quantized into their two
            # planes (m plane rows, as the other columns), the epilogue included
            xf = {k: torch.randn(m // 2, k) for _, k in shapes + [head]}

            def own(ours=ours, xf=xf):
                for v, c, s, n, k in ours:
                    K.int8_linear(xf[k], v, c, s, n)

            a = _best(int_mm)
            cell = own_cell = "n/a"
            if _HAS_QLINEAR:
                b = _best(packed)
                cell = f"{b * 1e3:.1f} ({total / b / 1e9:.1f})"
            if vnni and m >= 2:
                c = _best(own)
                own_cell = f"{c * 1e3:.1f} ({total / c / 1e9:.1f})"
            print(f"| {name} | {m} | {a * 1e3:.1f} ({total / a / 1e9:.1f}) | {cell} | {own_cell} |")


def linears() -> None:
    from souverain.models.int4_linear import Int4Linear
    from souverain.models.int8_linear import Int8Linear

    print("\n| model | rows | fp32 F.linear ms | Int8Linear ms | Int4Linear ms |\n"
          "|---|---:|---:|---:|---:|")
    for name, (shapes, layers, _head) in SHAPES.items():
        mods = []
        for _ in range(layers):
            for n, k in shapes:
                w = torch.randn(n, k) * 0.02
                mods.append((w, Int8Linear.from_float(w), Int4Linear.from_float(w)))
        for m in (1, 16, 512) if layers == 30 else (1, 16):  # int4 at 512 rows of 0.86B: minutes
            xs = {k: torch.randn(m, k) for _, k in shapes}
            xb = {k: x.bfloat16() for k, x in xs.items()}
            f = _best(lambda mods=mods, xs=xs: [F.linear(xs[w.shape[1]], w) for w, _, _ in mods], 2)
            i8 = _best(lambda mods=mods, xs=xs: [q(xs[w.shape[1]]) for w, q, _ in mods], 2)
            i4 = _best(lambda mods=mods, xb=xb: [q(xb[w.shape[1]]) for w, _, q in mods], 2)
            print(f"| {name} | {m} | {f * 1e3:.1f} | {i8 * 1e3:.1f} | {i4 * 1e3:.1f} |")


def accuracy() -> None:
    from souverain.llm import LLM

    llm = LLM("smollm2-135m-instruct", dtype="float32", threads=torch.get_num_threads())
    model = llm.model
    prompts = [llm.encode(p) for p in ("Write a long story about a robot who learns to paint.",
                                       "What is the capital of France? Explain its history.",
                                       "def fibonacci(n):")]
    refs = [llm.logits(p).float() for p in prompts]
    linears_ = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def one_plane(x):
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        return (x / s).round() * s

    def two_planes(x):
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        xs = x / s
        hi = xs.round()
        return (hi + ((xs - hi) * 254).round() / 254) * s

    def rel(act=None) -> str:
        hooks = [m.register_forward_pre_hook(lambda mod, inp: (act(inp[0]),))
                 for m in linears_.values()] if act else []
        try:
            errs = [((llm.logits(p).float() - r).norm() / r.norm()).item()
                    for p, r in zip(prompts, refs)]
        finally:
            for h in hooks:
                h.remove()
        return " / ".join(f"{e:.4f}" for e in errs)

    print("\n| scheme (SmolLM2-135M, every block linear) | logits rel. RMS vs fp32 (3 prompts) |"
          "\n|---|---|")
    print(f"| int8 activations, one plane per row (float weights) | {rel(one_plane)} |")
    print(f"| int8 activations, two planes per row (float weights) | {rel(two_planes)} |")
    with torch.no_grad():
        for m in linears_.values():
            w = m.weight.data
            s = w.abs().amax(1, keepdim=True) / 127
            m.weight.data = (w / s).round() * s
    print(f"| int8 weights per channel, float activations | {rel()} |")
    print(f"| int8 weights + one plane | {rel(one_plane)} |")
    print(f"| int8 weights + two planes (`Int8Linear`) | {rel(two_planes)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-accuracy", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        kernels()
        linears()
    if not a.skip_accuracy:
        accuracy()


if __name__ == "__main__":
    main()
