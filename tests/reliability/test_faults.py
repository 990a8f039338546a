"""Fault injection (issue 6, item 4): peer resets, half-closed connections,
descriptors closed under an operation, EMFILE, tiny rings, signal storms and
interpreter shutdown with I/O in flight. Each must end in a clear exception
or a completion that carries the error: never a crash, a hang or a lost
packet.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import socket
import struct
import sys
import threading
import time

import pytest

import fastiocp
from conftest import collect, loopback_tcp_pair
from relutil import (ON_LINUX, ON_WINDOWS, UNDER_WINE, assert_clean_exit, env_int, hard_watchdog,
                     is_cancel_error, join_all, record, run_child)

pytestmark = pytest.mark.reliability

RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def abort(sock: socket.socket) -> None:
    """close() that sends RST instead of FIN (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------------------
# Peer resets and half-closed connections


def test_peer_reset_fails_pending_recv_and_send(port):
    """N connections, each with a receive and a send that cannot finish (8
    MiB into a peer that does not read) in flight; every peer resets. Each
    operation completes exactly once: the receive with a reset error (or
    EOF), the send with a reset/pipe error or a short count; operations
    submitted afterwards on the dead socket complete with errors too, never
    raise at submission."""
    n = 4 if UNDER_WINE else 24
    pairs = [loopback_tcp_pair() for _ in range(n)]
    big = bytes(8 << 20)
    try:
        ops = []
        for i, (client, server) in enumerate(pairs):
            port.register(server, key=i)
            ops.append(port.recv(server, bytearray(256), context=("recv", i)))
            ops.append(port.send(server, big, context=("send", i)))
        time.sleep(0.1)  # let the sends fill the socket buffers
        for client, _server in pairs:
            abort(client)
        cs = collect(port, len(ops), timeout=30)
        assert sorted(c.context for c in cs) == sorted(op.context for op in ops)
        for c in cs:
            if c.op == "recv":
                assert isinstance(c.error, RESET_ERRORS) or (c.error is None and c.nbytes == 0), c
            else:
                assert isinstance(c.error, RESET_ERRORS) or (c.error is None and 0 < c.nbytes < len(big)), c
        # The socket is dead: new operations complete with an error.
        later = []
        for i, (_client, server) in enumerate(pairs):
            later.append(port.send(server, b"after reset", context=("late-send", i)))
            later.append(port.recv(server, 16, context=("late-recv", i)))
        cs = collect(port, len(later), timeout=30)
        for c in cs:
            if c.op == "send":
                assert isinstance(c.error, OSError), c
            else:
                assert isinstance(c.error, OSError) or c.nbytes == 0, c
        assert port.pending == 0
    finally:
        for client, server in pairs:
            client.close()
            server.close()


def test_half_closed_connection_both_ways(port):
    """Peer shuts down its sending side: a pending receive completes with
    nbytes == 0 (EOF is not an error) and so does every later one, while
    sending the other way still works. Then this side shuts down its own
    sending side: the peer sees EOF, and a send through the port completes
    with an error instead of raising."""
    client, server = loopback_tcp_pair()
    with client, server:
        port.register(server, key="server")
        first = port.recv(server, bytearray(64))
        client.shutdown(socket.SHUT_WR)
        (c,) = collect(port, 1)
        assert c is first and c.error is None and c.nbytes == 0
        again = port.recv(server, bytearray(64))
        (c,) = collect(port, 1)
        assert c is again and c.error is None and c.nbytes == 0
        port.send(server, b"still flowing")
        (c,) = collect(port, 1)
        assert c.error is None and c.nbytes == 13
        client.settimeout(10)
        assert client.recv(64) == b"still flowing"
        server.shutdown(socket.SHUT_WR)
        assert client.recv(64) == b""
        op = port.send(server, b"after my shutdown")
        (c,) = collect(port, 1)
        assert c is op and isinstance(c.error, OSError), c  # EPIPE / WSAESHUTDOWN


def test_shutdown_own_socket_with_recv_pending(port):
    """shutdown(SHUT_RDWR) on this side while a receive waits: the receive
    completes, by itself (Linux: EOF) or once cancelled (Wine leaves it
    pending), and the port goes on."""
    client, server = loopback_tcp_pair()
    with client, server:
        port.register(server)
        op = port.recv(server, bytearray(64))
        time.sleep(0.05)
        server.shutdown(socket.SHUT_RDWR)
        _closed_under(port, op)
        assert op.nbytes == 0 or isinstance(op.error, OSError), op
        port.post(context="alive")
        assert port.get(timeout=5).context == "alive"


# ---------------------------------------------------------------------------
# Descriptors closed under an operation


def _closed_under(port, op, timeout=10.0):
    """The completion of op, whose descriptor the user closed: it may come
    by itself (Windows cancels, Linux may report EBADF); if not, cancel()
    must bring it."""
    got = port.get_many(8, timeout=0.3)
    if op not in got:
        op.cancel()
        got += collect(port, 1, timeout=timeout)
    assert got == [op], got
    return op


@pytest.mark.parametrize("kind", ["recv", "send", "accept"])
def test_close_socket_with_operation_in_flight(port, kind):
    """The user closes a socket while an operation on it is in flight. The
    operation still completes exactly once (by itself or when cancelled),
    with an error or as cancelled, and the port stays usable; close() of
    the port afterwards is prompt."""
    if kind == "send" and UNDER_WINE:
        pytest.skip("Wine does not abort a pending overlapped WSASend when its socket is closed "
                    "(Windows does: closesocket() cancels it), so its packet never comes under Wine")
    extra = []
    if kind == "accept":
        sock = socket.create_server(("127.0.0.1", 0))
        port.register(sock)
        op = port.accept(sock)
    else:
        sock, peer = loopback_tcp_pair()
        extra.append(peer)
        port.register(sock)
        op = port.recv(sock, bytearray(64)) if kind == "recv" else port.send(sock, bytes(16 << 20))
    time.sleep(0.05)
    port.unregister(sock)
    sock.close()
    _closed_under(port, op)
    assert op.done
    if kind == "send":
        assert op.error is not None or 0 < op.nbytes <= 16 << 20
    else:
        assert op.error is not None or (kind == "recv" and op.nbytes == 0), op
    port.post(context="alive")
    assert port.get(timeout=5).context == "alive"
    assert port.pending == 0
    for s in extra:
        s.close()


def test_descriptor_number_reused_after_close(port):
    """A receive waits on socket A; the user closes A (without cancelling)
    and a new socket B gets the same descriptor number. B's operations get
    B's data; A's operation never receives B's data and still completes
    exactly once (an error, or cancelled when asked)."""
    a, a_peer = socket.socketpair()
    port.register(a, key="A")
    old = port.recv(a, bytearray(64), context="old")
    number = a.fileno()
    port.unregister(a)
    a.close()
    # Take the same number for B (Linux hands out the lowest free one;
    # Windows reuses handle values less predictably: try a few times).
    spare, found = [], None
    for _ in range(64):
        b, b_peer = socket.socketpair()
        if b.fileno() == number:
            found = (b, b_peer)
            break
        spare.append((b, b_peer))
    for s1, s2 in spare:
        s1.close()
        s2.close()
    if found is None:
        old.cancel()
        collect(port, 1)
        a_peer.close()
        pytest.skip("the OS did not reuse the descriptor number")
    b, b_peer = found
    with b, b_peer, a_peer:
        port.register(b, key="B")
        new = port.recv(b, bytearray(64), context="new")
        b_peer.sendall(b"for B only")
        got = {c.context: c for c in collect(port, 1, timeout=10)}
        if "old" in got:  # the old operation noticed its file was gone
            assert got["old"].error is not None
            got.update({c.context: c for c in collect(port, 1, timeout=10)})
        assert "new" in got, got
        assert bytes(new.buffer[: new.nbytes]) == b"for B only"
        if not old.done:
            old.cancel()
            (c,) = collect(port, 1, timeout=10)
            assert c is old
        assert old.error is not None or old.nbytes == 0
        assert b"for B only" not in bytes(old.buffer)
        assert port.pending == 0


@pytest.mark.skipif(ON_WINDOWS, reason="os.pipe() descriptors; Windows pipes for ports are overlapped named pipes (tests/test_files.py)")
def test_close_pipe_ends_with_read_in_flight(port):
    """Closing the write end completes a pending read with EOF; closing the
    read end under a pending read leaves it to cancel()."""
    r, w = os.pipe()
    try:
        port.register(r)
        op = port.read(r, bytearray(32), offset=None)
        os.close(w)
        w = -1
        (c,) = collect(port, 1)
        assert c is op and c.error is None and c.nbytes == 0
    finally:
        if w >= 0:
            os.close(w)
    op = port.read(r, bytearray(32), offset=None)
    port.unregister(r)
    os.close(r)
    # The read end is gone: EOF, an error, or pending until cancelled.
    _closed_under(port, op)
    assert op.error is not None or op.nbytes == 0


def test_port_close_with_operations_on_closed_descriptors(backend):
    """close() of a port whose operations wait on descriptors the user
    already closed returns promptly (not after its 10 s bound) with every
    operation done and its buffer released."""
    port = fastiocp.CompletionPort(backend=backend)
    socks, ops, bufs = [], [], []
    for _ in range(8):
        a, b = socket.socketpair()
        port.register(b)
        buf = bytearray(64)
        bufs.append(buf)
        ops.append(port.recv(b, buf))
        socks.append(a)
        port.unregister(b)  # registrations are by handle number, which the OS reuses
        b.close()
    t0 = time.monotonic()
    port.close()
    assert time.monotonic() - t0 < 5
    assert all(op.done for op in ops)
    for buf in bufs:
        buf.extend(b"released")
    for a in socks:
        a.close()


# ---------------------------------------------------------------------------
# EMFILE


@pytest.mark.skipif(not ON_LINUX, reason="RLIMIT_NOFILE (resource module) is POSIX; Windows has no per-process handle limit to lower")
def test_emfile_in_a_child(backend):
    """In a child whose RLIMIT_NOFILE leaves no free descriptor: accept()
    completes with EMFILE (and works again once a descriptor is free);
    creating a port raises BackendUnavailableError saying EMFILE; the
    operations in flight are unaffected."""
    r = run_child(f"""
        import errno, os, resource, socket, fastiocp
        backend = {backend!r}
        port = fastiocp.CompletionPort(backend=backend)
        lsock = socket.create_server(("127.0.0.1", 0))
        a, b = socket.socketpair()
        port.register(lsock, key="L")
        port.register(b, key="B")
        recv = port.recv(b, bytearray(16), context="recv")
        clients = [socket.socket() for _ in range(2)]
        # No descriptor left: fill every hole below the limit.
        top = max(int(n) for n in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        fillers = []
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        clients[0].connect(lsock.getsockname())
        acc = port.accept(lsock, context="accept-1")
        c = port.get(timeout=10)
        assert c is acc, c
        assert isinstance(c.error, OSError) and c.error.errno == errno.EMFILE, c.error
        print("accept:", c.error.errno == errno.EMFILE)
        for name in ("io_uring", "epoll", "auto"):
            try:
                fastiocp.CompletionPort(backend=name)
                print("port", name, "created?!")
            except fastiocp.BackendUnavailableError as exc:
                assert "EMFILE" in str(exc) or "Too many open files" in str(exc), exc
                print("port", name, "refused")
            except OSError as exc:
                print("port", name, "OSError", exc)
        os.close(fillers.pop())
        acc = port.accept(lsock, context="accept-2")
        c = port.get(timeout=10)
        assert c is acc and c.error is None, c.error
        conn, addr = c.result()
        conn.close()
        a.sendall(b"unaffected")
        c = port.get(timeout=10)
        assert c is recv and bytes(c.buffer[:c.nbytes]) == b"unaffected", c
        port.close()
        print("ok")
    """)
    assert_clean_exit(r)
    assert "accept: True" in r.stdout
    assert "port io_uring refused" in r.stdout and "port epoll refused" in r.stdout
    assert "port auto refused" in r.stdout
    assert r.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------
# Tiny rings: full SQ, overflowing CQ


@pytest.mark.parametrize("entries", [1, 2])
def test_tiny_ring_under_threads_and_cancels(backend, entries, request):
    """CompletionPort(entries=1 or 2) (io_uring: an SQ of 1-2 entries and a
    CQ of 4-8; other backends ignore it) with four threads submitting
    receives, sends and posts, two cancelling and four dequeuing, some of
    the submitters short-lived threads (io_uring cancels the requests of a
    thread that exits; they must be resubmitted): every operation and post
    completes exactly once and every record arrives intact."""
    n_per = 150 if UNDER_WINE else 600
    port = fastiocp.CompletionPort(backend=backend, entries=entries)
    pairs = [socket.socketpair() for _ in range(6)] if not ON_WINDOWS else []
    if ON_WINDOWS:
        from relutil import message_pair

        pairs = [message_pair()[:2] for _ in range(6)]
    for a, b in pairs:
        port.register(a)
        port.register(b)
    submitted: list = []
    dequeued: list = []
    errors: list = []
    stop = threading.Event()
    cancelled: set = set()

    def submitter(i: int) -> None:
        rng = random.Random(i)
        try:
            for k in range(n_per):
                a, b = pairs[rng.randrange(len(pairs))]
                ident = i * 1_000_000 + k
                which = rng.randrange(3)
                if which == 0:
                    submitted.append(port.recv(b, bytearray(64), context=ident))
                elif which == 1:
                    submitted.append(port.send(a, record(ident), context=ident))
                else:
                    port.post(context=ident)
                    submitted.append(ident)
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    def canceller() -> None:
        rng = random.Random()
        while not stop.is_set():
            if submitted:
                op = submitted[rng.randrange(len(submitted))]
                if not isinstance(op, int):
                    cancelled.add(op.context)
                    op.cancel()
            time.sleep(0)

    def getter() -> None:
        while not stop.is_set():
            dequeued.extend(port.get_many(64, timeout=0.01))

    subs = [threading.Thread(target=submitter, args=(i,)) for i in range(4)]
    # Short-lived submitters: each one thread that submits and exits at once.
    subs += [threading.Thread(target=submitter, args=(10 + i,)) for i in range(8)]
    helpers = [threading.Thread(target=canceller) for _ in range(2)]
    helpers += [threading.Thread(target=getter) for _ in range(4)]
    try:
        with hard_watchdog(180, request.config):
            for t in helpers + subs:
                t.start()
            join_all(subs, 60, "submitters")
            # Feed the receives that wait, then cancel whatever is left.
            for a, _b in pairs:
                a.setblocking(False)
                try:
                    a.send(bytes(64) * 200) if not ON_WINDOWS else None
                except (BlockingIOError, OSError):
                    pass
            time.sleep(0.2)
            for op in submitted:
                if not isinstance(op, int) and not op.done:
                    cancelled.add(op.context)
                    op.cancel()
            deadline = time.monotonic() + 30
            while port.pending and time.monotonic() < deadline:
                time.sleep(0.01)
            stop.set()
            join_all(helpers, 30, "getters and cancellers")
            dequeued.extend(port.get_many(65536, timeout=0))
    finally:
        stop.set()
        port.close()
        for a, b in pairs:
            a.close()
            b.close()
    assert not errors, errors[:5]
    assert port.pending == 0
    want = sorted(x if isinstance(x, int) else x.context for x in submitted)
    got = sorted(c.context for c in dequeued)
    assert got == want, f"{len(want)} submitted, {len(got)} dequeued"
    for c in dequeued:
        if c.error is not None:
            assert is_cancel_error(c.error) and c.context in cancelled, c
        elif c.op == "send":
            assert c.nbytes == 64


# ---------------------------------------------------------------------------
# Signal storms (EINTR everywhere)


@pytest.mark.skipif(not ON_LINUX, reason="POSIX signals delivered to any thread (EINTR in futex, epoll_wait, io_uring_enter)")
def test_signal_storm_loses_nothing(backend, request):
    """A thread sends SIGUSR1 to the process thousands of times while four
    threads wait in get() and two exchange data through the port: the
    signals interrupt waits in every thread (EINTR); nothing is lost,
    duplicated or failed."""
    hits = [0]
    old = signal.signal(signal.SIGUSR1, lambda *_: hits.__setitem__(0, hits[0] + 1))
    port = fastiocp.CompletionPort(backend=backend)
    pairs = [socket.socketpair() for _ in range(2)]
    for a, b in pairs:
        port.register(a)
        port.register(b)
    seconds = 2.0 if UNDER_WINE else 1.0
    rounds = [0, 0]
    got: list = []
    stop = threading.Event()
    errors: list = []

    def getter() -> None:
        try:
            while not stop.is_set():
                got.extend(port.get_many(32, timeout=0.05))
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    def io(i: int) -> None:
        a, b = pairs[i]
        t_end = time.monotonic() + seconds
        try:
            k = 0
            while time.monotonic() < t_end:
                port.recv(b, bytearray(1), context=("r", i, k))
                port.send(a, b"x", context=("s", i, k))
                port.post(context=("p", i, k))
                k += 1
                rounds[i] = k
                if k % 64 == 0:
                    while port.pending > 2000:
                        time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    def storm() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.0002)

    getters = [threading.Thread(target=getter) for _ in range(4)]
    ios = [threading.Thread(target=io, args=(i,)) for i in range(2)]
    stormer = threading.Thread(target=storm)
    try:
        with hard_watchdog(180, request.config):
            for t in getters + [stormer] + ios:
                t.start()
            join_all(ios, 60, "I/O threads")
            deadline = time.monotonic() + 30
            while len(got) < 3 * sum(rounds) and time.monotonic() < deadline:
                time.sleep(0.01)
            stop.set()
            join_all(getters + [stormer], 30, "getters")
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, old)
        port.close()
        for a, b in pairs:
            a.close()
            b.close()
    assert not errors, errors[:5]
    assert hits[0] > 20, "the storm did not happen"
    ctxs = [c.context for c in got]
    assert len(ctxs) == len(set(ctxs)) == 3 * sum(rounds)
    assert all(c.error is None for c in got), [c for c in got if c.error][:3]


@pytest.mark.skipif(not ON_LINUX, reason="POSIX signals interrupting a wait (Windows: tests/backends/test_iocp.py)")
@pytest.mark.parametrize("action", ["get", "post", "close"])
def test_signal_handler_reenters_the_port(backend, action):
    """A Python signal handler runs while the main thread waits in get()
    (between two waits, inside the binding) and uses the same port: a
    nested get(), a post(), or close(). The outer get() then returns
    normally, returns the handler's packet, or raises PortClosedError."""
    port = fastiocp.CompletionPort(backend=backend, concurrency=1)
    a, b = socket.socketpair()
    port.register(b)
    port.recv(b, 10)  # the main thread is the one polling the OS
    seen = []

    def handler(signum, frame):
        if action == "get":
            port.post(context="from the handler")
            seen.append(port.get(timeout=2).context)
        elif action == "post":
            port.post(context="posted by the handler")
            seen.append("posted")
        else:
            port.close()
            seen.append("closed")

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        if action == "close":
            with pytest.raises(fastiocp.PortClosedError):
                port.get(timeout=5)
        else:
            c = port.get(timeout=0.5 if action == "get" else 5)
            assert (c and c.context) == (None if action == "get" else "posted by the handler")
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, old)
        port.close()
        a.close()
        b.close()
    assert seen == [{"get": "from the handler", "post": "posted", "close": "closed"}[action]]
    assert port.pending == 0


@pytest.mark.skipif(not ON_LINUX, reason="relies on Linux dropping SYNs to a listener whose backlog is full")
def test_connect_in_progress_when_its_thread_exits(port):
    """A connect still in progress (the listener's backlog is full, so the
    SYN waits for a retransmission) whose submitting thread exits: io_uring
    cancels the request with the thread; it must be resubmitted and
    complete normally once the listener makes room."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(lsock.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.2)
    client = socket.socket()
    accepted = []
    try:
        port.register(client)
        ops = []
        t = threading.Thread(target=lambda: ops.append(port.connect(client, lsock.getsockname())))
        t.start()
        t.join()
        time.sleep(0.3)
        lsock.setblocking(False)
        deadline = time.monotonic() + 15
        got = []
        while not got and time.monotonic() < deadline:
            try:
                while True:
                    accepted.append(lsock.accept()[0])
            except BlockingIOError:
                pass
            got = port.get_many(1, timeout=0.2)
        assert got == ops, "the connect never completed"
        assert got[0].error is None, got[0].error
    finally:
        for s in fillers + accepted + [client, lsock]:
            s.close()


# ---------------------------------------------------------------------------
# Interpreter shutdown with I/O in flight

SHUTDOWN_SETUP = """
import os, socket, sys, tempfile, threading, time, fastiocp
backend = {backend!r}
port = fastiocp.CompletionPort(backend=backend)
lsock = socket.create_server(("127.0.0.1", 0), backlog=1)
port.register(lsock)
for _ in range(4):
    port.accept(lsock)                               # accepts waiting
conns = []
for _ in range(8):
    a, b = socket.socketpair()
    port.register(a); port.register(b)
    conns += [a, b]
    for _ in range(16):
        port.recv(b, bytearray(4096))                # receives waiting
    port.send(a, bytes(8 << 20))                     # a send that cannot finish
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
port.register(udp)
port.recvfrom(udp, bytearray(100))
path = os.path.join(tempfile.mkdtemp(), "f")
with open(path, "wb") as fh:
    fh.write(os.urandom(1 << 20))
f = fastiocp.open(path, "rb")
port.register(f)
for i in range(64):
    port.read(f, bytearray(4096), offset=i * 4096)   # file reads (epoll: the pool)
for i in range(1000):
    port.post(context=i)                             # posts never dequeued
"""


@pytest.mark.parametrize("variant", ["idle-getters", "busy-threads", "atexit-close", "worker-pool", "cycle"])
def test_interpreter_shutdown_with_io_in_flight(backend, variant):
    """The interpreter exits with operations of every kind in flight, posts
    queued and threads inside the port: blocked in get() (daemon threads),
    busy submitting and dequeuing, a port closed by an atexit handler while
    threads wait, a WorkerPool never stopped, a port kept alive by a
    reference cycle through a context. Exit status 0, no crash, no hang."""
    tail = {
        "idle-getters": """
for _ in range(4):
    threading.Thread(target=port.get, daemon=True).start()
time.sleep(0.1)
""",
        "busy-threads": """
def busy():
    while True:
        port.post(); port.get_many(16, timeout=0.001)
        a = conns[0]; port.send(a, b"x"); port.recv(conns[1], 1)
for _ in range(4):
    threading.Thread(target=busy, daemon=True).start()
time.sleep(0.2)
""",
        "atexit-close": """
import atexit
for _ in range(4):
    threading.Thread(target=lambda: list(port), daemon=True).start()
atexit.register(port.close)
time.sleep(0.1)
""",
        "worker-pool": """
pool = fastiocp.WorkerPool(port, lambda c: None, threads=4).start()
time.sleep(0.1)
""",
        "cycle": """
class Ctx: pass
ctx = Ctx(); ctx.port = port
a, b = socket.socketpair(); port.register(b)
port.recv(b, 10, context=ctx)
del port, ctx
""",
    }[variant]
    r = run_child(SHUTDOWN_SETUP.format(backend=backend) + tail + "\nprint('exiting')\n", timeout=60)
    assert_clean_exit(r)
    assert "exiting" in r.stdout
