"""io_uring-only behaviour: tiny rings, overflow, the task-exit rule."""
from __future__ import annotations

import socket
import threading

import pytest

import fastiocp
from conftest import collect

pytestmark = pytest.mark.skipif("io_uring" not in fastiocp.available_backends(),
                                reason="io_uring is not available here")


def test_tiny_ring_many_ops():
    """Far more operations in flight than SQ or CQ entries: the full SQ is
    flushed and the CQ overflow backlog drained, nothing is lost."""
    with fastiocp.CompletionPort(backend="io_uring", entries=2) as port:
        pairs = [socket.socketpair() for _ in range(50)]
        try:
            for a, b in pairs:
                port.register(a)
                port.register(b)
            ops = [port.recv(b, 1, context=i) for i, (a, b) in enumerate(pairs) for _ in range(4)]
            for a, b in pairs:
                a.sendall(b"abcd")
            cs = collect(port, len(ops))
            assert sorted(c.context for c in cs) == sorted(op.context for op in ops)
            assert all(c.nbytes == 1 for c in cs)
        finally:
            for a, b in pairs:
                a.close()
                b.close()


def test_cq_overflow_backlog(tmp_path):
    """More completions at once than the CQ holds (entries=4: CQ of 16):
    cached file reads complete at submission, nobody reaps until the end."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789" * 100)
    with fastiocp.CompletionPort(backend="io_uring", entries=4) as port, fastiocp.open(path) as f:
        port.register(f)
        n = 500
        for i in range(n):
            port.read(f, bytearray(10), offset=(i % 100) * 10, context=i)
        cs = collect(port, n)
        assert sorted(c.context for c in cs) == list(range(n))
        assert all(c.nbytes == 10 and bytes(c.buffer) == b"0123456789" for c in cs)


def test_many_threads_submitting_then_exiting():
    """Requests of exited threads are resubmitted, not cancelled."""
    with fastiocp.CompletionPort(backend="io_uring") as port:
        a, b = socket.socketpair()
        with a, b:
            port.register(b)
            threads = [threading.Thread(target=port.recv, args=(b, bytearray(1))) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            a.sendall(b"q" * 20)
            cs = collect(port, 20)
            assert all(c.error is None and c.nbytes == 1 for c in cs)


def test_cancel_only_hits_its_own_operation():
    """A record reused after completion carries a new generation, so a
    cancel of the old operation cannot cancel the new one."""
    with fastiocp.CompletionPort(backend="io_uring") as port:
        a, b = socket.socketpair()
        with a, b:
            port.register(b)
            for _ in range(200):
                op = port.recv(b, 1)
                a.sendall(b"1")
                (c,) = collect(port, 1)
                assert c is op and c.error is None
                assert op.cancel() is False


def test_completion_reaches_waiter_while_submitter_computes():
    """The ring defers task work (COOP_TASKRUN): a completion owed to a
    thread busy in pure Python waits for that thread's next kernel entry
    rather than an interrupt. That next entry (a tick, a GIL hand-off) must
    come soon: a waiter in get() sees the completion while the submitter is
    still computing, not when it stops. The bound is liveness, not speed."""
    import time

    with fastiocp.CompletionPort(backend="io_uring") as port:
        a, b = socket.socketpair()
        with a, b:
            port.register(b)
            submitted = threading.Event()
            stop_at = [0.0]

            def submit_then_compute() -> None:
                port.recv(b, bytearray(8), context="busy")
                submitted.set()
                stop_at[0] = time.monotonic() + 3.0
                x = 0
                while time.monotonic() < stop_at[0]:
                    x += 1

            t = threading.Thread(target=submit_then_compute)
            t.start()
            try:
                assert submitted.wait(5)
                a.send(b"data")
                sent = time.monotonic()
                c = port.get(timeout=10)
                got = time.monotonic()
                assert c.context == "busy" and bytes(c.buffer[:c.nbytes]) == b"data"
                assert got - sent < 2.0, f"the completion waited {got - sent:.2f} s"
                assert t.is_alive(), "the submitter stopped computing first"
            finally:
                stop_at[0] = 0.0
                t.join()
