"""WorkerPool: the seed's worker-thread pattern."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

import fastiocp


def test_pool_handles_every_packet(port):
    seen, lock = [], threading.Lock()

    def handler(c):
        with lock:
            seen.append((c.context, threading.current_thread().name))

    with fastiocp.WorkerPool(port, handler, threads=4) as pool:
        for i in range(1000):
            port.post(context=i)
        deadline = time.monotonic() + 20
        while len(seen) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sorted(ctx for ctx, _ in seen) == list(range(1000))
    assert not pool.errors
    assert port.pending == 0  # exactly one EXIT per thread, all consumed


def test_default_thread_count(port):
    pool = fastiocp.WorkerPool(port, lambda c: None)
    assert pool.nthreads == 2 * (os.cpu_count() or 1)


def test_handler_error_reported_not_swallowed(port, capsys):
    done = threading.Event()

    def handler(c):
        if c.context == "bad":
            raise RuntimeError("handler blew up")
        if c.context == "after":
            done.set()

    pool = fastiocp.WorkerPool(port, handler, threads=1).start()
    port.post(context="bad")
    port.post(context="after")
    assert done.wait(10), "the pool died after a handler error"
    with pytest.raises(RuntimeError, match="handler blew up"):
        pool.stop()
    assert "handler blew up" in capsys.readouterr().err
    assert len(pool.errors) == 1


def test_on_error_hook(port):
    got = []
    pool = fastiocp.WorkerPool(port, lambda c: 1 / 0, threads=2,
                               on_error=lambda exc, c: got.append((type(exc), c.context)))
    pool.start()
    port.post(context="x")
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ZeroDivisionError):
        pool.stop()
    assert got == [(ZeroDivisionError, "x")]


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batch_submissions"])
def test_pool_stops_when_port_closes(backend, batched):
    port = fastiocp.CompletionPort(backend=backend)
    pool = fastiocp.WorkerPool(port, lambda c: None, threads=3, batch_submissions=batched).start()
    time.sleep(0.05)
    port.close()
    pool.stop(timeout=10)


def test_bad_pool_args(port):
    with pytest.raises(ValueError):
        fastiocp.WorkerPool(port, lambda c: None, threads=0)
    with pytest.raises(ValueError):
        fastiocp.WorkerPool(port, lambda c: None, max_batch=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_submissions_echo(port, threads):
    """batch_submissions=True: what the handlers of one dequeued batch
    submit reaches the kernel when the batch is handled. An echo over 8
    socket pairs, each message checked, with small batches so that several
    threads share the work."""
    pairs = [socket.socketpair() for _ in range(8)]
    try:
        for srv, _cli in pairs:
            srv.setblocking(False)
            port.register(srv, key=srv)

        def handler(c):
            if c.error is not None:
                return
            if c.op == "recv":
                if c.nbytes:
                    port.send(c.key, bytes(c.buffer[:c.nbytes]), context=c.buffer)
            elif c.op == "send":
                port.recv(c.key, c.context)

        with fastiocp.WorkerPool(port, handler, threads=threads, max_batch=3,
                                 batch_submissions=True) as pool:
            for srv, _cli in pairs:
                port.recv(srv, bytearray(256))
            for rnd in range(50):
                for i, (_srv, cli) in enumerate(pairs):
                    cli.sendall(b"%d:%d;" % (i, rnd))
                for i, (_srv, cli) in enumerate(pairs):
                    want = b"%d:%d;" % (i, rnd)
                    cli.settimeout(10)
                    got = b""
                    while len(got) < len(want):
                        got += cli.recv(len(want) - len(got))
                    assert got == want
        assert not pool.errors
    finally:
        port.close()
        for srv, cli in pairs:
            srv.close()
            cli.close()
