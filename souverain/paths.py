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

A process's liveness, for work it owns in a shared database (a fine-tuning job, a document
being ingested, an erasure): `OwnerLock` (an flock on ``<token>.lock`` in a folder of its
kind, held for the owner's life).
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
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


class OwnerLock:
    """A process's liveness, as the kernel sees it: an exclusive `flock` on
    ``<dir>/<token>.lock`` held for the owner's life. The kernel drops it when the process
    ends however it ends (kill -9 included), so a free lock means a dead owner, even where its
    pid now names another process (pid reuse, a container restarted with the same pids).
    The fine-tuning worker (`souverain.finetune.store.WorkerLock`), the batch runner and the
    document libraries' ingestions each keep theirs in their own folder."""

    def __init__(self, owners_dir: Path):
        self.token = uuid.uuid4().hex
        owners_dir.mkdir(parents=True, exist_ok=True)
        self.path = owners_dir / f"{self.token}.lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def held(owners_dir: Path, token: str | None) -> bool | None:
        """True if the owner ``token`` is alive, False if it is gone (its lock file is then
        removed), None when there is no lock file to tell (no token, or another machine's
        folder)."""
        if not token or not token.isalnum():
            return None
        path = owners_dir / f"{token}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # (closing drops the lock taken just now, if it was)
        path.unlink(missing_ok=True)
        return False
