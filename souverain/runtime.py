"""Process-wide runtime choices: CPU threads and the default dtype."""

from __future__ import annotations

import os

import torch


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share a core's FPU, and
    decode is bandwidth bound, so extra SMT threads only add contention)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo") as f:
            proc = phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    proc = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and proc is not None:
                    if proc in allowed:
                        cores.add((phys or "0", core or str(proc)))
                    proc = phys = core = None
            if proc is not None and proc in allowed:
                cores.add((phys or "0", core or str(proc)))
    except OSError:
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: physical cores) and return the count."""
    n = threads or int(os.environ.get("SOUVERAIN_THREADS", 0)) or physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_dtype(n_params: int) -> str:
    """float32 (exact, and fastest on CPUs without native bf16) when the fp32 weights take at
    most 40% of available memory; bfloat16 otherwise (a 7B model on a 24 GiB machine)."""
    avail = available_memory()
    if avail and n_params * 4 > 0.4 * avail:
        return "bfloat16"
    return "float32"
