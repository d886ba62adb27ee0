"""`souverain plan measure`: one replica's throughput / latency curve and memory figures,
measured in this process with the real engine (`LLMEngine`, continuous batching), written as
the profile `souverain plan predict` reads (`souverain.bench.capacity`).

At each concurrency N the engine is kept at N requests in flight (closed loop, no think time):
a ramp of N requests with staggered answer lengths first, so that later arrivals are spread
over the steps as a steady load spreads them, then ``rounds`` x N measured requests, each
submitted when one finishes. Per level: aggregate decode tok/s over the steps run with N
sequences in flight (their prefills included), TTFT p50/p95 of the measured requests (arrival
-> first token, engine clock), time per output token p50/p95 ((t_last - t_first) / (n - 1)).
Before the levels: prefill tok/s of one prompt (best of 2 distinct prompts: no prefix-cache
hit), and the read bandwidth (the bench's probe).
"""

from __future__ import annotations

import itertools
import os
import platform
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from souverain.bench.bytes_per_token import find_module, torch_bytes_per_token
from souverain.bench.capacity import PROFILE_VERSION
from souverain.bench.machine import cpu_seconds, loadavg, others_share
from souverain.bench.measure import percentile, prefill_rate, rss

if TYPE_CHECKING:
    from souverain.engine import LLMEngine

Progress = Callable[[str, int, int], None]  # (what, done, total)


def machine_info() -> dict[str, Any]:
    """CPU model, logical CPUs, physical cores, RAM of this machine."""
    from souverain.runtime import physical_cores

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx2", "avx512f", "avx512_vnni", "amx_tile")
                             if x in have]
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_flags": flags, "logical_cpus": os.cpu_count() or 1,
            "physical_cores": physical_cores(), "memory_bytes": ram,
            "python": platform.python_version()}


def measure_profile(model: str, *, quantization: str = "none", dtype: str = "auto",
                    threads: int | None = None, concurrency: list[int],
                    prompt_tokens: int = 64, answer_tokens: int = 16, rounds: int = 2,
                    tensor_parallel: int = 1, bandwidth_mb: int = 256, seed: int = 0,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Load ``model`` and measure the profile (see the module docstring)."""
    import torch

    import souverain
    from souverain.bench.run_bandwidth import measure_bandwidth
    from souverain.engine import EngineConfig, LLMEngine
    from souverain.runtime import physical_cores

    threads = threads or physical_cores()
    report = progress or (lambda what, done, total: None)
    report("loading the model", 0, 1)
    rss_before = rss()
    t = time.perf_counter()
    engine = LLMEngine(model, EngineConfig(
        dtype=dtype, quantization=quantization, threads=threads,
        max_num_seqs=max(concurrency), max_num_batched_tokens=512,
        tensor_parallel=tensor_parallel))
    load_s = time.perf_counter() - t
    rss_load = rss()
    args = engine.args
    module = find_module(engine) if tensor_parallel == 1 else None
    prof: dict[str, Any] = {
        "version": PROFILE_VERSION, "souverain": souverain.__version__, "model": model,
        "quantization": quantization, "dtype": str(engine.dtype).replace("torch.", ""),
        "threads": threads, "tensor_parallel": tensor_parallel,
        "prompt_tokens": prompt_tokens, "answer_tokens": answer_tokens, "rounds": rounds,
        "machine": machine_info(), "load_s": load_s,
        "model_args": {"n_layers": args.n_layers, "dim": args.dim, "n_heads": args.n_heads,
                       "n_kv_heads": args.n_kv_heads, "head_dim": args.head_dim,
                       "vocab_size": args.vocab_size},
        "memory": {"weight_bytes": int(engine.weight_bytes()),
                   "kv_bytes_per_token": int(engine.kv_bytes_per_token),
                   "kv_cache_tokens": int(engine.kv_tokens),
                   "rss_before_load_bytes": rss_before, "rss_after_load_bytes": rss_load},
    }
    if module is not None:
        prof["memory"]["bytes_read_per_token"] = torch_bytes_per_token(module)
    report("measuring read bandwidth", 0, 1)
    bw = measure_bandwidth(threads, bandwidth_mb)
    torch.set_num_threads(threads)  # the probe set it too; keep the engine's
    prof["machine"]["read_gbs"] = bw["read_gbs_best"]
    rng = random.Random(seed)
    low = min(1000, args.vocab_size // 4)

    def ids(n: int) -> list[int]:
        return [rng.randrange(low, args.vocab_size) for _ in range(n)]

    loop = _ClosedLoop(engine)
    before, own = cpu_seconds(), _own_cpu()
    # warm-up (kernels, allocator, batch shapes): a short level at the highest concurrency
    loop.run_level(max(concurrency), ids, min(prompt_tokens, 16), 4, 1)
    report("prefill", 0, 1)
    prof["prefill_tok_s"] = prefill_rate([ids(prompt_tokens) for _ in range(2)],
                                         lambda p: loop.first_token_seconds(p))
    curve = []
    for i, n in enumerate(concurrency):
        report(f"concurrency {n}", i, len(concurrency))
        curve.append(loop.run_level(n, ids, prompt_tokens, answer_tokens, rounds))
    report("done", len(concurrency), len(concurrency))
    prof["curve"] = curve
    prof["memory"]["rss_peak_bytes"] = rss("VmHWM:")
    prof["preemptions"] = engine.stats()["preemptions"]
    engine.close()  # the ranks' CPU time counts as this process's children's once they end
    # what else ran meanwhile: the curve is only as good as the machine was quiet
    prof["others_cpu_share"] = others_share(before, cpu_seconds(), _own_cpu() - own)
    prof["loadavg_after"] = loadavg()
    return prof


def _own_cpu() -> float:
    """CPU seconds of this process and its children (the tensor-parallel ranks)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class _ClosedLoop:
    """Keeps N greedy requests (EOS ignored) in flight on the engine and times every step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tags = itertools.count()

    def first_token_seconds(self, prompt: list[int]) -> float:
        from souverain.engine import SamplingParams

        tag = f"p{next(self.tags)}"
        t = time.perf_counter()
        self.engine.add_request(tag, prompt, SamplingParams(max_tokens=1, temperature=0.0,
                                                            ignore_eos=True))
        first = None
        while self.engine.has_unfinished():
            for o in self.engine.step():
                if first is None and o.outputs[0].token_ids:
                    first = time.perf_counter()
        return (first or time.perf_counter()) - t

    def run_level(self, n: int, ids: Callable[[int], list[int]], prompt_tokens: int,
                  answer_tokens: int, rounds: int) -> dict[str, Any]:
        from souverain.engine import SamplingParams

        # the ramp: N requests whose answers end at staggered steps, so that the measured
        # requests (submitted as ramp ones finish) arrive spread out, as under steady load
        queue: list[tuple[int, bool]] = [
            (max(1, round(answer_tokens * (i + 1) / n)), False) for i in range(n)]
        queue += [(answer_tokens, True)] * (n * rounds)
        arrival: dict[str, float] = {}
        stamps: dict[str, list[float]] = {}
        measured: set[str] = set()
        seen: dict[str, int] = {}
        in_flight = 0
        full_time = 0.0
        full_tokens = 0
        level = next(self.tags)
        counter = itertools.count()

        def submit() -> None:
            nonlocal in_flight
            max_tokens, is_measured = queue.pop(0)
            rid = f"c{level}-{next(counter)}"
            arrival[rid] = time.perf_counter()
            stamps[rid], seen[rid] = [], 0
            if is_measured:
                measured.add(rid)
            self.engine.add_request(rid, ids(prompt_tokens), SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            in_flight += 1

        while queue and in_flight < n:
            submit()
        while self.engine.has_unfinished():
            before = in_flight
            t = time.perf_counter()
            outs = self.engine.step()
            now = time.perf_counter()
            emitted = 0
            for o in outs:
                k = len(o.outputs[0].token_ids)
                emitted += k - seen[o.request_id]
                stamps[o.request_id].extend([now] * (k - seen[o.request_id]))
                seen[o.request_id] = k
                if o.finished:
                    in_flight -= 1
            if before == n:
                full_time += now - t
                full_tokens += emitted
            while queue and in_flight < n:
                submit()
        ttft = [stamps[r][0] - arrival[r] for r in measured] or [0.0]
        tpot = [(stamps[r][-1] - stamps[r][0]) / (len(stamps[r]) - 1)
                for r in measured if len(stamps[r]) > 1]
        total = sum(len(stamps[r]) for r in measured)
        return {"concurrency": n, "requests": len(measured), "new_tokens": total,
                "decode_tok_s": full_tokens / full_time if full_time > 0 else 0.0,
                "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
                "tpot_p50_s": percentile(tpot, 50) if tpot else 0.0,
                "tpot_p95_s": percentile(tpot, 95) if tpot else 0.0,
                "steady_seconds": full_time}
