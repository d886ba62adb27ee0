"""The read-bandwidth reference of the "GB/s (% bound)" column, measured in its own child
process like the engines."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def measure_bandwidth(threads: int, mb: int) -> dict[str, Any]:
    """Read bandwidth over ``mb`` MiB of float32, two ways: ``sum`` (a pure stream) and a
    matrix-vector product (the decode kernel itself; it reads faster here, ~32 vs ~24-28 GB/s).
    The bound used for "% bound" is the best of both."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    w = x.view(1024, -1)
    v = torch.ones(w.shape[1])
    nbytes = x.numel() * 4
    out: dict[str, Any] = {"tensor_mb": nbytes / 1e6, "threads": threads}
    readers: tuple[tuple[str, Callable[[], object]], ...] = (
        ("sum", x.sum), ("gemv", lambda: torch.mv(w, v)))
    for name, fn in readers:
        fn()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[f"{name}_gbs_best"] = nbytes / min(times) / 1e9
        out[f"{name}_gbs_median"] = nbytes / statistics.median(times) / 1e9
    out["read_gbs_best"] = max(out["sum_gbs_best"], out["gemv_gbs_best"])
    out["read_gbs_median"] = max(out["sum_gbs_median"], out["gemv_gbs_median"])
    return out
