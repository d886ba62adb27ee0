"""Start a real `souverain serve` process on 127.0.0.1 for tests, and stop it cleanly.

`ServerProcess` is `souverain.eval.target.ServerProcess` (what `souverain eval` uses to serve a
local model): it runs the CLI in a subprocess (exactly what a user runs), waits for
``/health``, keeps its log (so tests can check what was logged) and stops it with SIGTERM,
which makes uvicorn drain in-flight requests before the process exits. Here it also gives each
server started on the test suite's shared home a data folder of its own, and reads /metrics.
"""

from __future__ import annotations

import os
import tempfile

import httpx

from souverain.eval.target import ServerProcess as _ServerProcess
from souverain.eval.target import free_port

__all__ = ["ServerProcess", "free_port"]


class ServerProcess(_ServerProcess):
    def __init__(self, *args: str, startup_timeout: float = 180.0, env: dict | None = None):
        env = {**os.environ, **(env or {})}
        if "--data-dir" not in args and env.get("SOUVERAIN_HOME") == env.get(
                "SOUVERAIN_TEST_SHARED_HOME"):
            # the test suite's shared home: each server gets its own data folder (a second
            # server on one folder is refused), as a user running two servers must do
            env["SOUVERAIN_HOME"] = tempfile.mkdtemp(prefix="souverain-serve-home-")
        super().__init__(*args, startup_timeout=startup_timeout, env=env)

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """``/metrics`` samples as ``{'name{labels}': value}`` (labels sorted as exported)."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out
