"""The no-egress guard the whole suite runs under (tests/conftest.py): outbound connections other
than loopback fail at once with a sentence naming the guard, in this process and in the
processes the tests start; loopback keeps working."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from souverain import offline

BLACKHOLE = ("10.255.255.1", 80)  # unroutable: without the guard a connect would hang


@pytest.fixture(autouse=True)
def _forget_attempts():
    before = list(offline.attempts)
    yield
    offline.attempts[:] = before


def test_guard_is_on_for_the_suite() -> None:
    assert offline.guard_installed()
    assert os.environ.get("SOUVERAIN_TEST_NO_EGRESS") == "1"


@pytest.mark.parametrize("how", ["connect", "connect_ex", "create_connection"])
def test_outbound_connection_refused_at_once(how: str) -> None:
    start = time.monotonic()
    with pytest.raises(offline.EgressBlockedError, match="no-egress guard blocked .*10.255.255.1"):
        if how == "create_connection":
            socket.create_connection(BLACKHOLE, timeout=5)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                getattr(s, how)(BLACKHOLE)
    assert time.monotonic() - start < 0.5
    assert any("10.255.255.1" in a for a in offline.attempts)


def test_name_lookup_and_datagrams_refused() -> None:
    with pytest.raises(offline.EgressBlockedError, match="name lookup of 'huggingface.co'"):
        socket.getaddrinfo("huggingface.co", 443)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
            pytest.raises(offline.EgressBlockedError):
        s.sendto(b"x", ("8.8.8.8", 53))
    with pytest.raises(offline.EgressBlockedError):
        socket.create_connection(("example.com", 80), timeout=5)


def test_httpx_to_the_internet_refused() -> None:
    import httpx

    with pytest.raises(httpx.ConnectError, match="no-egress guard"):
        httpx.get("http://10.255.255.1/", timeout=5)


def _echo_server(family: int, host: str) -> tuple[socket.socket, int]:
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.recv(16))

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_loopback_still_works() -> None:
    srv, port = _echo_server(socket.AF_INET, "127.0.0.1")
    with srv, socket.create_connection(("localhost", port), timeout=5) as c:
        c.sendall(b"ping")
        assert c.recv(16) == b"ping"
    assert socket.getaddrinfo("localhost", 80)
    if socket.has_ipv6:
        try:
            srv6, port6 = _echo_server(socket.AF_INET6, "::1")
        except OSError:
            pytest.skip("no IPv6 loopback here")
        with srv6, socket.create_connection(("::1", port6), timeout=5) as c:
            c.sendall(b"pong")
            assert c.recv(16) == b"pong"


def test_unix_sockets_allowed() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"u")
        assert b.recv(1) == b"u"


@pytest.mark.parametrize("address,local", [
    (("127.0.0.1", 1), True), (("127.8.9.10", 1), True), (("::1", 1, 0, 0), True),
    (("::ffff:127.0.0.1", 1, 0, 0), True), (("localhost", 1), True),
    (("10.0.0.1", 1), False), (("192.168.1.1", 1), False), (("::ffff:10.0.0.1", 1), False),
    (("2001:db8::1", 1, 0, 0), False), (("example.com", 80), False),
])
def test_is_local_address(address: tuple, local: bool) -> None:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    assert offline.is_local_address(family, address) is local


def test_child_processes_inherit_the_guard() -> None:
    code = ("import socket, souverain.offline as o; import souverain\n"
            "try:\n    socket.create_connection(('10.255.255.1', 80), timeout=5)\n"
            "except o.EgressBlockedError as e:\n    print('BLOCKED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("BLOCKED souverain's no-egress guard"), r.stdout + r.stderr
