"""Decode attention alone: `kernels.paged_attention` (one query per sequence, reading its keys and
values in place from scattered KV pages) vs the gather + SDPA it replaced.

    python benchmarks/decode_attention.py [--threads 2]

SmolLM2's shape (9 query heads over 3 kv heads, head_dim 64) and a Mistral-7B-like one (32 over
8, head_dim 128), float32 and bfloat16 caches, pages of 16 tokens in a random order. Prints the
median microseconds per call of each and the largest difference from a float64 SDPA.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from souverain import kernels


def _median_us(fn, n: int = 300) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit("the fused kernels are not built here (see `souverain doctor`).")
    g = torch.Generator().manual_seed(0)
    bs = 16
    print(f"{'shape':>18} {'dtype':>9} {'batch x keys':>13} {'kernel us':>10} "
          f"{'gather+SDPA us':>15} {'max |err|':>10}")
    for H, KVH, D in ((9, 3, 64), (32, 8, 128)):
        for dt in (torch.float32, torch.bfloat16):
            for B, L in ((1, 200), (16, 300), (1, 2000)):
                W = (L + bs - 1) // bs
                n_blocks = B * W + 1
                kc = torch.randn(n_blocks * bs, KVH, D, generator=g).to(dt)
                vc = torch.randn(n_blocks * bs, KVH, D, generator=g).to(dt)
                tables = (torch.randperm(n_blocks - 1, generator=g)[:B * W] + 1).view(B, W)
                lo = torch.zeros(B, dtype=torch.long)
                hi = torch.full((B,), L, dtype=torch.long)
                q = torch.randn(B, H, D, generator=g).to(dt)

                def gathered(cache):
                    return (cache.view(-1, bs, KVH, D).index_select(0, tables.view(-1))
                            .view(B, W * bs, KVH, D)[:, :L].transpose(1, 2))

                qg = q.view(B, KVH, H // KVH, D)
                ref = F.scaled_dot_product_attention(
                    qg.double(), gathered(kc).double(), gathered(vc).double()).reshape(B, H, D)
                out = kernels.paged_attention(q, kc, vc, tables, lo, hi, bs)
                err = (out.double() - ref).abs().max().item()
                t_kernel = _median_us(
                    lambda: kernels.paged_attention(q, kc, vc, tables, lo, hi, bs))
                t_sdpa = _median_us(lambda: F.scaled_dot_product_attention(
                    qg, gathered(kc), gathered(vc)))
                print(f"{f'{H}/{KVH} heads, D {D}':>18} {str(dt).split('.')[1]:>9} "
                      f"{f'{B} x {L}':>13} {t_kernel:10.1f} {t_sdpa:15.1f} {err:10.2e}")


if __name__ == "__main__":
    main()
