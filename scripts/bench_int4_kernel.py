"""Per-call speed of the two int4 kernels on this CPU: souverain's q4 layout
(`torch.ops.souverain.q4_linear`) against PyTorch's (`aten._weight_int4pack_mm_for_cpu`, bf16
activations), on the same codes, at 1/4/16/128 rows, for SmolLM2's and Mistral 7B's matrix
shapes. Prints microseconds per call, the ratio and the q4 weight read rate.

    .venv/bin/python scripts/bench_int4_kernel.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import souverain.models.int4_linear as il
from souverain.models.int4_linear import Int4Linear

SHAPES = [(3456, 576), (576, 1536), (49152, 576), (4096, 4096), (28672, 4096)]


def per_call_us(lin: Int4Linear, x: torch.Tensor, calls: int) -> float:
    for _ in range(5):
        lin(x)
    t = time.perf_counter()
    for _ in range(calls):
        lin(x)
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not il.q4_kernel():
        raise SystemExit("souverain's q4 kernel is not available on this CPU/setting")
    print(f"torch {torch.__version__}, {args.threads} threads")
    for n, k in SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scales = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
        zeros = torch.randn(n, k // 32, generator=g) * 0.05
        q4 = Int4Linear.from_int4(q, scales, zeros, 32)
        os.environ["SOUVERAIN_INT4_KERNEL"] = "aten"
        il._q4.clear()
        aten = Int4Linear.from_int4(q, scales, zeros, 32)
        del os.environ["SOUVERAIN_INT4_KERNEL"]
        il._q4.clear()
        il.q4_kernel()
        assert (q4.layout, aten.layout) == ("q4", "aten")
        for m in (1, 4, 16, 128):
            x = torch.randn(m, k).bfloat16()
            calls = 10 if n * k * m > 1e9 else 100
            a = per_call_us(aten, x, calls)
            b = per_call_us(q4, x, calls)
            gbs = n * k / 2 / 1e9 / (b * 1e-6)
            print(f"{n:>6} x {k:<5} rows {m:>3}: aten {a:8.0f} us  q4 {b:8.0f} us  "
                  f"({a / b:.2f}x; q4 reads the weights at {gbs:.1f} GB/s)")


if __name__ == "__main__":
    main()
