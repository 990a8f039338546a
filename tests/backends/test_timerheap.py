"""The timer heap the Linux backends share (csrc/unix/timerheap.c: timers in
user space, one kernel timer armed to the earliest deadline), on each of
them: many timers with random delays fire once each, never early, in
deadline order; cancelling entries scattered through the heap keeps it a
heap. The backends' own sides of it (io_uring's kernel TIMEOUT, epoll's
timerfd) are tested in test_io_uring_ops.py and test_epoll_ops.py."""
from __future__ import annotations

import errno
import random
import sys
import time

import pytest

from conftest import collect

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux backends' heap")


def _timer_bounds(port, delays):
    """Arms a timer per delay (context: its index); returns the ops and,
    per timer, the (earliest, latest) absolute deadline the submit-time
    clock reads allow."""
    ops, bounds = [], []
    for i, d in enumerate(delays):
        before = time.monotonic()
        ops.append(port.timer(d, context=i))
        bounds.append((before + d, time.monotonic() + d))
    return ops, bounds


def _assert_deadline_order(order, bounds):
    """A timer that fired later never had a deadline proven earlier than
    one that fired before it (an inversion beyond the submit-time bounds is
    a heap bug)."""
    latest_lo = float("-inf")
    for i in order:
        lo, hi = bounds[i]
        assert hi >= latest_lo, f"timer {i} fired after a later deadline"
        latest_lo = max(latest_lo, lo)


def test_ten_thousand_random_timers_fire_once_in_order_never_early(port):
    rng = random.Random(14)
    n = 10_000
    _, bounds = _timer_bounds(port, [rng.uniform(0.0, 0.4) for _ in range(n)])
    seen = []
    deadline = time.monotonic() + 30
    while len(seen) < n:
        assert time.monotonic() < deadline, f"{len(seen)} of {n} fired"
        cs = port.get_many(4096, timeout=5)
        now = time.monotonic()
        for c in cs:
            assert c.op == "timer" and c.error is None and c.result() is None
            assert now >= bounds[c.context][0], "fired early"
            seen.append(c.context)
    assert sorted(seen) == list(range(n))  # each exactly once
    _assert_deadline_order(seen, bounds)
    assert port.get(timeout=0.05) is None
    assert port.pending == 0


def test_cancel_in_the_middle_of_the_heap(port):
    rng = random.Random(3)
    ops, bounds = _timer_bounds(port, [rng.uniform(0.05, 0.3) for _ in range(3000)])
    cancelled = set(range(1, len(ops), 3))  # scattered, not just the root
    for i in cancelled:
        assert ops[i].cancel() is True
    cs = collect(port, len(ops))
    assert sorted(c.context for c in cs) == list(range(len(ops)))
    for c in cs:
        if c.context in cancelled:
            assert c.cancelled and isinstance(c.error, OSError)
            assert c.error.errno == errno.ECANCELED
        else:
            assert c.error is None, c.error
    # Those left fire in deadline order: removals kept the heap a heap.
    _assert_deadline_order([c.context for c in cs if c.context not in cancelled], bounds)
    for i in list(cancelled)[:10]:
        assert ops[i].cancel() is False  # done: a no-op
