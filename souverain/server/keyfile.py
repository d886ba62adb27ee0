"""The API key file: its format, and reading and parsing it (no secret kept, none logged).

Format
------
One key per line; blank lines and lines starting with ``#`` are ignored::

    # <key_id> <name> sha256:<64 hex> [models=a,b] [scopes=admin]
    3f9a1c2e alice sha256:3f9a1c2e...(64 hex in all)
    77b0d41a ci-bot sha256:77b0d41a... models=mistral-7b,codestral
    0c1d2e3f ops sha256:0c1d2e3f... scopes=admin

* ``key_id`` is a public identifier (letters, digits, ``._-``): it is what logs, metrics and
  rate limits name, never the key itself.
* ``name`` is a free label without spaces (who or what holds the key).
* ``sha256:<hex>`` is the SHA-256 of the key as the client sends it. The plaintext key is not
  stored: `souverain.server.auth.add_key` shows it once and writes only the hash.
* ``models=a,b`` (optional) restricts the key to those model ids; without it the key may use
  every model the server serves (a request for another model gets 403).
* ``scopes=admin`` (optional) lets the key administer the server: a model's lifecycle
  (deprecate, withdraw, restore; delete, archive, rename a fine-tuned model). Other keys get
  403 there. Without keys, the clients on this machine are the administrators.

For convenience a line may also hold just a bare plaintext key (for example a key copied from
an environment variable). It is hashed at load time and the plaintext is not kept; its
``key_id`` (and name) are the first 8 hex digits of its hash. A bare ``sha256:<hex>`` line works
the same way. Prefer `souverain.server.auth.add_key`: a file of hashes is harmless if it
leaks, a file of plaintext keys is not.

Errors name the file and the line, never quote it (it may hold a plaintext key).
`souverain.server.auth` holds the live key set built from this file and the edits to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from souverain.errors import SouverainError

# its records keep the logger name they had before this module was split from auth.py
logger = logging.getLogger("souverain.server.auth")

HASH_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LINE_FORMAT = "'<key_id> <name> sha256:<64 hex> [models=a,b] [scopes=admin]' or a bare key"
SCOPES = frozenset({"admin"})


class ConfigError(SouverainError):
    """The API key file is missing, unreadable or malformed (the message names the line)."""


@dataclass(frozen=True)
class KeyInfo:
    """Who a request authenticated as. Holds no secret (neither the key nor its hash)."""

    key_id: str
    name: str
    models: frozenset[str] | None = None  # None = every model
    scopes: frozenset[str] = frozenset()  # "admin": lifecycle changes

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class KeyEntry:
    """One accepted key: its public description and the hash the file stores."""

    info: KeyInfo
    digest: bytes = field(repr=False)  # raw 32-byte SHA-256 of the key
    line: int = 0


def key_digest(key: str) -> bytes:
    """The raw SHA-256 of a key as the client sends it (any str encodes: surrogatepass)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


# -- parsing -----------------------------------------------------------------------------------
def _err(source: str, lineno: int, what: str) -> ConfigError:
    # Never quote the line: it may hold a plaintext key.
    return ConfigError(f"API key file {source}, line {lineno}: {what} (expected {_LINE_FORMAT}).")


def parse_line(line: str, lineno: int, source: str, *, warn: bool = True) -> KeyEntry | None:
    """One line's entry, None for a blank or comment line; :class:`ConfigError` if malformed."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    tokens = line.split()
    if len(tokens) == 1:
        token = tokens[0]
        if token.lower().startswith(HASH_PREFIX):
            hexpart = token[len(HASH_PREFIX) :]
            if not _HEX64.fullmatch(hexpart):
                raise _err(source, lineno, "the hash is not 64 hex digits")
            digest = bytes.fromhex(hexpart)
        else:
            digest = key_digest(token)
            if warn and len(token) < 16:
                logger.warning(
                    "API key file %s, line %d: bare key is shorter than 16 characters; "
                    "prefer a generated key (souverain.server.auth.generate_key).",
                    source,
                    lineno,
                )
        key_id = digest.hex()[:8]
        return KeyEntry(info=KeyInfo(key_id=key_id, name=key_id), digest=digest, line=lineno)
    if len(tokens) not in (3, 4, 5):
        raise _err(source, lineno, f"{len(tokens)} fields")
    key_id, name, hashed = tokens[:3]
    if not _KEY_ID.fullmatch(key_id):
        raise _err(source, lineno, "the key_id must be 1-64 letters, digits, '.', '_' or '-'")
    if not hashed.lower().startswith(HASH_PREFIX) or not _HEX64.fullmatch(
        hashed[len(HASH_PREFIX) :]
    ):
        raise _err(source, lineno, "the third field must be 'sha256:' followed by 64 hex digits")
    digest = bytes.fromhex(hashed[len(HASH_PREFIX) :])
    models: frozenset[str] | None = None
    scopes: frozenset[str] = frozenset()
    for opt in tokens[3:]:
        if opt.startswith("models=") and models is None:
            names = [m for m in opt[len("models=") :].split(",") if m]
            if not names:
                raise _err(source, lineno, "'models=' lists no model")
            models = frozenset(names)
        elif opt.startswith("scopes=") and not scopes:
            scopes = frozenset(s for s in opt[len("scopes=") :].split(",") if s)
            if not scopes or not scopes <= SCOPES:
                raise _err(source, lineno, "the only scope is 'scopes=admin'")
        else:
            raise _err(source, lineno, "the only options after the hash are 'models=a,b' "
                                       "and 'scopes=admin'")
    return KeyEntry(info=KeyInfo(key_id=key_id, name=name, models=models, scopes=scopes),
                    digest=digest, line=lineno)


def parse_keys(text: str, source: str) -> list[KeyEntry]:
    """Every entry of a key file's text; a repeated key_id or key is a :class:`ConfigError`."""
    entries: list[KeyEntry] = []
    ids: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        entry = parse_line(raw, lineno, source)
        if entry is None:
            continue
        if entry.info.key_id in ids:
            raise _err(
                source,
                lineno,
                f"key_id {entry.info.key_id!r} is already used on line {ids[entry.info.key_id]}",
            )
        if entry.digest in digests:
            raise _err(
                source, lineno, f"the same key is already listed on line {digests[entry.digest]}"
            )
        ids[entry.info.key_id] = lineno
        digests[entry.digest] = lineno
        entries.append(entry)
    return entries


def read_keyfile(path: Path) -> tuple[str, tuple]:
    """(text, stat signature) of the file, both taken from the same open file."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"API key file {path} does not exist: create it with `souverain keys add FILE NAME` (or fix the path)."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"API key file {path} is a directory, not a file.") from None
    except OSError as exc:
        raise ConfigError(
            f"API key file {path} cannot be read ({exc.strerror}): check its permissions."
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"API key file {path}, line {lineno}: not valid UTF-8 text.") from None
    if st.st_mode & 0o077:
        logger.warning(
            "API key file %s is accessible to other users (mode %o): run `chmod 600 %s`.",
            path,
            st.st_mode & 0o777,
            path,
        )
    return text, file_signature(st)


def file_signature(st: os.stat_result) -> tuple:
    """What changes when the file is edited or replaced (device, inode, size, times)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
