"""Scale (issue 6, item 5): FASTIOCP_SCALE_CONNECTIONS concurrent TCP
connections on loopback (default 10,000: about 3 s per backend here; 200
under Wine). The server ends (listener, accepts, echoes) run on one port in
the test process, the client ends (connects, sends, receives) on one port
in a child process. Each client sends FASTIOCP_SCALE_MESSAGES messages
(default 3) that the server echoes; the client verifies every byte, and no
connection closes before all have finished, so that all are open at once
(the server checks its peak).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

import fastiocp
from conftest import open_fd_count
from relutil import ON_LINUX, ON_WINDOWS, child_env, env_int, hard_watchdog

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.reliability

CONNECTIONS = env_int("FASTIOCP_SCALE_CONNECTIONS", 10_000, wine=200)
MESSAGES = env_int("FASTIOCP_SCALE_MESSAGES", 3)
WINDOW = 512          # connects in flight at once (the listen backlog is bounded)
ACCEPTS = 256         # accepts in flight at once
TIME_LIMIT = env_int("FASTIOCP_SCALE_SECONDS", 240)


@contextlib.contextmanager
def nofile_limit(needed: int):
    """Raises the soft RLIMIT_NOFILE to `needed` for the block (and the hard
    limit, where the process may: CAP_SYS_RESOURCE), restoring it after.
    Yields True if the limit allows `needed` descriptors."""
    if not ON_LINUX:
        yield True
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard < needed:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            except (ValueError, OSError):
                pass
        cur_soft, cur_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = needed if cur_hard == resource.RLIM_INFINITY else min(needed, cur_hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(cur_soft, top), cur_hard))
        yield cur_hard == resource.RLIM_INFINITY or cur_hard >= needed
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def payload(i: int, m: int) -> bytes:
    head = b"%d:%d:" % (i, m)
    return head + bytes((i * 31 + m * 7 + k) & 0xFF for k in range(96 - len(head)))


def batches(port: fastiocp.CompletionPort, more: Callable[[], bool], deadline: float, side: str,
            progress: Callable[[], str]) -> Iterator[list]:
    """The batches of up to 512 completions one side handles while more():
    fails at the deadline or after 30 s without a completion, saying
    progress()."""
    while more():
        assert time.monotonic() < deadline, f"{side}: time limit ({progress()})"
        batch = port.get_many(512, timeout=30)
        assert batch, f"{side}: no completion for 30 s ({progress()})"
        yield batch


def test_ten_thousand_connections_one_port(backend, request):
    """The server ends (listener, accepts, echo) run on one port in this
    process; the client ends (connects, sends, receives, verification) on
    one port in a child process, so that each process needs about
    CONNECTIONS descriptors (one process with both ends would need twice
    as many, above this machine's hard RLIMIT_NOFILE of 20,000)."""
    fds_before = open_fd_count()
    with nofile_limit(CONNECTIONS + fds_before + 256) as ok, \
            hard_watchdog(TIME_LIMIT + 60, request.config):
        if not ok:
            pytest.skip(f"RLIMIT_NOFILE cannot be raised to {CONNECTIONS + fds_before + 256} here")
        server = EchoServer(backend, CONNECTIONS)
        child = subprocess.Popen(
            [sys.executable, "-c",
             f"import sys; sys.path[:0] = {[HERE, os.path.dirname(HERE)]!r}; import test_scale; "
             f"sys.exit(test_scale.client_main({backend!r}, {server.addr!r}, {CONNECTIONS}))"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            stats = server.run()
        finally:
            try:
                out, err = child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                out, err = child.communicate()
    returncode = child.returncode
    del child  # Windows: the Popen object holds the process's handles until freed
    gc.collect()
    assert returncode == 0, f"client side failed:\n{out}\n{err}"
    client = json.loads(out.strip().splitlines()[-1])
    assert client["verified"] == CONNECTIONS * MESSAGES, client
    assert stats["accepted"] == CONNECTIONS, stats
    assert stats["peak_open"] == CONNECTIONS, f"not all open at once: {stats}"
    assert stats["echoed_bytes"] == CONNECTIONS * MESSAGES * 96, stats
    assert open_fd_count() <= fds_before  # a leak grows the count; Windows may close a handle of its own
    print(f"\n{backend}: {CONNECTIONS} connections, all open at once; "
          f"{client['verified']} messages echoed and verified; server "
          f"{stats['completions']} completions in {stats['seconds']:.1f}s, client "
          f"{client['completions']} completions in {client['seconds']:.1f}s")


class EchoServer:
    """Accepts CONNECTIONS connections and echoes what they send until each
    one closes, on one port, one thread."""

    def __init__(self, backend: str, n: int):
        self.n = n
        self.port = fastiocp.CompletionPort(backend=backend)
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=min(n, 4096))
        self.addr = self.lsock.getsockname()
        self.port.register(self.lsock, key="listener")

    def run(self) -> dict:
        port, n = self.port, self.n
        t0 = time.monotonic()
        deadline = t0 + TIME_LIMIT
        servers: dict[int, socket.socket] = {}
        accepting = accepted = open_now = peak = completions = echoed = 0
        try:
            while accepting < min(ACCEPTS, n):
                port.accept(self.lsock, context=("accept",))
                accepting += 1
            for batch in batches(port, lambda: accepted < n or open_now > 0, deadline, "server",
                                 lambda: f"{accepted}/{n} accepted, {open_now} open"):
                completions += len(batch)
                with port.batch():
                    for c in batch:
                        kind = c.context[0]
                        if kind == "accept":
                            accepting -= 1
                            conn, _addr = c.result()
                            accepted += 1
                            fd = conn.fileno()
                            servers[fd] = conn
                            open_now += 1
                            peak = max(peak, open_now)
                            port.register(conn, key=fd)
                            port.recv(conn, bytearray(4096), context=("srecv", fd))
                            if accepted + accepting < n:
                                port.accept(self.lsock, context=("accept",))
                                accepting += 1
                        elif kind == "srecv":
                            fd = c.context[1]
                            assert c.error is None, f"server recv: {c.error!r}"
                            if c.nbytes == 0:  # the client closed
                                port.unregister(servers[fd])
                                servers.pop(fd).close()
                                open_now -= 1
                            else:
                                port.send(servers[fd], memoryview(c.buffer)[: c.nbytes],
                                          context=("ssend", fd, c.nbytes, c.buffer))
                        elif kind == "ssend":
                            fd, want, buf = c.context[1:]
                            assert c.error is None and c.nbytes == want, f"echo: {c!r}"
                            echoed += want
                            port.recv(servers[fd], buf, context=("srecv", fd))
        finally:
            port.close()
            for s in servers.values():
                s.close()
            self.lsock.close()
        return {"accepted": accepted, "peak_open": peak, "completions": completions,
                "echoed_bytes": echoed, "seconds": time.monotonic() - t0}


def client_main(backend: str, addr, n: int) -> int:
    """The client ends, in a child process: n connections through one port,
    MESSAGES messages each, every echo verified; none closes before all have
    finished. Prints a JSON line of figures."""
    with nofile_limit(n + 256):
        t0 = time.monotonic()
        deadline = t0 + TIME_LIMIT
        port = fastiocp.CompletionPort(backend=backend)
        addr = tuple(addr)
        clients: dict[int, socket.socket] = {}
        got: dict[int, bytearray] = {}
        next_conn = connecting = finished = verified = completions = 0

        def start_connect() -> None:
            nonlocal next_conn, connecting
            i = next_conn
            next_conn += 1
            s = socket.socket()
            if ON_WINDOWS:
                s.bind(("127.0.0.1", 0))
            clients[i] = s
            port.register(s, key=i)
            port.connect(s, addr, context=("connect", i))
            connecting += 1

        def send(i: int, m: int) -> None:
            port.send(clients[i], payload(i, m), context=("csend", i, m))
            got[i] = bytearray()
            port.recv(clients[i], bytearray(96), context=("crecv", i, m))

        try:
            while next_conn < n and connecting < WINDOW:
                start_connect()
            for batch in batches(port, lambda: finished < n, deadline, "client",
                                 lambda: f"{finished}/{n} finished, {connecting} connecting"):
                completions += len(batch)
                with port.batch():
                    for c in batch:
                        kind, i = c.context[0], c.context[1]
                        if kind == "connect":
                            assert c.error is None, f"connect {i}: {c.error!r}"
                            connecting -= 1
                            send(i, 0)
                            if next_conn < n:
                                start_connect()
                        elif kind == "csend":
                            assert c.error is None and c.nbytes == 96, f"client send: {c!r}"
                        else:
                            m = c.context[2]
                            assert c.error is None and c.nbytes > 0, f"client {i} recv: {c!r}"
                            buf = got[i]
                            buf += c.buffer[: c.nbytes]
                            if len(buf) < 96:
                                port.recv(clients[i], bytearray(96 - len(buf)), context=("crecv", i, m))
                                continue
                            assert buf == payload(i, m), f"client {i} message {m}: {bytes(buf)!r}"
                            verified += 1
                            if m + 1 < MESSAGES:
                                send(i, m + 1)
                            else:
                                finished += 1
        finally:
            port.close()
            for s in clients.values():   # only now: all were open at once
                s.close()
        print(json.dumps({"verified": verified, "completions": completions,
                          "seconds": time.monotonic() - t0}))
    return 0
