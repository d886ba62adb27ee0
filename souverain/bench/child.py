"""The child side of one bench run: ``python -m souverain.bench.child SPEC RESULT`` reads the
run's spec (JSON written by `souverain.bench.launch`), runs that engine's runner or the
bandwidth probe, and writes the result (JSON). A failure becomes the result's ``error``.

Only the asked engine's module is imported: the llama.cpp child never imports torch, so its
RSS is llama.cpp's own.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from souverain.bench.measure import rss

Runner = Callable[[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]], None]


def child_main(spec_path: Path, out_path: Path) -> None:
    """Run the spec at ``spec_path``; the result goes to ``out_path``, whatever happens."""
    spec = json.loads(spec_path.read_text())
    run, work = spec["run"], spec["workload"]
    result: dict[str, Any] = {"label": run["label"], "engine": run["engine"], "notes": []}
    os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    try:
        if run["engine"] == "bandwidth":
            from souverain.bench.run_bandwidth import measure_bandwidth

            result.update(measure_bandwidth(spec["threads"], spec["bandwidth_mb"]))
        else:
            result["rss_start"] = rss()
            _runner(run["engine"])(spec, run, work, result)
            result["peak_rss"] = rss("VmHWM:")
    except Exception as exc:  # report and keep the other engines going
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    out_path.write_text(json.dumps(result))


def _runner(engine: str) -> Runner:
    if engine == "souverain":
        from souverain.bench.run_souverain import run_souverain

        return run_souverain
    if engine == "llama.cpp":
        from souverain.bench.run_llama_cpp import run_llama

        return run_llama
    if engine == "transformers":
        from souverain.bench.run_transformers import run_transformers

        return run_transformers
    raise KeyError(engine)


if __name__ == "__main__":
    child_main(Path(sys.argv[1]), Path(sys.argv[2]))
