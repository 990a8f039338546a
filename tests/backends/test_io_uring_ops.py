"""io_uring backend: the operations of issue 14, through scenarios ported from
liburing's test/ directory (each test names the file it comes from), plus
what only the io_uring backend does its own way (csrc/unix/io_uring.c):
LINK_TIMEOUTs that must stay adjacent to their operation in a tiny ring,
absolute deadlines that survive the resubmission of a request whose thread
exited, sendfile's bursts of non-blocking sendfile() between POLLs (the
first one inside submit()), pidfds, and the guard timer that bounds a
sendfile whatever number of POLLs it takes.

Scenarios that make sense on every Linux backend run on epoll too (the
`backend` fixture, narrowed by FASTIOCP_BACKEND); the others are io_uring's
alone and use `uport`. The shared behaviour suite is tests/test_operations.py.
"""
from __future__ import annotations

import errno
import gc
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import fastiocp
from conftest import collect, loopback_tcp_pair, open_fd_count

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux backends")

needs_uring = pytest.mark.skipif("io_uring" not in fastiocp.available_backends(),
                                 reason="io_uring is not available here")

LINUX_BACKENDS = ("io_uring", "epoll")


@pytest.fixture
def lport(backend):
    """A port of each Linux backend (the `backend` fixture)."""
    if backend not in LINUX_BACKENDS:
        pytest.skip("Linux backends only")
    p = fastiocp.CompletionPort(backend=backend)
    yield p
    p.close()


@pytest.fixture
def uport():
    if "io_uring" not in fastiocp.available_backends():
        pytest.skip("io_uring is not available here")
    p = fastiocp.CompletionPort(backend="io_uring")
    yield p
    p.close()


def one(port: fastiocp.CompletionPort, timeout: float = 10.0) -> fastiocp.Completion:
    """The next completion, and proof that it was the only one."""
    c = port.get(timeout=timeout)
    assert c is not None, f"no completion within {timeout}s"
    extra = port.get(timeout=0.05)
    assert extra is None, f"a second completion came: {extra!r}"
    return c


def later(delay: float, fn, *args) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)), daemon=True)
    t.start()
    return t


@pytest.fixture
def pipe_fds():
    r, w = os.pipe()
    fds = [r, w]
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# liburing test/poll.c
# ---------------------------------------------------------------------------

def test_poll_basic_pipe(lport, pipe_fds):
    """liburing test/poll.c, test_basic: a POLLIN poll on a pipe's read end
    fires once another thread (there: a forked parent) writes to the pipe,
    with POLLIN in the mask."""
    r, w = pipe_fds
    lport.register(r)
    op = lport.poll(r, fastiocp.POLLIN, context="pipe")
    assert lport.get(timeout=0.1) is None, "nothing written yet"
    later(0.05, os.write, w, b"foo")
    c = one(lport)
    assert c is op and c.op == "poll" and c.context == "pipe" and c.error is None
    assert c.result() & fastiocp.POLLIN
    assert os.read(r, 8) == b"foo", "a poll consumes nothing"


def test_poll_missing_events(lport):
    """liburing test/poll.c, test_missing_events: a socket that is both
    readable (data queued) and writable reports both events in one mask."""
    a, b = socket.socketpair()
    with a, b:
        lport.register(b)
        a.send(b"xx")
        lport.poll(b, fastiocp.POLLIN | fastiocp.POLLOUT)
        mask = one(lport).result()
        assert mask & (fastiocp.POLLIN | fastiocp.POLLOUT) == fastiocp.POLLIN | fastiocp.POLLOUT


def test_poll_reports_hangup_it_did_not_ask_for(lport, pipe_fds):
    """liburing test/poll.c (POLLHUP is always reported, as poll(2) does):
    a POLLIN poll on a pipe whose writer closes."""
    r, w = pipe_fds
    lport.register(r)
    lport.poll(r, fastiocp.POLLIN)
    later(0.05, os.close, w)
    pipe_fds.remove(w)
    assert one(lport).result() & fastiocp.POLLHUP


def test_poll_many(lport):
    """liburing test/poll-many.c: many descriptors polled at once; each
    completes exactly once, when its peer writes."""
    pairs = [socket.socketpair() for _ in range(64)]
    try:
        for _a, b in pairs:
            lport.register(b)
        ops = [lport.poll(b, fastiocp.POLLIN, context=i) for i, (_a, b) in enumerate(pairs)]
        assert lport.get(timeout=0.05) is None
        for a, _b in pairs[::2]:
            a.send(b"!")
        got = collect(lport, 32)
        assert sorted(c.context for c in got) == list(range(0, 64, 2))
        assert all(c.result() & fastiocp.POLLIN for c in got)
        for a, _b in pairs[1::2]:
            a.send(b"!")
        got = collect(lport, 32)
        assert sorted(c.context for c in got) == list(range(1, 64, 2))
        assert lport.get(timeout=0.05) is None
        assert all(op.done for op in ops)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# ---------------------------------------------------------------------------
# liburing test/poll-cancel.c
# ---------------------------------------------------------------------------

def test_poll_cancel(lport, pipe_fds):
    """liburing test/poll-cancel.c, test_poll_cancel: a poll on an idle pipe,
    then its removal: one completion, cancelled."""
    r, _w = pipe_fds
    lport.register(r)
    op = lport.poll(r, fastiocp.POLLIN)
    assert op.cancel() is True
    c = one(lport)
    assert c is op and c.cancelled and isinstance(c.error, OSError)
    assert not isinstance(c.error, TimeoutError)
    assert op.cancel() is False, "already complete"


def test_poll_cancel_with_timeouts(lport, pipe_fds):
    """liburing test/poll-cancel.c, test_poll_cancel_with_timeouts: a poll
    with a (long) timeout attached is cancelled: the cancel is what the
    completion says, not the timeout, and the timeout leaves no trace."""
    r, _w = pipe_fds
    lport.register(r)
    op = lport.poll(r, fastiocp.POLLIN, timeout=0.3)
    time.sleep(0.02)
    op.cancel()
    c = one(lport)
    assert c.cancelled and not isinstance(c.error, TimeoutError)
    time.sleep(0.4)
    assert lport.get(timeout=0.05) is None


# ---------------------------------------------------------------------------
# liburing test/poll-link.c and test/link-timeout.c
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("do_connect", [False, True])
def test_poll_link_timeout(lport, do_connect):
    """liburing test/poll-link.c, test_poll_timeout: a POLLIN poll on a
    listening socket with a linked timeout: with a client connecting, the
    poll fires and the timeout does not; without, the timeout fires."""
    lsock = socket.create_server(("127.0.0.1", 0))
    client = None
    try:
        lport.register(lsock)
        t0 = time.monotonic()
        op = lport.poll(lsock, fastiocp.POLLIN, timeout=0.2 if do_connect else 0.05)
        if do_connect:
            client = socket.create_connection(lsock.getsockname())
        c = one(lport)
        assert c is op
        if do_connect:
            assert c.error is None and c.result() & fastiocp.POLLIN
        else:
            assert isinstance(c.error, TimeoutError) and not c.cancelled
            assert time.monotonic() - t0 >= 0.045
        time.sleep(0.25)
        assert lport.get(timeout=0.02) is None
    finally:
        lsock.close()
        if client is not None:
            client.close()


def test_link_timeout_read_that_will_not_complete(lport, pipe_fds):
    """liburing test/link-timeout.c, test_single_link_timeout: a read on an
    idle pipe with a linked timeout completes with the timeout, not earlier;
    test_single_link_no_timeout: a read that completes in time gets its
    data, and its timeout never shows up."""
    r, w = pipe_fds
    os.set_blocking(r, False)
    lport.register(r)
    t0 = time.monotonic()
    op = lport.read(r, bytearray(8), offset=None, timeout=0.08)
    c = one(lport)
    assert c is op and isinstance(c.error, TimeoutError)
    assert time.monotonic() - t0 >= 0.075
    op = lport.read(r, bytearray(8), offset=None, timeout=0.3)
    os.write(w, b"data")
    c = one(lport)
    assert c.error is None and bytes(c.buffer[:c.nbytes]) == b"data"
    time.sleep(0.35)
    assert lport.get(timeout=0.02) is None


@needs_uring
def test_link_timeouts_never_split_in_a_tiny_ring():
    """liburing test/link-timeout.c (test_timeout_link_chain*: a chain must
    reach the kernel whole): with an SQ of 2 entries (entries=1 is raised
    to 2 so that an operation and its LINK_TIMEOUT always fit), hundreds of
    operations with timeouts from several threads; every one completes
    exactly once, with its data or TimeoutError, never a stray error that a
    cut chain (an operation without its timeout, or a lone LINK_TIMEOUT,
    which the kernel fails with EINVAL) would give."""
    with fastiocp.CompletionPort(backend="io_uring", entries=1) as port:
        pairs = [socket.socketpair() for _ in range(8)]
        try:
            for a, b in pairs:
                port.register(b)
            ops = []
            lock = threading.Lock()

            def submitter(k: int) -> None:
                for i in range(100):
                    _a, b = pairs[(k + i) % len(pairs)]
                    op = port.recv(b, bytearray(1), timeout=0.001 * (i % 7), context=(k, i))
                    with lock:
                        ops.append(op)

            threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for a, _b in pairs:
                a.send(b"z" * 20)
            for t in threads:
                t.join()
            got = collect(port, len(ops), timeout=20)
            assert sorted(c.context for c in got) == sorted(op.context for op in ops)
            for c in got:
                assert c.error is None and c.nbytes == 1 or isinstance(c.error, TimeoutError), c.error
            assert port.get(timeout=0.05) is None
        finally:
            for a, b in pairs:
                a.close()
                b.close()


@needs_uring
def test_link_timeouts_of_a_deferred_batch(uport):
    """liburing test/link-timeout.c, test_single_link_timeout with deferred
    submission: inside batch() the SQEs (and the timespecs the kernel reads
    at submission, kept in each record) wait for flush(); timers and
    timeouts then count from submit(), not from the flush: a timeout of
    0.1 s submitted 0.15 s before the flush expires at once."""
    a, b = socket.socketpair()
    with a, b:
        uport.register(b)
        with uport.batch():
            t0 = time.monotonic()
            ops = [uport.recv(b, bytearray(1), timeout=0.1, context=i) for i in range(10)]
            ops.append(uport.timer(0.1, context="timer"))
            time.sleep(0.15)
        got = collect(uport, 11)
        elapsed = time.monotonic() - t0
        assert sorted(map(str, (c.context for c in got))) == sorted(map(str, list(range(10)) + ["timer"]))
        for c in got:
            if c.context == "timer":
                assert c.error is None
            else:
                assert isinstance(c.error, TimeoutError)
        assert elapsed < 1.0, elapsed
        assert uport.get(timeout=0.05) is None


@needs_uring
def test_link_timeout_survives_the_exit_of_the_submitting_thread(uport):
    """liburing test/link-timeout.c with DESIGN.md's task-exit rule: a
    receive with a timeout submitted by a thread that then exits is
    cancelled by the kernel, resubmitted by the port with the same absolute
    deadline: it times out once, at its deadline (not at once, not with a
    cancellation), or gets data that arrives in time."""
    a, b = socket.socketpair()
    with a, b:
        uport.register(b)
        box = []
        t0 = time.monotonic()
        t = threading.Thread(target=lambda: box.append(uport.recv(b, bytearray(4), timeout=0.3)))
        t.start()
        t.join()
        c = one(uport)
        elapsed = time.monotonic() - t0
        assert c is box[0] and isinstance(c.error, TimeoutError) and not c.cancelled
        assert 0.29 <= elapsed < 2.0, elapsed
        box.clear()
        t = threading.Thread(target=lambda: box.append(uport.recv(b, bytearray(4), timeout=5)))
        t.start()
        t.join()
        time.sleep(0.05)
        a.send(b"late")
        c = one(uport)
        assert c is box[0] and c.error is None and bytes(c.buffer) == b"late"


# ---------------------------------------------------------------------------
# liburing test/send_recvmsg.c
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("iov_count", [1, 3])
def test_send_recvmsg_iovecs(lport, iov_count):
    """liburing test/send_recvmsg.c, test(): a datagram sent with sendmsg
    over a vector of iov_count buffers, received with recvmsg into another
    vector: same bytes, split across the receive buffers, the sender's
    address reported."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        lport.register(a)
        lport.register(b)
        message = b"This is a test of sendmsg and recvmsg over io_uring!"
        step = -(-len(message) // iov_count)
        parts = [message[i:i + step] for i in range(0, len(message), step)]
        bufs = [bytearray(step) for _ in range(iov_count)]
        rop = lport.recvmsg(b, bufs, context="recv")
        sop = lport.sendmsg(a, parts, address=b.getsockname(), context="send")
        got = {c.context: c for c in collect(lport, 2)}
        assert got["send"] is sop and sop.result() == len(message)
        nbytes, ancdata, flags, address = got["recv"].result()
        assert got["recv"] is rop and nbytes == len(message) and ancdata == [] and flags == 0
        assert b"".join(bytes(x) for x in bufs)[:nbytes] == message
        assert address == a.getsockname()


def test_recvmsg_truncation_flags(lport):
    """liburing test/send_recvmsg.c (msg_flags written back): a datagram
    larger than the buffers sets MSG_TRUNC."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        lport.register(b)
        a.send(b"0123456789")
        lport.recvmsg(b, [bytearray(4)])
        nbytes, _anc, flags, _address = one(lport).result()
        assert nbytes == 4 and flags & socket.MSG_TRUNC


def test_send_recvmsg_scm_rights(lport):
    """liburing test/send_recvmsg.c, passing a descriptor (SCM_RIGHTS) over
    an AF_UNIX socketpair: the received descriptor is a new one on the same
    file; MSG_CTRUNC is set when the control buffer is too small (the
    descriptor is then dropped by the kernel)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, b"passed file")
        with a, b:
            lport.register(a)
            lport.register(b)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
            lport.sendmsg(a, [b"one", b"fd"], rights)
            assert one(lport).result() == 5
            buf = bytearray(16)
            lport.recvmsg(b, [buf], socket.CMSG_SPACE(4))
            nbytes, ancdata, flags, _address = one(lport).result()
            assert nbytes == 5 and bytes(buf[:5]) == b"onefd" and not flags & socket.MSG_CTRUNC
            [(level, kind, data)] = ancdata
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            passed = int.from_bytes(data[:4], sys.byteorder)
            try:
                assert passed != fd
                assert os.fstat(passed).st_ino == os.fstat(fd).st_ino
                assert os.pread(passed, 64, 0) == b"passed file"
            finally:
                os.close(passed)
            # No room for the descriptor: truncated, and no descriptor leaks.
            before = open_fd_count()
            lport.sendmsg(a, [b"x"], rights)
            assert one(lport).result() == 1
            lport.recvmsg(b, [bytearray(4)], 0)
            nbytes, ancdata, flags, _address = one(lport).result()
            assert nbytes == 1 and ancdata == [] and flags & socket.MSG_CTRUNC
            assert open_fd_count() == before
    finally:
        os.close(fd)
        os.unlink(path)


@needs_uring
def test_scm_rights_received_descriptor_is_not_inherited(uport):
    """liburing test/send_recvmsg.c with SCM_RIGHTS: io_uring's recvmsg asks
    for MSG_CMSG_CLOEXEC, so a received descriptor never leaks into a child
    process (as fastiocp's accept() uses SOCK_CLOEXEC)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    r, w = os.pipe()
    try:
        with a, b:
            uport.register(b)
            a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, sys.byteorder))])
            uport.recvmsg(b, [bytearray(4)], socket.CMSG_SPACE(4))
            _n, [(_l, _k, data)], flags, _addr = one(uport).result()
            passed = int.from_bytes(data[:4], sys.byteorder)
            try:
                assert os.get_inheritable(passed) is False
                assert flags == 0, "MSG_CMSG_CLOEXEC is not reported back"
            finally:
                os.close(passed)
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------
# liburing test/splice.c (sendfile: file -> socket, the kernel copies)
# ---------------------------------------------------------------------------

@pytest.fixture
def big_file():
    """4 MiB + 123 bytes of a pattern that differs in every 4 KiB page."""
    payload = b"".join(i.to_bytes(4, "little") * 1024 for i in range(1024)) + b"tail" * 30 + b"end"
    fd, path = tempfile.mkstemp()
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    f = fastiocp.open(path, "rb")
    yield f, payload
    f.close()
    os.unlink(path)


def reader(sock: socket.socket, out: bytearray, pause: float = 0.0) -> threading.Thread:
    def run():
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            out.extend(chunk)
            if pause:
                time.sleep(pause)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize("offset, count", [(0, None), (4093, 3_000_000), (1 << 20, 1)])
def test_splice_file_to_socket(lport, big_file, blocking, offset, count):
    """liburing test/splice.c, test_splice (file -> pipe -> file, checked
    byte for byte): sendfile of a range of a file to a socket, read on the
    other end by a slow reader (so that the socket fills and the operation
    waits for POLLOUT between bursts, whether the socket is blocking or
    not). Unaligned offsets, several bursts; no descriptor left behind."""
    f, payload = big_file
    count = len(payload) - offset if count is None else count
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.setblocking(blocking)
        lport.register(a)
        fds = open_fd_count()
        got = bytearray()
        t = reader(b, got, pause=0.001)
        op = lport.sendfile(a, f, offset, count, context="sf")
        c = one(lport, timeout=30)
        assert c is op and c.op == "sendfile" and c.error is None
        assert c.result() == count
        a.shutdown(socket.SHUT_WR)
        t.join(10)
        assert bytes(got) == payload[offset:offset + count]
        assert open_fd_count() == fds, "no descriptor left behind"


def test_splice_short_at_end_of_file(lport, big_file):
    """liburing test/splice.c (a splice from a file stops at its end):
    asking for more than the file holds sends what there is."""
    f, payload = big_file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        lport.register(a)
        got = bytearray()
        t = reader(b, got)
        lport.sendfile(a, f, len(payload) - 5000, 1 << 30)
        assert one(lport).result() == 5000
        a.shutdown(socket.SHUT_WR)
        t.join(10)
        assert bytes(got) == payload[-5000:]


def test_splice_to_a_closed_peer_reports_the_error(lport, big_file):
    """liburing test/splice.c (errors of a splice stage): the peer is gone
    before anything was sent: EPIPE (no SIGPIPE kills the process)."""
    f, _payload = big_file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a:
        b.close()
        lport.register(a)
        lport.sendfile(a, f, 0, 100_000)
        c = one(lport)
        assert isinstance(c.error, OSError) and c.error.errno in (32, 104)  # EPIPE, ECONNRESET


@needs_uring
def test_splice_cancel_reports_the_bytes_sent(uport, big_file):
    """liburing test/splice.c with cancellation (a sendfile waiting for a
    full blocking socket is cancelled): the bytes that reached the socket
    are the result, and no descriptor is left behind."""
    f, payload = big_file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        uport.register(a)
        fds = open_fd_count()
        op = uport.sendfile(a, f, 0, len(payload))
        # Keep the port's bursts going until the socket is full.
        assert uport.get(timeout=0.3) is None
        assert op.cancel() is True
        c = one(uport)
        assert c is op and c.error is None
        assert 0 < c.nbytes < len(payload)
        assert open_fd_count() == fds
        a.shutdown(socket.SHUT_WR)
        got = bytearray()
        reader(b, got).join(10)
        assert bytes(got) == payload[:c.nbytes]


@needs_uring
def test_splice_timeout_bounds_a_blocked_sendfile(uport, big_file):
    """liburing test/splice.c + test/link-timeout.c: a sendfile into a
    blocking socket nobody reads, with a timeout. The backend's guard timer
    (one for the whole operation, not one per POLL) must end it at its
    deadline, reporting what was sent; the guard then leaves no trace and
    no descriptor."""
    f, payload = big_file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        uport.register(a)
        fds = open_fd_count()
        t0 = time.monotonic()
        op = uport.sendfile(a, f, 0, len(payload), timeout=0.2)
        c = one(uport)
        elapsed = time.monotonic() - t0
        assert c is op and c.error is None and 0 < c.nbytes < len(payload)
        assert 0.19 <= elapsed < 3.0, elapsed
        assert open_fd_count() == fds
        # Nothing sent at all: the timeout is the error.
        op = uport.sendfile(a, f, 0, len(payload), timeout=0.05)
        c = one(uport)
        assert isinstance(c.error, TimeoutError) and not c.cancelled
        assert open_fd_count() == fds


@needs_uring
def test_splice_timeout_that_does_not_fire(uport, big_file):
    """liburing test/link-timeout.c, test_single_link_no_timeout, for the
    sendfile of many bursts: it completes in time, and its guard is removed
    (the completion waits for it: nothing comes later)."""
    f, payload = big_file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        uport.register(a)
        got = bytearray()
        t = reader(b, got)
        uport.sendfile(a, f, 0, len(payload), timeout=10)
        assert one(uport, timeout=20).result() == len(payload)
        a.shutdown(socket.SHUT_WR)
        t.join(10)
        assert bytes(got) == payload


def test_splice_close_port_while_pending(backend, big_file):
    """liburing test/splice.c + ring exit with requests in flight: closing a
    port with blocked sendfiles (with and without timeouts) returns
    promptly, completes them, and leaves no descriptor behind."""
    if backend not in LINUX_BACKENDS:
        pytest.skip("Linux backends only")
    f, _payload = big_file
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        fds = open_fd_count()
        port = fastiocp.CompletionPort(backend=backend)
        ops = []
        for i, (a, _b) in enumerate(pairs):
            port.register(a)
            ops.append(port.sendfile(a, f, 0, 4 << 20, timeout=30 if i else None))
        assert port.get(timeout=0.2) is None
        t0 = time.monotonic()
        port.close()
        assert time.monotonic() - t0 < 5
        assert all(op.done for op in ops)
        del port
        assert open_fd_count() == fds
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("blocking", [True, False])
def test_sendfile_leaves_socket_flags_and_file_position(lport, big_file, blocking):
    """sendfile() has no per-call non-blocking flag: both Linux backends
    make a blocking socket non-blocking for each burst of sendfile() calls
    and must give it back as it was; the offset form never moves the
    file's own position."""
    f, payload = big_file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.setblocking(blocking)
        lport.register(a)
        got = bytearray()
        t = reader(b, got, pause=0.001)  # slow: the socket fills, several bursts
        lport.sendfile(a, f, 10, len(payload) - 10)
        assert one(lport, timeout=30).result() == len(payload) - 10
        assert a.getblocking() is blocking
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 0
        a.shutdown(socket.SHUT_WR)
        t.join(10)
        assert bytes(got) == payload[10:]


@needs_uring
def test_sendfile_that_fits_completes_at_submit(uport, big_file):
    """io_uring: the first burst of sendfile() runs in submit(), so a
    transfer the socket takes at once is complete before the call returns
    (no POLL, no harvest: get(timeout=0) has it)."""
    f, payload = big_file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        uport.register(a)
        op = uport.sendfile(a, f, 100, 1000)
        c = uport.get(timeout=0)
        assert c is op and c.result() == 1000
        assert b.recv(2000) == payload[100:1100]


@needs_uring
def test_sendfile_bursts_survive_fork():
    """io_uring: a fork() while another thread is inside a sendfile burst
    (a blocking socket, made non-blocking under the backend's lock) leaves
    the child a usable backend: a port it creates sends a file too."""
    code = r"""
import os, socket, sys, tempfile, threading, time, fastiocp
fd, path = tempfile.mkstemp()
os.write(fd, os.urandom(1 << 20)); os.close(fd)
f = fastiocp.open(path, "rb")
os.unlink(path)
port = fastiocp.CompletionPort(backend="io_uring")
a, b = socket.socketpair()                 # a stays blocking
port.register(a)
threading.Thread(target=lambda: [None for _ in iter(lambda: b.recv(1 << 16), b"")],
                 daemon=True).start()
stop = []
def pump():
    while not stop:
        port.sendfile(a, f, 0, 1 << 20)
        assert port.get(timeout=10).nbytes > 0
t = threading.Thread(target=pump)
t.start()
for i in range(40):
    pid = os.fork()
    if pid == 0:
        p = fastiocp.CompletionPort(backend="io_uring")
        c, d = socket.socketpair()
        p.register(c)
        p.sendfile(c, f, 0, 1000)
        ok = p.get(timeout=5).nbytes == 1000 and len(d.recv(2000)) == 1000
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("child", i, "hung")
            os._exit(3)
        time.sleep(0.002)
    assert status == 0, (i, status)
stop.append(1)
t.join()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-4000:])


# ---------------------------------------------------------------------------
# liburing test/timeout.c
# ---------------------------------------------------------------------------

def test_single_timeout(lport):
    """liburing test/timeout.c, test_single_timeout: a timer wakes the
    waiter after its delay, not before."""
    t0 = time.monotonic()
    op = lport.timer(0.1, context="t")
    c = one(lport)
    elapsed = time.monotonic() - t0
    assert c is op and c.op == "timer" and c.context == "t" and c.error is None
    assert 0.095 <= elapsed < 2.0, elapsed


def test_single_timeout_immediate(lport):
    """liburing test/timeout.c, test_single_timeout(immediate): a zero delay
    completes at once."""
    t0 = time.monotonic()
    lport.timer(0)
    assert one(lport).error is None
    assert time.monotonic() - t0 < 1.0


def test_multi_timeout(lport):
    """liburing test/timeout.c, test_multi_timeout: timers with different
    delays submitted in reverse order complete in the order of their
    delays."""
    for d in (0.25, 0.15, 0.05):
        lport.timer(d, context=d)
    got = [c.context for c in collect(lport, 3)]
    assert got == [0.05, 0.15, 0.25]


def test_single_timeout_remove(lport):
    """liburing test/timeout.c, test_single_timeout_remove: a pending timer
    removed (cancelled) completes once, cancelled, long before its delay."""
    t0 = time.monotonic()
    op = lport.timer(60)
    time.sleep(0.02)
    assert op.cancel() is True
    c = one(lport)
    assert c is op and c.cancelled and time.monotonic() - t0 < 2


def test_single_timeout_exit(backend):
    """liburing test/timeout.c, test_single_timeout_exit: pending timers are
    cancelled when the ring goes away: close() returns at once."""
    if backend not in LINUX_BACKENDS:
        pytest.skip("Linux backends only")
    port = fastiocp.CompletionPort(backend=backend)
    ops = [port.timer(3600) for _ in range(20)]
    t0 = time.monotonic()
    port.close()
    assert time.monotonic() - t0 < 2 and all(op.done for op in ops)


@needs_uring
def test_timeout_of_an_exited_thread_keeps_its_deadline(uport):
    """liburing test/timeout.c (test_single_timeout_exit's other side: the
    kernel kills the timeouts of a task that exits): a timer armed by a
    thread that then exits is re-armed by the port with the same absolute
    expiry, so it fires once, on time."""
    box = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: box.append(uport.timer(0.2)))
    t.start()
    t.join()
    c = one(uport)
    elapsed = time.monotonic() - t0
    assert c is box[0] and c.error is None
    assert 0.195 <= elapsed < 1.5, elapsed


# ---------------------------------------------------------------------------
# io_uring's timer heap: timers in user space on one kernel TIMEOUT
# (csrc/unix/timerheap.c, the heap epoll uses; see io_uring.c's head comment)
# ---------------------------------------------------------------------------

# Many timers in order and cancels inside the heap: test_timerheap.py (both
# Linux backends).


@needs_uring
def test_heap_timer_zero_needs_no_kernel_timer(uport):
    """timer(0) is due at submit: it completes straight into the port's
    queue, so it is there even while its batch is still deferred (an SQE
    would not even have reached the kernel yet)."""
    with uport.batch():
        op = uport.timer(0, context="now")
        c = uport.get(timeout=0)
        assert c is op and c.error is None and c.context == "now"
    # And in bulk: 10,000 of them cost no kernel timer each.
    n = 10_000
    t0 = time.monotonic()
    for start in range(0, n, 64):
        with uport.batch():
            for i in range(start, min(n, start + 64)):
                uport.timer(0, context=i)
    got = [c.context for c in collect(uport, n)]
    assert got == list(range(n))  # submit order: equal deadlines
    assert time.monotonic() - t0 < 10


@needs_uring
def test_heap_timer_zero_comes_after_due_heap_timers(uport):
    """A timer(0) submitted after earlier timers' deadlines passed comes
    after them (they leave the heap first), whatever the kernel timer's
    slack."""
    early = [uport.timer(0.001, context=i) for i in range(5)]
    time.sleep(0.02)
    uport.timer(0, context="zero")
    got = [c.context for c in collect(uport, len(early) + 1)]
    assert got == [0, 1, 2, 3, 4, "zero"]


@needs_uring
def test_heap_earlier_timer_rearms_the_kernel_timer(uport):
    """A long timer arms the kernel timeout; a shorter one submitted after
    it must not wait for it."""
    uport.timer(30, context="long")
    t0 = time.monotonic()
    uport.timer(0.05, context="short")
    c = uport.get(timeout=5)
    assert c is not None and c.context == "short"
    assert 0.045 <= time.monotonic() - t0 < 2


@needs_uring
def test_heap_close_with_ten_thousand_pending_timers_is_prompt():
    port = fastiocp.CompletionPort(backend="io_uring")
    ops = [port.timer(60 + i * 1e-3) for i in range(10_000)]
    t0 = time.monotonic()
    port.close()
    assert time.monotonic() - t0 < 2
    assert all(op.done for op in ops)


@needs_uring
def test_heap_timers_from_many_threads_fire_once_each(uport):
    """Submitters on many threads (which then exit: the kernel cancels a
    TIMEOUT its thread armed, and the port re-arms), cancels among them."""
    import random

    per, nthreads = 500, 8
    boxes = [[] for _ in range(nthreads)]

    def work(k):
        rng = random.Random(k)
        for i in range(per):
            op = uport.timer(rng.uniform(0, 0.2), context=(k, i))
            boxes[k].append(op)
            if i % 7 == 0:
                op.cancel()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cs = collect(uport, per * nthreads, timeout=20)
    assert sorted(c.context for c in cs) == sorted((k, i) for k in range(nthreads) for i in range(per))
    assert uport.get(timeout=0.3) is None


# ---------------------------------------------------------------------------
# liburing test/fsync.c
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("datasync", [False, True])
def test_single_fsync(lport, tmp_path, datasync):
    """liburing test/fsync.c, test_single_fsync: fsync of a fresh file
    completes with 0."""
    with fastiocp.open(tmp_path / "f", "wb") as f:
        lport.register(f)
        op = lport.fsync(f, datasync=datasync, context="sync")
        c = one(lport)
        assert c is op and c.op == "fsync" and c.error is None and c.nbytes == 0


def test_barrier_fsync(lport, tmp_path):
    """liburing test/fsync.c, test_barrier_fsync: four writes, then (once
    they completed: the drain) an fsync; the file holds the four blocks."""
    path = tmp_path / "barrier"
    blocks = [bytes([65 + i]) * 4096 for i in range(4)]
    with fastiocp.open(path, "wb") as f:
        lport.register(f)
        for i, block in enumerate(blocks):
            lport.write(f, block, offset=i * 4096, context=i)
        got = collect(lport, 4)
        assert sorted(c.context for c in got) == [0, 1, 2, 3] and all(c.nbytes == 4096 for c in got)
        lport.fsync(f, context="sync")
        assert one(lport).error is None
    assert path.read_bytes() == b"".join(blocks)


def test_fsync_bad_descriptor(lport, pipe_fds):
    """liburing test/fsync.c (errors come as completions): fsync of a pipe
    fails with EINVAL in the completion."""
    r, _w = pipe_fds
    lport.register(r)
    lport.fsync(r)
    c = one(lport)
    assert isinstance(c.error, OSError) and c.error.errno == 22


# ---------------------------------------------------------------------------
# liburing test/waitid.c (process waits: a pidfd polled for POLLIN)
# ---------------------------------------------------------------------------

def spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_waitid_basic(lport):
    """liburing test/waitid.c, test: a child exiting with a code is seen
    with that code; the child is not reaped (WNOWAIT): waitpid() still gets
    its status afterwards."""
    p = spawn("import time, sys; time.sleep(0.1); sys.exit(3)")
    op = lport.wait_process(p.pid, context="child")
    c = one(lport)
    assert c is op and c.op == "wait_process" and c.error is None and c.result() == 3
    pid, status = os.waitpid(p.pid, 0)
    assert pid == p.pid and os.waitstatus_to_exitcode(status) == 3
    p.returncode = 3


def test_waitid_ready(lport):
    """liburing test/waitid.c, test_ready: a child that has already exited
    (a zombie) completes at once."""
    p = spawn("pass")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/stat") as st:
            if st.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    lport.wait_process(p.pid)
    assert one(lport).result() == 0
    assert p.wait() == 0


def test_waitid_killed_by_signal(lport):
    """liburing test/waitid.c (siginfo of a killed child): the result is
    the negative signal number, as Popen.returncode says."""
    p = spawn("import time; time.sleep(60)")
    try:
        lport.wait_process(p)
        time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        assert one(lport).result() == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


def test_waitid_noexit_timeout(lport):
    """liburing test/waitid.c, test_noexit: a wait with a linked timeout on
    a child that does not exit in time completes with TimeoutError, and the
    child is left alone."""
    p = spawn("import time; time.sleep(60)")
    try:
        t0 = time.monotonic()
        lport.wait_process(p, timeout=0.1)
        c = one(lport)
        assert isinstance(c.error, TimeoutError) and time.monotonic() - t0 >= 0.095
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_waitid_double(lport):
    """liburing test/waitid.c, test_double: one child exits, but not the
    one waited for: the wait stays pending until its own child exits."""
    waited = spawn("import time, sys; time.sleep(0.4); sys.exit(7)")
    other = spawn("import sys; sys.exit(1)")
    try:
        op = lport.wait_process(waited)
        assert other.wait() == 1
        assert lport.get(timeout=0.1) is None
        c = one(lport)
        assert c is op and c.result() == 7
    finally:
        waited.wait()


def test_waitid_cancel(lport):
    """liburing test/waitid.c, test_cancel: a pending wait cancelled
    completes once, cancelled; the pidfd is closed."""
    p = spawn("import time; time.sleep(60)")
    try:
        fds = open_fd_count()
        op = lport.wait_process(p)
        time.sleep(0.02)
        assert op.cancel() is True
        c = one(lport)
        assert c is op and c.cancelled
        assert open_fd_count() == fds
    finally:
        p.kill()
        p.wait()


def test_waitid_not_a_child(lport):
    """liburing test/waitid.c, test_invalid (waitid's ECHILD): waiting for
    a process that is not our child (our parent, here) fails at once with
    ChildProcessError instead of waiting for it."""
    lport.wait_process(os.getppid())
    c = one(lport)
    assert isinstance(c.error, ChildProcessError)


@needs_uring
def test_waitid_cancel_race(uport):
    """liburing test/waitid.c, test_cancel_race: cancels racing with the
    child's exit: each wait completes exactly once, with the status or a
    cancellation, and no pidfd leaks."""
    fds = open_fd_count()
    for i in range(20):
        p = spawn("pass")
        op = uport.wait_process(p)
        time.sleep(0.001 * (i % 5))
        op.cancel()
        c = one(uport)
        assert c is op and (c.cancelled or c.result() == 0)
        p.wait()
    assert open_fd_count() == fds


# ---------------------------------------------------------------------------
# What the port reports, and close() with every new kind pending
# ---------------------------------------------------------------------------

@needs_uring
def test_io_uring_operation_table():
    """The io_uring backend does every new kind with io_uring opcodes
    (process waits as a polled pidfd), timeouts as LINK_TIMEOUTs, but
    timers (a user-space heap on one kernel TIMEOUT) and sendfile (bursts of
    sendfile() from the backend whenever a POLL says the socket is
    writable, as epoll does); connect_pipe is Windows-only."""
    table = fastiocp.backend_operations("io_uring")
    assert table.pop("connect_pipe") == "unsupported"
    assert table.pop("timer") == "emulated"
    assert table.pop("sendfile") == "emulated"
    assert set(table.values()) == {"native"}


def test_close_with_every_kind_pending(backend, tmp_path, big_file):
    """liburing's exit tests (test/files-exit-hang-poll.c,
    test/files-exit-hang-timeout.c): a port closed with polls, receives with
    timeouts, timers, process waits and sendfiles pending returns promptly;
    every operation is done; no descriptor (pidfd, pipe) is left open."""
    if backend not in LINUX_BACKENDS:
        pytest.skip("Linux backends only")
    f, _payload = big_file
    a, b = socket.socketpair()
    c, d = socket.socketpair()  # sendfile from c to d, which nobody reads
    p = spawn("import time; time.sleep(60)")
    try:
        fds = open_fd_count()
        port = fastiocp.CompletionPort(backend=backend)
        port.register(a)
        port.register(c)
        ops = [port.poll(a, fastiocp.POLLIN), port.recvmsg(a, [bytearray(4)], timeout=60),
               port.timer(60), port.wait_process(p), port.wait_process(p, timeout=60),
               port.sendfile(c, f, 0, 4 << 20), port.sendfile(c, f, 0, 4 << 20, timeout=60),
               port.poll(a, fastiocp.POLLPRI, timeout=60)]
        assert port.get(timeout=0.1) is None
        t0 = time.monotonic()
        port.close()
        assert time.monotonic() - t0 < 5
        assert all(op.done for op in ops)
        del port, ops
        assert open_fd_count() == fds
    finally:
        p.kill()
        p.wait()
        for s_ in (a, b, c, d):
            s_.close()


# ---------------------------------------------------------------------------
# Issue 18 on io_uring: provided-buffer rings, multishot receive and accept,
# SEND_ZC (the contract on every backend is tests/test_pools.py). Each runs
# as this kernel does it (native) and as older kernels do:
# FASTIOCP_URING_DISABLE, read when a port opens, makes the port act as if
# its kernel lacked them (csrc/unix/io_uring.c, head comment).
# ---------------------------------------------------------------------------

URING_MODES = {
    "native": "",
    # 5.19: a buffer ring, but no multishot receive: single shots re-armed.
    "rearmed": "recv_multishot,accept_multishot",
    # before 5.19: no buffer ring (a POLL, then recv() into the free stack),
    # no multishot, no SEND_ZC (a plain send).
    "emulated": "pbuf_ring,recv_multishot,accept_multishot,send_zc",
}


@pytest.fixture(params=list(URING_MODES))
def mode(request, monkeypatch):
    if "io_uring" not in fastiocp.available_backends():
        pytest.skip("io_uring is not available here")
    monkeypatch.setenv("FASTIOCP_URING_DISABLE", URING_MODES[request.param])
    return request.param


@pytest.fixture
def mport(mode):
    """An io_uring port in each of URING_MODES."""
    p = fastiocp.CompletionPort(backend="io_uring")
    yield p
    p.close()


def until(port, want, timeout=10.0):
    """Dequeues until want(c) holds; returns every completion taken."""
    got = []
    deadline = time.monotonic() + timeout
    while not got or not want(got[-1]):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {got!r}"
        c = port.get(timeout=left)
        if c is not None:
            got.append(c)
    return got


def buffer_id(c) -> int:
    """The pool's id of the buffer c holds (PooledBuffer's repr shows it)."""
    m = re.search(r"id=(\d+)", repr(c.buffer))
    assert m, repr(c.buffer)
    return int(m.group(1))


def is_enobufs(c) -> bool:
    return isinstance(c.error, OSError) and c.error.errno == errno.ENOBUFS


@pytest.mark.parametrize("disabled, native", [
    ("", {"pooled", "multishot", "zerocopy"}),
    ("recv_multishot", {"pooled", "zerocopy"}),
    ("accept_multishot", {"pooled", "zerocopy"}),
    ("send_zc", {"pooled", "multishot"}),
    ("pbuf_ring", {"zerocopy"}),
    ("pbuf_ring,send_zc,bogus", set()),
])
def test_uring_native_says_what_the_kernel_does(monkeypatch, disabled, native):
    """port.native: everything on this kernel (6.x); a feature the port acts
    as if it lacked is emulated, and native says so (multishot needs both
    the buffer ring and the kernel's multishot receive and accept)."""
    if "io_uring" not in fastiocp.available_backends():
        pytest.skip("io_uring is not available here")
    monkeypatch.setenv("FASTIOCP_URING_DISABLE", disabled)
    with fastiocp.CompletionPort(backend="io_uring") as p:
        assert p.native == frozenset(native)


def test_uring_released_buffers_come_back_through_the_ring(mport, mode, sockpair):
    """liburing test/buf-ring.c (buffers provided through a registered ring,
    consumed from its head, given back at its tail): a released buffer is
    taken again once the ring comes round to it, in FIFO order: ids 0, 1,
    2, 3, 0, 1, ... Without a ring (emulated), the free stack gives the
    same buffer every time."""
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 4)
    mport.register(a)
    ids = []
    for i in range(10):
        c = mport.recv(a, pool)
        b.sendall(b"%d" % i)
        until(mport, lambda x: x is c)
        assert bytes(c.buffer) == b"%d" % i
        ids.append(buffer_id(c))
        c.release()
    assert ids == ([0] * 10 if mode == "emulated" else [0, 1, 2, 3] * 2 + [0, 1])
    assert pool.in_use == 0


def test_uring_pooled_recv_with_a_timeout(mport, sockpair):
    """A pooled receive takes a timeout (its LINK_TIMEOUT; emulated: behind
    each POLL): expired, it holds no buffer and reads nothing; with data
    before it, the data."""
    a, b = sockpair
    pool = fastiocp.BufferPool(32, 2)
    mport.register(a)
    op = mport.recv(a, pool, timeout=0.05)
    assert until(mport, lambda x: x is op) == [op]
    assert isinstance(op.error, TimeoutError) and op.buffer is None
    assert pool.in_use == 0
    b.sendall(b"in time")
    op = mport.recv(a, pool, timeout=5)
    assert until(mport, lambda x: x is op) == [op]
    assert op.error is None and bytes(op.buffer) == b"in time"
    op.release()
    assert pool.in_use == 0


def test_uring_multishot_recv_children_in_order_then_eof(mport):
    """liburing test/recv-multishot.c (stream, results until the one without
    IORING_CQE_F_MORE): 1 MiB in chunks of random sizes over TCP from
    another thread; the children carry it in order, each in a buffer of its
    own, then the last completion says end of stream. The consumer gives
    buffers back as it goes; a receive that found the pool dry (ENOBUFS:
    nothing read) is submitted again, so not one byte is lost."""
    client, server = loopback_tcp_pair()
    rng = random.Random(18)
    payload = rng.randbytes(1 << 20)
    pool = fastiocp.BufferPool(4096, 64)
    with client, server:
        mport.register(server)

        def send():
            pos = 0
            while pos < len(payload):
                n = rng.randint(1, 20000)
                client.sendall(payload[pos:pos + n])
                pos += n
            client.shutdown(socket.SHUT_WR)

        op = mport.recv(server, pool, multishot=True)
        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        dry = 0
        while True:
            c = mport.get(timeout=10)
            assert c is not None
            if c.nbytes:
                assert len(c.buffer) == c.nbytes <= pool.size
                got += c.buffer
                c.release()
            if c.more:
                assert c is not op
                continue
            assert c is op
            if is_enobufs(c):
                dry += 1
                op = mport.recv(server, pool, multishot=True)
                continue
            assert c.error is None and c.nbytes == 0  # end of stream
            break
        sender.join()
        assert got == payload
        assert pool.in_use == 0


@pytest.mark.parametrize("family", ["unix", "tcp"])
@pytest.mark.parametrize("size", [100, 5000])
def test_uring_multishot_recv_sees_an_end_queued_behind_the_data(mport, family, size):
    """Data and the peer's shutdown both queued before a multishot receive
    runs: the data, then the end of stream. (The kernel's own multishot
    misses that end on AF_UNIX, whose receives report what is left queued
    without TCP's end-of-stream hint: it waits for a wake-up that already
    came. The backend re-arms single shots there.)"""
    if family == "unix":
        r, s = socket.socketpair()
    else:
        s, r = loopback_tcp_pair()
    pool = fastiocp.BufferPool(512, 16)
    with r, s:
        mport.register(r)
        s.sendall(b"e" * size)
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.02)
        op = mport.recv(r, pool, multishot=True)
        got = bytearray()
        for c in until(mport, lambda x: x is op, timeout=5):
            got += c.buffer or b""
            c.release()
        assert got == b"e" * size
        assert op.error is None and op.nbytes == 0 and not op.more
        assert pool.in_use == 0


def test_uring_threads_release_into_one_ring_at_once(mport):
    """Four threads dequeue the results of multishot receives on eight
    connections sharing one small pool and release buffers at once (the
    ring's tail moves under the pool's mutex); a receive that found the
    pool dry is submitted again. Every byte arrives: per connection, the
    count and the sum of the bytes sent."""
    pairs = [socket.socketpair() for _ in range(8)]
    pool = fastiocp.BufferPool(512, 16)
    rounds = 300
    got = {i: [0, 0] for i in range(len(pairs))}
    ended = set()
    lock = threading.Lock()
    try:
        for i, (a, _b) in enumerate(pairs):
            mport.register(a, key=i)
            mport.recv(a, pool, multishot=True)

        def work():
            while True:
                c = mport.get(timeout=10)
                if c is None or c.key is None:
                    return
                if c.nbytes:
                    data = bytes(c.buffer)
                    c.release()
                    with lock:
                        got[c.key][0] += len(data)
                        got[c.key][1] += sum(data)
                if c.more:
                    continue
                if is_enobufs(c):
                    mport.recv(pairs[c.key][0], pool, multishot=True)
                    continue
                assert c.error is None and c.nbytes == 0, c.error
                with lock:
                    ended.add(c.key)

        workers = [threading.Thread(target=work) for _ in range(4)]
        for t in workers:
            t.start()
        rng = random.Random(4)
        sent = {i: [0, 0] for i in range(len(pairs))}
        for _ in range(rounds):
            for i, (_a, b) in enumerate(pairs):
                data = rng.randbytes(rng.randint(1, 1500))
                b.sendall(data)
                sent[i][0] += len(data)
                sent[i][1] += sum(data)
        for _a, b in pairs:
            b.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 20
        while len(ended) < len(pairs) and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in workers:
            mport.post()  # key None: stop
        for t in workers:
            t.join(10)
        assert ended == set(range(len(pairs)))
        assert got == sent
        assert pool.in_use == 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_uring_multishot_recv_enobufs_loses_no_data(mport, sockpair):
    """liburing test/recv-multishot.c, ERROR_NOT_ENOUGH_BUFFERS: with every
    buffer held, the multishot ends with ENOBUFS and reads nothing; after a
    release, a new receive gets exactly the bytes that were waiting."""
    a, b = sockpair
    pool = fastiocp.BufferPool(16, 4)
    mport.register(a)
    op = mport.recv(a, pool, multishot=True)
    held = []
    for i in range(4):
        b.sendall(b"msg%d" % i)
        c = until(mport, lambda x: x.nbytes > 0)[-1]
        assert c.more and bytes(c.buffer) == b"msg%d" % i
        held.append(c)
    assert pool.in_use == 4
    b.sendall(b"waiting")
    end = until(mport, lambda x: x is op)
    assert len(end) == 1 and is_enobufs(op) and not op.more and op.buffer is None
    held.pop(0).release()
    again = mport.recv(a, pool, multishot=True)
    c = until(mport, lambda x: x.nbytes > 0)[-1]
    assert c.more and bytes(c.buffer) == b"waiting"
    c.release()
    assert again.cancel() is True
    until(mport, lambda x: x is again)
    assert again.cancelled
    for c in held:
        c.release()
    assert pool.in_use == 0


def test_uring_cancel_multishot_recv(mport, sockpair):
    """A cancel ends a multishot receive (its own completion, cancelled,
    after the results before it); data sent afterwards stays in the
    socket."""
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 8)
    mport.register(a)
    op = mport.recv(a, pool, multishot=True)
    for i in range(3):
        b.sendall(b"r%d" % i)
        c = until(mport, lambda x: x.nbytes > 0)[-1]
        assert c.more and bytes(c.buffer) == b"r%d" % i
        c.release()
    assert op.cancel() is True
    assert until(mport, lambda x: x is op) == [op]
    assert op.cancelled and not op.more and op.nbytes == 0
    assert op.cancel() is False
    b.sendall(b"after")
    assert mport.get(timeout=0.1) is None
    assert a.recv(16) == b"after"
    assert pool.in_use == 0


def test_uring_cancel_multishot_accept(mport):
    """liburing test/accept.c, test_accept_cancel (multishot): connections
    are taken one child each (close-on-exec, as accept() makes them) until
    the cancel, whose completion is the operation's own; a connection
    after it waits in the backlog."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
    clients = []
    try:
        mport.register(lsock)
        op = mport.accept(lsock, multishot=True)
        for _ in range(3):
            clients.append(socket.create_connection(lsock.getsockname()))
            c = until(mport, lambda x: True)[-1]
            assert c.more and c is not op
            sock, addr = c.result()
            with sock:
                assert addr == clients[-1].getsockname()
                assert not os.get_inheritable(sock.fileno())
        assert op.cancel() is True
        assert until(mport, lambda x: x is op) == [op]
        assert op.cancelled and not op.more
        clients.append(socket.create_connection(lsock.getsockname()))
        assert mport.get(timeout=0.1) is None
        lsock.settimeout(5)
        lsock.accept()[0].close()
    finally:
        for s in clients:
            s.close()
        lsock.close()


def test_uring_multishot_survives_the_exit_of_the_submitting_thread(mport, sockpair):
    """The kernel cancels what a thread that exits still owes (the head
    comment of io_uring.c): a multishot receive and a multishot accept
    submitted from a thread that has ended go on, resubmitted unseen."""
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 8)
    lsock = socket.create_server(("127.0.0.1", 0))
    mport.register(a)
    mport.register(lsock)
    ops = []
    t = threading.Thread(target=lambda: ops.extend(
        [mport.recv(a, pool, multishot=True), mport.accept(lsock, multishot=True)]))
    t.start()
    t.join()
    recv_op, acc_op = ops
    time.sleep(0.05)
    assert mport.get(timeout=0.05) is None
    for i in range(2):
        b.sendall(b"t%d" % i)
        c = until(mport, lambda x: x.nbytes > 0)[-1]
        assert c.more and bytes(c.buffer) == b"t%d" % i
        c.release()
    with socket.create_connection(lsock.getsockname()):
        c = until(mport, lambda x: x.op == "accept")[-1]
        assert c.more and c.error is None
        c.result()[0].close()
    b.shutdown(socket.SHUT_WR)
    assert until(mport, lambda x: x is recv_op)[-1].nbytes == 0
    assert recv_op.error is None and not recv_op.more
    acc_op.cancel()
    until(mport, lambda x: x is acc_op)
    lsock.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("size", [1, 4096, 65536 + 3, 1 << 20])
def test_uring_send_zc_completes_once_with_the_bytes(mport, family, size):
    """liburing test/send-zerocopy.c (test_basic_send): a zero-copy send
    completes once, after its notification (the two CQEs are one
    completion), with the count of bytes sent; the receiver gets exactly
    them. Over AF_UNIX, which has no zero-copy (-EOPNOTSUPP), and without
    SEND_ZC (emulated), it is a plain send."""
    s, r = loopback_tcp_pair() if family == "tcp" else socket.socketpair()
    payload = os.urandom(size)
    got = bytearray()
    with s, r:
        mport.register(s)

        def read(n):
            while len(got) < n:
                chunk = r.recv(1 << 20)
                if not chunk:
                    break
                got.extend(chunk)

        reader = threading.Thread(target=read, args=(size,))
        reader.start()
        sent = 0
        while sent < size:  # a stream send may be short
            op = mport.send(s, payload[sent:], zerocopy=True)
            c = until(mport, lambda x: x is op)
            assert len(c) == 1 and c[0].error is None and c[0].nbytes > 0
            sent += op.nbytes
        reader.join(10)
        assert sent == size and bytes(got) == payload
        assert mport.get(timeout=0.05) is None


def test_uring_send_zc_records_reused_many_times(mport):
    """A record's SEND_ZC bookkeeping (the notification owed) never leaks
    into its next life: 200 zero-copy sends in a row, each one
    completion."""
    s, r = loopback_tcp_pair()
    with s, r:
        mport.register(s)
        for i in range(200):
            op = mport.send(s, b"%04d" % i, zerocopy=True)
            assert until(mport, lambda x: x is op) == [op]
            assert op.nbytes == 4
            assert r.recv(4, socket.MSG_WAITALL) == b"%04d" % i
        assert mport.get(timeout=0.05) is None


def test_uring_send_zc_cancel_and_close_while_blocked(mode):
    """A zero-copy send blocked on a full socket is cancelled: one
    completion, cancelled. Another one pending at close(): close() waits
    for its notification, which comes only once TCP lets go of the pages
    (here: once the peer, asleep until then, reads), and returns then;
    the receiver gets the bytes that went out, exact. (A peer that never
    reads holds the notification back for good: close() then gives up
    after its bound and leaks the port, the kernel still reading the
    buffer.)"""
    s, r = loopback_tcp_pair()
    payload = os.urandom(1 << 20)
    got = bytearray()
    with s, r:
        s.setblocking(False)
        filler = bytearray()
        try:
            while True:  # until the socket takes no more
                filler += b"f" * s.send(b"f" * 65536)
        except BlockingIOError:
            pass
        s.setblocking(True)
        port = fastiocp.CompletionPort(backend="io_uring")
        port.register(s)
        op = port.send(s, payload, zerocopy=True)
        assert port.get(timeout=0.1) is None, "the peer reads nothing"
        assert op.cancel() is True
        assert until(port, lambda x: x is op) == [op]
        assert op.cancelled and op.nbytes == 0
        # Short at once (the socket took a little), but a SEND_ZC's
        # completion waits for the notification.
        pending = port.send(s, payload, zerocopy=True)
        time.sleep(0.1)
        if mode != "emulated":
            assert port.get(timeout=0.05) is None, "no notification yet"

        def drain():
            time.sleep(0.3)
            r.settimeout(10)
            while chunk := r.recv(1 << 20):
                got.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        t0 = time.monotonic()
        port.close()
        assert time.monotonic() - t0 < 5
        assert pending.done
        sent = 0 if pending.error is not None else pending.nbytes
        s.shutdown(socket.SHUT_WR)
        reader.join(10)
        assert bytes(got) == bytes(filler) + payload[:sent]


def test_uring_close_with_multishots_pending_and_buffers_held(mode):
    """close() with a multishot receive (one buffer held by the program,
    more data arriving), a multishot accept and a pooled receive pending:
    prompt, every operation done, the ring unregistered; the held buffer is
    still readable and goes back to the pool, which then serves a new port
    (a new ring) as if new."""
    pool = fastiocp.BufferPool(64, 4)
    lsock = socket.create_server(("127.0.0.1", 0))
    a, b = socket.socketpair()
    c2, d2 = socket.socketpair()
    try:
        port = fastiocp.CompletionPort(backend="io_uring")
        port.register(a)
        port.register(c2)
        port.register(lsock)
        ms = port.recv(a, pool, multishot=True)
        acc = port.accept(lsock, multishot=True)
        single = port.recv(c2, pool)
        b.sendall(b"held")
        held = until(port, lambda x: x.nbytes > 0)[-1]
        b.sendall(b"more")
        time.sleep(0.05)
        t0 = time.monotonic()
        port.close()
        assert time.monotonic() - t0 < 5
        assert ms.done and acc.done and single.done
        assert bytes(held.buffer) == b"held"
        held.release()
        del held
        gc.collect()
        assert pool.in_use == 0
        with fastiocp.CompletionPort(backend="io_uring") as p2:
            p2.register(c2)
            ids = []
            for i in range(6):
                op = p2.recv(c2, pool)
                d2.sendall(b"p%d" % i)
                until(p2, lambda x: x is op)
                assert bytes(op.buffer) == b"p%d" % i
                ids.append(buffer_id(op))
                op.release()
            assert sorted(set(ids)) == ([0] if mode == "emulated" else [0, 1, 2, 3])
    finally:
        for s_ in (lsock, a, b, c2, d2):
            s_.close()
