"""The port itself: posts, dequeue forms, timeouts, iteration, lifetime."""
from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import pytest

import fastiocp
from conftest import collect


def test_backend_name(port, backend):
    assert port.backend == backend
    assert backend in fastiocp.available_backends()


def test_post_and_get(port):
    key, ctx = object(), {"any": "object"}
    assert port.post(key=key, context=ctx, nbytes=7) is None
    c = port.get(timeout=5)
    assert isinstance(c, fastiocp.Completion)
    assert c.key is key and c.context is ctx
    assert c.op == "post" and c.nbytes == 7 and c.error is None
    assert c.done and not c.cancelled and c.buffer is None
    assert c.result() == 7


def test_completion_attributes_are_exact_and_read_only(port):
    # nbytes objects are shared between completions with the same count (an
    # allocation saved per completion): each must still carry its own count.
    counts = [5000, 5000, 0, 70000, 5000, 2**32 - 1, 1]
    for n in counts:
        port.post(context=n, nbytes=n)
    got = collect(port, len(counts))
    assert [c.nbytes for c in got] == counts == [c.context for c in got]
    assert [c.result() for c in got] == counts
    c = got[0]
    for name in ("key", "context", "op", "nbytes", "error", "buffer", "done"):
        with pytest.raises(AttributeError):
            setattr(c, name, 1)


def test_post_defaults(port):
    port.post()
    c = port.get(5)
    assert (c.key, c.context, c.nbytes) == (None, None, 0)


def test_post_order_is_fifo(port):
    for i in range(100):
        port.post(context=i)
    assert [c.context for c in collect(port, 100)] == list(range(100))


def test_get_timeout_returns_none(port):
    t0 = time.monotonic()
    assert port.get(timeout=0.05) is None
    assert time.monotonic() - t0 >= 0.04
    assert port.get(timeout=0) is None
    assert port.get_many(timeout=0) == []


def test_get_many_batches(port):
    for i in range(10):
        port.post(context=i)
    first = port.get_many(max=4, timeout=1)
    assert [c.context for c in first] == [0, 1, 2, 3]
    rest = port.get_many(max=100, timeout=1)
    assert [c.context for c in rest] == list(range(4, 10))


@pytest.mark.parametrize("bad", [-1, float("nan"), "1"])
def test_bad_timeouts(port, bad):
    with pytest.raises((ValueError, TypeError)):
        port.get(timeout=bad)


def test_get_many_bad_max(port):
    with pytest.raises(ValueError):
        port.get_many(max=0)


def test_post_bad_nbytes(port):
    with pytest.raises(ValueError):
        port.post(nbytes=-1)
    assert port.pending == 0


def test_get_wakes_for_post_from_other_thread(port):
    threading.Timer(0.05, port.post, kwargs={"context": "late"}).start()
    c = port.get(timeout=5)
    assert c.context == "late"


def test_iteration_ends_when_closed(port):
    for i in range(3):
        port.post(context=i)
    got = []
    threading.Timer(0.2, port.close).start()
    for c in port:
        got.append(c.context)
    assert got == [0, 1, 2]


def test_context_manager_closes():
    with fastiocp.CompletionPort() as port:
        assert not port.closed
    assert port.closed
    with pytest.raises(fastiocp.PortClosedError):
        port.post()
    with pytest.raises(ValueError, match="closed CompletionPort"):
        port.get(0)


def test_close_is_idempotent(port):
    port.close()
    port.close()
    assert port.closed


def test_pending_counts(port):
    port.post()
    port.post()
    assert port.pending == 2
    collect(port, 2)
    assert port.pending == 0


def test_unknown_backend():
    built = ", ".join(name for name, _works, _why in fastiocp.backend_status())
    with pytest.raises(ValueError, match=f"'kqueue' names no backend; this build has: {built}"):
        fastiocp.CompletionPort(backend="kqueue")


def test_backend_of_another_platform_by_keyword():
    """CompletionPort(backend=...) names the backend it was given (it said
    'unknown backend None' for a keyword argument) and what this build has."""
    other = "epoll" if sys.platform == "win32" else "iocp"
    with pytest.raises(fastiocp.BackendUnavailableError,
                       match=f"backend='{other}': that backend is not built for this platform"):
        fastiocp.CompletionPort(backend=other)


def test_bad_constructor_args():
    with pytest.raises(ValueError):
        fastiocp.CompletionPort(concurrency=-1)
    with pytest.raises(TypeError):
        fastiocp.CompletionPort(backend=3)


def test_concurrency_recorded(backend):
    with fastiocp.CompletionPort(concurrency=3, backend=backend) as port:
        assert port.concurrency == 3


def test_batch_defers_and_flushes(port, sockpair):
    a, b = sockpair
    port.register(a)
    port.register(b)
    with port.batch():
        port.send(a, b"x")
        port.recv(b, 1)
    cs = collect(port, 2)
    assert sorted(c.op for c in cs) == ["recv", "send"]


def test_port_is_weakrefable_and_collected():
    port = fastiocp.CompletionPort()
    ref = weakref.ref(port)
    port.post(context="never dequeued")
    del port
    gc.collect()
    assert ref() is None


def test_result_before_completion_raises(port, sockpair):
    a, b = sockpair
    port.register(b)
    op = port.recv(b, 10)
    assert not op.done
    with pytest.raises(fastiocp.InvalidStateError):
        op.result()
    assert "pending" in repr(op)
    op.cancel()
    assert collect(port, 1)[0] is op


def test_exceptions_hierarchy():
    assert issubclass(fastiocp.PortClosedError, ValueError)
    assert issubclass(fastiocp.BackendUnavailableError, OSError)
    assert issubclass(fastiocp.InvalidStateError, RuntimeError)
    for exc in (fastiocp.PortClosedError, fastiocp.BackendUnavailableError,
                fastiocp.InvalidStateError):
        assert issubclass(exc, fastiocp.FastIOCPError)
