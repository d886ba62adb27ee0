"""Provable on-premises operation: serve + ingest + ask inside a network namespace that has only
`lo` (``unshare --net --map-root-user``). The kernel itself refuses any other destination, so
this does not rely on our socket guard (tests/conftest.py), which it complements: the guard
names the culprit in-process, the namespace proves nothing else got out either."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    r = subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return f"this kernel refuses unprivileged network namespaces: {r.stderr.strip()}"
    return None


def test_serve_ingest_ask_with_only_loopback(tmp_path: Path) -> None:
    why = _unshare_works()
    if why:
        pytest.skip(why)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["unshare", "--net", "--map-root-user", sys.executable,
                        str(HERE / "offline_flow.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for line in ("namespace has only ['lo']", "library create + add", "ask cites handbook.md",
                 "serve: upload, grounded chat, embeddings", "ok all"):
        assert line in out, out
