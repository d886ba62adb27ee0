"""Where souverain writes its data on this machine (one root, shown by `souverain doctor`).

``$SOUVERAIN_HOME`` if set, else ``$XDG_DATA_HOME/souverain``, else
``~/.local/share/souverain``. Under it: ``libraries/`` (document libraries: SQLite metadata
and the LanceDB tables) and ``audit/`` (the audit log, when enabled).
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
