"""Document parsing in worker processes: each document within a memory budget and a time limit.

A small upload can take a lot to parse: a 1 MB .docx may expand to 1 GB, an HTML tree takes many
times its bytes, a malformed PDF can send a parser into a loop. None of that may take the
server's memory or hold a request forever, and neither can be bounded inside the server's own
process. So `parse_document` hands the bytes to a worker (``python -m souverain.rag.parse_pool``),
started on first use and kept for the next documents, whose address space is limited
(RLIMIT_AS: what it holds once the parsers are imported, plus the budget) and which SIGALRM
kills past the time limit. A worker answers with the text and its sections, or one error
sentence; a worker out of memory, dead or past the limit is replaced, and the document refused
with a `RAGError` (a 400) naming the limit and the setting that raises it. At most
SOUVERAIN_PARSE_WORKERS documents are parsed at once; other callers wait for a worker.

Settings (environment, read when the first document is parsed):
  SOUVERAIN_PARSE_WORKERS     documents parsed at once (default 2); 0 parses in the calling
                              process with neither bound (debugging only)
  SOUVERAIN_PARSE_MEMORY_MIB  memory one document may take to parse (default 1024)
  SOUVERAIN_PARSE_TIMEOUT_S   seconds one document may take to parse (default 120)
  SOUVERAIN_PARSE_MAX_CHARS   characters of text one document may yield (default 64,000,000)

A plain subprocess rather than `multiprocessing`: the server has threads and torch, so no fork,
and spawn would import the parent's main module again. The worker's answer is JSON and UTF-8,
never pickle: a parser exploited by a document must not be able to run code in the server.
Workers hold no state: they exit when their stdin closes (the parent is gone), and the parent
kills them at exit, so stopping the server never waits on one for longer than a parse.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from souverain.errors import RAGError
from souverain.rag.parse import MIME_TYPES, ParsedDocument, Section, parse_here

MiB = 1 << 20
_LENGTH = struct.Struct("<Q")  # every message: 8-byte length, then that many bytes
_GRACE_S = 30.0  # the parent's backstop past the worker's own alarm (a busy machine)
_EXIT_MEMORY = 3  # a worker's exit status when a document's bytes do not fit its budget


@dataclass(frozen=True)
class Limits:
    workers: int = 2
    memory_mib: int = 1024
    timeout_s: float = 120.0
    max_chars: int = 64_000_000

    @classmethod
    def from_env(cls) -> Limits:
        def read(var: str, kind: type, default: Any, low: float) -> Any:
            raw = os.environ.get(var, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or value < low:
                raise RAGError(f"{var}={raw!r} is not a valid setting; use a number of at "
                               f"least {low:g}, or unset it for the default ({default}).")
            return value

        d = cls()
        return cls(read("SOUVERAIN_PARSE_WORKERS", int, d.workers, 0),
                   read("SOUVERAIN_PARSE_MEMORY_MIB", int, d.memory_mib, 16),
                   read("SOUVERAIN_PARSE_TIMEOUT_S", float, d.timeout_s, 0.1),
                   read("SOUVERAIN_PARSE_MAX_CHARS", int, d.max_chars, 1))


def parse(data: bytes, name: str, ext: str) -> ParsedDocument:
    """Parse in the default pool (SOUVERAIN_PARSE_* settings), or here when it has no worker."""
    pool = default_pool()
    if pool.limits.workers == 0 or os.name != "posix":
        try:
            return _checked_size(parse_here(data, name, ext), name, pool.limits.max_chars)
        except MemoryError:
            raise RAGError(f"{name}: there is not enough memory to parse the document; split "
                           "it into smaller files.") from None
    return pool.parse(data, name, ext)


class ParsePool:
    """Up to `limits.workers` worker processes, each parsing one document at a time."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self._slots = threading.BoundedSemaphore(max(1, self.limits.workers))
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()

    def parse(self, data: bytes, name: str, ext: str) -> ParsedDocument:
        """The document's `ParsedDocument`, or a `RAGError` saying why not (see the module)."""
        with self._slots:
            worker = self._take()
            try:
                meta, text = worker.call({"name": name, "ext": ext}, data, self.limits.timeout_s)
            except _WorkerLost as lost:
                self._drop(worker)
                raise RAGError(self._lost_sentence(name, lost)) from None
            except BaseException:  # KeyboardInterrupt mid-call: the conversation is broken
                self._drop(worker)
                raise
            if meta.get("retire"):  # it grew, or ran out of memory: a fresh one next time
                self._drop(worker, wait=True)
            else:
                with self._lock:
                    self._idle.append(worker)
        return _document(meta, text, name)

    def pids(self) -> list[int]:
        """The live workers' process ids (for tests and diagnostics)."""
        with self._lock:
            return [w.proc.pid for w in self._live]

    def close(self) -> None:
        """Stop every worker (idle ones; a busy one's caller gets a `RAGError`)."""
        with self._lock:
            workers, self._idle = list(self._live), []
        for worker in workers:
            self._drop(worker)

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                self._live.discard(worker)
        try:
            worker = _Worker(self.limits)
        except OSError as exc:  # out of processes or memory
            raise RAGError(f"cannot start a document parser ({exc}); try again when the "
                           "machine is less busy.") from exc
        with self._lock:
            self._live.add(worker)
        return worker

    def _drop(self, worker: _Worker, wait: bool = False) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.stop(wait)

    def _lost_sentence(self, name: str, lost: _WorkerLost) -> str:
        limits = self.limits
        if lost.timed_out:
            return (f"{name}: parsing took longer than {limits.timeout_s:g} s, the limit for "
                    "one document; split it into smaller files, or raise "
                    "SOUVERAIN_PARSE_TIMEOUT_S.")
        if lost.how == "memory":
            return (f"{name}: the document needs more than {limits.memory_mib} MiB to parse, "
                    "the limit for one document; split it into smaller files, or raise "
                    "SOUVERAIN_PARSE_MEMORY_MIB.")
        return (f"{name}: the parser stopped ({lost.how}): the document needs more than "
                f"{limits.memory_mib} MiB to parse, or is malformed; split it into smaller "
                "files or save it again from its source (the memory limit is "
                "SOUVERAIN_PARSE_MEMORY_MIB).")


_default: ParsePool | None = None
_default_lock = threading.Lock()


def default_pool() -> ParsePool:
    """The process's pool, made on first use from the SOUVERAIN_PARSE_* settings."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ParsePool(Limits.from_env())
            atexit.register(_default.close)
        return _default


def close_default_pool() -> None:
    """Stop the default pool's workers; the next parse reads the settings again."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        atexit.unregister(pool.close)
        pool.close()


# -- the parent's side of one worker -------------------------------------------------------------


class _WorkerLost(Exception):
    def __init__(self, how: str, timed_out: bool = False):
        super().__init__(how)
        self.how, self.timed_out = how, timed_out


class _Worker:
    def __init__(self, limits: Limits):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding `souverain`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        args = [str(limits.memory_mib), repr(limits.timeout_s), str(limits.max_chars)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "souverain.rag.parse_pool", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def call(self, header: dict, data: bytes, timeout_s: float) -> tuple[dict, bytes]:
        """Send one document; its answer (meta, text bytes), or `_WorkerLost`."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            _send(self.proc.stdin, json.dumps(header).encode())
            _send(self.proc.stdin, data)
            self.proc.stdin.flush()
        except (OSError, ValueError):  # a broken pipe: it died (or `close` stopped it)
            raise self._lost(time.monotonic() + 5) from None
        deadline = time.monotonic() + timeout_s + _GRACE_S
        fd = self.proc.stdout.fileno()
        try:
            meta = json.loads(_receive(fd, deadline))
            text = bytes(_receive(fd, deadline))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except _Timeout:
            raise _WorkerLost("timed out", timed_out=True) from None
        except (EOFError, ValueError):  # ValueError: not JSON, so not our worker talking
            raise self._lost(deadline) from None
        if meta.get("kind") == "memory":
            raise _WorkerLost("memory")
        return meta, text

    def _lost(self, deadline: float) -> _WorkerLost:
        """Why the worker stopped answering: its exit signal or status."""
        try:
            code = self.proc.wait(max(0.1, min(5.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            return _WorkerLost("it stopped answering")
        if code == -signal.SIGALRM:
            return _WorkerLost("timed out", timed_out=True)
        if code == _EXIT_MEMORY:
            return _WorkerLost("memory")
        if code < 0:
            try:
                return _WorkerLost(f"killed by {signal.Signals(-code).name}")
            except ValueError:
                return _WorkerLost(f"killed by signal {-code}")
        return _WorkerLost(f"exit status {code}")

    def stop(self, wait: bool = False) -> None:
        """Close its input (it exits by itself); kill it unless `wait` and it does so."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        if wait:
            try:
                self.proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _Timeout(Exception):
    pass


def _send(out: IO[bytes], payload: bytes) -> None:
    out.write(_LENGTH.pack(len(payload)))
    out.write(payload)


def _receive(fd: int, deadline: float) -> bytearray:
    size = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size, deadline))[0]
    return _read_exactly(fd, size, deadline)


def _read_exactly(fd: int, size: int, deadline: float) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    poller = select.poll()  # not select(): a busy server's descriptors pass 1024
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise _Timeout
        chunk = os.read(fd, min(size - got, MiB))
        if not chunk:
            raise EOFError
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return buf


def _document(meta: dict, text_bytes: bytes, name: str) -> ParsedDocument:
    """The worker's answer as the caller's result: a `ParsedDocument` or its `RAGError`."""
    if meta.get("kind") == "refused":
        raise RAGError(str(meta.get("message")))
    try:
        text = text_bytes.decode("utf-8", "surrogatepass")
        ext = str(meta["ext"])
        sections = [Section(text[start : start + length], page, heading, start)
                    for start, length, page, heading in meta["sections"]]
        return ParsedDocument(text, sections, meta["pages"], MIME_TYPES[ext], ext)
    except (KeyError, TypeError, ValueError) as exc:
        raise RAGError(f"{name}: the parser's answer could not be read ({exc!r}); try "
                       "again.") from None


def _checked_size(doc: ParsedDocument, name: str, max_chars: int) -> ParsedDocument:
    if len(doc.text) > max_chars:
        raise RAGError(f"{name}: the document's text has {len(doc.text):,} characters, over "
                       f"the limit of {max_chars:,} for one document; split it into smaller "
                       "files, or raise SOUVERAIN_PARSE_MAX_CHARS.")
    return doc


# -- the worker process ----------------------------------------------------------------------


def _worker_main(memory_mib: int, timeout_s: float, max_chars: int) -> None:
    """Parse documents from stdin until it closes; answers on what was stdout."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's stray print() lands in the log, not in the answers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us
    from souverain.rag import parse

    parse.preload()  # paid once per worker, outside the per-document budget
    _limit_address_space(memory_mib * MiB)
    retire_above = _rss() + max(256 * MiB, memory_mib * MiB // 4)
    requests = sys.stdin.buffer
    while True:
        try:
            header = _read_message(requests)
        except EOFError:
            return  # the parent closed our input, or is gone
        try:
            data = _read_message(requests)
        except MemoryError:  # the bytes alone are over the budget
            os._exit(_EXIT_MEMORY)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)  # SIGALRM's default action: exit
        meta, text = _answer(data, header, max_chars)
        del data
        signal.setitimer(signal.ITIMER_REAL, 0)
        meta["retire"] = meta["kind"] == "memory" or _rss() > retire_above
        _send(answers, json.dumps(meta).encode())
        _send(answers, text)
        answers.flush()
        if meta["retire"]:
            return


def _answer(data: bytes, header: bytes, max_chars: int) -> tuple[dict, bytes]:
    """One document -> (meta, UTF-8 text); the parse's memory is freed when this returns."""
    try:
        request = json.loads(header)
        name, ext = str(request["name"]), str(request["ext"])
        doc = _checked_size(parse_here(data, name, ext), name, max_chars)
        sections = [(s.start, len(s.text), s.page, s.heading) for s in doc.sections]
        text = doc.text.encode("utf-8", "surrogatepass")
        return ({"kind": "ok", "ext": doc.extension, "pages": doc.number_of_pages,
                 "sections": sections}, text)
    except RAGError as exc:
        return {"kind": "refused", "message": str(exc)}, b""
    except MemoryError:
        return {"kind": "memory"}, b""


def _read_message(stream: IO[bytes]) -> bytes:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    size = _LENGTH.unpack(head)[0]
    body = stream.read(size)
    if len(body) < size:
        raise EOFError
    return body


def _limit_address_space(budget: int) -> None:
    """RLIMIT_AS = what this process maps now + `budget` (Linux; elsewhere, no memory bound)."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
