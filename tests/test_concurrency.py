"""CompletionPort(concurrency=N): at most N threads hold dequeued packets.

On Linux this is an emulation (IOCP counts the threads that are running; we
cannot see a thread block, so a slot is held until the thread calls get
again or exits). The Windows kernel's own behaviour is tested in
tests/backends/test_iocp.py.
"""
from __future__ import annotations

import threading
import time

import pytest

import fastiocp


@pytest.fixture
def emulating(backend):
    if backend == "iocp":
        pytest.skip("IOCP enforces concurrency in the kernel, by running (not holding) threads")
    return backend


def _holders(port, nthreads, hold_seconds):
    """Threads that each get one packet, hold it, then exit."""
    got = []
    lock = threading.Lock()

    def worker(i):
        c = port.get(timeout=10)
        with lock:
            got.append((time.monotonic(), i, c.context))
        time.sleep(hold_seconds)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    return threads, got


def test_limit_holds_back_extra_threads(emulating):
    with fastiocp.CompletionPort(concurrency=2, backend=emulating) as port:
        threads, got = _holders(port, 4, hold_seconds=0.5)
        time.sleep(0.2)
        t0 = time.monotonic()
        for i in range(4):
            port.post(context=i)
        time.sleep(0.25)
        assert len(got) == 2, "more than 2 threads hold packets at once"
        for t in threads:
            t.join(10)
        assert len(got) == 4
        late = sorted(ts for ts, _, _ in got)[2:]
        # The last two were handed out only when a holder exited (~0.5 s).
        assert all(ts - t0 >= 0.4 for ts in late)
        assert sorted(ctx for _, _, ctx in got) == [0, 1, 2, 3]


def test_calling_get_again_releases_the_slot(emulating):
    with fastiocp.CompletionPort(concurrency=1, backend=emulating) as port:
        port.post(context="A")
        first = port.get(timeout=5)  # this thread now holds the only slot
        other = []
        t = threading.Thread(target=lambda: other.append(port.get(timeout=2)))
        t.start()
        port.post(context="B")
        time.sleep(0.2)
        assert not other, "a second thread got a packet while the slot was held"
        # Calling get again gives the slot back: B goes to one of the two.
        mine = port.get(timeout=0.5)
        t.join(10)
        receivers = [c for c in (mine, other[0]) if c is not None]
        assert first.context == "A"
        assert [c.context for c in receivers] == ["B"]


def test_zero_means_no_limit(emulating):
    with fastiocp.CompletionPort(concurrency=0, backend=emulating) as port:
        threads, got = _holders(port, 4, hold_seconds=0.5)
        time.sleep(0.2)
        for i in range(4):
            port.post(context=i)
        time.sleep(0.25)
        assert len(got) == 4
        for t in threads:
            t.join(10)


def test_released_slot_reaches_a_thread_blocked_in_the_os(emulating, sockpair):
    """The waiter left is the one polling the kernel (an operation is in
    flight): a slot given back by an exiting holder must still reach it."""
    a, b = sockpair
    with fastiocp.CompletionPort(concurrency=1, backend=emulating) as port:
        port.register(a)
        port.recv(a, 10)  # stays in flight: the next waiter blocks in the OS
        port.post(context="first")
        port.post(context="second")
        result = {}

        def holder():
            port.get(timeout=5)
            time.sleep(0.5)  # holds the only slot, then exits

        def taker():
            t0 = time.monotonic()
            c = port.get(timeout=5)
            result["c"] = (c and c.context, time.monotonic() - t0)

        h = threading.Thread(target=holder)
        h.start()
        time.sleep(0.1)
        t = threading.Thread(target=taker)
        t.start()
        h.join(10)
        t.join(10)
        context, waited = result["c"]
        assert context == "second"
        assert waited < 2.0, f"the released slot took {waited:.1f}s to reach the poller"
