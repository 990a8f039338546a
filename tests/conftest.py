"""Shared fixtures: every behaviour test runs once per backend that works on
this machine (narrowed by FASTIOCP_BACKEND), as CPython's test_selectors
runs one suite per selector."""
from __future__ import annotations

import os
import socket
import sys
import time

import pytest

import fastiocp

ON_WINDOWS = sys.platform == "win32"
ON_LINUX = sys.platform.startswith("linux")
# Wine runs the Windows suite correctly but slowly: scale loops down there.
UNDER_WINE = ON_WINDOWS and bool(os.environ.get("FASTIOCP_UNDER_WINE"))


def _backends() -> list[str]:
    forced = os.environ.get("FASTIOCP_BACKEND")
    names = [name for name, _works, _why in fastiocp.backend_status()]
    if forced and forced != "auto":
        return [forced]
    return names


@pytest.fixture(params=_backends())
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    status = {n: (w, why) for n, w, why in fastiocp.backend_status()}
    if name not in status:
        pytest.fail(f"FASTIOCP_BACKEND={name} is not a backend of this build")
    works, why = status[name]
    if not works:
        pytest.skip(f"backend {name} unavailable here: {why}")
    return name


@pytest.fixture
def port(backend: str):
    p = fastiocp.CompletionPort(backend=backend)
    yield p
    p.close()


@pytest.fixture
def sockpair():
    if hasattr(socket, "AF_UNIX"):
        a, b = socket.socketpair()
    else:  # Windows: socketpair() is emulated over TCP loopback
        a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def tcp_pair():
    """A connected TCP pair over IPv4 loopback: (client, server_side)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    yield client, server
    client.close()
    server.close()


def collect(port: fastiocp.CompletionPort, n: int, timeout: float = 10.0) -> list:
    """Dequeue exactly n completions or fail after timeout seconds."""
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(out)} of {n} completions within {timeout}s; last: {out[-3:]!r}")
        out.extend(port.get_many(n - len(out), timeout=left))
    return out


def open_fd_count() -> int:
    """Open descriptors of this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
