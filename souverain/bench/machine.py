"""What else the machine is doing while the bench runs: the load average, the CPU share of
other processes between two samples of ``/proc/stat``, and the wait for a quiet machine.

Standard library only (the parent process imports it before any engine).
"""

from __future__ import annotations

import os
import time

from souverain.bench.measure import log


def loadavg() -> float | None:
    """The 1-minute load average, or None where /proc is absent."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot (``/proc/stat``; steal time
    counts as busy: it is capacity this machine did not get)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / hz, sum(vals) / hz


def others_share(before: tuple[float, float] | None, after: tuple[float, float] | None,
                 own_cpu: float = 0.0) -> float | None:
    """Share of the machine's CPU capacity used by other processes between two samples."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return max(0.0, (after[0] - before[0] - own_cpu) / (after[1] - before[1]))


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float | None:
    """Sample other processes' CPU share for 3 s; while it is above ``threshold``, wait (at
    most ``max_wait`` seconds in all). Returns the last sample."""
    waited = 0.0
    while True:
        a = cpu_seconds()
        time.sleep(3)
        share = others_share(a, cpu_seconds())
        if share is None or share < threshold or waited >= max_wait:
            if share is not None and share >= threshold:
                log(f"other processes use {100 * share:.0f}% of the CPUs: timings will be noisy")
            return share
        log(f"other processes use {100 * share:.0f}% of the CPUs; waiting for a quiet machine")
        time.sleep(20)
        waited += 23
