"""Keep souverain's process off the network: library switches, and an optional socket guard.

souverain never needs the network (models are local files, the bundled embedder is a wheel),
so importing ``souverain`` turns off every phone-home switch and the Hugging Face hub access of
the libraries it loads (`force_offline`, before mistral-common imports huggingface_hub, which
reads them once at import). Each is set only when unset: ``HF_HUB_OFFLINE=0`` in the
environment still wins, and `souverain doctor` then reports it.

`install_socket_guard` makes any outbound connection other than loopback or a Unix socket
raise `EgressBlockedError`. ``SOUVERAIN_NO_EGRESS=1`` (or ``SOUVERAIN_TEST_NO_EGRESS=1``, set
by the test suite so that servers it starts inherit it) installs it in every process that
imports souverain. It guards Python's ``socket`` module; native code that opens sockets itself
(Rust or C clients inside extensions) is not covered.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

GUARD_ENV = ("SOUVERAIN_NO_EGRESS", "SOUVERAIN_TEST_NO_EGRESS")

# Telemetry and update checks of installed libraries, all off (only set when unset, so a user
# can still see them in `souverain doctor` if they turn one back on).
TELEMETRY_OFF: dict[str, str] = {
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub (and transformers' example telemetry)
    "DO_NOT_TRACK": "1",  # huggingface_hub and any library honouring donottrack.sh
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",  # huggingface_hub CLI update check
    "GRADIO_ANALYTICS_ENABLED": "False",  # gradio, if a user installs a UI beside us
    "ANONYMIZED_TELEMETRY": "False",  # chromadb-style libraries
    "MISTRAL_SDK_TELEMETRY": "false",  # mistralai SDK extra (opt-in already; explicit off)
    "LANGSMITH_TRACING": "false",  # langchain traces to smith.langchain.com (opt-in already)
    "LANGCHAIN_TRACING_V2": "false",
}
# Hub access off: a missing local file is an error, never a download.
OFFLINE: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


class EgressBlockedError(ConnectionRefusedError):
    """An outbound connection refused by the no-egress guard (an `OSError`, so that callers
    handling network failures treat it as an unreachable network)."""


# what the environment said before souverain set anything (for `souverain doctor`)
USER_ENV: dict[str, str | None] = {}


def _setdefault(values: dict[str, str]) -> None:
    for k, v in values.items():
        USER_ENV.setdefault(k, os.environ.get(k))
        os.environ.setdefault(k, v)


def disable_telemetry() -> None:
    _setdefault(TELEMETRY_OFF)


def force_offline() -> None:
    """Telemetry off and hub access off, for this process and its children."""
    _setdefault(TELEMETRY_OFF)
    _setdefault(OFFLINE)


def guard_requested() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in GUARD_ENV)


# -- the socket guard ------------------------------------------------------------------------

def is_local_address(family: int, address: Any) -> bool:
    """Loopback (127.0.0.0/8, ::1, ::ffff:127.x) or a Unix socket path."""
    if family == getattr(socket, "AF_UNIX", -1):
        return True
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _refuse(what: str, target: Any) -> EgressBlockedError:
    attempts.append(f"{what} {target!r}")
    return EgressBlockedError(
        f"souverain's no-egress guard blocked {what} {target!r}: only loopback (127.0.0.0/8, "
        f"::1) and Unix sockets are allowed in this process (unset {GUARD_ENV[0]} / "
        f"{GUARD_ENV[1]} to lift it).")


attempts: list[str] = []  # what the guard refused in this process, for reports
_saved: dict[str, Any] = {}


def guard_installed() -> bool:
    return bool(_saved)


def install_socket_guard() -> None:
    """Refuse outbound connections (connect, connect_ex, sendto, name lookups) other than to
    loopback or Unix sockets. Idempotent."""
    if _saved:
        return
    cls = socket.socket
    _saved.update(connect=cls.connect, connect_ex=cls.connect_ex, sendto=cls.sendto,
                  getaddrinfo=socket.getaddrinfo)
    real_connect, real_connect_ex = cls.connect, cls.connect_ex
    real_sendto, real_getaddrinfo = cls.sendto, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if not is_local_address(self.family, address):
            raise _refuse("a connection to", address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not is_local_address(self.family, address):
            raise _refuse("a connection to", address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        address = args[-1]
        if not is_local_address(self.family, address):
            raise _refuse("a datagram to", address)
        return real_sendto(self, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        # An IP literal needs no lookup (connect checks it); a name other than localhost would
        # query DNS, which is itself traffic leaving the machine.
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or name == "" or _is_ip_literal(name) or _is_localhost(name):
            return real_getaddrinfo(host, *args, **kwargs)
        raise _refuse("a name lookup of", name)

    # patching methods of a C type; the stubs type their self as _socket.socket, the base
    # class socket.socket's methods come from, where ours are written for socket.socket
    cls.connect = connect  # type: ignore[method-assign,assignment]
    cls.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    cls.sendto = sendto  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = getaddrinfo


def uninstall_socket_guard() -> None:
    if not _saved:
        return
    cls = socket.socket
    cls.connect = _saved["connect"]  # type: ignore[method-assign]
    cls.connect_ex = _saved["connect_ex"]  # type: ignore[method-assign]
    cls.sendto = _saved["sendto"]  # type: ignore[method-assign]
    socket.getaddrinfo = _saved["getaddrinfo"]
    _saved.clear()


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_localhost(name: str) -> bool:
    n = name.lower().rstrip(".")
    return n == "localhost" or n.endswith(".localhost") or n in ("ip6-localhost",
                                                                 "ip6-loopback")


def apply_from_env() -> None:
    """What importing souverain does: telemetry and hub off; the guard when asked."""
    force_offline()
    if guard_requested():
        install_socket_guard()
