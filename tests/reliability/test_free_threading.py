"""Many threads on one port at once: the contract under free-threaded
CPython (3.13t, PYTHON_GIL=0), where the threads really run in parallel
(issue 17). The same tests run on GIL builds, where they check the same
contract with the threads taking turns.

More threads than cores (the machines have 2): submissions, posts,
cancellations, batches, resubmissions and dequeues from 8 threads, every
post counted exactly once; handles unregistered and registered again under
new keys while others submit on them; close() racing with all of them;
Completion.cancel() racing with its port's deallocation.
"""
from __future__ import annotations

import queue
import random
import socket
import subprocess
import sys
import sysconfig
import threading
import time

import pytest

import fastiocp
from relutil import child_env, env_float, env_int

pytestmark = pytest.mark.reliability

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def run_threads(threads: list[threading.Thread], seconds: float, then, failures: list[BaseException]) -> None:
    """Starts threads, calls then() (what makes them return) after seconds,
    and joins them: none may still run 30 s later, and none may have caught
    anything (failures: what they caught)."""
    for t in threads:
        t.start()
    time.sleep(seconds)
    then()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures


@pytest.mark.skipif(not FREE_THREADED, reason="a free-threaded CPython (3.13t) build")
def test_import_keeps_the_gil_off():
    """The extension declares Py_MOD_GIL_NOT_USED: importing it leaves the
    GIL off, with no RuntimeWarning (PYTHON_GIL unset, warnings as errors)."""
    env = child_env()
    env.pop("PYTHON_GIL", None)
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c",
                        "import sys, fastiocp; print(sys._is_gil_enabled())"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_eight_threads_mixing_every_call_lose_and_duplicate_nothing(backend):
    """8 threads at random: post (counted), recv then maybe cancel, send to
    feed them, batch() blocks, get_many, resubmit of dequeued receives.
    Every post is dequeued exactly once; nothing crashes or hangs."""
    seconds = env_float("FASTIOCP_FT_SECONDS", 2.0, wine=1.0)
    nthreads = 8
    for concurrency in (0, 3):
        port = fastiocp.CompletionPort(concurrency=concurrency, backend=backend)
        pairs = [socket.socketpair() for _ in range(8)]
        for a, _b in pairs:
            port.register(a, key=a)
        posted = [0] * nthreads
        seen: dict = {}
        seen_lock = threading.Lock()
        failures: list[BaseException] = []
        stop = threading.Event()

        def count(c: fastiocp.Completion) -> None:
            with seen_lock:
                assert c.context not in seen, f"post {c.context} dequeued twice"
                seen[c.context] = True

        def worker(i: int) -> None:
            rnd = random.Random(i)
            n = 0
            try:
                while not stop.is_set():
                    r = rnd.random()
                    if r < 0.3:
                        port.post(key=i, context=(i, n))
                        posted[i] += 1
                        n += 1
                    elif r < 0.5:
                        a, b = pairs[rnd.randrange(len(pairs))]
                        c = port.recv(a, 64, context="recv")
                        if rnd.random() < 0.5:
                            c.cancel()
                        b.send(b"x" * rnd.randrange(1, 64))
                    elif r < 0.6:
                        with port.batch():
                            port.post(key=i, context=(i, n))
                            posted[i] += 1
                            n += 1
                    else:
                        again = []
                        for c in port.get_many(32, timeout=0.01):
                            if c.op == "post":
                                count(c)
                            elif c.op == "recv" and c.error is None and rnd.random() < 0.3:
                                again.append(c)
                        if again:
                            port.resubmit(again)
            except BaseException as exc:  # reported to the test thread
                failures.append(exc)

        run_threads([threading.Thread(target=worker, args=(i,)) for i in range(nthreads)], seconds, stop.set,
                    failures)
        while True:
            batch = port.get_many(256, timeout=0.5)
            if not batch:
                break
            for c in batch:
                if c.op == "post":
                    count(c)
        port.close()
        for a, b in pairs:
            a.close()
            b.close()
        assert len(seen) == sum(posted) > 0


def test_keys_stay_right_while_handles_churn(backend):
    """Submitters send on 16 sockets while another thread keeps
    unregistering 8 of them and registering them again under new keys (the
    port's key cache, csrc/binding/port.c, is emptied for a handle as it is
    unregistered). Every completion carries a key its own socket had; a
    send on a socket between unregister() and register() is refused; nothing
    crashes or hangs."""
    seconds = env_float("FASTIOCP_FT_SECONDS", 2.0, wine=1.0)
    port = fastiocp.CompletionPort(backend=backend)
    stable = [socket.socketpair() for _ in range(8)]
    churned = [socket.socketpair() for _ in range(8)]
    sockets = [("stable", i, a) for i, (a, _b) in enumerate(stable)] + \
              [("churned", i, a) for i, (a, _b) in enumerate(churned)]
    for i, (a, _b) in enumerate(stable):
        port.register(a, key=("stable", i))
    for i, (a, _b) in enumerate(churned):
        port.register(a, key=("churned", i, 0))
    failures: list[BaseException] = []
    stop = threading.Event()
    sent = [0]
    refused = [0]
    dequeued = [0]

    def guarded(body):
        def run(*args):
            try:
                body(*args)
            except BaseException as exc:  # reported to the test thread
                failures.append(exc)
        return run

    @guarded
    def churn() -> None:
        n = 0
        while not stop.is_set():
            i = n % len(churned)
            n += 1
            port.unregister(churned[i][0])
            port.register(churned[i][0], key=("churned", i, n))

    @guarded
    def submit(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            kind, i, a = sockets[rnd.randrange(len(sockets))]
            try:
                port.send(a, b"x", context=(kind, i))
                sent[0] += 1
            except ValueError as exc:
                assert kind == "churned" and "not registered" in str(exc), exc
                refused[0] += 1

    @guarded
    def dequeue() -> None:
        while not stop.is_set():
            for c in port.get_many(64, timeout=0.01):
                assert c.error is None, c
                assert c.key[:2] == c.context, (c.key, c.context)
                dequeued[0] += 1

    @guarded
    def drain() -> None:
        peers = [b for _a, b in stable + churned]
        for b in peers:
            b.setblocking(False)
        while not stop.is_set():
            for b in peers:
                try:
                    b.recv(65536)
                except BlockingIOError:
                    pass
            time.sleep(0.001)

    threads = [threading.Thread(target=churn), threading.Thread(target=drain)]
    threads += [threading.Thread(target=submit, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=dequeue) for _ in range(2)]
    run_threads(threads, seconds, stop.set, failures)
    port.close()
    for a, b in stable + churned:
        a.close()
        b.close()
    assert sent[0] > 0 and dequeued[0] > 0


def test_close_racing_with_getters_and_submitters(backend):
    """close() while 3 threads dequeue and 3 submit, cancel and post: each
    call either works or raises PortClosedError; nothing crashes, hangs or
    leaks a thread."""
    rounds = env_int("FASTIOCP_FT_CLOSE_ROUNDS", 40, wine=10)
    for k in range(rounds):
        port = fastiocp.CompletionPort(backend=backend, concurrency=k % 3)
        a, b = socket.socketpair()
        port.register(a)
        unexpected: list[BaseException] = []

        def getter() -> None:
            try:
                while True:
                    port.get_many(8, timeout=0.05)
            except fastiocp.PortClosedError:
                pass
            except BaseException as exc:
                unexpected.append(exc)

        def submitter() -> None:
            try:
                while True:
                    c = port.recv(a, 16)
                    c.cancel()
                    port.post()
            except fastiocp.PortClosedError:
                pass
            except BaseException as exc:
                unexpected.append(exc)

        threads = [threading.Thread(target=getter) for _ in range(3)]
        threads += [threading.Thread(target=submitter) for _ in range(3)]
        run_threads(threads, 0.02, port.close, unexpected)
        a.close()
        b.close()


def test_cancel_racing_with_the_ports_deallocation(backend):
    """One thread drops ports that each have a receive pending; another
    cancels those receives meanwhile. Completion.port is borrowed: a cancel()
    must never follow it into a port being freed. It returns True or False,
    or raises PortClosedError while the port is being closed."""
    n = env_int("FASTIOCP_FT_PORTS", 2000, wine=200)
    handed: queue.SimpleQueue = queue.SimpleQueue()
    done = threading.Event()
    results: list = []

    def canceller() -> None:
        while not done.is_set() or not handed.empty():
            try:
                c = handed.get(timeout=0.1)
            except queue.Empty:
                continue
            for _ in range(3):
                try:
                    results.append(c.cancel())
                except fastiocp.PortClosedError:
                    results.append("closed")

    t = threading.Thread(target=canceller)
    t.start()
    try:
        for _ in range(n):
            # a socket per port: on IOCP a handle stays associated with the
            # first port it was registered with
            a, b = socket.socketpair()
            port = fastiocp.CompletionPort(backend=backend)
            port.register(a)
            handed.put(port.recv(a, 16))
            del port  # deallocated here: closed, its receive cancelled
            a.close()
            b.close()
    finally:
        done.set()
        t.join(60)
    assert not t.is_alive()
    assert set(results) <= {True, False, "closed"}
