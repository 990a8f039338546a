"""IOCP-only behaviour of the issue-14 operations (csrc/win/iocp.c): AFD
polls, TransmitFile, ConnectNamedPipe, thread-pool timers, process waits and
flushes, and per-operation timeouts; and of issue 18's pooled receives (a
zero-byte WSARecv, then recv() into a pool buffer) and multishot accepts
(AcceptEx children kept in flight). Scenarios ported (rewritten, not
copied) from pywin32's win32/test/test_win32file.py (TestTransmit,
TestOverlapped's named-pipe completion-port tests) and CPython's
Lib/test/test_asyncio/test_windows_events.py (test_wait_for_handle,
test_pipe) are named after their origin. The behaviour every backend shares
is tests/test_operations.py's."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import fastiocp
from conftest import UNDER_WINE, assert_no_growth, collect, loopback_tcp_pair, loopback_udp_pair, open_fd_count

pytestmark = pytest.mark.skipif(sys.platform != "win32", reason="Windows only: IOCP")

if sys.platform == "win32":
    import _winapi

ERROR_OPERATION_ABORTED = 995
ERROR_PIPE_CONNECTED = 535
WSAECONNRESET = 10054
WSAEOPNOTSUPP = 10045
MSG_TRUNC = 0x100


@pytest.fixture
def port():
    p = fastiocp.CompletionPort(backend="iocp")
    yield p
    p.close()


def one(port: fastiocp.CompletionPort, timeout: float = 10.0) -> fastiocp.Completion:
    """The next completion, and no second one within 50 ms."""
    c = port.get(timeout=timeout)
    assert c is not None, f"no completion within {timeout}s"
    assert port.get(timeout=0.05) is None, "a second completion came"
    return c


def child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


_pipe_seq = iter(range(1 << 30))


def pipe_name() -> str:
    return rf"\\.\pipe\fastiocp-test-{os.getpid()}-{next(_pipe_seq)}"


def server_pipe(name: str, first: bool = True, instances: int = 1) -> int:
    mode = _winapi.PIPE_ACCESS_DUPLEX | _winapi.FILE_FLAG_OVERLAPPED
    if first:
        mode |= _winapi.FILE_FLAG_FIRST_PIPE_INSTANCE
    return _winapi.CreateNamedPipe(
        name, mode, _winapi.PIPE_WAIT,  # byte type and read mode (0)
        instances, 4096, 4096, _winapi.NMPWAIT_WAIT_FOREVER, _winapi.NULL)


def client_pipe(name: str) -> int:
    """A blocking client end (no FILE_FLAG_OVERLAPPED)."""
    return _winapi.CreateFile(name, _winapi.GENERIC_READ | _winapi.GENERIC_WRITE, 0, _winapi.NULL,
                              _winapi.OPEN_EXISTING, 0, _winapi.NULL)


# ---------------------------------------------------------------------------
# The support table


def test_support_table_says_how_each_kind_is_done():
    table = fastiocp.backend_operations("iocp")
    native = {"read", "write", "recv", "send", "recvfrom", "sendto", "accept", "connect", "post",
              "poll", "sendmsg", "recvmsg", "sendfile", "connect_pipe"}
    emulated = {"wait_process", "timer", "fsync", "timeout"}
    assert {k for k, v in table.items() if v == "native"} == native
    assert {k for k, v in table.items() if v == "emulated"} == emulated


# ---------------------------------------------------------------------------
# AFD polls (IOCTL_AFD_POLL on the port's \Device\Afd handle)


def test_afd_poll_in_on_data(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    op = port.poll(a, fastiocp.POLLIN)
    assert port.get(timeout=0.2) is None, "POLLIN before any data"
    b.send(b"ping")
    c = one(port)
    assert c is op and c.result() == fastiocp.POLLIN
    assert a.recv(16) == b"ping", "a poll consumes nothing"


def test_afd_poll_out_on_a_connected_socket(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    port.poll(a, fastiocp.POLLOUT)
    assert one(port).result() == fastiocp.POLLOUT


def test_afd_poll_in_and_out_reports_only_what_is_ready(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    port.poll(a, fastiocp.POLLIN | fastiocp.POLLOUT)
    assert one(port).result() == fastiocp.POLLOUT
    b.send(b"x")
    time.sleep(0.05)
    port.poll(a, fastiocp.POLLIN | fastiocp.POLLOUT)
    assert one(port).result() == fastiocp.POLLIN | fastiocp.POLLOUT


def test_afd_poll_hup_on_peer_close(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    op = port.poll(a, fastiocp.POLLIN)
    time.sleep(0.05)
    b.close()
    events = one(port).result()
    assert op.done and events & fastiocp.POLLIN
    if not UNDER_WINE:
        # AFD_POLL_DISCONNECT. Wine reports a peer's FIN as plain
        # readability (AFD_POLL_RECEIVE: its server polls the Unix socket).
        assert events & fastiocp.POLLHUP
    assert a.recv(16) == b""


def test_afd_poll_on_a_listening_socket_fires_on_a_connection(port):
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        port.register(lsock)
        op = port.poll(lsock, fastiocp.POLLIN)
        assert port.get(timeout=0.2) is None
        cli = socket.create_connection(lsock.getsockname())
        assert one(port) is op and op.result() == fastiocp.POLLIN
        srv, _ = lsock.accept()
        srv.close()
        cli.close()
    finally:
        lsock.close()


def test_afd_poll_cancel(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    op = port.poll(a, fastiocp.POLLIN)
    assert port.get(timeout=0.1) is None
    assert op.cancel()
    c = one(port)
    assert c is op and c.cancelled and c.error.winerror == ERROR_OPERATION_ABORTED


def test_afd_poll_on_a_socket_closed_under_it_is_aborted(port):
    a, b = loopback_tcp_pair()
    try:
        port.register(a)
        op = port.poll(a, fastiocp.POLLIN)
        assert port.get(timeout=0.1) is None
        a.close()  # AFD_POLL_LOCAL_CLOSE (Windows) or the poll's cancellation
        c = one(port)
        assert c is op and isinstance(c.error, OSError)
    finally:
        b.close()


def test_afd_polls_of_many_sockets_on_one_port(port):
    pairs = [loopback_tcp_pair() for _ in range(8)]
    try:
        ops = {}
        for i, (a, _b) in enumerate(pairs):
            port.register(a)
            ops[port.poll(a, fastiocp.POLLIN, context=i)] = i
        for i in (5, 2, 7):
            pairs[i][1].send(b"x")
        got = collect(port, 3)
        assert sorted(c.context for c in got) == [2, 5, 7]
        assert all(c.result() == fastiocp.POLLIN for c in got)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_afd_poll_of_a_non_socket_is_refused(port, tmp_path):
    with fastiocp.open(tmp_path / "f", "wb") as f:
        port.register(f)
        with pytest.raises(OSError):
            port.poll(f, fastiocp.POLLIN)
    assert port.pending == 0


# ---------------------------------------------------------------------------
# sendmsg / recvmsg (WSASend/WSARecv with several WSABUFs)


def test_sendmsg_gathers_and_recvmsg_scatters_on_tcp(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    port.register(b)
    port.sendmsg(a, [b"abc", memoryview(b"defg"), bytearray(b"hi")])
    assert one(port).result() == 9
    x, y = bytearray(4), bytearray(8)
    time.sleep(0.05)
    port.recvmsg(b, [x, y])
    nbytes, anc, flags, address = one(port).result()
    assert (nbytes, anc, flags) == (9, [], 0)
    assert bytes(x) == b"abcd" and bytes(y[:5]) == b"efghi"


def test_recvmsg_truncated_datagram_reports_msg_trunc(port):
    a, b = loopback_udp_pair()
    try:
        port.register(a)
        port.register(b)
        port.sendmsg(a, [b"0123456789"], address=b.getsockname())
        assert one(port).result() == 10
        buf = bytearray(4)
        port.recvmsg(b, [buf])
        nbytes, _anc, flags, address = one(port).result()
        assert nbytes == 4 and bytes(buf) == b"0123"
        assert flags & MSG_TRUNC
        assert address == a.getsockname()
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# sendfile: TransmitFile


def test_win32file_transmit_file(port):
    """pywin32 TestTransmit.test_transmit: a 2 MiB file sent whole several
    times over one connection arrives intact and in order (without the
    head and tail buffers, which fastiocp's sendfile has not)."""
    payload = os.urandom(1024 * 1024).hex().encode()
    fd, path = tempfile.mkstemp()
    with os.fdopen(fd, "wb") as fw:
        fw.write(payload)
    f = fastiocp.open(path, "rb")
    a, b = loopback_tcp_pair()
    try:
        port.register(a)
        got = bytearray()

        def reader():
            while True:
                chunk = b.recv(1 << 17)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        total = 0
        for _ in range(3):
            sent = 0
            while sent < len(payload):
                port.sendfile(a, f, sent, len(payload) - sent)
                n = one(port, timeout=60).result()
                assert n > 0
                sent += n
            total += sent
        a.shutdown(socket.SHUT_WR)
        t.join(60)
        assert total == len(got) == 3 * len(payload)
        assert bytes(got) == payload * 3
    finally:
        a.close()
        b.close()
        f.close()
        os.unlink(path)


def test_transmit_file_cancel(port):
    """A TransmitFile blocked by a full peer buffer is cancellable."""
    payload = b"z" * (8 << 20)
    fd, path = tempfile.mkstemp()
    with os.fdopen(fd, "wb") as fw:
        fw.write(payload)
    f = fastiocp.open(path, "rb")
    a, b = loopback_tcp_pair()
    try:
        port.register(a)
        op = port.sendfile(a, f, 0, len(payload))  # nobody reads b
        c = port.get(timeout=0.5)
        if c is None:
            op.cancel()
            c = one(port)
            assert c is op and (c.cancelled or c.nbytes > 0)
        else:
            assert c is op  # the socket buffers took it all (Wine buffers a lot)
    finally:
        a.close()
        b.close()
        f.close()
        os.unlink(path)


# ---------------------------------------------------------------------------
# connect_pipe: ConnectNamedPipe


def test_win32file_completion_port_named_pipe_server(port):
    """pywin32 TestOverlapped (the _IOCPServerThread tests): a server
    pipe's ConnectNamedPipe completes through the completion port when a
    client connects, then overlapped reads and writes echo on it."""
    name = pipe_name()
    pipe = server_pipe(name)
    try:
        port.register(pipe, key="pipe")
        op = port.connect_pipe(pipe, context="connect")
        assert port.get(timeout=0.1) is None, "no client yet"
        cli = client_pipe(name)
        try:
            c = one(port)
            assert c is op and c.op == "connect_pipe" and c.key == "pipe" and c.result() is None
            port.read(pipe, 64, offset=None)
            _winapi.WriteFile(cli, b"Hello World")
            c = one(port)
            assert bytes(c.buffer[:c.nbytes]) == b"Hello World"
            port.write(pipe, b"Echo: Hello World", offset=None)
            assert one(port).nbytes == 17
            data, err = _winapi.ReadFile(cli, 64)
            assert (data, err) == (b"Echo: Hello World", 0)
        finally:
            _winapi.CloseHandle(cli)
        port.read(pipe, 64, offset=None)
        assert one(port).nbytes == 0, "the client's close reads as EOF"
    finally:
        _winapi.CloseHandle(pipe)


def test_win32file_connect_named_pipe_already_connected(port):
    """ERROR_PIPE_CONNECTED (a client came before ConnectNamedPipe) is a
    success: one completion, no error."""
    name = pipe_name()
    pipe = server_pipe(name)
    cli = client_pipe(name)
    try:
        port.register(pipe)
        op = port.connect_pipe(pipe)
        c = one(port)
        assert c is op and c.error is None and c.result() is None
    finally:
        _winapi.CloseHandle(cli)
        _winapi.CloseHandle(pipe)


def test_connect_pipe_cancel_then_close_while_pending(port):
    name = pipe_name()
    pipe = server_pipe(name)
    try:
        port.register(pipe)
        op = port.connect_pipe(pipe)
        assert port.get(timeout=0.1) is None
        assert op.cancel()
        c = one(port)
        assert c is op and c.cancelled and c.error.winerror == ERROR_OPERATION_ABORTED
        p2 = fastiocp.CompletionPort(backend="iocp")
        name2 = pipe_name()
        pipe2 = server_pipe(name2)
        try:
            p2.register(pipe2)
            op2 = p2.connect_pipe(pipe2)
            t0 = time.monotonic()
            p2.close()
            assert time.monotonic() - t0 < 5 and op2.done and p2.pending == 0
        finally:
            _winapi.CloseHandle(pipe2)
    finally:
        _winapi.CloseHandle(pipe)


def test_connect_pipe_timeout(port):
    name = pipe_name()
    pipe = server_pipe(name)
    try:
        port.register(pipe)
        op = port.connect_pipe(pipe, timeout=0.05)
        c = one(port)
        assert c is op and isinstance(c.error, TimeoutError)
    finally:
        _winapi.CloseHandle(pipe)


def test_windows_events_pipe(port):
    """asyncio test_windows_events test_pipe: a server accepts several
    clients in turn, each on a new pipe instance, and echoes to each."""
    name = pipe_name()
    n = 5
    servers = [server_pipe(name, first=(i == 0), instances=n) for i in range(n)]
    clients = []
    try:
        for i, s in enumerate(servers):
            port.register(s)
            port.connect_pipe(s, context=i)
        for i in range(n):
            clients.append(client_pipe(name))
        got = collect(port, n)
        assert sorted(c.context for c in got) == list(range(n))
        assert all(c.error is None for c in got)
        for i, cli in enumerate(clients):
            _winapi.WriteFile(cli, b"lower-%d" % i)
        for i, s in enumerate(servers):
            port.read(s, 64, offset=None, context=i)
        for c in collect(port, n):
            port.write(servers[c.context], bytes(c.buffer[:c.nbytes]).upper(), offset=None)
        assert all(c.error is None for c in collect(port, n))
        for i, cli in enumerate(clients):
            assert _winapi.ReadFile(cli, 64) == (b"LOWER-%d" % i, 0)
    finally:
        for h in clients + servers:
            _winapi.CloseHandle(h)


# ---------------------------------------------------------------------------
# wait_process: a thread-pool wait on a duplicate of the process handle


def test_windows_events_wait_for_handle(port):
    """asyncio test_windows_events test_wait_for_handle: a wait with a
    timeout ends with the timeout while the process runs, and a new wait
    completes when it ends; a cancelled wait is cancelled."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); raise SystemExit(7)"],
                         stdin=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        op = port.wait_process(p, timeout=0.5)
        c = one(port, timeout=30)
        assert c is op and isinstance(c.error, TimeoutError) and not c.cancelled
        assert 0.45 <= time.monotonic() - t0 < 10
        op = port.wait_process(p)
        assert port.get(timeout=0.1) is None
        assert op.cancel()
        c = one(port)
        assert c is op and c.cancelled and c.error.winerror == ERROR_OPERATION_ABORTED
        op = port.wait_process(p, context="end")
        p.stdin.close()
        c = one(port, timeout=60)
        assert c is op and c.result() == 7
        assert p.wait(timeout=10) == 7
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_wait_process_exit_code_3(port):
    p = child("raise SystemExit(3)")
    op = port.wait_process(p)
    assert one(port, timeout=60).result() == 3 and op.done
    assert p.wait(timeout=10) == 3


def test_wait_process_of_an_ended_process_and_handle_closed_meanwhile(port):
    """A process that already ended completes at once; the wait holds its
    own handle, so the caller may close theirs while waiting."""
    p = child("raise SystemExit(0)")
    p.wait(timeout=60)
    port.wait_process(p)
    assert one(port).result() == 0
    q = child("import time; time.sleep(0.5); raise SystemExit(4)")
    h = _winapi.DuplicateHandle(_winapi.GetCurrentProcess(), int(q._handle), _winapi.GetCurrentProcess(),
                                0, False, _winapi.DUPLICATE_SAME_ACCESS)
    op = port.wait_process(h)
    _winapi.CloseHandle(h)
    assert one(port, timeout=60) is op and op.result() == 4
    q.wait(timeout=10)


def test_wait_process_many_children_and_close(port):
    ps = [child("import time; time.sleep(60)") for _ in range(3)]
    try:
        p2 = fastiocp.CompletionPort(backend="iocp")
        ops = [p2.wait_process(p) for p in ps]
        t0 = time.monotonic()
        p2.close()
        assert time.monotonic() - t0 < 5
        assert all(op.done and op.cancelled for op in ops)
    finally:
        for p in ps:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------
# timers and timeouts: thread-pool timers


def test_timer_zero_fires_promptly(port):
    t0 = time.monotonic()
    port.timer(0)
    assert one(port).result() is None
    assert time.monotonic() - t0 < 1


def test_many_timers_complete_once_each_and_close_sweeps_the_rest():
    p = fastiocp.CompletionPort(backend="iocp")
    fired = [p.timer(0.01 * (i % 3), context=i) for i in range(30)]
    pending = [p.timer(3600) for _ in range(30)]
    got = collect(p, 30)
    assert sorted(c.context for c in got) == list(range(30))
    assert p.get(timeout=0.1) is None
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 5
    assert all(op.done for op in fired + pending)
    assert all(op.cancelled for op in pending)


def test_timeout_on_recv_then_data_arrives_and_the_socket_still_works(port, tcp_pair):
    a, b = tcp_pair
    port.register(a)
    op = port.recv(a, 16, timeout=0.05)
    c = one(port)
    assert c is op and isinstance(c.error, TimeoutError) and not c.cancelled
    b.send(b"after")
    port.recv(a, 16, timeout=5)
    c = one(port)
    assert c.error is None and bytes(c.buffer[:c.nbytes]) == b"after"


def test_data_wins_over_a_timeout_that_fires_with_it(port, tcp_pair):
    """Data already there and a timeout of 0: the result >= 0 wins."""
    a, b = tcp_pair
    port.register(a)
    b.send(b"data")
    time.sleep(0.05)
    port.recv(a, 16, timeout=0)
    c = one(port)
    assert c.error is None and bytes(c.buffer[:c.nbytes]) == b"data"


def test_timeouts_on_poll_and_wait_process(port, tcp_pair):
    a, _b = tcp_pair
    port.register(a)
    p = child("import time; time.sleep(60)")
    try:
        port.poll(a, fastiocp.POLLIN, timeout=0.05, context="poll")
        port.wait_process(p, timeout=0.05, context="wait")
        got = collect(port, 2)
        assert sorted(c.context for c in got) == ["poll", "wait"]
        assert all(isinstance(c.error, TimeoutError) for c in got)
    finally:
        p.kill()
        p.wait()


def test_timeout_then_close_with_many_pending(tcp_pair):
    a, _b = tcp_pair
    p = fastiocp.CompletionPort(backend="iocp")
    p.register(a)
    ops = [p.recv(a, 4, timeout=3600) for _ in range(20)]
    ops += [p.poll(a, fastiocp.POLLIN, timeout=3600) for _ in range(20)]
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 5
    assert all(op.done and op.cancelled for op in ops)


# ---------------------------------------------------------------------------
# fsync: FlushFileBuffers on a pool thread


def test_fsync_flushes_and_a_read_only_handle_fails(port, tmp_path):
    with fastiocp.open(tmp_path / "f", "wb") as f:
        port.register(f)
        port.write(f, b"x" * 4096, 0)
        assert one(port).nbytes == 4096
        port.fsync(f, timeout=30)
        assert one(port).result() is None
        port.unregister(f)
    with fastiocp.open(tmp_path / "f", "rb") as f:
        port.register(f)
        port.fsync(f)
        c = one(port)
        if UNDER_WINE:
            # Wine 8's NtFlushBuffersFile does not check the handle's access.
            assert c.error is None or isinstance(c.error, PermissionError)
        else:
            assert isinstance(c.error, PermissionError)


def test_fsync_close_while_pending(tmp_path):
    p = fastiocp.CompletionPort(backend="iocp")
    f = fastiocp.open(tmp_path / "f", "wb")
    try:
        p.register(f)
        ops = [p.fsync(f) for _ in range(8)]
        t0 = time.monotonic()
        p.close()
        assert time.monotonic() - t0 < 5
        assert all(op.done and op.error is None for op in ops), "a flush runs to its end"
    finally:
        f.close()


# ---------------------------------------------------------------------------
# Pooled receives: a zero-byte WSARecv while idle, recv() into a buffer once
# data is there


def reset(sock: socket.socket) -> None:
    """Closes sock with an RST (SO_LINGER 0), as a crashed peer would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("hh", 1, 0))
    sock.close()


def test_native_flags_are_none_on_iocp(port):
    assert port.native == frozenset()


def test_pooled_receives_pin_no_buffer_while_idle(port):
    """Many more receives waiting than the pool has buffers: none is taken
    until data comes (the point of the zero-byte receive), then exactly
    one per receive with data."""
    pool = fastiocp.BufferPool(4096, 2)
    pairs = [loopback_tcp_pair() for _ in range(40)]
    try:
        ops = []
        for i, (client, server) in enumerate(pairs):
            port.register(server)
            ops.append(port.recv(server, pool, context=i))
        ops.append(port.recv(pairs[0][1], pool, context="multi", multishot=True))
        assert port.get(timeout=0.3) is None
        assert pool.in_use == 0, "a waiting receive holds a buffer"
        pairs[7][0].sendall(b"seven")
        c = one(port)
        assert c.context == 7 and bytes(c.buffer) == b"seven" and pool.in_use == 1
        c.release()
        assert pool.in_use == 0
        for op in ops:
            op.cancel()
        got = collect(port, len(ops) - 1)
        assert all(x.cancelled and x.buffer is None for x in got)
        assert pool.in_use == 0
    finally:
        for client, server in pairs:
            client.close()
            server.close()


def test_pooled_recv_end_of_stream_and_reset(port):
    """FIONREAD 0 on a readable socket: end of stream (nbytes 0) or a reset
    (WSAECONNRESET); neither takes a buffer."""
    pool = fastiocp.BufferPool(64, 1)
    client, server = loopback_tcp_pair()
    port.register(server)
    op = port.recv(server, pool)
    client.sendall(b"last")
    client.shutdown(socket.SHUT_WR)
    c = one(port)
    assert bytes(c.buffer) == b"last"
    c.release()
    op = port.recv(server, pool)
    c = one(port)
    assert c is op and c.nbytes == 0 and c.error is None and c.buffer is None
    port.unregister(server)
    client.close()
    server.close()

    client, server = loopback_tcp_pair()
    port.register(server)
    op = port.recv(server, pool, multishot=True)
    client.sendall(b"data")
    first = collect(port, 1)[0]
    assert first.more and bytes(first.buffer) == b"data"
    first.release()
    reset(client)
    c = one(port)
    assert c is op and not c.more and isinstance(c.error, ConnectionResetError)
    assert c.error.winerror == WSAECONNRESET and c.buffer is None
    assert pool.in_use == 0
    server.close()


def test_pooled_recv_whose_data_another_receive_took_waits_again(port, tcp_pair):
    """A plain receive on the same (blocking) socket takes the data that
    woke the zero-byte receive: the pooled receive finds nothing (FIONREAD
    0, not readable) and waits again, without blocking the dequeuing
    thread in a recv()."""
    a, b = tcp_pair
    pool = fastiocp.BufferPool(16, 2)
    port.register(a)
    pooled = port.recv(a, pool)
    plain = port.recv(a, bytearray(16))
    b.sendall(b"abc")
    c = one(port, timeout=5)
    assert c is plain and bytes(c.buffer[:c.nbytes]) == b"abc"
    assert not pooled.done and pool.in_use == 0
    b.sendall(b"def")
    c = one(port, timeout=5)
    assert c is pooled and bytes(c.buffer) == b"def"
    c.release()


def test_pooled_recv_on_a_non_blocking_socket(port, tcp_pair):
    a, b = tcp_pair
    a.setblocking(False)
    pool = fastiocp.BufferPool(16, 4)
    port.register(a)
    op = port.recv(a, pool, multishot=True)
    b.sendall(b"0123456789abcdefXYZ")  # more than one buffer
    got = bytearray()
    while len(got) < 19:
        c = collect(port, 1)[0]
        assert c.more and c.nbytes <= 16
        got += bytes(c.buffer)
        c.release()
    assert got == b"0123456789abcdefXYZ"
    assert op.cancel() is True
    c = one(port)
    assert c is op and c.cancelled


def test_pooled_recv_on_udp_takes_one_datagram_per_result(port):
    """On a datagram socket the zero-byte receive peeks (MSG_PEEK): a plain
    zero-byte receive would consume the datagram. A datagram longer than a
    buffer gives its first bytes, as POSIX's recv() does."""
    a, b = loopback_udp_pair()
    pool = fastiocp.BufferPool(8, 4)
    try:
        port.register(a)
        op = port.recv(a, pool, multishot=True)
        assert port.get(timeout=0.1) is None and pool.in_use == 0
        for msg in (b"one", b"two", b"longer than eight", b"four"):
            b.sendto(msg, a.getsockname())
        got = []
        while len(got) < 4:
            c = collect(port, 1)[0]
            assert c.more, c.error
            got.append(bytes(c.buffer))
            c.release()
        assert got == [b"one", b"two", b"longer t", b"four"]
        op.cancel()
        assert one(port) is op and op.cancelled
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# Multishot accepts: several AcceptEx in flight, each a child record


def test_multishot_accept_of_many_connections_arriving_at_once(port):
    """More connections at once than AcceptEx in flight (4): each is taken
    exactly once, with its peer's address, as the children are replaced."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
    port.register(lsock)
    op = port.accept(lsock, multishot=True)
    clients = [socket.socket() for _ in range(16)]
    try:
        for cl in clients:
            cl.setblocking(False)
            cl.connect_ex(lsock.getsockname())
        got = collect(port, len(clients))
        assert all(c.more and c.error is None for c in got), [c.error for c in got]
        accepted = [c.result() for c in got]
        assert len({s.fileno() for s, _ in accepted}) == len(clients)
        assert sorted(a for _, a in accepted) == sorted(cl.getsockname() for cl in clients)
        for s, _ in accepted:
            s.close()
        assert op.cancel() is True
        end = collect(port, 1)
        assert end == [op] and op.cancelled and not op.more
    finally:
        for cl in clients:
            cl.close()
        lsock.close()


def test_multishot_accept_cancel_with_accepts_outstanding(port):
    """Cancelled with its AcceptEx in flight and no connection: one
    completion, cancelled; the pre-created sockets are closed (the handle
    count comes back); the listener still works for the next accept."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
    port.register(lsock)
    port.accept(lsock).cancel()  # load AcceptEx and warm up the port
    one(port)
    before = open_fd_count()
    for _ in range(20):
        op = port.accept(lsock, multishot=True, context="m")
        assert port.get(timeout=0.05) is None
        assert op.cancel() is True
        c = one(port)
        assert c is op and c.cancelled and not c.more and c.context == "m"
        assert op.cancel() is False
    assert open_fd_count() - before < 8
    op = port.accept(lsock)
    client = socket.create_connection(lsock.getsockname())
    c = one(port)
    assert c is op and c.error is None
    c.result()[0].close()
    client.close()
    lsock.close()


def test_close_with_a_multishot_accept_outstanding_returns_everything_once():
    lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
    p = fastiocp.CompletionPort(backend="iocp")
    p.register(lsock)
    op = p.accept(lsock, multishot=True)
    clients = [socket.create_connection(lsock.getsockname()) for _ in range(3)]
    got = collect(p, 3)
    assert all(c.more for c in got)
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 5
    assert op.done and op.cancelled and not op.more and p.pending == 0
    for c in got:
        c.result()[0].close()
    for cl in clients:
        cl.close()
    lsock.close()


def test_multishot_accept_on_a_listener_closed_under_it_ends_it(port):
    lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
    port.register(lsock)
    op = port.accept(lsock, multishot=True)
    assert port.get(timeout=0.05) is None
    lsock.close()
    c = one(port)
    assert c is op and not c.more and isinstance(c.error, OSError)


@pytest.mark.skipif(UNDER_WINE, reason="Wine 8's AcceptEx on a socket that does not listen waits "
                    "instead of failing with WSAEINVAL")
def test_multishot_accept_on_a_socket_not_listening_fails_in_its_completion(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        port.register(s)
        op = port.accept(s, multishot=True)
        c = one(port)
        assert c is op and not c.more and isinstance(c.error, OSError) and not c.cancelled
    finally:
        s.close()


def test_pooled_recv_timeout_holds_no_buffer(port, tcp_pair):
    a, b = tcp_pair
    pool = fastiocp.BufferPool(16, 1)
    port.register(a)
    op = port.recv(a, pool, timeout=0.05)
    c = one(port)
    assert c is op and isinstance(c.error, TimeoutError) and c.buffer is None
    assert pool.in_use == 0
    b.sendall(b"later")
    op = port.recv(a, pool, timeout=5)
    c = one(port)
    assert bytes(c.buffer) == b"later"
    c.release()


# Pooled receives and multishot accepts started, and started again, by
# threads that exit (see test_iocp.py's tests of exited threads: Wine
# completes their socket requests with STATUS_ALERTED, and the backend
# starts a receive again or checks an accept for a peer). A multishot
# operation's next request is started by the thread that dequeued its last
# result: here each result is taken by a thread that exits at once.


def _in_exiting_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_pooled_receives_from_exited_threads(port, tcp_pair):
    a, b = tcp_pair
    pool = fastiocp.BufferPool(64, 4)
    port.register(a)
    for i in range(30):
        op = _in_exiting_thread(lambda: port.recv(a, pool))
        b.sendall(b"r%d" % i)
        c = one(port)
        assert c is op and bytes(c.buffer) == b"r%d" % i, c.error
        c.release()
    op = _in_exiting_thread(lambda: port.recv(a, pool, multishot=True))
    for i in range(30):
        b.sendall(b"m%d" % i)
        c = _in_exiting_thread(lambda: port.get(timeout=10))
        assert c is not None and c.more and bytes(c.buffer) == b"m%d" % i, c and c.error
        c.release()
    op.cancel()
    assert one(port) is op and op.cancelled and pool.in_use == 0


def test_multishot_accept_from_exited_threads(port):
    lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
    with lsock:
        port.register(lsock)
        op = _in_exiting_thread(lambda: port.accept(lsock, multishot=True))
        for _ in range(30):
            client = socket.create_connection(lsock.getsockname())
            c = _in_exiting_thread(lambda: port.get(timeout=10))
            assert c is not None and c.more and c.error is None, c and c.error
            conn, addr = c.result()
            assert addr == client.getsockname() == conn.getpeername()
            conn.close()
            client.close()
        assert op.cancel() is True
        assert collect(port, 1) == [op] and op.cancelled


def test_pooled_and_multishot_cycles_leak_nothing(port):
    """Handles (AcceptEx's pre-created sockets) and memory (children and
    their extensions) stay flat over many multishot operations."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
    client, server = loopback_tcp_pair()
    pool = fastiocp.BufferPool(64, 4)
    port.register(lsock)
    port.register(server)

    def cycles(n):
        for _ in range(n):
            acc = port.accept(lsock, multishot=True)
            rec = port.recv(server, pool, multishot=True)
            client.sendall(b"x")
            got = collect(port, 1)[0]
            assert got.more and bytes(got.buffer) == b"x"
            got.release()
            acc.cancel()
            rec.cancel()
            collect(port, 2)

    try:
        assert_no_growth(cycles, 20, 200)
        assert pool.in_use == 0 and port.pending == 0
    finally:
        lsock.close()
        client.close()
        server.close()


def test_multishot_accept_cancelled_mid_stream_loses_no_connection(port):
    """Four threads dequeue while 40 connections arrive and the multishot
    accept is cancelled half way: each connection is accepted exactly once,
    by a child or, after the end, by plain accepts (a connection that an
    AcceptEx had taken when the cancel came is a child, not lost)."""
    n = 40
    lsock = socket.create_server(("127.0.0.1", 0), backlog=n)
    port.register(lsock)
    op = port.accept(lsock, multishot=True)
    got: list = []
    lock = threading.Lock()

    def worker():
        while True:
            c = port.get(timeout=10)
            if c is None or c.key == "stop":
                return
            with lock:
                got.append(c)
            if c is op:
                for _ in range(3):
                    port.post(key="stop")
                return

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    clients = []
    try:
        for i in range(n):
            clients.append(socket.create_connection(lsock.getsockname()))
            if i == n // 2:
                op.cancel()
        for t in threads:
            t.join(30)
        assert sum(c is op for c in got) == 1 and op.cancelled and not op.more
        children = [c for c in got if c is not op]
        assert all(c.more and c.error is None for c in children)
        peers = [c.result()[1] for c in children]
        for c in children:
            c.result()[0].close()
        lsock.settimeout(5)
        while len(peers) < n:
            conn, addr = lsock.accept()
            peers.append(addr)
            conn.close()
        assert sorted(peers) == sorted(cl.getsockname() for cl in clients)
    finally:
        for cl in clients:
            cl.close()
        lsock.close()
