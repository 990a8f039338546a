"""epoll backend: the operations of issue 14 where the epoll backend does
them its own way (csrc/unix/epoll.c): the timer heap behind timer() and
per-operation timeouts, polls beside the per-descriptor queues, sendfile on a
blocking socket, process waits on a pidfd of the backend's own, and the
descriptors those need (no pidfd or timerfd may leak). Then issue 18's pools
and multishot operations, emulated on readiness: a multishot beside a
pending send, the burst bound per readiness event, FIOCP_ENOBUFS that reads
nothing, order and loss under cancel and close.

The shared behaviour of these operations on every backend lives in
tests/test_operations.py; these tests reach into what only epoll has."""
from __future__ import annotations

import errno
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import fastiocp
from conftest import collect

if sys.platform.startswith("linux"):
    import fcntl  # the module is collected on Windows too (and skipped there)
    import termios

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux backends")

BACKEND = "epoll"


@pytest.fixture
def port():
    p = fastiocp.CompletionPort(backend=BACKEND)
    yield p
    p.close()


@pytest.fixture
def pair(port):
    """A socket pair registered with port."""
    a, b = socket.socketpair()
    port.register(a)
    port.register(b)
    yield a, b
    a.close()
    b.close()


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def errno_of(c) -> int | None:
    return None if c.error is None else c.error.errno


def fill(sock: socket.socket) -> int:
    """Fills sock's send buffer (and the peer's receive buffer); returns the
    bytes it took."""
    sock.setblocking(False)
    total = 0
    try:
        while True:
            total += sock.send(b"\0" * 65536)
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return total


# ---- The timer heap ---------------------------------------------------------

# test_timerheap.py: many timers in order, cancels inside the heap (both
# Linux backends).

def test_cancelling_a_fired_timer_is_a_no_op(port):
    op = port.timer(0)
    c = port.get(timeout=5)
    assert c is op and c.error is None
    op.cancel()  # already done: nothing happens, nothing more comes
    assert port.get_many(4, timeout=0.05) == []


def test_timeouts_fire_for_thousands_of_queued_polls(port, pair):
    _, b = pair
    rng = random.Random(7)
    n = 2000
    for i in range(n):
        port.poll(b, fastiocp.POLLIN, context=i, timeout=rng.uniform(0.01, 0.2))
    cs = collect(port, n)
    assert sorted(c.context for c in cs) == list(range(n))
    assert all(errno_of(c) == errno.ETIMEDOUT for c in cs)
    # The descriptor still works: its interest was left consistent.
    port.poll(b, fastiocp.POLLOUT)
    assert port.get(timeout=5).result() & fastiocp.POLLOUT


# ---- Per-operation timeouts against data ------------------------------------

def test_timeout_with_data_already_there_returns_the_data(port, pair):
    a, b = pair
    a.send(b"early")
    c = port.recv(b, 16, timeout=0)
    c = port.get(timeout=5)
    assert c.error is None and bytes(c.buffer[:c.nbytes]) == b"early"


def test_timeout_zero_on_an_empty_socket_times_out(port, pair):
    _, b = pair
    port.recv(b, 16, timeout=0)
    c = port.get(timeout=5)
    assert errno_of(c) == errno.ETIMEDOUT
    assert isinstance(c.error, TimeoutError)


def test_timeouts_racing_with_data_never_lose_a_byte(port, pair):
    """Each round a receive with a ~1 ms timeout races a send timed to land
    around its expiry. Whatever wins, every byte sent is received exactly
    once: either by the receive, or (when it timed out) by the next one."""
    a, b = pair
    rng = random.Random(5)
    sent = bytearray()
    got = bytearray()
    outcomes = {"data": 0, "timeout": 0}
    for i in range(400):
        payload = i.to_bytes(4, "big")
        port.recv(b, 64, timeout=0.001)
        time.sleep(rng.choice((0, 0.0005, 0.001, 0.0015)))
        a.send(payload)
        sent += payload
        c = port.get(timeout=5)
        if c.error is None:
            outcomes["data"] += 1
            got += c.buffer[:c.nbytes]
        else:
            assert errno_of(c) == errno.ETIMEDOUT, c.error
            outcomes["timeout"] += 1
    # What a timed-out receive left behind is still in the socket.
    b.setblocking(False)
    try:
        while len(got) < len(sent):
            got += b.recv(65536)
    except BlockingIOError:
        pass
    assert bytes(got) == bytes(sent)
    assert outcomes["data"] > 0, outcomes


def test_cancel_and_timeout_race_gives_one_completion_each(port, pair):
    _, b = pair
    ops = [port.recv(b, 8, timeout=0.002, context=i) for i in range(500)]
    for op in ops[::2]:
        op.cancel()
    cs = collect(port, len(ops))
    assert sorted(c.context for c in cs) == list(range(len(ops)))
    for c in cs:
        assert errno_of(c) in (errno.ECANCELED, errno.ETIMEDOUT)
        if c.context % 2:
            assert errno_of(c) == errno.ETIMEDOUT


# ---- Polls beside the read and write queues --------------------------------

def test_poll_and_recv_pending_on_one_fd_both_complete(port, pair):
    a, b = pair
    poll = port.poll(b, fastiocp.POLLIN, context="poll")
    recv = port.recv(b, 16, context="recv")
    assert port.get_many(4, timeout=0.05) == []  # both wait
    a.send(b"both")
    cs = {c.context: c for c in collect(port, 2)}
    assert cs["poll"].result() & fastiocp.POLLIN
    assert bytes(cs["recv"].buffer[:cs["recv"].nbytes]) == b"both"
    assert poll.done and recv.done


def test_pollin_and_pollout_on_one_fd_complete_separately(port, pair):
    a, b = pair
    fill(b)  # b cannot write now, and has nothing to read
    port.poll(b, fastiocp.POLLOUT, context="out")
    port.poll(b, fastiocp.POLLIN, context="in")
    assert port.get_many(4, timeout=0.05) == []
    a.send(b"x")
    c = port.get(timeout=5)
    assert c.context == "in" and c.result() == fastiocp.POLLIN
    # Drain what b wrote: b becomes writable.
    a.setblocking(False)
    try:
        while True:
            a.recv(1 << 20)
    except BlockingIOError:
        pass
    c = port.get(timeout=5)
    assert c.context == "out" and c.result() == fastiocp.POLLOUT


def test_poll_for_both_directions_reports_what_fired(port, pair):
    """Ported from CPython's test_epoll.test_control_and_wait: a connected
    socket polled for IN|OUT is writable only, then readable too once the
    peer sent."""
    a, b = pair
    port.poll(b, fastiocp.POLLIN | fastiocp.POLLOUT)
    assert port.get(timeout=5).result() == fastiocp.POLLOUT
    a.send(b"y")
    port.poll(b, fastiocp.POLLIN | fastiocp.POLLOUT)
    assert port.get(timeout=5).result() == fastiocp.POLLIN | fastiocp.POLLOUT


def test_poll_on_a_pipe_written_later(port):
    """Ported from liburing's test/poll.c: a POLLIN on a pipe's read end
    completes once another thread writes to it."""
    r, w = os.pipe()
    try:
        port.register(r)
        port.poll(r, fastiocp.POLLIN)
        threading.Timer(0.05, os.write, (w, b"z")).start()
        c = port.get(timeout=5)
        assert c.result() == fastiocp.POLLIN
        assert os.read(r, 1) == b"z"
        # Then the writer goes away: HUP comes unasked.
        os.close(w)
        w = -1
        port.poll(r, fastiocp.POLLOUT)  # never true for a read end
        assert port.get(timeout=5).result() & fastiocp.POLLHUP
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_poll_and_recv_with_many_rounds_keep_the_recv_order(port, pair):
    a, b = pair
    for i in range(200):
        port.poll(b, fastiocp.POLLIN, context=("poll", i))
        port.recv(b, 4, context=("recv", i))
        a.send(i.to_bytes(4, "big"))
        cs = {c.context[0]: c for c in collect(port, 2)}
        assert cs["poll"].result() & fastiocp.POLLIN
        assert int.from_bytes(cs["recv"].buffer[:cs["recv"].nbytes], "big") == i


def test_cancelling_a_poll_leaves_the_recv_waiting(port, pair):
    a, b = pair
    poll = port.poll(b, fastiocp.POLLIN)
    port.recv(b, 8, context="recv")
    poll.cancel()
    c = port.get(timeout=5)
    assert c is poll and c.cancelled
    a.send(b"after")
    c = port.get(timeout=5)
    assert c.context == "recv" and bytes(c.buffer[:c.nbytes]) == b"after"


def test_pollpri_reports_urgent_data(port):
    """Ported from CPython's test_selectors (the out-of-band data case of
    test_select/test_poll): TCP urgent data makes a socket POLLPRI."""
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    try:
        port.register(server)
        port.poll(server, fastiocp.POLLPRI, context="pri")
        assert port.get_many(4, timeout=0.05) == []
        client.send(b"!", socket.MSG_OOB)
        c = port.get(timeout=5)
        assert c.context == "pri" and c.result() & fastiocp.POLLPRI
    finally:
        client.close()
        server.close()


# ---- sendmsg and recvmsg through the queues ---------------------------------

def test_queued_recvmsg_receives_descriptors_close_on_exec(port, pair):
    a, b = pair
    op = port.recvmsg(b, [bytearray(3), bytearray(5)], ancbufsize=socket.CMSG_SPACE(8))
    assert port.get_many(4, timeout=0.02) == []  # waits in b's read queue
    r, w = os.pipe()
    try:
        port.sendmsg(a, [b"abc", b"defgh"],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                       r.to_bytes(4, sys.byteorder) + w.to_bytes(4, sys.byteorder))])
        cs = {c.op: c for c in collect(port, 2)}
        assert cs["sendmsg"].result() == 8
        nbytes, ancdata, flags, _addr = cs["recvmsg"].result()
        assert cs["recvmsg"] is op and nbytes == 8 and flags == 0
        [(level, kind, data)] = ancdata
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds = [int.from_bytes(data[i:i + 4], sys.byteorder) for i in (0, 4)]
        try:
            for fd in fds:  # received close-on-exec (MSG_CMSG_CLOEXEC)
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.write(fds[1], b"via")
            assert os.read(fds[0], 3) == b"via"
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_recvmsg_reports_the_sender_and_truncation(port):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        tx.bind(("127.0.0.1", 0))
        port.register(rx)
        port.register(tx)
        port.recvmsg(rx, [bytearray(4)], context="rx")
        port.sendmsg(tx, [b"too long"], address=rx.getsockname(), context="tx")
        cs = {c.context: c for c in collect(port, 2)}
        assert cs["tx"].result() == 8
        nbytes, ancdata, flags, addr = cs["rx"].result()
        assert nbytes == 4 and ancdata == [] and flags & socket.MSG_TRUNC
        assert addr == tx.getsockname()
        assert bytes(cs["rx"].buffer[0]) == b"too "
    finally:
        rx.close()
        tx.close()


# ---- sendfile on a blocking socket -----------------------------------------

def test_sendfile_on_a_blocking_socket_with_a_slow_reader(port, tmp_path):
    size = 4 << 20
    data = os.urandom(1 << 16) * (size >> 16)
    path = tmp_path / "blob"
    path.write_bytes(data)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    received = bytearray()

    def slow_reader():
        # Small reads with pauses: the sender sees EAGAIN again and again.
        while len(received) < size - 1000:
            chunk = b.recv(65536)
            if not chunk:
                break
            received.extend(chunk)
            time.sleep(0.0005)

    assert a.getblocking()
    th = threading.Thread(target=slow_reader)
    th.start()
    with open(path, "rb") as f:
        port.register(a)
        port.register(f)
        op = port.sendfile(a, f, 1000, size)  # past the end: short at EOF
        c = port.get(timeout=60)
        assert f.tell() == 0  # the file position never moves
    th.join(60)
    assert c is op and c.error is None
    assert c.result() == size - 1000
    assert bytes(received) == data[1000:]
    # The socket is still the user's blocking socket.
    assert a.getblocking()
    assert not fcntl.fcntl(a.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    a.close()
    b.close()


def test_sendfile_reports_the_bytes_sent_before_the_peer_left(port, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"q" * (8 << 20))
    a, b = socket.socketpair()
    with open(path, "rb") as f:
        port.register(a)
        port.register(f)
        port.sendfile(a, f, 0, 8 << 20)
        b.recv(100_000)
        time.sleep(0.05)
        b.close()  # unread data: the sender gets EPIPE or ECONNRESET
        c = port.get(timeout=10)
    assert c.error is None, c.error
    assert 0 < c.result() < 8 << 20
    a.close()


# ---- Process waits on a pidfd ------------------------------------------------

def test_wait_process_does_not_reap(port):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    port.wait_process(child.pid)
    c = port.get(timeout=30)
    assert c.result() == 7
    # Still a zombie for its owner to reap (WNOWAIT).
    info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    assert info is not None and info.si_status == 7
    assert child.wait() == 7


def test_wait_process_reports_a_signal(port):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    port.wait_process(child)
    time.sleep(0.05)
    assert port.get_many(4, timeout=0) == []
    child.send_signal(signal.SIGTERM)
    c = port.get(timeout=30)
    assert c.result() == -signal.SIGTERM
    child.wait()


def test_wait_process_of_a_stranger_is_echild(port):
    port.wait_process(os.getppid())  # alive, not ours
    c = port.get(timeout=5)
    assert errno_of(c) == errno.ECHILD


def test_wait_process_timeout_then_the_child_is_still_waitable(port):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    port.timer(0)  # the port's timerfd is made the first time it is needed
    port.get(timeout=5)
    before = nfds()
    port.wait_process(child, timeout=0.05)
    c = port.get(timeout=5)
    assert errno_of(c) == errno.ETIMEDOUT
    assert nfds() == before  # its pidfd is gone
    port.wait_process(child)
    child.kill()
    assert port.get(timeout=30).result() == -signal.SIGKILL
    child.wait()


# ---- No descriptor leaks -------------------------------------------------------

def test_no_pidfd_leak_over_2000_cycles(port):
    zombie = subprocess.Popen(["true"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        while os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            time.sleep(0.01)
        # Warm up (the timerfd, the descriptor table), then count.
        port.wait_process(live, timeout=0.001)
        collect(port, 1)
        before = nfds()
        for i in range(2000):
            which = i % 4
            if which == 0:  # completes at submit: already exited
                port.wait_process(zombie)
                assert port.get(timeout=5).result() == 0
            elif which == 1:  # waits, then cancelled
                op = port.wait_process(live)
                op.cancel()
                assert port.get(timeout=5).cancelled
            elif which == 2:  # waits, then times out
                port.wait_process(live, timeout=0.0001)
                assert errno_of(port.get(timeout=5)) == errno.ETIMEDOUT
            else:  # fails at pidfd_open: a pid that cannot exist
                port.wait_process(2**22 + 1)
                assert errno_of(port.get(timeout=5)) in (errno.ESRCH, errno.EINVAL)
        assert nfds() == before
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_no_timerfd_or_pidfd_leak_when_ports_close_with_work_pending():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    a, b = socket.socketpair()
    try:
        p = fastiocp.CompletionPort(backend=BACKEND)
        p.close()
        before = nfds()
        for _ in range(2000 // 4):
            p = fastiocp.CompletionPort(backend=BACKEND)
            p.register(b)
            ops = [p.timer(60), p.wait_process(child), p.poll(b, fastiocp.POLLIN),
                   p.recv(b, 8, timeout=60)]
            p.close()
            assert p.pending == 0
            assert all(op.done and op.cancelled for op in ops)
        assert nfds() == before
    finally:
        child.kill()
        child.wait()
        a.close()
        b.close()


# ---- close() against submitters -----------------------------------------------

def test_close_while_threads_submit_timers_and_timeouts():
    """Submitters keep adding timers and timed receives while close()
    sweeps; every operation that was accepted completes once, nothing
    hangs, and the descriptors come back."""
    a, b = socket.socketpair()
    before = nfds()
    for _round in range(20):
        p = fastiocp.CompletionPort(backend=BACKEND)
        p.register(b)
        accepted = []
        stop = threading.Event()

        def submitter(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                try:
                    if rng.random() < 0.5:
                        op = p.timer(rng.uniform(0, 0.01))
                    else:
                        op = p.recv(b, 8, timeout=rng.uniform(0, 0.01))
                except (OSError, ValueError, RuntimeError):
                    return  # the port closed under us
                accepted.append(op)

        threads = [threading.Thread(target=submitter, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.02)
        p.close()
        stop.set()
        for t in threads:
            t.join(10)
        assert p.pending == 0
        assert all(op.done for op in accepted)
    assert nfds() == before
    a.close()
    b.close()


# ---- Pools and multishot operations (issue 18) --------------------------------
#
# epoll has no kernel buffer rings: a pooled receive takes a buffer only for
# the moment of its recv(), and a multishot operation stays at the head of its
# descriptor's read queue, armed, with at most 16 results per readiness event
# (csrc/unix/epoll.c, MULTISHOT_BURST). The contract on every backend is in
# tests/test_pools.py.

BURST = 16  # MULTISHOT_BURST in epoll.c


def test_nothing_is_native_on_epoll(port):
    assert port.native == frozenset()


def drain_bytes(results) -> bytes:
    """The data of pooled results, in order, each buffer given back."""
    out = b"".join(bytes(c.buffer) for c in results if c.buffer is not None)
    for c in results:
        c.release()
    return out


def completed_before_a_later_post(port, op) -> bool:
    """Whether op, just submitted, completed at submit time: a try at once
    puts its completion ahead of a post() made after it; an operation that
    waits for readiness completes only when the next poll finds it, behind
    the post."""
    port.post(context="later")
    first, second = port.get(timeout=10), port.get(timeout=10)
    assert {first.op, second.op} == {"post", "recv"}
    assert op in (first, second)
    return first is op


def test_a_recv_on_a_drained_stream_waits_for_readiness_first(port, pair):
    """After a recv that read less than it asked (the stream socket was
    drained), the next recv skips the try at submit, which in a
    request-response exchange would be a system call saying EAGAIN, and
    arms the interest first (io_uring's POLL_FIRST). Data that came in
    between is still received: arming reports the descriptor ready at once."""
    a, b = pair
    buf = bytearray(64)
    a.sendall(b"x")
    c = port.recv(b, buf)
    assert port.get(timeout=10) is c and c.nbytes == 1  # short: drained
    a.sendall(b"yz")  # there before the next recv is submitted
    c = port.recv(b, buf)
    assert not completed_before_a_later_post(port, c)
    assert c.error is None and bytes(buf[:c.nbytes]) == b"yz"
    # The first recv waits (the last one drained the socket) and fills its
    # buffer; that may have left more, so the next is tried at once.
    a.sendall(b"0123456789" * 7)
    small = bytearray(64)
    c = port.recv(b, small)
    assert not completed_before_a_later_post(port, c) and c.nbytes == 64
    c = port.recv(b, small)
    assert completed_before_a_later_post(port, c) and bytes(small[:c.nbytes]) == b"456789"
    # Drained again; nothing comes until after the submit.
    c = port.recv(b, buf)
    assert port.get_many(1, timeout=0.1) == []
    a.sendall(b"late")
    assert port.get(timeout=10) is c and bytes(buf[:c.nbytes]) == b"late"


def test_datagram_recvs_are_tried_at_submit(port):
    """A datagram socket returns one datagram per recv, shorter than the
    buffer while more wait: its recvs are always tried at once."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        port.register(b)
        for d in (b"one", b"two", b"three"):
            a.send(d)
        buf = bytearray(64)
        got = []
        for _ in range(3):
            c = port.recv(b, buf)
            assert completed_before_a_later_post(port, c)
            got.append(bytes(buf[:c.nbytes]))
        assert got == [b"one", b"two", b"three"]
    finally:
        a.close()
        b.close()


def test_multishot_recv_beside_a_pending_send(port, pair):
    """A send waiting for room (the write queue) and a multishot recv (the
    read queue) on one socket: each event re-arms the interest for both, and
    the recv goes on after the send completed."""
    a, b = pair
    pool = fastiocp.BufferPool(4096, 64)
    filled = fill(a)
    send = port.send(a, b"s" * 65536, context="send")
    ms = port.recv(a, pool, context="ms", multishot=True)
    b.sendall(b"hello")
    c = port.get(timeout=10)
    assert (c.context, c.more, bytes(c.buffer)) == ("ms", True, b"hello")
    c.release()
    assert not send.done

    got = bytearray()

    def reader():
        while len(got) < filled + 1:  # the send's first byte at least
            chunk = b.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    c = port.get(timeout=10)
    assert c.context == "send" and c.error is None and c.nbytes > 0
    t.join(10)
    assert not ms.done
    # Still armed for reading now that the write queue is empty.
    for word in (b"world", b"again"):
        b.sendall(word)
        c = port.get(timeout=10)
        assert (c.context, c.more, bytes(c.buffer)) == ("ms", True, word)
        c.release()
    b.shutdown(socket.SHUT_WR)
    c = port.get(timeout=10)
    assert c is ms and not c.more and c.error is None and c.nbytes == 0
    assert pool.in_use == 0


def test_a_flooded_socket_does_not_starve_another(port):
    """Both sockets become ready in the same epoll_wait(): the flooded one's
    multishot gives at most a burst of results before the other one's recv
    completes, not all of its data."""
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    with a1, b1, a2, b2:
        for s in (a1, a2):
            port.register(s)
        pool = fastiocp.BufferPool(64, 4096)
        quiet = bytearray(16)
        port.recv(a1, pool, context="flood", multishot=True)
        port.recv(a2, quiet, context="quiet")
        b1.sendall(os.urandom(64 * 1024))  # 1024 results of 64 bytes
        b2.sendall(b"!")
        before = 0
        while True:
            c = port.get(timeout=10)
            if c.context == "quiet":
                break
            assert c.more and c.nbytes > 0
            c.release()
            before += 1
        assert c.result() == 1 and quiet[:1] == b"!"
        # One burst (two if the poller woke between the two writes), not
        # the 1024 results that were ready.
        assert before <= 2 * BURST, before
        b1.close()
        rest = 0
        while True:
            c = port.get(timeout=10)
            if not c.more:
                break
            rest += c.nbytes
            c.release()
        assert c.context == "flood" and c.error is None and c.nbytes == 0
        assert before * 64 + rest == 64 * 1024
        assert pool.in_use == 0


def test_enobufs_leaves_the_data_in_the_socket(port, pair):
    """No buffer free: a pooled recv reads nothing, at submit time and when
    woken by readiness, and says FIOCP_ENOBUFS only once data is there."""
    a, b = pair
    pool = fastiocp.BufferPool(8, 1)
    b.sendall(b"first")
    held = port.recv(a, pool)
    assert port.get(timeout=10) is held and bytes(held.buffer) == b"first"
    # Data there, pool empty: at once.
    b.sendall(b"second")
    c = port.recv(a, pool)
    assert port.get(timeout=10) is c
    assert c.error.errno == errno.ENOBUFS and c.buffer is None and c.nbytes == 0
    assert a.recv(64) == b"second"
    # No data, pool empty: it waits (a one-byte MSG_PEEK, not a read), then
    # ENOBUFS when data comes.
    c = port.recv(a, pool)
    assert port.get_many(1, timeout=0.2) == []
    b.sendall(b"third")
    assert port.get(timeout=10) is c and c.error.errno == errno.ENOBUFS
    assert c.nbytes == 0
    ms = port.recv(a, pool, multishot=True)
    assert port.get(timeout=10) is ms and ms.error.errno == errno.ENOBUFS
    assert not ms.more
    assert a.recv(64) == b"third"
    held.release()
    assert pool.in_use == 0
    b.sendall(b"fourth")
    c = port.recv(a, pool)
    assert port.get(timeout=10) is c and bytes(c.buffer) == b"fourth"
    c.release()


def test_multishot_ends_with_enobufs_and_the_rest_stays(port, pair):
    a, b = pair
    pool = fastiocp.BufferPool(100, 3)
    data = bytes(range(256)) * 4
    b.sendall(data)
    ms = port.recv(a, pool, multishot=True)
    got = collect(port, 4)
    assert [c.more for c in got] == [True, True, True, False]
    assert got[-1] is ms and ms.error.errno == errno.ENOBUFS and ms.buffer is None
    taken = drain_bytes(got[:3])
    assert taken == data[:300]
    assert pool.in_use == 0
    a.setblocking(False)
    assert a.recv(4096) == data[300:]


def test_a_recv_behind_a_multishot_waits_for_its_end(port, pair):
    """The read queue keeps its order: a multishot recv at its head takes
    everything until it ends; a recv queued behind it runs after."""
    a, b = pair
    pool = fastiocp.BufferPool(64, 8)
    ms = port.recv(a, pool, context="ms", multishot=True)
    buf = bytearray(64)
    later = port.recv(a, buf, context="later")
    b.sendall(b"one")
    c = port.get(timeout=10)
    assert c.context == "ms" and c.more and bytes(c.buffer) == b"one"
    c.release()
    port.cancel(ms)
    assert port.get(timeout=10) is ms and ms.cancelled
    b.sendall(b"two")
    assert port.get(timeout=10) is later and later.result() == 3
    assert buf[:3] == b"two"


def test_multishot_accept_takes_a_backlog_in_bursts_with_addresses(port):
    """More connections waiting than one burst: the first burst at submit
    time, the rest through the poller (the re-armed interest), each child
    with the peer's address as accept() gave it: the backend copies it into
    the child, so even a connection the peer reset before the accept (where
    getpeername() fails with ENOTCONN) reports its address."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    port.register(ls)
    n = 3 * BURST + 5
    clients = [socket.create_connection(ls.getsockname()) for _ in range(n)]
    # The last one resets (SO_LINGER 0) while still in the accept queue.
    clients[-1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset_name = clients[-1].getsockname()
    clients[-1].close()
    names = {cl.getsockname() for cl in clients[:-1]} | {reset_name}
    try:
        ms = port.accept(ls, context="acc", multishot=True)
        got = collect(port, n)
        assert all(c.more and c.context == "acc" for c in got)
        peers = set()
        for c in got:
            s, addr = c.result()
            peers.add(addr)
            s.close()
        assert peers == names
        assert not ms.done
        late = socket.create_connection(ls.getsockname())
        c = port.get(timeout=10)
        s, addr = c.result()
        assert c.more and addr == late.getsockname()
        s.close()
        late.close()
        port.cancel(ms)
        assert port.get(timeout=10) is ms and ms.cancelled and not ms.more
    finally:
        for cl in clients:
            cl.close()
        ls.close()


FLOOD_WRITER = """
import os, sys
fd = int(sys.argv[1])
data = bytes(range(251)) * 16384
view = memoryview(data)
sent = 0
while sent < len(data):
    sent += os.write(fd, view[sent:sent + 65536])
"""


def test_cancel_racing_a_flood_keeps_order_and_loses_nothing(port, pair):
    """A child process floods the socket while the multishot recv runs in
    the poller (this thread, inside get_many()); cancel() comes from another
    thread at a random moment, often while the poller holds the descriptor
    in the middle of a burst: every child comes before the op's own
    completion, their data is a prefix of the stream in order, and what
    they did not take is still in the socket. (When the op's completion
    went to the hub straight from cancel(), it overtook the burst's
    children, which wait in e->done for the poller's harvest.)"""
    a, b = pair
    pattern = bytes(range(251)) * 16384  # 4 MiB, the writer's stream
    for _ in range(20):
        pool = fastiocp.BufferPool(256, 1024)
        writer = subprocess.Popen([sys.executable, "-c", FLOOD_WRITER, str(b.fileno())],
                                  pass_fds=[b.fileno()])
        time.sleep(0.05)  # the writer started and the socket is full
        ms = port.recv(a, pool, multishot=True)
        canceller = threading.Timer(random.uniform(0, 0.005), ms.cancel)
        canceller.start()
        received = bytearray()
        ended = False
        while not ended:
            for c in port.get_many(64, timeout=10):
                assert not ended, "a result after the op's own completion"
                if c.more:
                    received += bytes(c.buffer)
                    c.release()
                else:
                    assert c is ms
                    ended = True
        canceller.join(10)
        writer.kill()
        writer.wait(10)
        assert ms.cancelled and ms.nbytes == 0 and ms.buffer is None
        assert bytes(received) == pattern[:len(received)]
        a.setblocking(False)
        rest = bytearray()
        while True:
            try:
                chunk = a.recv(1 << 20)
            except BlockingIOError:
                break
            rest += chunk
        a.setblocking(True)
        stream = bytes(received + rest)
        assert stream == pattern[:len(stream)]
        assert pool.in_use == 0


def test_cancel_during_the_pollers_batch_comes_after_the_children(port):
    """The poller runs a multishot's burst (its children wait in e->done),
    then, in the same batch, a long queue on another descriptor before it
    harvests; a cancel() from another thread lands in between. The op's own
    completion must still come after those children. (Completed straight
    into the hub, it overtook them in a third to two thirds of the rounds.)

    How the window is made: y, a dup() of the multishot's socket a, holds
    2000 one-byte receives. epoll keys its registrations on (file, fd), so
    one write wakes both, a first (armed last, so first on the socket's wait
    queue). The helper thread writes once this thread is blocked in
    get_many() with the GIL released (get_many() first polls once without
    blocking, under the GIL, and a batch run there leaves no room for
    another thread), watches FIONREAD drop (the burst has begun), and
    cancels: it waits for a's lock until the burst ends, then runs while the
    poller works through y's queue."""
    a, b = socket.socketpair()
    y = os.dup(a.fileno())
    try:
        port.register(a)
        port.register(y)
        ny = 2000
        ybufs = [bytearray(1) for _ in range(ny)]
        total = 4096 * BURST + ny
        for _ in range(30):
            pool = fastiocp.BufferPool(4096, 64)
            for buf in ybufs:
                port.recv(y, buf, context="y")
            ms = port.recv(a, pool, context="ms", multishot=True)

            def helper():
                time.sleep(0.002)  # the main thread is blocked in get_many()
                b.sendall(b"m" * total)
                n = bytearray(4)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    fcntl.ioctl(a.fileno(), termios.FIONREAD, n)
                    if struct.unpack("i", n)[0] < total:
                        break
                ms.cancel()

            t = threading.Thread(target=helper)
            t.start()
            order = []
            topped_up = False
            while sum(c.context == "y" for c in order) < ny or ms not in order:
                if ms in order and not topped_up:
                    # A late cancel lets the multishot take y's bytes.
                    b.sendall(b"t" * ny)
                    topped_up = True
                got = port.get_many(4096, timeout=10)
                assert got, "completions missing"
                order += got
            t.join(10)
            mine = [c for c in order if c.context == "ms"]
            assert mine[-1] is ms and ms.cancelled and not ms.more
            assert all(c.more for c in mine[:-1])
            assert sum(c.nbytes for c in mine) + ny <= total + ny * topped_up
            for c in mine:
                c.release()
            assert pool.in_use == 0
            a.setblocking(False)
            try:
                while a.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
            a.setblocking(True)
    finally:
        os.close(y)
        a.close()
        b.close()


def test_close_with_children_queued_returns_every_buffer():
    """close() with a multishot armed and many of its results not yet
    dequeued: each is handed back once (drained), no buffer stays held, no
    descriptor leaks."""
    a, b = socket.socketpair()
    before = nfds()
    pool = fastiocp.BufferPool(64, 1024)
    for _ in range(3):
        p = fastiocp.CompletionPort(backend=BACKEND)
        p.register(a)
        ms = p.recv(a, pool, multishot=True)
        b.sendall(os.urandom(64 * 100))
        # Some results dequeued and held, the others left in the queue.
        held = p.get_many(10, timeout=10)
        assert all(c.more for c in held) and len(held) > 0
        p.close()
        assert ms.done and ms.cancelled
        for c in held:
            c.release()
        assert pool.in_use == 0
        a.setblocking(False)
        try:
            while a.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
        a.setblocking(True)
    assert nfds() == before
    a.close()
    b.close()
