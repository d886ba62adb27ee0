"""Start a real `souverain serve` process on 127.0.0.1 for tests, and stop it cleanly.

`ServerProcess` runs the CLI in a subprocess (exactly what a user runs), waits for ``/health``,
keeps its log (so tests can check what was logged) and stops it with SIGTERM, which makes
uvicorn drain in-flight requests before the process exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, startup_timeout: float = 180.0, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="souverain-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "souverain.cli", "serve", *args, "--port", str(self.port),
               "--host", "127.0.0.1"]
        env = {**os.environ, **(env or {})}
        if "--data-dir" not in args and env.get("SOUVERAIN_HOME") == env.get(
                "SOUVERAIN_TEST_SHARED_HOME"):
            # the test suite's shared home: each server gets its own data folder (a second
            # server on one folder is refused), as a user running two servers must do
            env["SOUVERAIN_HOME"] = tempfile.mkdtemp(prefix="souverain-serve-home-")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"souverain serve exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"souverain serve did not start in {startup_timeout} s:\n"
                                   f"{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """``/metrics`` samples as ``{'name{labels}': value}`` (labels sorted as exported)."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out
