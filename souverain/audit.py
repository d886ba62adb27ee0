"""The audit log: one JSON line per API call, written off the event loop.

Each line: ``ts`` (UTC, ISO 8601), ``request_id``, ``key_id`` and ``key_name`` (from the API
keys file; never the key nor its hash), ``client_ip``, ``method``, ``route`` (the template,
``/v1/models/{model_id}``), ``model``, ``status``, ``latency_ms``, ``prompt_tokens``,
``completion_tokens``. With ``content=True`` also ``request`` (the JSON body) and ``response``
(the generated text, or the error message), both with personal data redacted
(`souverain.redact`). Headers are never logged.

Handlers pass what only they know (key, model, token counts, the completion id) through
``note(request)``, a dict in the request's ASGI ``state`` that `AuditMiddleware` reads when
the response is over (after the last SSE chunk for a stream). ``GET /health`` (liveness
probes, no data) is not logged.

Lines go to ``audit-YYYY-MM-DD.jsonl`` (UTC day) in a directory, or to one fixed file; files
are created 0600 and opened append-only. A background thread does the JSON encoding, the
redaction and the writes; `AuditLog.close` drains its queue (the server calls it at shutdown).
A handler that erased data (a document, a library, a file) says what in ``note["erased"]``,
and the line carries it as ``erased``: the erasure itself is on record.

Retention and erasure (GDPR art. 5(1)(e) and 17): `prune` deletes the days older than N days
(the server runs it at start and daily with ``--audit-retention-days``; default: kept),
`expire_content` replaces the logged texts of days older than N days with ``"[EXPIRED
<date>]"`` (``--audit-content-retention-days``, default 30 with ``--audit-content``), `erase` replaces the
``request``/``response`` content of the records that mention a subject (or come from one key)
with ``"[ERASED <date>]"``, keeping the metadata (who called what, when), so the log stays an
audit log. Both rewrite a file atomically (temp file, fsync, rename; mode kept) under an
exclusive `flock` on ``.audit.lock`` next to the log; the writer takes it shared around each
write and reopens its file when the path no longer names it, so a running server loses no
line to `souverain audit erase|prune` (on systems without ``fcntl`` there is no lock: run
them with the server stopped).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import queue
import re
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, see the module docstring
    fcntl = None  # type: ignore[assignment]

from souverain import strictjson
from souverain.redact import redact, redact_json

log = logging.getLogger("souverain.audit")

NOTE_KEY = "souverain.audit"
_BODY_PEEK = 64 * 1024  # enough to find the model of a request the handler never saw
_CONTENT_CAP = 1 << 20  # most bytes of a body or response kept for --audit-content
UNLOGGED = frozenset({"/health"})  # liveness probes: no data, and one a second would drown it
_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_DAY_FILE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.jsonl$")
LOCK_NAME = ".audit.lock"
RETENTION_CHECK_S = 3600.0  # how often an idle writer looks for days past the retention


def note(request: Any) -> dict[str, Any]:
    """The audit notes of a request (a Starlette `Request`): handlers set ``key_id``,
    ``key_name``, ``model``, ``request_id``, ``prompt_tokens``, ``completion_tokens``,
    ``moderation`` (flagged categories, never the text)."""
    state = request.scope.setdefault("state", {})
    return state.setdefault(NOTE_KEY, {})


class AuditLog:
    """Appends records to a JSONL file from a writer thread.

    ``path``: one fixed file; otherwise ``directory/audit-YYYY-MM-DD.jsonl``."""

    def __init__(self, directory: Path | str | None = None, *, path: Path | str | None = None,
                 content: bool = False, retention_days: int | None = None,
                 content_retention_days: int | None = None,
                 clock: Callable[[], float] = time.time):
        if (directory is None) == (path is None):
            raise ValueError("give exactly one of directory or path")
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.path = Path(path).expanduser() if path is not None else None
        self.content = content
        self.retention_days = retention_days or None  # None/0: kept until pruned by hand
        # the logged texts (personal data) expire sooner than the metadata: None/0 = kept
        self.content_retention_days = content_retention_days or None
        self._clock = clock
        target = self.path.parent if self.path is not None else self.directory
        assert target is not None
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = AuditLock(self.path or self.directory,  # type: ignore[arg-type]
                               directory=self.path is None)
        self._open_path: Path | None = None
        self._fd: int | None = None
        self._fd_ino: tuple[int, int] | None = None
        self._pruned_day: str | None = None
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="souverain-audit", daemon=True)
        self._closed = False
        self._open(self._file_for(self._clock()))  # a bad path fails now, not at the first call
        self._thread.start()
        atexit.register(self.close)

    def __repr__(self) -> str:
        return f"AuditLog({self.path or self.directory}, content={self.content})"

    def describe(self) -> str:
        where = self.path if self.path is not None \
            else self.directory / "audit-YYYY-MM-DD.jsonl"  # type: ignore[operator]
        kept = (f", kept {self.retention_days} days" if self.retention_days
                else ", kept until `souverain audit prune`")
        texts = ""
        if self.content_retention_days:
            texts = f" (texts expire after {self.content_retention_days} days)"
        return f"{where}{' with redacted content' if self.content else ''}{kept}{texts}"

    # -- producer side (event loop) ------------------------------------------------------
    def submit(self, event: dict[str, Any]) -> None:
        """Queue one finished call (raw bytes included); never blocks."""
        if not self._closed:
            self._queue.put(event)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer and close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lock.close()

    # -- writer thread -------------------------------------------------------------------
    def _file_for(self, ts: float) -> Path:
        if self.path is not None:
            return self.path
        day = dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")
        return self.directory / f"audit-{day}.jsonl"  # type: ignore[operator]

    def _open(self, path: Path) -> None:
        """Have ``path`` open for appending; reopened when the name now points elsewhere (an
        erase replaced the file, a prune deleted it)."""
        if self._open_path == path and self._fd is not None:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._fd_ino:
                    return
            except FileNotFoundError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self._fd)
        self._fd_ino = (st.st_dev, st.st_ino)
        self._open_path = path

    def _run(self) -> None:
        while True:
            self._retain()
            try:
                event = self._queue.get(timeout=RETENTION_CHECK_S)
            except queue.Empty:
                continue
            if event is None:
                return
            try:
                record = self.record(event)
                line = json.dumps(record, ensure_ascii=False, separators=(",", ":"),
                                  default=str) + "\n"
                with self._lock.shared():
                    self._open(self._file_for(event["start"]))
                    os.write(self._fd, line.encode())  # type: ignore[arg-type]
            except Exception:  # the server must go on; the log says why
                log.exception("could not write an audit record")

    def _retain(self) -> None:
        """Once a day (the first time at start): delete the days past the retention, and
        expire the logged texts past the content retention."""
        if self.retention_days is None and self.content_retention_days is None:
            return
        day = _day(self._clock())
        if day == self._pruned_day:
            return
        self._pruned_day = day
        target: Path = self.path or self.directory  # type: ignore[assignment]
        try:
            if self.retention_days is not None:
                result = prune(target, older_than_days=self.retention_days, now=self._clock())
                if result.records:
                    log.info("audit retention (%d days): %s", self.retention_days,
                             result.describe(dry_run=False))
            if self.content_retention_days is not None:
                result = expire_content(target, older_than_days=self.content_retention_days,
                                        now=self._clock())
                if result.records:
                    log.info("audit content retention (%d days): %s",
                             self.content_retention_days, result.describe(dry_run=False))
        except Exception:
            log.exception("could not apply the audit log's retention")

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        """The JSON line of one finished call (runs on the writer thread)."""
        n = event["note"]
        body: bytes = event.get("body", b"")
        model = n.get("model")
        if model is None and body:
            m = _MODEL_RE.search(body)
            if m:  # a refused body may be anything: never lose the record over it
                try:
                    model = json.loads(b'"' + m.group(1) + b'"')
                except ValueError:  # UnicodeDecodeError too
                    model = m.group(1).decode("utf-8", errors="replace")
        rec: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(event["start"], dt.timezone.utc)
                    .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": n.get("request_id") or event["request_id"],
            "key_id": n.get("key_id"),
            "key_name": n.get("key_name"),
            "client_ip": event.get("client_ip"),
            "method": event["method"],
            "route": event["route"],
            "model": model,
            "status": event["status"],
            "latency_ms": round(event["latency_s"] * 1000, 1),
            "prompt_tokens": n.get("prompt_tokens"),
            "completion_tokens": n.get("completion_tokens"),
        }
        if n.get("erased") is not None:  # what the call erased (documents, files ...)
            rec["erased"] = n["erased"]
        if n.get("moderation") is not None:  # flagged categories (moderation, guardrails)
            rec["moderation"] = n["moderation"]
        if n.get("lifecycle") is not None:  # a lifecycle change (old -> new), a replacement
            rec["lifecycle"] = n["lifecycle"]
        if n.get("classifications") is not None:  # per input, each target's top label
            rec["classifications"] = n["classifications"]
        if n.get("release") is not None:  # a release gate overridden: job, model, reason
            rec["release"] = n["release"]
        if n.get("evaluation_run") is not None:  # an evaluation run recorded: id, verdict
            rec["evaluation_run"] = n["evaluation_run"]
        if self.content:
            rec["request"] = _redacted_body(body) if body else None
            rec["response"] = _response_text(event.get("response", b""),
                                             event.get("content_type", ""))
        return rec


def append_record(directory: Path | str, record: dict[str, Any]) -> Path:
    """Append one record made outside the server (``souverain models``' lifecycle changes)
    to ``directory``'s file of the day, under the lock the server's writer and `prune`/`erase`
    honour; returns the file."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = time.time()
    rec = {"ts": dt.datetime.fromtimestamp(now, dt.timezone.utc)
           .isoformat(timespec="milliseconds").replace("+00:00", "Z"), **record}
    path = directory / f"audit-{_day(now)}.jsonl"
    line = json.dumps(rec, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
    lock = AuditLock(directory, directory=True)
    try:
        with lock.shared():
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
    finally:
        lock.close()
    return path


# -- retention and erasure (`souverain audit prune|erase`, `--audit-retention-days`) --------
def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")


class AuditLock:
    """The ``flock`` that the writer takes shared around each append and `prune`/`erase`
    take exclusive around each rewrite (a file ``.audit.lock`` next to the log)."""

    def __init__(self, target: Path, *, directory: bool):
        target = Path(target)
        lock = target / LOCK_NAME if directory else target.with_name(f".{target.name}.lock")
        self._fd: int | None = None
        if fcntl is not None:
            self._fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def _held(self, mode: int) -> Iterator[None]:
        if self._fd is None:
            yield
            return
        fcntl.flock(self._fd, mode)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def shared(self) -> contextlib.AbstractContextManager[None]:
        return self._held(fcntl.LOCK_SH if fcntl is not None else 0)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._held(fcntl.LOCK_EX if fcntl is not None else 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Rewrite:
    """What a `prune` or an `erase` changed (or would, with ``dry_run``)."""

    action: str  # "deleted" (prune) | "erased" (erase) | "expired" (expire_content)
    records: int = 0
    files: int = 0  # files changed or deleted
    searched: int = 0  # files looked at

    def describe(self, *, dry_run: bool) -> str:
        verb = {"deleted": ("Deleted", "Would delete"),
                "erased": ("Erased the content of", "Would erase the content of"),
                "expired": ("Expired the content of", "Would expire the content of"),
                }[self.action]
        return (f"{verb[dry_run]} {self.records} record{'s' * (self.records != 1)} in "
                f"{self.files} file{'s' * (self.files != 1)} (of {self.searched} searched).")


def audit_files(target: Path) -> list[Path]:
    """The audit files of a log: ``audit-YYYY-MM-DD.jsonl`` in a directory (oldest first), or
    the one file."""
    target = Path(target)
    if target.is_dir():
        return sorted(p for p in target.iterdir() if _DAY_FILE.match(p.name) and p.is_file())
    return [target] if target.is_file() else []


def _rewrite(path: Path, transform: Callable[[str], str | None], *, dry_run: bool) -> int:
    """Stream ``path`` through ``transform`` (a line -> the line to keep, changed or not, or
    None to drop it) and return how many lines it changed or dropped. With changes (and not
    ``dry_run``) the file is replaced atomically: temp file in the same folder, fsync,
    rename, fsync of the folder; its permission bits (0600) kept. Memory: one line."""
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    changed = 0
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out, \
                path.open(encoding="utf-8", errors="replace", newline="") as src:
            for line in src:
                new = transform(line)
                if new != line:
                    changed += 1
                if new is not None and not dry_run:
                    out.write(new)
            if changed and not dry_run:
                out.flush()
                os.fsync(out.fileno())
        if not changed or dry_run:
            os.unlink(tmp)
            return changed
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return changed


def _record_day(line: str) -> str | None:
    try:
        ts = json.loads(line).get("ts")
    except (ValueError, AttributeError):
        return None
    return ts[:10] if isinstance(ts, str) and len(ts) >= 10 else None


def prune(target: Path | str, *, older_than_days: int, now: float | None = None,
          dry_run: bool = False) -> Rewrite:
    """Delete the audit records of days older than ``older_than_days`` (UTC days before
    today - N): whole ``audit-YYYY-MM-DD.jsonl`` files in a directory; the old lines of a
    single-file log (rewritten atomically)."""
    cutoff = _cutoff(older_than_days, now)
    target = Path(target)
    result = Rewrite("deleted")
    if not target.exists():
        return result
    lock = AuditLock(target, directory=target.is_dir())
    try:
        for path in audit_files(target):
            result.searched += 1
            with lock.exclusive():
                m = _DAY_FILE.match(path.name)
                if m and target.is_dir():
                    if m[1] >= cutoff:
                        continue
                    with path.open(encoding="utf-8", errors="replace") as f:
                        n = sum(1 for line in f if line.strip())
                    result.records += n
                    result.files += 1
                    if not dry_run:
                        path.unlink()
                    continue
                dropped = _rewrite(path, lambda line: line if (_record_day(line) or cutoff)
                                   >= cutoff else None, dry_run=dry_run)  # unreadable: kept
                if dropped:
                    result.records += dropped
                    result.files += 1
    finally:
        lock.close()
    return result


def _cutoff(older_than_days: int, now: float | None) -> str:
    if older_than_days < 0:
        raise ValueError("older_than_days must be >= 0")
    today = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)
    return (today.date() - dt.timedelta(days=older_than_days)).isoformat()


def _rewrite_files(target: Path, action: str, transform_for: Callable[[Path], Callable[
        [str], str] | None], *, dry_run: bool) -> Rewrite:
    """Every audit file of ``target`` through ``transform_for(path)`` (None: the file is left
    unread), each rewritten atomically under the exclusive lock; what changed, counted."""
    result = Rewrite(action)
    if not target.exists():
        return result
    lock = AuditLock(target, directory=target.is_dir())
    try:
        for path in audit_files(target):
            transform = transform_for(path)
            if transform is None:
                continue
            result.searched += 1
            with lock.exclusive():
                changed = _rewrite(path, transform, dry_run=dry_run)
                if changed:
                    result.records += changed
                    result.files += 1
    finally:
        lock.close()
    return result


def _record_or_none(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _content_replaced(rec: dict[str, Any], marker: str) -> str:
    """The record's line with its logged ``request``/``response`` replaced by ``marker``
    (content already erased or expired keeps its first marker)."""
    for k in ("request", "response"):
        if rec.get(k) is not None and not _erased_marker(rec.get(k)):
            rec[k] = marker
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def _has_content(rec: dict[str, Any]) -> bool:
    return any(rec.get(k) is not None and not _erased_marker(rec.get(k))
               for k in ("request", "response"))


def expire_content(target: Path | str, *, older_than_days: int, now: float | None = None,
                   dry_run: bool = False) -> Rewrite:
    """Replace the ``request`` and ``response`` content of the records of days older than
    ``older_than_days`` with ``"[EXPIRED YYYY-MM-DD]"`` (the content retention of
    ``--audit-content``): the texts are personal data, kept only as long as needed; who called
    what, and when, stays for the log's own retention. Files of days within the retention are
    not even read."""
    cutoff = _cutoff(older_than_days, now)
    marker = f"[EXPIRED {_day(time.time() if now is None else now)}]"
    target = Path(target)

    def transform_for(path: Path) -> Callable[[str], str] | None:
        m = _DAY_FILE.match(path.name)
        day_file = bool(m and target.is_dir())
        if day_file and m and m[1] >= cutoff:
            return None  # a day within the retention: nothing in it has expired

        def expired(line: str) -> str:
            rec = _record_or_none(line)
            if rec is None:  # a torn line: replaced when its file's day is past
                return json.dumps({"unreadable": marker}) + "\n" if day_file else line
            day = rec.get("ts")
            if not isinstance(day, str) or day[:10] >= cutoff or not _has_content(rec):
                return line
            return _content_replaced(rec, marker)

        return expired

    return _rewrite_files(target, "expired", transform_for, dry_run=dry_run)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _erased_marker(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("[ERASED ", "[EXPIRED "))


def erase(target: Path | str, *, match: str | None = None, key_id: str | None = None,
          now: float | None = None, dry_run: bool = False) -> Rewrite:
    """Replace the ``request`` and ``response`` content of the records that mention ``match``
    (case-insensitive, in any string of the content) and/or come from ``key_id`` with
    ``"[ERASED YYYY-MM-DD]"``; every other field (time, key, route, status ...) stays."""
    if not match and not key_id:
        raise ValueError("give a text to match, a key id, or both")
    needle = match.casefold() if match else None
    marker = f"[ERASED {_day(time.time() if now is None else now)}]"

    def hit(rec: dict[str, Any]) -> bool:
        content = [rec.get(k) for k in ("request", "response")
                   if rec.get(k) is not None and not _erased_marker(rec.get(k))]
        if not content or (key_id is not None and rec.get("key_id") != key_id):
            return False
        return needle is None or any(needle in s.casefold() for s in _strings(content))

    def erased(line: str) -> str:
        rec = _record_or_none(line)
        if rec is None:  # a torn line: erased whole if it names the subject
            if needle is not None and needle in line.casefold():
                return json.dumps({"unreadable": marker}) + "\n"
            return line
        return _content_replaced(rec, marker) if hit(rec) else line

    return _rewrite_files(Path(target), "erased", lambda path: erased, dry_run=dry_run)


def _redacted_body(body: bytes) -> Any:
    """The body as JSON, redacted; as redacted text when it is not strict JSON (a refused
    body: not UTF-8, NaN, too deep to parse), so that the log line stays strict JSON."""
    try:
        return redact_json(strictjson.loads(body))
    except (ValueError, RecursionError):
        return redact(body.decode("utf-8", errors="replace"))


def _texts_of(obj: Any, parts: list[str]) -> None:
    """The human-readable text of a response object: choices' content and tool-call arguments
    (message or streamed delta), or an error's message."""
    if not isinstance(obj, dict):
        return
    if obj.get("object") == "error" and isinstance(obj.get("message"), str):
        parts.append(obj["message"])
        return
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        msg = choice.get("message") or choice.get("delta") or {}
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict))
        for call in msg.get("tool_calls") or ():
            fn = (call or {}).get("function") or {}
            parts.append(f"{fn.get('name', '')}({fn.get('arguments', '')})")


def _response_text(body: bytes, content_type: str) -> str | None:
    parts: list[str] = []
    if content_type.startswith("text/event-stream"):
        for line in body.decode("utf-8", errors="replace").splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                try:
                    _texts_of(json.loads(line[6:]), parts)
                except ValueError:
                    continue
    elif content_type.startswith("application/json"):
        try:
            _texts_of(json.loads(body), parts)
        except ValueError:
            return None
    return redact("".join(parts)) if parts else None


class AuditMiddleware:
    """ASGI middleware: hands every finished HTTP call to an `AuditLog`.

    It adds an ``x-request-id`` header (the id in the log) to each response."""

    def __init__(self, app: Any, audit: AuditLog):
        self.app, self.audit = app, audit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLOGGED:
            return await self.app(scope, receive, send)
        start_wall, start = time.time(), time.perf_counter()
        request_id = f"req-{uuid.uuid4().hex}"
        notes = scope.setdefault("state", {}).setdefault(NOTE_KEY, {})
        cap = _CONTENT_CAP if self.audit.content else _BODY_PEEK
        body: list[bytes] = []
        kept = 0
        response: list[bytes] = []
        status, content_type = 500, ""

        async def tap_receive() -> dict:
            nonlocal kept
            message = await receive()
            if message["type"] == "http.request" and kept < cap:
                chunk = message.get("body", b"")[: cap - kept]
                body.append(chunk)
                kept += len(chunk)
            return message

        async def tap_send(message: dict) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                for k, v in headers:
                    if k.lower() == b"content-type":
                        content_type = v.decode("latin-1")
                rid = notes.get("request_id") or request_id
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif (message["type"] == "http.response.body" and self.audit.content
                  and sum(len(r) for r in response) < _CONTENT_CAP):
                response.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, tap_receive, tap_send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:  # plain Starlette routes (/openapi.json, /docs): fixed paths
                path = scope.get("path", "")
                routes = getattr(scope.get("app"), "routes", ())
                route = path if path in route_paths(routes) else "unmatched"
            client = scope.get("client")
            self.audit.submit({
                "start": start_wall, "latency_s": time.perf_counter() - start,
                "request_id": request_id, "note": dict(notes),
                "client_ip": client[0] if client else None,
                "method": scope.get("method", "GET"), "route": route, "status": status,
                "body": b"".join(body), "response": b"".join(response),
                "content_type": content_type,
            })


def route_paths(routes: Sequence[Any]) -> set[str | None]:
    """The path template of every route of an app. FastAPI >= 0.137 keeps an included router
    as one node of ``app.routes``, which `iter_route_contexts` expands; before, ``app.routes``
    held every route itself."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return {getattr(r, "path", None) for r in routes}
    return {c.path for c in iter_route_contexts(routes)}
