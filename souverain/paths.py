"""Where souverain writes its data on this machine (one root, shown by `souverain doctor`).

``$SOUVERAIN_HOME`` if set, else ``$XDG_DATA_HOME/souverain``, else
``~/.local/share/souverain``. Under it: ``libraries/`` (document libraries: SQLite metadata
and the LanceDB tables) and ``audit/`` (the audit log, when enabled).

What can be rebuilt goes to the cache instead: ``$SOUVERAIN_CACHE`` if set, else
``$XDG_CACHE_HOME/souverain``, else ``~/.cache/souverain``; under it ``kernels/`` (the fused
CPU kernels compiled on this machine).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    env = os.environ.get("SOUVERAIN_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "souverain"


def libraries_dir(root: Path | None = None) -> Path:
    return (root or data_home()) / "libraries"


def audit_dir(root: Path | None = None) -> Path:
    return (root or data_home()) / "audit"


def cache_home() -> Path:
    env = os.environ.get("SOUVERAIN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "souverain"


def kernels_dir() -> Path:
    return cache_home() / "kernels"
