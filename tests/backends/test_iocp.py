"""IOCP-only behaviour: Ctrl-C, AcceptEx/ConnectEx details, the exactly-once
rule for immediate results, EOF mapping, handles, files, concurrency."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastiocp
from conftest import collect, contexts_got_by_waiters, ctrl_c_child_script, growth, loopback_udp_pair, open_fd_count

pytestmark = pytest.mark.skipif(sys.platform != "win32", reason="Windows only: IOCP")

WSAEMSGSIZE = 10040
WSAENOTSOCK = 10038
WSAENOTCONN = 10057
ERROR_INVALID_PARAMETER = 87
ERROR_OPERATION_ABORTED = 995


def _wine_version() -> str | None:
    """Wine's version when running under Wine, else None."""
    if sys.platform != "win32":
        return None
    import ctypes

    try:
        get = ctypes.WinDLL("ntdll").wine_get_version
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_char_p
    return get().decode()


WINE = _wine_version()


@pytest.fixture
def port():
    p = fastiocp.CompletionPort(backend="iocp")
    yield p
    p.close()


def _child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_auto_picks_iocp():
    with fastiocp.CompletionPort() as p:
        assert p.backend == "iocp"
    assert fastiocp.available_backends() == ["iocp"]


# ---------------------------------------------------------------------------
# Ctrl-C: Windows has no EINTR; wait() blocks in slices and the binding
# checks signals between them.


@pytest.mark.parametrize("role", ["only-waiter", "with-other-waiter"])
def test_ctrl_c_interrupts_get(role):
    """SIGINT (raised as Ctrl-C raises it: C raise(), CPython's handler sets
    its flag and event) reaches a main thread blocked in get() promptly,
    also while another thread waits on the same port."""
    r = _child(ctrl_c_child_script("iocp", other_waiter=role == "with-other-waiter", raise_after=0.3))
    assert r.returncode == 0, (r.stdout, r.stderr)
    elapsed = float(r.stdout.split()[-1])
    assert 0.25 <= elapsed < 2, r.stdout


def test_signal_handler_runs_during_get_and_timeout_still_holds():
    """A handler that does not raise runs while get() waits, and get() then
    waits out the rest of its timeout."""
    r = _child("""
        import signal, threading, time, fastiocp
        port = fastiocp.CompletionPort(backend="iocp")
        seen = []
        signal.signal(signal.SIGINT, lambda *a: seen.append(time.monotonic()))
        threading.Timer(0.3, signal.raise_signal, args=(signal.SIGINT,)).start()
        t0 = time.monotonic()
        c = port.get(timeout=1.5)
        t1 = time.monotonic()
        print(c, len(seen), "%.2f %.2f" % (seen[0] - t0, t1 - t0))
    """)
    assert r.returncode == 0, r.stderr
    result, nseen, handled_at, returned_at = r.stdout.split()
    assert result == "None" and nseen == "1"
    assert 0.25 <= float(handled_at) < 1.0  # during the wait, not after it
    assert float(returned_at) >= 1.45


# ---------------------------------------------------------------------------
# AcceptEx and ConnectEx


def test_accepted_socket_has_its_context(port):
    """SO_UPDATE_ACCEPT_CONTEXT: the accepted socket knows both ends and
    supports shutdown(), as one from accept() does."""
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    with lsock, client:
        port.register(lsock)
        op = port.accept(lsock)
        (c,) = collect(port, 1)
        conn, addr = c.result()
        with conn:
            assert addr == client.getsockname()
            assert conn.getpeername() == client.getsockname()
            assert conn.getsockname() == lsock.getsockname()
            assert (conn.family, conn.type) == (socket.AF_INET, socket.SOCK_STREAM)
            conn.sendall(b"hi")
            conn.shutdown(socket.SHUT_WR)
            assert client.recv(10) == b"hi" and client.recv(10) == b""


def test_cancelled_accept_closes_its_socket(port):
    """AcceptEx needs a socket made in advance; a cancelled accept must close
    it, or each cancel leaks a handle."""
    lsock = socket.create_server(("127.0.0.1", 0))
    with lsock:
        port.register(lsock)

        def cycles(n: int) -> None:
            for _ in range(n):
                op = port.accept(lsock)
                assert op.cancel() is True
                (c,) = collect(port, 1)
                assert c.cancelled and c.error.winerror == ERROR_OPERATION_ABORTED

        assert growth(cycles, 5, 50, open_fd_count) == [0]
        # The listener still works afterwards.
        op = port.accept(lsock)
        client = socket.create_connection(lsock.getsockname())
        with client:
            (c,) = collect(port, 1)
            c.result()[0].close()


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_connect_unbound_socket(port, family, host):
    """ConnectEx needs a bound socket: an unbound one is bound to the
    wildcard address first, as connect() does implicitly, and gets its
    context (SO_UPDATE_CONNECT_CONTEXT) so getpeername() works."""
    try:
        lsock = socket.create_server((host, 0), family=family)
    except OSError as exc:
        pytest.skip(f"no {host} here: {exc}")
    client = socket.socket(family, socket.SOCK_STREAM)
    with lsock, client:
        with pytest.raises(OSError):
            client.getsockname()  # not bound yet
        port.register(client)
        port.register(lsock)
        acc = port.accept(lsock)
        con = port.connect(client, lsock.getsockname()[:2])
        collect(port, 2)
        assert con.error is None, con.error
        assert client.getsockname()[1] != 0
        assert client.getpeername()[:2] == lsock.getsockname()[:2]
        conn, addr = acc.result()
        with conn:
            assert addr[1] == client.getsockname()[1]
            client.sendall(b"unbound")
            assert conn.recv(10) == b"unbound"


def test_connect_keeps_an_explicit_bind(port):
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    with lsock, client:
        client.bind(("127.0.0.1", 0))
        local = client.getsockname()
        port.register(client)
        port.connect(client, lsock.getsockname())
        (c,) = collect(port, 1)
        assert c.error is None and client.getsockname() == local


def test_connect_refused_unbound(port):
    probe = socket.create_server(("127.0.0.1", 0))
    addr = probe.getsockname()
    probe.close()
    client = socket.socket()
    with client:
        port.register(client)
        port.connect(client, addr)
        (c,) = collect(port, 1, timeout=30)
        assert isinstance(c.error, ConnectionRefusedError)


# ---------------------------------------------------------------------------
# Exactly one packet per submission, whatever the call returned at once


def test_truncated_datagram_already_waiting(port):
    """WSARecvFrom of a datagram too big for the buffer that is already
    queued fails at once with WSAEMSGSIZE, yet (an NT warning, not an error)
    queues a packet: exactly one completion must come, not two, not none."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b:
        b.bind(("127.0.0.1", 0))
        port.register(b)
        for i in range(20):
            a.sendto(b"0123456789", b.getsockname())
        time.sleep(0.1)  # all of them queued in b before the receives
        ops = [port.recvfrom(b, bytearray(4), context=i) for i in range(20)]
        cs = collect(port, 20)
        assert sorted(c.context for c in cs) == list(range(20))
        for c in cs:
            assert c.error is not None and c.error.winerror == WSAEMSGSIZE
            assert bytes(c.buffer) == b"0123"
        assert port.get(timeout=0.3) is None
        assert port.pending == 0


def test_immediate_failure_arrives_in_completion(port):
    """An operation that fails at once (here: recv on an unconnected TCP
    socket) completes with its error, exactly once, as on Linux."""
    s = socket.socket()
    with s:
        port.register(s)
        op = port.recv(s, 10, context="x")
        (c,) = collect(port, 1)
        assert c is op and c.context == "x"
        assert isinstance(c.error, OSError) and c.error.winerror == WSAENOTCONN
        assert op.cancel() is False
        assert port.get(timeout=0.2) is None and port.pending == 0


def test_immediate_success_still_one_packet(port, tmp_path):
    """Cached file reads usually succeed at once; FILE_SKIP_COMPLETION_PORT_
    ON_SUCCESS is not set, so each still yields exactly one completion."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789" * 100)
    with fastiocp.open(path) as f:
        port.register(f)
        for i in range(200):
            port.read(f, bytearray(10), offset=(i % 100) * 10, context=i)
        cs = collect(port, 200)
        assert sorted(c.context for c in cs) == list(range(200))
        assert all(bytes(c.buffer) == b"0123456789" for c in cs)
        assert port.get(timeout=0.2) is None and port.pending == 0


def test_bad_handle_raises_at_once(port):
    """A handle that is no longer a socket is a bad argument: raised at
    submission, nothing submitted."""
    s = socket.socket()
    handle = s.fileno()
    port.register(handle)
    s.close()
    with pytest.raises(OSError) as info:
        port.recv(handle, 10)
    assert info.value.winerror in (WSAENOTSOCK, 6)  # or ERROR_INVALID_HANDLE
    assert port.pending == 0 and port.get(timeout=0.1) is None


def test_closing_the_socket_cancels_pending_operations(port):
    """Closing a socket with receives pending completes them as cancelled;
    their errors are read from the OVERLAPPED although the socket is gone."""
    a, b = socket.socketpair()
    with a:
        port.register(b)
        ops = [port.recv(b, 10) for _ in range(3)]
        b.close()
        cs = collect(port, 3)
        assert all(c.cancelled and c.error.winerror == ERROR_OPERATION_ABORTED for c in cs)


def _from_exiting_threads(submit, n: int) -> list:
    """Submits n operations, each from a thread that exits right after."""
    ops: list = []
    threads = [threading.Thread(target=lambda: ops.append(submit())) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ops


# Operations submitted from threads that have just exited must complete
# normally once their event comes: Windows keeps the I/O of an exiting thread
# when the handle is associated with a completion port. Wine finishes such
# operations in an APC of the submitting thread and, when that thread exits
# as the event comes, completes them with STATUS_ALERTED instead; the backend
# then runs a receive again and checks an accept or connect for a peer.
# thread.join() returns before the OS thread is gone: the event is made to
# come at once, in that window. 30 rounds hit it several times under Wine.


def test_receives_from_exited_threads(port):
    a, b = socket.socketpair()
    u1, u2 = loopback_udp_pair()
    with a, b, u1, u2:
        port.register(b)
        port.register(u2)
        for _ in range(30):
            recvs = _from_exiting_threads(lambda: port.recv(b, bytearray(1)), 4)
            a.sendall(b"abcd")
            dgrams = _from_exiting_threads(lambda: port.recvfrom(u2, bytearray(8)), 2)
            u1.sendto(b"d1", u2.getsockname())
            u1.sendto(b"d2", u2.getsockname())
            collect(port, 6)
            assert [c.error for c in recvs + dgrams] == [None] * 6
            assert sorted(bytes(c.buffer) for c in recvs) == [b"a", b"b", b"c", b"d"]
            assert sorted(c.result() for c in dgrams) == [(2, u1.getsockname())] * 2
            assert sorted(bytes(c.buffer[:2]) for c in dgrams) == [b"d1", b"d2"]
        assert port.pending == 0 and port.get(timeout=0.2) is None


def test_accepts_from_exited_threads(port):
    lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
    with lsock:
        port.register(lsock)
        for _ in range(30):
            accepts = _from_exiting_threads(lambda: port.accept(lsock), 2)
            clients = [socket.create_connection(lsock.getsockname()) for _ in range(2)]
            collect(port, 2)
            assert sorted(c.result()[1] for c in accepts) == sorted(s.getsockname() for s in clients)
            for c in accepts:
                conn = c.result()[0]
                assert conn.getpeername() == c.result()[1]
                conn.close()
            for s in clients:
                s.close()
        assert port.pending == 0 and port.get(timeout=0.2) is None


def test_connects_from_exited_threads(port):
    lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
    with lsock:
        for _ in range(30):
            clients = [socket.socket() for _ in range(2)]
            for c in clients:
                port.register(c)
            it = iter(clients)
            ops = _from_exiting_threads(lambda: port.connect(next(it), lsock.getsockname()), 2)
            collect(port, 2)
            assert [op.error for op in ops] == [None, None]
            for c in clients:
                assert c.getpeername() == lsock.getsockname()
                port.unregister(c)
                c.close()
            for _ in clients:
                lsock.accept()[0].close()


@pytest.mark.skipif(WINE is not None,
                    reason=f"Wine {WINE} loses the data of a pipe read whose thread exits as the "
                           "data comes: its server hands the data to an APC of that thread, which "
                           "is destroyed unrun (server/thread.c, thread_apc_destroy)")
def test_pipe_reads_from_exited_threads(port):
    r, w, close = _pipe()
    try:
        port.register(r)
        for _ in range(30):
            reads = _from_exiting_threads(lambda: port.read(r, bytearray(1), offset=None), 2)
            _pipe_write(w, b"xy")
            collect(port, 2)
            assert sorted(bytes(c.buffer) for c in reads if c.error is None) == [b"x", b"y"]
    finally:
        close(r)
        close(w)


# ---------------------------------------------------------------------------
# Handles


def test_reregister_after_unregister(port):
    """A handle stays associated with its port until closed: registering it
    again after unregister() must work (and keep working)."""
    a, b = socket.socketpair()
    with a, b:
        for key in range(3):
            port.register(b, key=key)
            port.recv(b, 1)
            a.sendall(b"k")
            assert collect(port, 1)[0].key == key
            port.unregister(b)


def test_handle_belongs_to_one_port():
    a, b = socket.socketpair()
    with a, b, fastiocp.CompletionPort() as p1, fastiocp.CompletionPort() as p2:
        p1.register(b)
        with pytest.raises(OSError) as info:
            p2.register(b)
        assert info.value.winerror == ERROR_INVALID_PARAMETER


def test_os_pipe_cannot_be_registered(port):
    """os.pipe() makes an anonymous pipe opened for synchronous I/O, and
    returns C runtime descriptors: neither the descriptor nor its HANDLE can
    join a completion port. (tests/test_files.py uses an overlapped named
    pipe on Windows instead.)"""
    import msvcrt

    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            port.register(msvcrt.get_osfhandle(r))
        assert port.pending == 0
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------
# EOF and pipes


def _pipe_write(handle: int, data: bytes) -> None:
    """Writes to an overlapped pipe HANDLE (not registered with any port)
    and waits for it."""
    import _winapi

    ov, _err = _winapi.WriteFile(handle, data, overlapped=True)
    assert ov.GetOverlappedResult(True) == (len(data), 0)


def _pipe():
    import _winapi
    from asyncio.windows_utils import pipe

    r, w = pipe(duplex=False, overlapped=(True, True))
    return r, w, _winapi.CloseHandle


def test_pending_pipe_read_sees_eof_when_writer_closes(port):
    """ERROR_BROKEN_PIPE on a read in flight is EOF: 0 bytes, no error."""
    r, w, close = _pipe()
    try:
        port.register(r)
        op = port.read(r, 10, offset=None)
        time.sleep(0.1)
        assert not op.done
        close(w)
        w = None
        (c,) = collect(port, 1)
        assert c is op and c.nbytes == 0 and c.error is None and c.result() == 0
    finally:
        close(r)
        if w is not None:
            close(w)


def test_pipe_write_after_reader_closed_fails(port):
    r, w, close = _pipe()
    try:
        port.register(w)
        close(r)
        r = None
        port.write(w, b"nobody listens", offset=None)
        (c,) = collect(port, 1)
        assert isinstance(c.error, BrokenPipeError), c.error
    finally:
        close(w)
        if r is not None:
            close(r)


def test_read_at_end_of_file_is_eof(port, tmp_path):
    """ERROR_HANDLE_EOF, whether the read fails at once or in its packet."""
    path = tmp_path / "e.bin"
    path.write_bytes(b"abc")
    with fastiocp.open(path) as f:
        port.register(f)
        ops = [port.read(f, 10, offset=off) for off in (3, 4, 1 << 40)]
        collect(port, 3)
        assert [(op.nbytes, op.error) for op in ops] == [(0, None)] * 3


# ---------------------------------------------------------------------------
# Files


def test_offset_none_on_a_file(port, tmp_path):
    """A file opened for overlapped I/O has no file pointer: offset=None
    writes at the end of the file (FILE_WRITE_TO_END_OF_FILE), and a read
    at the current position is refused at once as a bad argument."""
    path = tmp_path / "n.bin"
    with fastiocp.open(path, "w+b") as f:
        port.register(f)
        port.write(f, b"first", offset=0)
        collect(port, 1)
        port.write(f, b"+end", offset=None)
        collect(port, 1)
        with pytest.raises(OSError) as info:
            port.read(f, 10, offset=None)
        assert info.value.winerror == ERROR_INVALID_PARAMETER
        assert port.pending == 0
    assert path.read_bytes() == b"first+end"


def test_append_mode_writes_at_the_end(port, tmp_path):
    """Mode 'a' opens with append-only access: every write lands at the end,
    whatever its offset, as O_APPEND does on Linux."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"old;")
    with fastiocp.open(path, "a") as f:
        port.register(f)
        for chunk in (b"one;", b"two;"):
            port.write(f, chunk, offset=0)
            (c,) = collect(port, 1)
            assert c.error is None and c.nbytes == 4
        assert f.size() == 12
    assert path.read_bytes() == b"old;one;two;"


@pytest.mark.skipif(WINE is not None,
                    reason=f"Wine {WINE} does not check FILE_WRITE_DATA when a file's size is set")
def test_append_mode_cannot_truncate(tmp_path):
    """Append-only access lacks FILE_WRITE_DATA, which setting the size
    (FileEndOfFileInformation) requires."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"keep")
    with fastiocp.open(path, "a") as f:
        with pytest.raises(PermissionError):
            f.truncate(0)
    assert path.read_bytes() == b"keep"


def test_file_helpers(tmp_path):
    path = tmp_path / "h.bin"
    with fastiocp.open(path, "w+b") as f:
        assert f.size() == 0
        f.truncate(1000)
        assert f.size() == 1000
        f.truncate(10)
        assert f.size() == 10
        with pytest.raises(ValueError):
            f.truncate(-1)
    assert path.stat().st_size == 10
    with pytest.raises(FileNotFoundError) as info:
        fastiocp.open(tmp_path / "missing" / "x.bin", "w")
    assert "missing" in str(info.value.filename)
    # The file stays shared: others may read, rename and delete it while open.
    with fastiocp.open(path, "rb") as f:
        assert path.read_bytes() == b"\0" * 10
        os.replace(path, tmp_path / "moved.bin")
        os.remove(tmp_path / "moved.bin")


def _aligned_buffer(size: int):
    import mmap

    return mmap.mmap(-1, size)  # page-aligned, hence sector-aligned


def test_direct_io_reads_aligned(port, tmp_path):
    """direct=True is FILE_FLAG_NO_BUFFERING: sector-aligned offsets,
    lengths and buffers bypass the cache."""
    path = tmp_path / "d.bin"
    path.write_bytes(os.urandom(8192))
    with fastiocp.open(path, "rb", direct=True) as f:
        port.register(f)
        buf = _aligned_buffer(4096)
        port.read(f, buf, offset=4096)
        (c,) = collect(port, 1)
        assert c.error is None and c.nbytes == 4096
        assert buf[:] == path.read_bytes()[4096:]
        buf.close()


@pytest.mark.skipif(WINE is not None,
                    reason=f"Wine {WINE} does not enforce FILE_FLAG_NO_BUFFERING's sector alignment")
def test_direct_io_refuses_misaligned_length(port, tmp_path):
    """A misaligned length is a bad argument (ERROR_INVALID_PARAMETER):
    raised at submission, nothing submitted."""
    path = tmp_path / "d.bin"
    path.write_bytes(os.urandom(8192))
    with fastiocp.open(path, "rb", direct=True) as f:
        port.register(f)
        buf = _aligned_buffer(4096)
        with pytest.raises(OSError) as info:
            port.read(f, memoryview(buf)[:100], offset=0)
        assert info.value.winerror == ERROR_INVALID_PARAMETER
        assert port.pending == 0
        buf.close()


# ---------------------------------------------------------------------------
# Concurrency


@pytest.mark.parametrize("concurrency", [0, 1, 2, 64])
def test_concurrency_value_accepted(concurrency):
    """The value goes to CreateIoCompletionPort; any value serves any
    number of threads (the kernel only limits how many run at once)."""
    with fastiocp.CompletionPort(concurrency=concurrency, backend="iocp") as port:
        assert port.concurrency == concurrency
        assert contexts_got_by_waiters(port, threads=4, each=25) == list(range(100))


@pytest.mark.skipif(WINE is not None,
                    reason=f"Wine {WINE} ignores the concurrency value of a completion port "
                           "(FIXME in its server/completion.c)")
@pytest.mark.parametrize("concurrency, limited", [(1, True), (2, False)])
def test_kernel_limits_running_threads(concurrency, limited):
    """With concurrency 1, a thread that dequeued a packet and keeps running
    (hashing with the GIL released) holds back a second waiting thread until
    it blocks; with 2 the second thread gets its packet meanwhile."""
    import hashlib

    blob = bytes(256 << 20)
    times = {}
    with fastiocp.CompletionPort(concurrency=concurrency, backend="iocp") as port:

        def worker() -> None:
            c = port.get(timeout=20)
            now = time.monotonic()
            if c.context == "first":
                port.post(context="second")
                times["busy_from"] = time.monotonic()
                hashlib.sha256(blob).digest()  # running, without the GIL
                times["busy_until"] = time.monotonic()
                time.sleep(0.5)  # blocked: the kernel may release another
            else:
                times["second"] = now

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        port.post(context="first")
        for t in threads:
            t.join(30)
    assert times["busy_until"] - times["busy_from"] > 0.1, "hashing too fast to tell"
    if limited:
        assert times["second"] >= times["busy_until"]
    else:
        assert times["second"] < times["busy_until"]


# ---------------------------------------------------------------------------
# Close


def test_close_drains_queued_packets_and_io():
    """Packets still queued in the kernel (posts and finished receives) and
    cancelled operations all come back to close(), which releases them."""
    a, b = socket.socketpair()
    with a, b:
        port = fastiocp.CompletionPort(backend="iocp")
        port.register(b)
        bufs = [bytearray(4) for _ in range(10)]
        ops = [port.recv(b, buf) for buf in bufs]
        a.sendall(b"x" * 8)  # a few receives finish, the rest stay pending
        for i in range(100):
            port.post(context=i)
        time.sleep(0.2)
        port.close()
        assert port.pending == 0
        assert all(op.done for op in ops)
        assert all(op.cancelled or (op.error is None and op.nbytes > 0) for op in ops)
        assert any(op.cancelled for op in ops)
        received = sum(op.nbytes for op in ops if op.error is None)
        b.setblocking(False)
        try:
            left = len(b.recv(100))
        except BlockingIOError:
            left = 0
        assert received + left == 8  # nothing lost to a cancelled receive
        for buf in bufs:
            buf.extend(b"released")
