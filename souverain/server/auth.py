"""API keys for the HTTP server: the live key set, constant-time checks, live revocation,
the edits `souverain keys add|revoke` make to the key file, and the no-key (loopback) rule.

The key file's format and its parsing are `souverain.server.keyfile`'s. The plaintext of a
key is shown once by :func:`add_key`, which writes only its hash.

The server re-reads the file when it changes (checked at most once per second, on the next
request), so revoking a key is removing its line (:func:`revoke_key` does it atomically) and
takes effect without a restart. If a changed file cannot be read or parsed, the server fails
closed: every key is refused (401) until the file is fixed, and the error is logged, rather
than keep accepting keys that may have just been revoked.

Presented keys are hashed and compared with :func:`hmac.compare_digest` against every stored
hash (no early exit). Neither a key nor its hash ever appears in a log record, ``repr`` or
exception message: only the ``key_id`` does.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from souverain.server.keyfile import (
    HASH_PREFIX,
    ConfigError,
    KeyEntry,
    KeyInfo,
    file_signature,
    key_digest,
    parse_keys,
    parse_line,
    read_keyfile,
)

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-sov-"
RELOAD_INTERVAL_S = 1.0


class AuthError(Exception):
    """A request is refused: 401 (no, malformed, unknown or revoked key) or 403 (not allowed).

    ``message`` is the user-facing sentence, ``code`` a stable machine-readable string; the
    La Plateforme error ``type`` is ``authentication_error``. Never carries the key.
    """

    type = "authentication_error"

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def __repr__(self) -> str:
        return f"AuthError(status={self.status}, code={self.code!r}, message={self.message!r})"

    def to_dict(self) -> dict:
        """The La Plateforme error body: ``{"object": "error", "message", "type", "param", "code"}``."""
        return {
            "object": "error",
            "message": self.message,
            "type": self.type,
            "param": None,
            "code": self.code,
        }


_BEARER_HINT = "send 'Authorization: Bearer <key>'"


def _missing() -> AuthError:
    return AuthError(401, f"No API key given: {_BEARER_HINT}.", "missing_api_key")


def _malformed() -> AuthError:
    return AuthError(
        401, f"Malformed Authorization header: {_BEARER_HINT}.", "invalid_authorization_header"
    )


def _invalid() -> AuthError:
    return AuthError(401, "Invalid or revoked API key.", "invalid_api_key")


# -- the key set -------------------------------------------------------------------------------
class APIKeys:
    """A set of accepted API keys, optionally backed by a key file that is re-read on change."""

    def __init__(
        self,
        entries: Iterable[KeyEntry] = (),
        *,
        path: str | os.PathLike | None = None,
        clock: Callable[[], float] = time.monotonic,
        _signature: tuple | None = None,
    ) -> None:
        self._entries: tuple[KeyEntry, ...] = tuple(entries)
        self.path = Path(path) if path is not None else None
        self._clock = clock
        self._sig = _signature
        self._last_check = clock()
        self._lock = threading.Lock()

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, clock: Callable[[], float] = time.monotonic
    ) -> APIKeys:
        """Load a key file; raises :class:`ConfigError` (one sentence, naming the line)."""
        p = Path(path).expanduser().absolute()  # reloads must not depend on the cwd
        text, sig = read_keyfile(p)
        entries = parse_keys(text, str(p))
        if not entries:
            logger.warning("API key file %s lists no key: every request will be refused (401).", p)
        logger.info("Loaded %d API key(s) from %s.", len(entries), p)
        return cls(entries, path=p, clock=clock, _signature=sig)

    @classmethod
    def from_plaintext(cls, keys: Iterable[str]) -> APIKeys:
        """Keys given directly (e.g. from an environment variable); hashed, not kept."""
        entries: dict[bytes, KeyEntry] = {}
        for i, key in enumerate(keys, start=1):
            if not key or any(c.isspace() for c in key):
                raise ConfigError(f"API key number {i} is empty or contains whitespace.")
            digest = key_digest(key)
            entries.setdefault(
                digest, KeyEntry(KeyInfo(digest.hex()[:8], digest.hex()[:8]), digest, i)
            )
        return cls(entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"APIKeys(path={str(self.path) if self.path else None!r}, keys={len(self._entries)})"

    @property
    def keys(self) -> list[KeyInfo]:
        """The accepted keys' public descriptions (no secrets)."""
        return [e.info for e in self._entries]

    @staticmethod
    def hash_key(key: str) -> str:
        """``"sha256:<hex>"`` of a key, the form the key file stores."""
        return HASH_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    # -- checks ----------------------------------------------------------------------------
    def authenticate(self, authorization_header: str | None) -> KeyInfo:
        """The key of an ``Authorization: Bearer <key>`` header, or :class:`AuthError` (401)."""
        if self.path is not None:
            now = self._clock()
            if now - self._last_check >= RELOAD_INTERVAL_S:
                self._last_check = now
                self.reload_if_changed()
        if authorization_header is None or not authorization_header.strip():
            raise _missing()
        parts = authorization_header.strip().split(None, 1)
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise _malformed()
        presented = parts[1].strip()
        if not presented or any(c.isspace() for c in presented):
            raise _malformed()
        digest = key_digest(presented)  # surrogatepass: encoding any str succeeds
        del presented
        match: KeyInfo | None = None
        for entry in self._entries:  # a snapshot: reloads swap the tuple, never mutate it
            # Compare against every entry, no early exit.
            if hmac.compare_digest(digest, entry.digest) and match is None:
                match = entry.info
        if match is None:
            logger.debug("Refused a request: unknown or revoked API key.")
            raise _invalid()
        logger.debug("Authenticated key_id=%s.", match.key_id)
        return match

    def check_model(self, key: KeyInfo, model: str) -> None:
        """:class:`AuthError` (403) unless ``key`` may use ``model``."""
        if not key.allows(model):
            raise AuthError(
                403,
                f"API key {key.key_id!r} is not allowed to use model {model!r}; "
                "ask the server's administrator to add it to the key's models.",
                "model_not_allowed",
            )

    def reload_if_changed(self) -> None:
        """Re-read the key file if it changed (inode, size, mtime or ctime); fail closed on error."""
        if self.path is None:
            return
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                if self._sig is not None:
                    logger.error(
                        "API key file %s disappeared: refusing every key until it is back.",
                        self.path,
                    )
                    self._entries, self._sig = (), None
                return
            except OSError as exc:
                logger.error(
                    "API key file %s cannot be checked (%s): keeping the current keys.",
                    self.path,
                    exc.strerror,
                )
                return
            if file_signature(st) == self._sig:
                return
            try:
                text, sig = read_keyfile(self.path)
                entries = parse_keys(text, str(self.path))
            except ConfigError as exc:
                logger.error("%s Refusing every key until the file is fixed.", exc)
                self._entries, self._sig = (), file_signature(st)
                return
            before = {e.info.key_id for e in self._entries}
            self._entries, self._sig = tuple(entries), sig
            after = {e.info.key_id for e in entries}
            logger.info(
                "Reloaded API key file %s: %d key(s)%s%s.",
                self.path,
                len(entries),
                f", added {sorted(after - before)}" if after - before else "",
                f", removed {sorted(before - after)}" if before - after else "",
            )


# -- key management (the CLI's `keys add/revoke`) ------------------------------------------
def generate_key() -> str:
    """A new random key: ``sk-sov-`` + 32 random bytes, URL-safe base64 (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _check_label(value: str, what: str) -> None:
    if not value or any(c.isspace() for c in value) or value.startswith(("#", "models=")):
        raise ConfigError(
            f"The key {what} {value!r} must be non-empty, without spaces, and not start with '#' or 'models='."
        )


def add_key(path: str | os.PathLike, name: str, models: list[str] | None = None, *,
            admin: bool = False) -> tuple[str, str]:
    """Create a key, append its HASH to the key file, return ``(key_id, plaintext key)``.

    The file (and its folder) are created if needed, the file with mode 0600. The plaintext
    is returned once, for the caller to show; it is never written anywhere.
    """
    _check_label(name, "name")
    if models is not None:
        if not models:
            raise ConfigError(
                "Give at least one model to restrict a key to, or none to allow every model."
            )
        for m in models:
            if not m or "," in m or any(c.isspace() for c in m):
                raise ConfigError(f"Model id {m!r} must be non-empty, without spaces or commas.")
    p = Path(path).expanduser()
    existing: list[KeyEntry] = []
    if p.exists():
        existing = parse_keys(read_keyfile(p)[0], str(p))
    used_ids = {e.info.key_id for e in existing}
    while True:
        key = generate_key()
        key_id = hashlib.sha256(key.encode()).hexdigest()[:8]
        if key_id not in used_ids:
            break
    line = f"{key_id} {name} {APIKeys.hash_key(key)}"
    if models is not None:
        line += " models=" + ",".join(dict.fromkeys(models))
    if admin:
        line += " scopes=admin"
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_size == 0:
            os.fchmod(fd, 0o600)
            prefix = ("# souverain API keys: <key_id> <name> sha256:<hex> [models=a,b] "
                      "[scopes=admin]\n")
        else:
            os.lseek(fd, -1, os.SEEK_END)
            prefix = "" if os.read(fd, 1) == b"\n" else "\n"
        os.write(fd, (prefix + line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    logger.info("Added API key key_id=%s name=%s to %s.", key_id, name, p)
    return key_id, key


def revoke_key(path: str | os.PathLike, key_id_or_name: str) -> bool:
    """Remove every line whose key_id or name matches; atomic (temp file + ``os.replace``).

    Returns False (and leaves the file alone) when nothing matched. A running server picks
    the change up within a second. Lines it cannot parse are kept as they are.
    """
    p = Path(path).expanduser()
    text, _ = read_keyfile(p)
    kept: list[str] = []
    removed: list[str] = []
    for lineno, raw in enumerate(text.splitlines(keepends=True), start=1):
        try:
            entry = parse_line(raw, lineno, str(p), warn=False)
        except ConfigError:
            entry = None
        if entry is not None and key_id_or_name in (entry.info.key_id, entry.info.name):
            removed.append(entry.info.key_id)
            continue
        kept.append(raw)
    if not removed:
        return False
    mode = os.stat(p).st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    logger.info("Revoked API key(s) %s in %s.", ", ".join(removed), p)
    return True


# -- no-key mode -------------------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1, IPv4-mapped loopback (::ffff:127.x.y.z) and "localhost"."""
    if not host:
        return False
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.lower() in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def require_loopback(host: str | None) -> None:
    """:class:`AuthError` (403) unless the client is on this machine (the no-key mode)."""
    if not is_loopback(host):
        raise AuthError(
            403,
            "This server has no API keys configured, so it only accepts requests from this "
            "machine; configure an API key file to accept remote clients.",
            "loopback_only",
        )


def authorize(
    keys: APIKeys | None, authorization_header: str | None, client_host: str | None
) -> KeyInfo | None:
    """The whole check: with keys, the key (401 otherwise); without, loopback only (403)."""
    if keys is None:
        require_loopback(client_host)
        return None
    return keys.authenticate(authorization_header)
