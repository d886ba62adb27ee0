"""What every engine runner measures, in the same way: RSS, per-token timestamps -> decode
rate, best prefill rate, the concurrency figures (aggregate tok/s, TTFT percentiles); and the
bench's log line.

Standard library only: the llama.cpp child imports it, and its RSS must not include torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rss(field: str = "VmRSS:") -> int:
    """This process's resident memory in bytes (``VmHWM:``: its peak); 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def concurrency_result(n_new: list[int], arrival: list[float], first: list[float],
                       t0: float, t_end: float, mode: str) -> dict[str, Any]:
    """One concurrency level: ``n_new`` tokens per request, each request's arrival and first
    token times, the batch's start and end."""
    ttft = [f - a for f, a in zip(first, arrival)]
    wall = t_end - t0
    return {"requests": len(n_new), "new_tokens": sum(n_new), "wall_s": wall,
            "aggregate_tok_s": sum(n_new) / wall if wall > 0 else 0.0,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "mode": mode}


def decode_rate(stamps: list[float]) -> float:
    """tok/s between the first and the last generated token."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return 0.0
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def prefill_rate(prompts: list[list[int]], seconds: Callable[[list[int]], float]) -> float:
    """tok/s of the fastest prefill: ``seconds(prompt)`` times one prompt's prefill (the
    prompts are distinct, all of the same length, so no prefix cache helps)."""
    best = min(seconds(p) for p in prompts)
    return len(prompts[0]) / best
