"""The parent side of one bench run: write its spec, start ``python -m souverain.bench.child``
in a fresh interpreter, wait for it (with a timeout), and read its result back with the
child's wall and CPU time and the CPU share other processes took meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from souverain.bench.machine import cpu_seconds, others_share


def launch(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one child (``spec["run"]`` names the engine) and return its result; a timeout or a
    child that died without a result gives ``{"label", "engine", "error"}``."""
    import resource  # POSIX only: deferred so that importing the bench works everywhere

    with tempfile.TemporaryDirectory(prefix="souverain-bench-") as d:
        spec_path, out_path = Path(d) / "spec.json", Path(d) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
                   TOKENIZERS_PARALLELISM="false")
        label, engine = spec["run"]["label"], spec["run"]["engine"]
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = usage.ru_utime + usage.ru_stime
        stat0 = cpu_seconds()
        t = time.perf_counter()
        try:
            returncode = _run_child(spec_path, out_path, env, timeout)
        except subprocess.TimeoutExpired:
            return {"label": label, "engine": engine, "error": f"timed out after {timeout:.0f} s"}
        if not out_path.is_file():
            return {"label": label, "engine": engine,
                    "error": f"the subprocess exited with code {returncode} and no result"}
        res: dict[str, Any] = json.loads(out_path.read_text())
        res["child_s"] = time.perf_counter() - t
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = usage.ru_utime + usage.ru_stime - cpu0
        res["child_cpu_s"] = own
        res["others_cpu_share"] = others_share(stat0, cpu_seconds(), own)
        return res


def _run_child(spec_path: Path, out_path: Path, env: dict[str, str], timeout: float) -> int:
    """The child's output (progress, warnings) goes straight to our stderr; where stderr is
    not a real file (pytest captures it) it is collected and echoed afterwards."""
    try:
        sys.stderr.fileno()
        live = True
    except (AttributeError, OSError, ValueError):
        live = False
    proc = subprocess.run(
        [sys.executable, "-m", "souverain.bench.child", str(spec_path), str(out_path)],
        env=env, timeout=timeout, stdout=sys.stderr if live else subprocess.PIPE,
        stderr=None if live else subprocess.STDOUT, text=None if live else True)
    if not live and proc.stdout:
        sys.stderr.write(proc.stdout)
    return proc.returncode
