"""The operations of issue 14 on every backend: poll, sendmsg, recvmsg,
sendfile, wait_process, timer, fsync, connect_pipe, and the timeout= every
submit method takes. Each joins the seed's contract (tests/test_port.py):
exactly one completion, cancel and close work, bad arguments raise before
anything is submitted, nothing leaks. Backend-specific and ported scenarios
(liburing's test/, pywin32's test_win32file) live in tests/backends/."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import fastiocp

from conftest import (
    ON_LINUX,
    ON_WINDOWS,
    UNDER_WINE,
    assert_no_growth,
    collect,
    loopback_tcp_pair,
    loopback_udp_pair,
)

CYCLES = 500 if UNDER_WINE else 20_000


def one(port: fastiocp.CompletionPort, timeout: float = 10.0) -> fastiocp.Completion:
    """The next completion, and proof that it was the only one: nothing else
    comes in the next 50 ms."""
    c = port.get(timeout=timeout)
    assert c is not None, f"no completion within {timeout}s"
    extra = port.get(timeout=0.05)
    assert extra is None, f"a second completion came: {extra!r}"
    return c


def assert_nothing_submitted(port: fastiocp.CompletionPort) -> None:
    assert port.pending == 0
    assert port.get(timeout=0.02) is None


def cancel_and_collect(port: fastiocp.CompletionPort, op: fastiocp.Completion) -> fastiocp.Completion:
    op.cancel()
    c = one(port)
    assert c is op and c.done and c.cancelled
    assert isinstance(c.error, OSError)
    with pytest.raises(OSError):
        c.result()
    return c


def close_with_pending(backend: str, start) -> None:
    """Submit what start(port) submits, close the port at once: close() must
    return promptly and leave every operation done."""
    port = fastiocp.CompletionPort(backend=backend)
    ops = start(port)
    t0 = time.monotonic()
    port.close()
    assert time.monotonic() - t0 < 5.0
    assert port.pending == 0
    for op in ops:
        assert op.done


# ---------------------------------------------------------------------------
# poll
# ---------------------------------------------------------------------------

def test_poll_constants_are_linux_values():
    assert (fastiocp.POLLIN, fastiocp.POLLPRI, fastiocp.POLLOUT, fastiocp.POLLERR, fastiocp.POLLHUP) == (
        1, 2, 4, 8, 16)


def test_poll_in_fires_when_data_arrives(port, tcp_pair):
    a, b = tcp_pair
    port.register(a, key="a")
    op = port.poll(a, fastiocp.POLLIN, context="ctx")
    assert port.get(timeout=0.1) is None, "POLLIN before any data"
    b.send(b"x")
    c = one(port)
    assert c is op and c.op == "poll" and c.key == "a" and c.context == "ctx"
    assert c.nbytes & fastiocp.POLLIN and c.result() == c.nbytes
    assert c.nbytes & ~(fastiocp.POLLIN | fastiocp.POLLERR | fastiocp.POLLHUP) == 0
    assert a.recv(1) == b"x", "poll must not consume the data"


def test_poll_out_on_a_connected_socket_fires_at_once(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    port.poll(a, fastiocp.POLLOUT)
    c = one(port)
    assert c.nbytes & fastiocp.POLLOUT and not c.nbytes & fastiocp.POLLIN


def test_poll_reports_peer_close(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    port.poll(a, fastiocp.POLLIN)
    b.close()
    c = one(port)
    assert c.nbytes & (fastiocp.POLLIN | fastiocp.POLLHUP)
    assert a.recv(16) == b""


@pytest.mark.skipif(ON_WINDOWS, reason="IOCP: a receive pending on the socket takes the data before AFD "
                    "reports it readable, so the poll does not fire (docs/OPERATIONS.md)")
def test_poll_and_recv_pending_on_one_socket(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    ops = {port.poll(a, fastiocp.POLLIN, context="poll"), port.recv(a, 16, context="recv")}
    b.send(b"hello")
    got = collect(port, 2)
    assert set(got) == ops
    recv = next(c for c in got if c.op == "recv")
    assert bytes(recv.buffer[:recv.nbytes]) == b"hello"


def test_poll_cancel(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    cancel_and_collect(port, port.poll(a, fastiocp.POLLIN))


def test_poll_close_while_pending(backend):
    def start(port):
        a, b = loopback_tcp_pair()
        start.keep = (a, b)
        port.register(a)
        return [port.poll(a, fastiocp.POLLIN)]
    close_with_pending(backend, start)
    for s in start.keep:
        s.close()


@pytest.mark.parametrize("events, exc", [(-1, ValueError), (1 << 20, ValueError), ("1", TypeError),
                                         (1.0, TypeError)])
def test_poll_bad_events_submit_nothing(port, tcp_pair, events, exc):
    a, _b = tcp_pair
    port.register(a)
    with pytest.raises(exc):
        port.poll(a, events)
    assert_nothing_submitted(port)


def test_poll_unregistered_socket_is_refused(port, tcp_pair):
    with pytest.raises(ValueError, match="not registered"):
        port.poll(tcp_pair[0], fastiocp.POLLIN)
    assert_nothing_submitted(port)


# ---------------------------------------------------------------------------
# sendmsg / recvmsg
# ---------------------------------------------------------------------------

def test_sendmsg_gathers_and_recvmsg_scatters(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    port.register(b)
    data = [b"ab", memoryview(b"cdef"), bytearray(b"gh")]
    op = port.sendmsg(a, data, context=1)
    c = one(port)
    assert c is op and c.op == "sendmsg" and c.nbytes == 8 and c.result() == 8
    bufs = [bytearray(3), bytearray(10)]
    port.recvmsg(b, bufs)
    c = one(port)
    assert c.op == "recvmsg"
    nbytes, ancdata, flags, _address = c.result()
    assert nbytes == c.nbytes == 8 and ancdata == [] and flags == 0
    assert bytes(bufs[0]) == b"abc" and bytes(bufs[1][:5]) == b"defgh"
    assert c.buffer == tuple(bufs)


def test_sendmsg_and_recvmsg_datagrams_with_addresses(port):
    a, b = loopback_udp_pair()
    try:
        port.register(a)
        port.register(b)
        port.sendmsg(a, [b"hello ", b"world"], address=b.getsockname())
        assert one(port).nbytes == 11
        buf = bytearray(64)
        port.recvmsg(b, [buf])
        nbytes, _anc, _flags, address = one(port).result()
        assert nbytes == 11 and bytes(buf[:11]) == b"hello world"
        assert address == a.getsockname()
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(ON_WINDOWS, reason="SCM_RIGHTS: Unix sockets with ancillary data")
def test_scm_rights_passes_a_descriptor(port):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        port.register(a)
        port.register(b)
        port.sendmsg(a, [b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, int.to_bytes(w, 4, sys.byteorder))])
        assert one(port).nbytes == 2
        buf = bytearray(8)
        port.recvmsg(b, [buf], socket.CMSG_SPACE(4))
        nbytes, ancdata, flags, _address = one(port).result()
        assert nbytes == 2 and bytes(buf[:2]) == b"fd" and flags & socket.MSG_CTRUNC == 0
        [(level, kind, data)] = ancdata
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        passed = int.from_bytes(data[:4], sys.byteorder)
        assert passed != w
        os.write(passed, b"through the passed descriptor")
        os.close(passed)
        assert os.read(r, 64) == b"through the passed descriptor"
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_recvmsg_cancel(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    cancel_and_collect(port, port.recvmsg(a, [bytearray(4)]))


@pytest.mark.parametrize("call, exc", [
    (lambda p, s: p.sendmsg(s, b"not a sequence"), TypeError),
    (lambda p, s: p.sendmsg(s, 42), TypeError),
    (lambda p, s: p.sendmsg(s, [b"x", 3]), TypeError),
    (lambda p, s: p.sendmsg(s, [b"x"], flags="0"), TypeError),
    (lambda p, s: p.sendmsg(s, [b"x"], [(1, 2)]), TypeError),
    (lambda p, s: p.sendmsg(s, [b"x"], 7), TypeError),
    (lambda p, s: p.sendmsg(s, [b"x"] * 1025), ValueError),
    (lambda p, s: p.recvmsg(s, [b"read-only"]), TypeError),
    (lambda p, s: p.recvmsg(s, [bytearray(1)], -1), ValueError),
    (lambda p, s: p.recvmsg(s, [bytearray(1)], 1 << 40), ValueError),
])
def test_msg_bad_arguments_submit_nothing(port, tcp_pair, call, exc):
    a, _b = tcp_pair
    port.register(a)
    with pytest.raises(exc):
        call(port, a)
    assert_nothing_submitted(port)


@pytest.mark.skipif(not ON_WINDOWS, reason="Windows refuses ancillary data")
def test_msg_ancillary_data_is_refused_on_windows(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    with pytest.raises(NotImplementedError):
        port.sendmsg(a, [b"x"], [(0xFFFF, 1, b"1234")])
    with pytest.raises(NotImplementedError):
        port.recvmsg(a, [bytearray(1)], 64)
    assert_nothing_submitted(port)


# ---------------------------------------------------------------------------
# sendfile
# ---------------------------------------------------------------------------

@pytest.fixture
def data_file():
    payload = bytes(range(256)) * 4096  # 1 MiB
    fd, path = tempfile.mkstemp()
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    f = fastiocp.open(path, "rb")
    yield f, payload
    f.close()
    os.unlink(path)


def drain(sock: socket.socket, n: int, out: bytearray) -> threading.Thread:
    def run():
        while len(out) < n:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            out.extend(chunk)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sendfile_sends_the_file_range(port, tcp_pair, data_file):
    f, payload = data_file
    a, b = tcp_pair
    port.register(a)
    received = bytearray()
    want = payload[1000:1000 + 700_000]
    reader = drain(b, len(want), received)
    sent = 0
    while sent < len(want):
        op = port.sendfile(a, f, 1000 + sent, len(want) - sent, context="sf")
        c = one(port, timeout=20)
        assert c is op and c.op == "sendfile" and c.context == "sf" and c.error is None
        assert 0 < c.nbytes <= len(want) - sent and c.result() == c.nbytes
        sent += c.nbytes
    reader.join(20)
    assert bytes(received) == want


def test_sendfile_stops_at_end_of_file(port, tcp_pair, data_file):
    f, payload = data_file
    a, b = tcp_pair
    port.register(a)
    received = bytearray()
    reader = drain(b, 100, received)
    port.sendfile(a, f, len(payload) - 100, 5000)
    assert one(port).nbytes == 100
    reader.join(10)
    assert bytes(received) == payload[-100:]
    port.sendfile(a, f, len(payload) + 10, 100)
    assert one(port).nbytes == 0


@pytest.mark.parametrize("offset, count, exc", [(-1, 10, ValueError), (0, 0, ValueError),
                                                (0, -5, ValueError), (0, 1 << 40, ValueError),
                                                ("0", 10, TypeError), (0, None, TypeError)])
def test_sendfile_bad_arguments_submit_nothing(port, tcp_pair, data_file, offset, count, exc):
    a, _b = tcp_pair
    port.register(a)
    with pytest.raises(exc):
        port.sendfile(a, data_file[0], offset, count)
    assert_nothing_submitted(port)


def test_sendfile_from_a_closed_file_is_refused(port, tcp_pair, data_file):
    a, _b = tcp_pair
    port.register(a)
    f = data_file[0]
    f.close()
    with pytest.raises(ValueError):
        port.sendfile(a, f, 0, 10)
    assert_nothing_submitted(port)


# ---------------------------------------------------------------------------
# wait_process
# ---------------------------------------------------------------------------

def child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_wait_process_gives_the_return_code(port):
    p = child("raise SystemExit(3)")
    op = port.wait_process(p, context="child")
    c = one(port, timeout=60)
    assert c is op and c.op == "wait_process" and c.context == "child" and c.key is None
    assert c.result() == 3 and c.buffer is p
    assert p.wait(timeout=10) == 3, "the child must still be there for Popen to reap"


@pytest.mark.skipif(ON_WINDOWS, reason="POSIX: a pid and a signal")
def test_wait_process_by_pid_and_killed_by_a_signal(port):
    p = child("import time; time.sleep(60)")
    port.wait_process(p.pid)
    assert port.get(timeout=0.2) is None
    p.send_signal(signal.SIGKILL)
    c = one(port, timeout=30)
    assert c.result() == -signal.SIGKILL
    assert p.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.skipif(ON_WINDOWS, reason="POSIX: reaping")
def test_wait_process_after_popen_reaped_it_uses_its_returncode(port):
    p = child("raise SystemExit(5)")
    assert p.wait(timeout=60) == 5
    port.wait_process(p)
    assert one(port).result() == 5


def test_wait_process_cancel(port):
    p = child("import time; time.sleep(60)")
    try:
        cancel_and_collect(port, port.wait_process(p))
    finally:
        p.kill()
        p.wait()


def test_wait_process_close_while_pending(backend):
    p = child("import time; time.sleep(60)")
    try:
        close_with_pending(backend, lambda port: [port.wait_process(p)])
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("process, exc", [("1234", TypeError), (None, TypeError), (object(), TypeError)]
                         + ([] if ON_WINDOWS else [(0, ValueError), (-1, ValueError), (1 << 40, ValueError)]))
def test_wait_process_bad_arguments_submit_nothing(port, process, exc):
    with pytest.raises(exc):
        port.wait_process(process)
    assert_nothing_submitted(port)


# ---------------------------------------------------------------------------
# timer
# ---------------------------------------------------------------------------

def test_timer_fires_after_its_delay(port):
    t0 = time.monotonic()
    op = port.timer(0.05, context="t")
    c = one(port)
    elapsed = time.monotonic() - t0
    assert c is op and c.op == "timer" and c.context == "t" and c.key is None
    assert c.result() is None and c.error is None and not c.cancelled
    assert elapsed >= 0.045


def test_timers_fire_in_the_order_of_their_delays(port):
    for delay in (0.12, 0.04, 0.08, 0.0):
        port.timer(delay, context=delay)
    assert [c.context for c in collect(port, 4)] == [0.0, 0.04, 0.08, 0.12]


def test_timer_cancel(port):
    t0 = time.monotonic()
    cancel_and_collect(port, port.timer(30))
    assert time.monotonic() - t0 < 5


def test_timer_close_while_pending(backend):
    close_with_pending(backend, lambda port: [port.timer(100) for _ in range(10)])


@pytest.mark.parametrize("delay, exc", [(-0.1, ValueError), (float("nan"), ValueError), ("1", TypeError),
                                        (None, TypeError)])
def test_timer_bad_delay_submits_nothing(port, delay, exc):
    with pytest.raises(exc):
        port.timer(delay)
    assert_nothing_submitted(port)


# ---------------------------------------------------------------------------
# timeout= on submit methods
# ---------------------------------------------------------------------------

def test_recv_timeout_expires_with_timeout_error(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    t0 = time.monotonic()
    op = port.recv(a, 16, timeout=0.05)
    c = one(port)
    assert c is op and isinstance(c.error, TimeoutError) and not c.cancelled
    assert time.monotonic() - t0 >= 0.045
    with pytest.raises(TimeoutError):
        c.result()


def test_data_that_arrived_wins_over_the_timeout(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    b.send(b"early")
    time.sleep(0.02)
    port.recv(a, 16, timeout=0.05)
    c = one(port)
    assert c.error is None and bytes(c.buffer[:c.nbytes]) == b"early"


def test_a_timeout_that_does_not_fire_leaves_no_trace(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    op = port.recv(a, 16, timeout=0.2)
    b.send(b"x")
    assert one(port) is op and op.nbytes == 1
    time.sleep(0.3)
    assert port.get(timeout=0.05) is None, "the expired timer must not complete anything"


def test_cancel_before_the_timeout_is_a_cancel(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    c = cancel_and_collect(port, port.recv(a, 16, timeout=30))
    assert not isinstance(c.error, TimeoutError)


def test_accept_and_poll_time_out(port):
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        port.register(lsock)
        port.accept(lsock, timeout=0.05, context="accept")
        port.poll(lsock, fastiocp.POLLIN, timeout=0.05, context="poll")
        got = collect(port, 2)
        assert sorted(c.context for c in got) == ["accept", "poll"]
        assert all(isinstance(c.error, TimeoutError) for c in got)
    finally:
        lsock.close()


def test_many_timeouts_each_complete_once(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    ops = [port.recvmsg(a, [bytearray(4)], timeout=0.01 * (i % 5)) for i in range(50)]
    got = collect(port, 50)
    assert set(got) == set(ops)
    assert all(isinstance(c.error, TimeoutError) for c in got)
    assert port.get(timeout=0.1) is None


@pytest.mark.parametrize("timeout, exc", [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError)])
def test_bad_timeout_submits_nothing(port, tcp_pair, timeout, exc):
    a, _b = tcp_pair
    port.register(a)
    with pytest.raises(exc):
        port.recv(a, 16, timeout=timeout)
    with pytest.raises(exc):
        port.poll(a, fastiocp.POLLIN, timeout=timeout)
    assert_nothing_submitted(port)


# ---------------------------------------------------------------------------
# fsync, connect_pipe
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("datasync", [False, True])
def test_fsync_after_a_write(port, tmp_path, datasync):
    with fastiocp.open(tmp_path / "f", "wb") as f:
        port.register(f, key="f")
        port.write(f, b"durable", 0)
        assert one(port).nbytes == 7
        op = port.fsync(f, datasync=datasync, context="sync")
        c = one(port)
        assert c is op and c.op == "fsync" and c.key == "f" and c.result() is None
    assert (tmp_path / "f").read_bytes() == b"durable"


def test_fsync_unregistered_file_is_refused(port, tmp_path):
    with fastiocp.open(tmp_path / "f", "wb") as f:
        with pytest.raises(ValueError, match="not registered"):
            port.fsync(f)
    assert_nothing_submitted(port)


@pytest.mark.skipif(ON_WINDOWS, reason="connect_pipe is a Windows operation")
def test_connect_pipe_is_not_implemented_off_windows(port, tcp_pair):
    port.register(tcp_pair[0])
    assert fastiocp.backend_operations(port.backend)["connect_pipe"] == "unsupported"
    with pytest.raises(NotImplementedError, match="connect_pipe"):
        port.connect_pipe(tcp_pair[0])
    assert_nothing_submitted(port)


def test_backend_operations_cover_every_operation(backend):
    table = fastiocp.backend_operations(backend)
    ops = {"read", "write", "recv", "send", "recvfrom", "sendto", "accept", "connect", "post", "poll",
           "sendmsg", "recvmsg", "sendfile", "wait_process", "timer", "fsync", "connect_pipe", "timeout"}
    assert set(table) == ops
    assert set(table.values()) <= {"native", "emulated", "unsupported"}
    unsupported = {op for op, how in table.items() if how == "unsupported"}
    assert unsupported == (set() if ON_WINDOWS else {"connect_pipe"})
    with pytest.raises(ValueError):
        fastiocp.backend_operations("kqueue")


# ---------------------------------------------------------------------------
# No growth over many cycles
# ---------------------------------------------------------------------------

def test_new_operations_do_not_leak(port, tcp_pair, data_file):
    """poll, sendmsg/recvmsg, a recv that times out, a timer, a cancelled
    wait and sendfile, over and over: no descriptor, handle or memory
    growth."""
    a, b = tcp_pair
    port.register(a)
    port.register(b)
    f, _payload = data_file
    buf = bytearray(64)

    def cycles(n):
        for i in range(n):
            port.poll(b, fastiocp.POLLOUT)
            port.sendmsg(b, [b"ab", b"cd"])
            port.recvmsg(a, [buf])
            got = collect(port, 3)
            assert all(c.error is None for c in got)
            if i % 4 == 0:
                port.timer(0)
                port.recv(a, buf, timeout=0)
                got = collect(port, 2)
                assert sum(isinstance(c.error, TimeoutError) for c in got) == 1
            if i % 16 == 0:
                port.sendfile(b, f, 0, 64)
                assert collect(port, 1)[0].nbytes == 64
                a.recv(64, socket.MSG_WAITALL)

    assert_no_growth(cycles, 2000 if not UNDER_WINE else 100, CYCLES)


@pytest.mark.skipif(not ON_LINUX, reason="process waits: pidfds on Linux")
def test_process_waits_do_not_leak_descriptors(port):
    from conftest import open_fd_count
    before = open_fd_count()
    for _ in range(20):
        p = child("pass")
        port.wait_process(p)
        assert one(port, timeout=60).result() == 0
        p.wait()
    assert open_fd_count() == before
