"""Median time of one `LLMEngine.step()` in steady decode, on the bundled SmolLM2, and where it
goes (torch.profiler, --profile).

    python benchmarks/engine_step.py --quantization int4 --batch 1
    python benchmarks/engine_step.py --quantization int8 --batch 16 --profile
    SOUVERAIN_KERNELS=0 python benchmarks/engine_step.py ...   # without the fused C++ kernels

`batch` requests of 60..(60 + 7 * batch) prompt tokens decode greedily (EOS ignored); after 20
warm-up steps, 60 steps are timed one by one.
"""

from __future__ import annotations

import argparse
import time

from souverain.engine import EngineConfig, LLMEngine
from souverain.engine.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantization", default="int4", choices=["none", "int8", "int4"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table")
    a = ap.parse_args()
    engine = LLMEngine(a.model, EngineConfig(quantization=a.quantization, threads=a.threads))
    prompt = list(range(1000, 1000 + 60 + 7 * a.batch))
    for i in range(a.batch):
        engine.add_request(f"r{i}", prompt[:60 + 7 * i],
                           SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    for _ in range(20):
        engine.step()
    times = []
    for _ in range(60):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"{a.quantization}, batch {a.batch}: step median {times[30] * 1e3:.2f} ms, "
          f"min {times[0] * 1e3:.2f} ms")
    if a.profile:
        from torch.profiler import profile

        with profile() as p:
            for _ in range(20):
                engine.step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
