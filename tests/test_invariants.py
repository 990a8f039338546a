"""The invariants of DESIGN.md, proven on every backend.

1. Exactly once   2. Buffer safety   3. Errors   4. Close   5. No leaks
"""
from __future__ import annotations

import collections
import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

import fastiocp
from conftest import (ON_LINUX, ON_WINDOWS, UNDER_WINE, assert_no_growth, collect, contexts_got_by_waiters,
                      ctrl_c_child_script, open_fd_count)

# ---------------------------------------------------------------------------
# 1. Exactly once


def test_exactly_once_8_threads_100k_packets(port):
    """100,000 packets (posts and socket operations, submitted from several
    threads) dequeued by 8 threads: each arrives exactly once."""
    total_posts = 20_000 if UNDER_WINE else 96_000
    posters = 4
    io_pairs = 8
    io_rounds = (100 if UNDER_WINE else 500)  # per pair: one send + one recv
    expected = total_posts + 2 * io_pairs * io_rounds
    seen: list[list] = [[] for _ in range(8)]
    stop = threading.Event()

    def dequeue(slot: list) -> None:
        while not stop.is_set():
            for c in port.get_many(64, timeout=0.05):
                slot.append(c.context)

    def post(base: int) -> None:
        for i in range(total_posts // posters):
            port.post(key="p", context=("post", base + i))

    pairs = [socket.socketpair() for _ in range(io_pairs)]
    for a, b in pairs:
        port.register(a)
        port.register(b)

    def do_io(idx: int) -> None:
        a, b = pairs[idx]
        for r in range(io_rounds):
            port.recv(b, 1, context=("recv", idx, r))
            port.send(a, b"x", context=("send", idx, r))

    workers = [threading.Thread(target=dequeue, args=(s,)) for s in seen]
    producers = [threading.Thread(target=post, args=(k * total_posts,)) for k in range(posters)]
    producers += [threading.Thread(target=do_io, args=(i,)) for i in range(io_pairs)]
    for t in workers + producers:
        t.start()
    for t in producers:
        t.join()
    deadline = time.monotonic() + 120
    while sum(len(s) for s in seen) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    for t in workers:
        t.join()
    for a, b in pairs:
        a.close()
        b.close()
    counts = collections.Counter(ctx for s in seen for ctx in s)
    assert sum(counts.values()) == expected, "lost completions"
    dupes = [ctx for ctx, n in counts.items() if n != 1]
    assert not dupes, f"duplicated: {dupes[:5]}"
    assert port.get(timeout=0.1) is None
    assert port.pending == 0
    assert sum(1 for s in seen if s) >= 2, "only one thread ever dequeued"


def test_each_waiter_gets_distinct_packets(port):
    """Eight threads blocked in get(); eight posts wake each exactly once."""
    assert contexts_got_by_waiters(port, threads=8, each=1, settle=0.1) == list(range(8))


def test_submission_from_exiting_thread_completes(port, sockpair):
    """An operation submitted from a thread that then exits still completes
    normally (io_uring cancels a task's requests when it exits)."""
    a, b = sockpair
    port.register(b)
    ops = []
    t = threading.Thread(target=lambda: ops.append(port.recv(b, bytearray(8), context="t")))
    t.start()
    t.join()
    time.sleep(0.05)  # let the thread really exit
    a.sendall(b"late")
    (c,) = collect(port, 1)
    assert c is ops[0]
    assert c.error is None, c.error
    assert bytes(c.buffer[: c.nbytes]) == b"late"


def test_submissions_from_pool_threads(port, sockpair):
    """The same through concurrent.futures, which creates and retires
    threads."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = sockpair
    port.register(b)
    with ThreadPoolExecutor(4) as ex:
        ops = list(ex.map(lambda i: port.recv(b, bytearray(1), context=i), range(16)))
    a.sendall(b"y" * 16)
    cs = collect(port, 16)
    assert sorted(c.context for c in cs) == list(range(16))
    assert all(c.error is None and c.nbytes == 1 for c in cs)


# ---------------------------------------------------------------------------
# 2. Buffer safety


def test_buffer_survives_dropped_references(port, sockpair):
    a, b = sockpair
    port.register(b)
    port.recv(b, bytearray(b"\xee" * 64))  # no reference kept
    for _ in range(3):
        gc.collect()
    garbage = [bytearray(64) for _ in range(1000)]  # reuse freed memory if any
    a.sendall(b"pinned!")
    (c,) = collect(port, 1)
    assert bytes(c.buffer[:7]) == b"pinned!"
    assert bytes(c.buffer[7:]) == b"\xee" * 57
    del garbage


def test_resize_refused_while_in_flight(port, sockpair):
    a, b = sockpair
    port.register(b)
    buf = bytearray(16)
    op = port.recv(b, buf)
    with pytest.raises(BufferError):
        buf.extend(b"more")
    with pytest.raises(BufferError):
        del buf[:]
    view = memoryview(bytearray(8))
    op2 = port.recv(b, view)
    with pytest.raises(BufferError):
        view.release()
    a.sendall(b"z" * 24)
    collect(port, 2)
    buf.extend(b"ok")  # released once dequeued
    view.release()
    assert op.done and op2.done


def test_buffers_released_by_close(backend, sockpair):
    a, b = sockpair
    port = fastiocp.CompletionPort(backend=backend)
    port.register(b)
    buf = bytearray(16)
    op = port.recv(b, buf)
    port.close()
    assert op.done and op.cancelled and isinstance(op.error, OSError)
    buf.extend(b"free again")


def test_port_in_a_cycle_through_its_key_is_collected(backend, sockpair):
    """A key that refers back to its port (a connection object holding the
    port) makes a cycle the GC breaks: the port closes as it is cleared,
    its queued packets' contexts and its kernel object are released, and
    nothing is left half-open between the clearing and the dealloc."""

    class Connection:
        port: fastiocp.CompletionPort | None = None

    class Context:
        pass

    a, b = sockpair
    descriptors = open_fd_count() if (ON_LINUX or ON_WINDOWS) else None
    gc.collect()
    gc.disable()  # no collection until the cycle is complete
    try:
        port = fastiocp.CompletionPort(backend=backend)
        conn = Connection()
        conn.port = port
        port.register(b, conn)
        context = Context()
        port.post(context=context)
        port_alive, context_alive = weakref.ref(port), weakref.ref(context)
        del port, conn, context
        assert port_alive() is not None, "a cycle keeps the port until the GC runs"
    finally:
        gc.enable()
    gc.collect()
    assert port_alive() is None
    assert context_alive() is None
    if descriptors is not None:
        assert open_fd_count() == descriptors


def test_send_buffer_kept_until_completion(port, tcp_pair):
    client, server = tcp_pair
    port.register(client)
    payload = bytearray(os.urandom(4 << 20))
    expected = bytes(payload)
    op = port.send(client, payload)
    with pytest.raises(BufferError):
        payload.clear()
    del payload
    gc.collect()
    got = bytearray()
    server.settimeout(10)
    while len(got) < op.nbytes or not op.done:
        try:
            chunk = server.recv(1 << 20)
        except socket.timeout:
            break
        got += chunk
        if op.done or port.get_many(timeout=0):
            pass
        if len(got) >= len(expected):
            break
    cs = [] if op.done else collect(port, 1)
    assert op.done and op.error is None
    assert bytes(got[: op.nbytes]) == expected[: op.nbytes]


# ---------------------------------------------------------------------------
# 3. Errors


def test_bad_arguments_submit_nothing(port, sockpair, tmp_path):
    a, b = sockpair
    port.register(b)
    unregistered = socket.socket()
    closed = socket.socket()
    closed.close()
    f = fastiocp.open(tmp_path / "f.bin", "w+b")
    port.register(f)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port.register(udp)
    cases = [
        (TypeError, lambda: port.recv("not a socket", 10)),
        (TypeError, lambda: port.recv(b, b"read-only bytes")),
        (TypeError, lambda: port.read(f, b"read-only", offset=0)),
        (TypeError, lambda: port.send(b, "text is not bytes")),
        (TypeError, lambda: port.recv(b, 1.5)),
        (ValueError, lambda: port.recv(b, -1)),
        (ValueError, lambda: port.recv(unregistered, 10)),
        (ValueError, lambda: port.recv(closed, 10)),
        (ValueError, lambda: port.read(f, 10, offset=-1)),
        (TypeError, lambda: port.read(f, 10, offset="0")),
        (TypeError, lambda: port.sendto(udp, b"x", "not an address")),
        (TypeError, lambda: port.connect(udp, ("127.0.0.1",))),
        (OverflowError, lambda: port.sendto(udp, b"x", ("127.0.0.1", 70000))),
        (TypeError, lambda: port.cancel("not an op")),
        (ValueError, lambda: port.register(b)),
        (TypeError, lambda: port.register(object())),
        (TypeError, lambda: port.post(nbytes="7")),
    ]
    for i, (exc, call) in enumerate(cases):
        with pytest.raises(exc):
            call()
        assert port.pending == 0, f"case {i} submitted something"
    assert port.get(timeout=0.1) is None
    udp.close()
    unregistered.close()
    f.close()


def test_error_messages_are_clear(port, sockpair):
    a, b = sockpair
    with pytest.raises(ValueError, match="not registered with this port"):
        port.recv(b, 10)
    port.register(b)
    with pytest.raises(TypeError, match="writable"):
        port.recv(b, b"bytes")
    port.close()
    with pytest.raises(fastiocp.PortClosedError, match="closed CompletionPort"):
        port.recv(b, 10)


def test_unregister(port, sockpair):
    a, b = sockpair
    port.register(b, key=1)
    port.unregister(b)
    with pytest.raises(ValueError):
        port.recv(b, 1)
    with pytest.raises(KeyError):
        port.unregister(b)
    port.register(b, key=2)
    op = port.recv(b, 1)
    a.sendall(b"k")
    assert collect(port, 1)[0].key == 2


def test_keys_follow_registration(port):
    """Every completion carries the key its handle has when it is submitted,
    over more handles than the port keeps keys of at hand (they share
    places) and across unregister() and register() again; a completion
    whose handle was unregistered since is not resubmitted."""
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        for round_, sign in enumerate((1, -1)):
            for i, (a, _b) in enumerate(pairs):
                port.register(a, key=sign * (i + 1))
            sent = {}
            for i, (a, _b) in enumerate(pairs):
                sent[id(port.send(a, b"x"))] = sign * (i + 1)
            done = collect(port, len(pairs))
            assert sorted(c.key for c in done) == sorted(sent.values())
            assert all(c.key == sent[id(c)] for c in done)
            # resubmit() looks the key up again: the same ones.
            port.resubmit(done)
            again = collect(port, len(pairs))
            assert all(c.key == sent[id(c)] for c in again)
            for a, _b in pairs:
                port.unregister(a)
            with pytest.raises(ValueError, match="not registered"):
                port.send(pairs[0][0], b"x")
            with pytest.raises(ValueError, match="not registered"):
                port.resubmit(again[:1])
            if round_ == 0:
                for _a, b in pairs:
                    assert b.recv(10) == b"xx"
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# What a closed socket's -1 is called: a negative descriptor on POSIX, an
# invalid SOCKET on Windows.
CLOSED_HANDLE = "invalid handle -1" if ON_WINDOWS else "negative integer"


def test_socket_handles_are_what_fileno_says(port):
    """A socket's descriptor is read from the socket object without calling
    its fileno() (csrc/binding/filehandle.c), but only where fileno() would
    say the same: a subclass's own fileno() is still called, and a closed
    or detached socket is refused as before."""
    calls = []

    class Counted(socket.socket):
        def fileno(self):
            calls.append(1)
            return super().fileno()

    x, y = socket.socketpair()
    a = Counted(x.family, x.type, fileno=x.detach())
    with a, y:
        port.register(a, key="a")
        port.register(y, key="y")
        before = len(calls)
        port.send(a, b"hi")
        assert len(calls) == before + 1
        (c,) = collect(port, 1)
        assert c.key == "a" and c.nbytes == 2 and y.recv(10) == b"hi"
        port.send(y, b"back")  # a plain socket.socket
        (c,) = collect(port, 1)
        assert c.key == "y" and a.recv(10) == b"back"
        port.unregister(y)
        detached = socket.socket(fileno=y.detach())
        with pytest.raises(ValueError, match=CLOSED_HANDLE):
            port.register(y)
        detached.close()
    with pytest.raises(ValueError, match=CLOSED_HANDLE):
        port.send(a, b"x")


# ---------------------------------------------------------------------------
# Cancel


def test_cancel_pending_recv(port, sockpair):
    a, b = sockpair
    port.register(b, key="b")
    op = port.recv(b, 10, context="c")
    assert op.cancel() is True
    (c,) = collect(port, 1)
    assert c is op and c.cancelled and c.key == "b" and c.context == "c"
    assert op.cancel() is False  # already completed
    assert port.cancel(op) is False


def test_cancel_races_with_completion(port, sockpair):
    """Cancel while data arrives: every op completes exactly once, either
    with data or cancelled, and no data is lost between them."""
    a, b = sockpair
    port.register(b)
    n = 50 if UNDER_WINE else 300
    ops = [port.recv(b, 1, context=i) for i in range(n)]
    a.sendall(b"d" * (n // 2))
    for op in ops:
        op.cancel()
    cs = collect(port, n)
    assert sorted(c.context for c in cs) == list(range(n))
    got = sum(c.nbytes for c in cs if c.error is None)
    assert all(c.cancelled for c in cs if c.error is not None)
    assert got <= n // 2
    # What was not received by a completed op is still in the socket.
    b.setblocking(False)
    left = 0
    try:
        while True:
            left += len(b.recv(4096))
    except BlockingIOError:
        pass
    assert got + left == n // 2


# ---------------------------------------------------------------------------
# 4. Close


def test_close_wakes_blocked_threads_and_cancels(backend, sockpair):
    a, b = sockpair
    port = fastiocp.CompletionPort(backend=backend)
    port.register(b)
    ops = [port.recv(b, bytearray(4)) for _ in range(10)]
    outcomes = []

    def blocked_get() -> None:
        try:
            port.get()
            outcomes.append("got")
        except fastiocp.PortClosedError:
            outcomes.append("closed")

    def blocked_iter() -> None:
        for _ in port:
            outcomes.append("iter-got")
        outcomes.append("iter-end")

    threads = [threading.Thread(target=blocked_get) for _ in range(3)]
    threads.append(threading.Thread(target=blocked_iter))
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    port.close()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - t0 < 10
    assert sorted(outcomes) == ["closed"] * 3 + ["iter-end"]
    assert all(op.done and op.cancelled for op in ops)
    assert port.pending == 0


def test_close_from_other_thread_while_submitting(backend, sockpair):
    a, b = sockpair
    port = fastiocp.CompletionPort(backend=backend)
    port.register(a)
    port.register(b)
    errors = []

    def submitter() -> None:
        try:
            while True:
                port.recv(b, 1)
                port.post()
        except fastiocp.PortClosedError:
            pass
        except Exception as exc:  # anything else is a bug
            errors.append(exc)

    ts = [threading.Thread(target=submitter) for _ in range(3)]
    getters = [threading.Thread(target=lambda: [None for _ in port]) for _ in range(2)]
    for t in ts + getters:
        t.start()
    time.sleep(0.3)
    port.close()
    for t in ts + getters:
        t.join(10)
    assert not any(t.is_alive() for t in ts + getters)
    assert not errors
    assert port.pending == 0


def _run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(fastiocp.__file__)), env.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_interpreter_shutdown_with_io_in_flight(backend):
    """Exit without close(): operations pending, daemon threads blocked in
    get(). Must neither crash nor hang."""
    r = _run_child(f"""
        import socket, threading, fastiocp
        port = fastiocp.CompletionPort(backend={backend!r})
        a, b = socket.socketpair()
        port.register(b)
        for _ in range(100):
            port.recv(b, bytearray(64))
        for _ in range(4):
            threading.Thread(target=port.get, daemon=True).start()
        port.post()
        print("exiting")
    """)
    assert r.returncode == 0, r.stderr
    assert "exiting" in r.stdout


@pytest.mark.skipif(ON_WINDOWS, reason="POSIX signals: Windows Ctrl-C is tested in tests/backends/test_iocp.py")
@pytest.mark.parametrize("role", ["poller", "sleeper"])
def test_ctrl_c_interrupts_get(backend, role):
    """SIGINT reaches a main thread blocked in get() promptly, whether it is
    the thread polling the OS or one sleeping behind another poller."""
    code = ctrl_c_child_script(backend, other_waiter=role == "sleeper")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, (out, err)
    elapsed = float(out.split()[-1])
    assert elapsed < 5, out


# ---------------------------------------------------------------------------
# 5. No leaks


@pytest.mark.skipif(not (ON_LINUX or ON_WINDOWS), reason="reads RSS and fd counts from /proc (Linux) or handle counts and the working set from Win32 (Windows) only")
def test_no_growth_over_50k_cycles(port, sockpair):
    a, b = sockpair
    port.register(a)
    port.register(b)
    buf = bytearray(64)

    def cycles(n: int) -> None:
        for i in range(n):
            port.recv(b, buf, context=i)
            port.send(a, b"0123456789", context=i)
            got = 0
            while got < 2:
                got += len(port.get_many(2, timeout=5))
            if i % 10 == 0:
                port.post(context=i)
                port.get(5)

    assert_no_growth(cycles, 5_000, 50_000)
    assert port.pending == 0


@pytest.mark.skipif(not (ON_LINUX or ON_WINDOWS), reason="reads fd counts from /proc (Linux) or handle counts from Win32 (Windows) only")
def test_ports_do_not_leak_fds(backend):
    before = open_fd_count()
    for _ in range(200):
        with fastiocp.CompletionPort(backend=backend) as p:
            p.post()
    assert open_fd_count() == before
