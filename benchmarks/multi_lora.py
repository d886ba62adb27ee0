"""Multi-LoRA overhead on the bundled SmolLM2-135M: decode tok/s at batch 8, base vs adapters.

    python benchmarks/multi_lora.py [--rank 16] [--quantization none|int8|int4] [--steps 40]

One engine, one random adapter (every target: wq wk wv wo w1 w2 w3; random weights time the
same as trained ones), 8 requests decoding (32-token prompts). The configurations take turns
step by step, so that all see the same load on a shared machine; tok/s = 8 / step time
(median, and best).

  base        8 base requests (the model runs unwrapped: the LoRA path is skipped entirely)
  lora x8     8 requests on the adapter (every row one adapter: no gather/scatter)
  lora x4+4   4 on the adapter, 4 base (index_select / index_add_ of the adapter's rows)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from souverain import EngineConfig, LLMEngine, SamplingParams
from souverain.weights.adapter import LoRAAdapter


def random_adapter(engine: LLMEngine, rank: int) -> LoRAAdapter:
    a = engine.args
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    shapes = {"attention.wq": (q, a.dim), "attention.wk": (kv, a.dim),
              "attention.wv": (kv, a.dim), "attention.wo": (a.dim, q),
              "feed_forward.w1": (a.hidden_dim, a.dim), "feed_forward.w2": (a.dim, a.hidden_dim),
              "feed_forward.w3": (a.hidden_dim, a.dim)}
    gen = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.{m}": (torch.randn(rank, n_in, generator=gen) * 0.01,
                                   torch.randn(n_out, rank, generator=gen) * 0.01)
               for i in range(a.n_layers) for m, (n_out, n_in) in shapes.items()}
    return LoRAAdapter(rank, 2.0, weights, name="bench")


def interleaved_step_times(engine: LLMEngine, configs: dict[str, list[str | None]],
                           steps: int) -> dict[str, list[float]]:
    """8 requests decode; before each step their adapter is switched to the next
    configuration's (timing only: the KV of a switched sequence no longer matches one adapter),
    so every configuration is timed step after step under the same machine load."""
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    ids = [engine.add_request(None, [1] + [100 + 7 * i + j for j in range(31)], params)
           for i in range(8)]
    while engine.scheduler.waiting or any(s.num_computed < s.num_tokens - 1
                                          for s in engine.scheduler.running):
        engine.step()  # prefills
    seqs = list(engine.scheduler.running)
    ref = engine.loras.ref("bench")
    times: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(steps + 2):
        for name, loras in configs.items():
            for seq, lora in zip(seqs, loras):
                seq.lora = ref if lora else None
            t = time.perf_counter()
            engine.step()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t)
    for request_id in ids:
        engine.abort(request_id)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quantization", default="none")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    engine = LLMEngine("smollm2-135m-instruct",
                       EngineConfig(quantization=args.quantization, threads=args.threads,
                                    kv_cache_tokens=16384))
    engine.add_lora("bench", random_adapter(engine, args.rank))
    configs = {"base": [None] * 8, "lora x8": ["bench"] * 8,
               "lora x4+4": ["bench", None] * 4}
    times = interleaved_step_times(engine, configs, args.steps)
    print(f"SmolLM2-135M, {args.quantization}, dtype {engine.dtype}, {engine.threads} threads, "
          f"adapter rank {args.rank} on wq wk wv wo w1 w2 w3; batch 8 decode")
    base = 8 / statistics.median(times["base"])
    best = 8 / min(times["base"])
    print(f"{'config':>10} {'tok/s median':>13} {'vs base':>8} {'tok/s best':>11} {'vs base':>8}")
    for name, ts in times.items():
        tps, top = 8 / statistics.median(ts), 8 / min(ts)
        print(f"{name:>10} {tps:13.1f} {tps / base:8.2f} {top:11.1f} {top / best:8.2f}")


if __name__ == "__main__":
    main()
