"""Where souverain writes its data on this machine (one root, shown by `souverain doctor`).

``$SOUVERAIN_HOME`` if set, else ``$XDG_DATA_HOME/souverain``, else
``~/.local/share/souverain``. Under it: ``libraries/`` (document libraries: SQLite metadata
and the LanceDB tables) and ``audit/`` (the audit log, when enabled).

What can be rebuilt goes to the cache instead: ``$SOUVERAIN_CACHE`` if set, else
``$XDG_CACHE_HOME/souverain``, else ``~/.cache/souverain``; under it ``kernels/`` (the fused
CPU kernels compiled on this machine).

One server per data folder: `DataDirLock` (an flock on ``server.lock`` in the data folder,
held for the server's life; the kernel drops it when the process ends, kill -9 included).
Servers that cooperate share a jobs database (``--jobs-db``), each with its own data folder.
"""

from __future__ import annotations

import fcntl
import json
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


SERVER_LOCK = "server.lock"


class DataDirLock:
    """The exclusive `flock` a server holds on ``ROOT/server.lock`` for its life, so a second
    server on the same data folder refuses to start (`DataDirInUse`) instead of sharing its
    libraries, audit log and jobs database unannounced. The file says who holds it (pid,
    URL); the lock itself, not the file, is the truth: a holder killed with -9 leaves the file
    and no lock, and the next server takes it at once."""

    def __init__(self, root: Path | None = None, *, url: str | None = None):
        self.root = root or data_home()
        self.path = self.root / SERVER_LOCK
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = server_holding(self.root)
            who = f" ({holder})" if holder else ""
            raise DataDirInUse(
                f"Another souverain server{who} already uses the data folder {self.root}; "
                "stop it, or start this one with its own --data-dir (servers cooperate "
                "through a shared PostgreSQL --jobs-db, each with its own data folder)."
            ) from None
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "url": url}).encode() + b"\n")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (the file stays: unlinking it could race a new holder)
            self._fd = None


class DataDirInUse(Exception):
    """A running server holds this data folder's `DataDirLock` (the message is one sentence
    naming --data-dir; the CLI prints it and exits 2)."""


def server_holding(root: Path | None = None) -> str | None:
    """``"pid N, URL"`` of the server holding ``root``'s `DataDirLock` (``"pid N"`` when it
    gave no URL), or None when no server holds it (or the folder has no lock file)."""
    path = (root or data_home()) / SERVER_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: read who holds it
            try:
                info = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            pid, url = info.get("pid"), info.get("url")
            if not pid:
                return "pid unknown"
            return f"pid {pid}, {url}" if url else f"pid {pid}"
        return None
    finally:
        os.close(fd)
