"""The loop's scheduling in C (_LoopCore, csrc/loop/core.c): call_soon,
call_at, call_later, time and _run_once behave as BaseEventLoop's, on
genuine events.Handle / TimerHandle objects. Several scenarios follow
CPython's test_asyncio (test_base_events.BaseEventLoopTests and
test_events.HandleTests), named where they do."""
from __future__ import annotations

import asyncio
import contextvars
import decimal
import fractions
import heapq
import time
from asyncio import events
from typing import Any, List

import pytest

import fastiocp
from fastiocp._fastiocp import _LoopCore


@pytest.fixture
def loop():
    lp = fastiocp.new_event_loop()
    yield lp
    lp.close()


def run_briefly(loop: Any, rounds: int = 3) -> None:
    for _ in range(rounds):
        loop.call_soon(loop.stop)
        loop.run_forever()


def test_the_loop_has_the_c_core(loop):
    assert isinstance(loop, _LoopCore)
    assert type(loop).call_soon is _LoopCore.call_soon
    assert type(loop)._run_once is _LoopCore._run_once


def test_call_soon_makes_a_genuine_handle(loop):
    h = loop.call_soon(print, 1, 2)
    assert type(h) is events.Handle
    assert h._callback is print and h._args == (1, 2) and h._loop is loop
    assert not h.cancelled() and h._source_traceback is None
    assert isinstance(h._context, contextvars.Context)
    assert "print" in repr(h)
    assert list(loop._ready)[-1] is h
    h.cancel()
    assert h.cancelled() and "cancelled" in repr(h)


def test_call_soon_runs_in_order_with_args(loop):
    # test_base_events: test_call_soon / test__run_once ordering (FIFO).
    calls: List[Any] = []
    for i in range(5):
        loop.call_soon(calls.append, i)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == [0, 1, 2, 3, 4]


def test_callbacks_scheduled_by_callbacks_run_next_iteration(loop):
    # BaseEventLoop._run_once runs only what was ready when it started.
    calls: List[str] = []

    def first() -> None:
        calls.append("first")
        loop.call_soon(calls.append, "second")

    loop.call_soon(first)
    loop._run_once()
    assert calls == ["first"]
    loop._run_once()
    assert calls == ["first", "second"]


def test_cancelled_handle_does_not_run(loop):
    calls: List[int] = []
    h = loop.call_soon(calls.append, 1)
    loop.call_soon(calls.append, 2)
    h.cancel()
    run_briefly(loop)
    assert calls == [2]


def test_callback_runs_in_its_context(loop):
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outer")
    seen: List[str] = []
    ctx = contextvars.copy_context()
    ctx.run(var.set, "inner")
    loop.call_soon(lambda: seen.append(var.get()), context=ctx)
    var.set("now")
    loop.call_soon(lambda: seen.append(var.get()))  # a copy of the current context
    var.set("later")
    run_briefly(loop)
    assert seen == ["inner", "now"]


def test_a_context_already_entered_is_reported(loop, caplog):
    # Context.run raises RuntimeError for a context already entered; the
    # stdlib reports it as the callback's exception (the default handler
    # logs it; a custom one would be run in that very context on 3.13).
    ctx = contextvars.copy_context()
    ctx.run(lambda: loop.call_soon(lambda: None, context=ctx) and loop._run_once())
    records = [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert records and isinstance(records[0].exc_info[1], RuntimeError)


def test_callback_error_is_reported_and_the_loop_goes_on(loop):
    # test_base_events: test_default_exc_handler_callback (message, handle).
    errors: List[dict] = []
    calls: List[int] = []
    loop.set_exception_handler(lambda lp, c: errors.append(c))

    def boom() -> None:
        raise ZeroDivisionError("boom")

    h = loop.call_soon(boom)
    loop.call_soon(calls.append, 1)
    run_briefly(loop)
    assert calls == [1]
    assert len(errors) == 1
    assert errors[0]["message"].startswith("Exception in callback ")
    assert "boom" in errors[0]["message"]
    assert isinstance(errors[0]["exception"], ZeroDivisionError)
    assert errors[0]["handle"] is h


def test_keyboard_interrupt_propagates_and_leaves_the_rest_ready(loop):
    calls: List[int] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    loop.call_soon(interrupt)
    loop.call_soon(calls.append, 1)
    with pytest.raises(KeyboardInterrupt):
        loop._run_once()
    assert calls == []
    assert len(loop._ready) == 1
    loop._run_once()
    assert calls == [1]


def test_call_soon_on_a_closed_loop_raises():
    lp = fastiocp.new_event_loop()
    lp.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        lp.call_soon(print)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        lp.call_later(1, print)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        lp.call_at(1, print)


def test_argument_errors(loop):
    with pytest.raises(TypeError):
        loop.call_soon()
    with pytest.raises(TypeError, match="unexpected keyword"):
        loop.call_soon(print, ctx=None)
    with pytest.raises(TypeError, match="delay must not be None"):
        loop.call_later(None, print)
    with pytest.raises(TypeError, match="when cannot be None"):
        loop.call_at(None, print)
    with pytest.raises(TypeError):
        loop.call_later("1", print)


def test_time_is_monotonic(loop):
    a = time.monotonic()
    t = loop.time()
    b = time.monotonic()
    assert a <= t <= b


def test_call_later_runs_timers_in_time_order(loop):
    # test_base_events: test_call_later; the heap orders by _when.
    order: List[float] = []
    for delay in (0.03, 0.01, 0.02, 0.0, 0.01):
        loop.call_later(delay, order.append, delay)
    loop.call_later(0.05, loop.stop)
    t0 = loop.time()
    loop.run_forever()
    assert order == [0.0, 0.01, 0.01, 0.02, 0.03]
    assert loop.time() - t0 >= 0.05 - loop._clock_resolution


def test_timer_handle_is_genuine_and_scheduled(loop):
    h = loop.call_at(loop.time() + 10, print)
    assert type(h) is events.TimerHandle
    assert h._scheduled is True
    assert h in loop._scheduled
    assert h.when() == pytest.approx(loop.time() + 10, abs=1)
    h.cancel()
    assert loop._timer_cancelled_count == 1
    loop._run_once()  # the cancelled head is dropped
    assert loop._scheduled == [] and h._scheduled is False
    assert loop._timer_cancelled_count == 0


def test_heap_matches_heapq(loop):
    # The C heap is heapq's algorithm: the same list, element for element.
    whens = [(i * 7919) % 101 / 10.0 for i in range(300)] + [5.0] * 20
    handles = [loop.call_at(1e6 + w, print) for w in whens]
    expected: List[Any] = []
    for h in handles:
        heapq.heappush(expected, h)
    assert loop._scheduled == expected
    for h in handles:
        h.cancel()


def test_call_at_takes_ints_and_other_numbers(loop):
    # An int when stays as given; a Decimal or Fraction goes through the
    # stdlib's call_at (its heap compares them with TimerHandle.__lt__).
    fired: List[str] = []
    now = int(loop.time())
    h1 = loop.call_at(now, fired.append, "int")
    assert h1.when() == now and type(h1.when()) is int
    h2 = loop.call_at(fractions.Fraction(now), fired.append, "fraction")
    assert type(h2) is events.TimerHandle and h2._scheduled
    with pytest.raises(TypeError):  # float + Decimal, as with the stdlib loop
        loop.call_later(decimal.Decimal(0), fired.append, "decimal")
    run_briefly(loop)
    assert sorted(fired) == ["fraction", "int"]


def test_many_cancelled_timers_rebuild_the_heap(loop):
    # test_base_events: test__run_once_cancelled_event_cleanup.
    handles = [loop.call_later(100 + i, print) for i in range(150)]
    for h in handles[:100]:
        h.cancel()
    assert loop._timer_cancelled_count == 100
    loop._run_once()
    assert loop._timer_cancelled_count == 0
    assert len(loop._scheduled) == 50
    assert all(not h._scheduled for h in handles[:100])
    assert all(h._scheduled for h in handles[100:])
    assert loop._scheduled[0] is handles[100]
    for h in handles[100:]:
        h.cancel()


def test_time_override_is_used_by_call_later():
    class Clocked(fastiocp.EventLoop):
        def time(self) -> float:
            return 1000.0

    lp = Clocked()
    try:
        h = lp.call_later(5, print)
        assert h.when() == 1005.0
        h.cancel()
    finally:
        lp.close()


def test_debug_mode_uses_the_stdlib(loop):
    loop.set_debug(True)
    h = loop.call_soon(print)
    assert isinstance(h._source_traceback, list) and h._source_traceback
    t = loop.call_later(10, print)
    assert t._source_traceback
    t.cancel()
    h.cancel()
    loop.set_debug(False)
    assert loop.call_soon(print)._source_traceback is None


def test_other_handle_types_run_through_their_run(loop):
    class Counted(events.Handle):
        __slots__ = ()
        runs = 0

        def _run(self) -> None:
            type(self).runs += 1
            super()._run()

    calls: List[int] = []
    loop._ready.append(Counted(calls.append, (1,), loop, None))
    run_briefly(loop, 1)
    assert Counted.runs == 1 and calls == [1]


def test_a_non_context_is_reported_like_the_stdlib(loop):
    errors: List[dict] = []
    loop.set_exception_handler(lambda lp, c: errors.append(c))
    loop.call_soon(print, context=123)
    run_briefly(loop, 1)
    assert len(errors) == 1 and isinstance(errors[0]["exception"], AttributeError)


def test_threadsafe_wakes_a_waiting_loop(loop):
    import threading

    done: List[int] = []

    async def main() -> None:
        fut = loop.create_future()
        threading.Timer(0.05, loop.call_soon_threadsafe, (fut.set_result, 7)).start()
        done.append(await asyncio.wait_for(fut, 5))

    loop.run_until_complete(main())
    assert done == [7]


def test_tasks_and_sleep_run_on_the_core(loop):
    async def worker(i: int) -> int:
        for _ in range(3):
            await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return i

    async def main() -> List[int]:
        return await asyncio.gather(*[worker(i) for i in range(50)])

    assert loop.run_until_complete(main()) == list(range(50))


# ---- the proactor's select() in C -----------------------------------------


def test_select_finishes_futures_and_direct_callbacks(loop):
    # An operation with a Future (sock_recv) and a direct one (a transport's
    # read loop) finished by the same select().
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        async def main() -> bytes:
            fut = loop.sock_recv(a, 100)
            b.send(b"hello")
            return await asyncio.wait_for(fut, 5)

        assert loop.run_until_complete(main()) == b"hello"
    finally:
        a.close()
        b.close()


def test_select_reports_a_direct_callback_error_and_goes_on(loop):
    errors: List[dict] = []
    loop.set_exception_handler(lambda lp, c: errors.append(c))
    port = loop._proactor.port

    def bad(c: Any) -> None:
        raise ValueError("bad callback")

    port.post(context=bad)
    run_briefly(loop)
    assert len(errors) == 1
    assert errors[0]["message"].startswith("Exception in callback ")
    assert isinstance(errors[0]["exception"], ValueError)


def test_keyboard_interrupt_in_a_direct_callback_leaves_the_rest_for_later(loop):
    # PortProactor's backlog: the completions after the interrupted one are
    # finished by the next select(), none lost.
    port = loop._proactor.port
    seen: List[int] = []

    def interrupt(c: Any) -> None:
        raise KeyboardInterrupt

    port.post(context=interrupt)
    for i in range(3):
        port.post(context=lambda c, i=i: seen.append(i))
    with pytest.raises(KeyboardInterrupt):
        loop._proactor.select(0)
    assert seen == [] and len(loop._proactor._backlog) == 3
    loop._proactor.select(0)
    assert seen == [0, 1, 2] and loop._proactor._backlog == []


def test_select_on_a_closed_port_returns_nothing():
    lp = fastiocp.new_event_loop()
    proactor = lp._proactor
    proactor.port.close()
    assert proactor.select(0) == []
    lp.close()


def test_a_foreign_object_in_the_heap_raises_and_keeps_the_heap_whole(loop):
    # Only TimerHandles belong in loop._scheduled; anything else makes the
    # heap's comparisons fail with TypeError, every item still there once.
    handles = [loop.call_later(100 + i, print) for i in range(5)]
    loop._scheduled.insert(0, object())  # the root: every push compares with it
    with pytest.raises(TypeError, match="not a TimerHandle"):
        loop.call_later(50, print)
    assert len(loop._scheduled) == 7 and len({id(x) for x in loop._scheduled}) == 7
    assert all(h in loop._scheduled for h in handles)
    loop._scheduled.clear()


def test_a_foreign_object_at_the_heap_top_is_an_error_not_a_crash(loop):
    # _run_once reads a timer's slots by offset: anything but a TimerHandle
    # at the top is refused with TypeError before any slot is read.
    loop._scheduled.insert(0, object())
    with pytest.raises(TypeError, match="not a TimerHandle"):
        loop._run_once()
    loop._scheduled.clear()
    loop._scheduled = None
    with pytest.raises(TypeError):
        loop.call_later(1, print)
    loop._scheduled = []


def test_call_later_in_debug_mode_passes_when_args_and_context(loop):
    # The stdlib's call_at gets time() + delay in the delay's place, the
    # arguments after it and context= unchanged.
    loop.set_debug(True)
    ctx = contextvars.copy_context()
    before = loop.time()
    t = loop.call_later(10, print, 1, 2, context=ctx)
    assert before + 10 <= t.when() <= loop.time() + 10
    assert t._args == (1, 2) and t._context is ctx and t._source_traceback
    t.cancel()
    loop.set_debug(False)


def test_create_future_and_get_debug_are_the_c_core_s(loop):
    # BaseEventLoop.create_future() and get_debug() in C: a StreamReader
    # makes a Future per read, and Future() asks the loop's get_debug().
    assert type(loop).create_future is _LoopCore.create_future
    assert type(loop).get_debug is _LoopCore.get_debug
    fut = loop.create_future()
    assert type(fut) is asyncio.Future
    assert fut.get_loop() is loop and not fut.done()
    assert loop.get_debug() is False
    loop.set_debug(True)
    assert loop.get_debug() is True
    fut = loop.create_future()
    assert fut._source_traceback  # a debug loop's Future records where it was made
    loop.set_debug(False)
    fut.set_result(3)
    assert loop.run_until_complete(fut) == 3


def test_create_future_of_a_subclass_is_its_own():
    class Loop(fastiocp.EventLoop):
        def create_future(self):
            return "mine"

    lp = Loop()
    try:
        assert lp.create_future() == "mine"
    finally:
        lp.close()


@pytest.mark.parametrize("where", ["subclass", "instance"])
def test_a_process_events_of_ones_own_is_called_each_iteration(where):
    # _run_once() leaves out BaseProactorEventLoop._process_events(), which
    # does nothing; one given by a subclass or set on the loop still runs,
    # with the events select() returned (BaseEventLoop._run_once's call).
    seen: List[Any] = []

    class Loop(fastiocp.EventLoop):
        if where == "subclass":
            def _process_events(self, event_list):
                seen.append(event_list)

    lp = Loop()
    try:
        if where == "instance":
            lp._process_events = seen.append
        run_briefly(lp)
        assert len(seen) >= 3 and all(isinstance(e, list) for e in seen)
    finally:
        lp.close()


def test_create_task_is_the_c_core_s_and_takes_what_the_stdlib_s_takes(loop):
    # BaseEventLoop.create_task() in C when no task factory is set and
    # debug is off: Task(coro, loop=self, name=..., context=...).
    import contextvars
    import sys

    assert type(loop).create_task is _LoopCore.create_task

    async def double(x):
        return 2 * x

    task = loop.create_task(double(2), name="doubler")
    assert type(task) is asyncio.Task and task.get_loop() is loop and task.get_name() == "doubler"
    assert loop.run_until_complete(task) == 4
    if sys.version_info >= (3, 11):
        var = contextvars.ContextVar("var")
        ctx = contextvars.copy_context()
        ctx.run(var.set, "in ctx")

        async def read():
            return var.get()

        assert loop.run_until_complete(loop.create_task(read(), context=ctx)) == "in ctx"
    coro = double(1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        loop.create_task(coro, bogus=1)
    with pytest.raises(TypeError):
        loop.create_task()
    coro.close()


def test_create_task_goes_through_a_task_factory_and_a_closed_check(loop):
    made = []

    def factory(lp, coro, **kwargs):
        made.append(kwargs)
        return asyncio.Task(coro, loop=lp, **kwargs)

    async def one():
        return 1

    loop.set_task_factory(factory)
    task = loop.create_task(one(), name="via factory")
    assert made and task.get_name() == "via factory"
    assert loop.run_until_complete(task) == 1
    loop.set_task_factory(None)
    loop.set_debug(True)  # debug: the stdlib's method, which trims the traceback
    task = loop.create_task(one())
    assert task._source_traceback and loop.run_until_complete(task) == 1
    loop.set_debug(False)
    loop.close()
    coro = one()
    with pytest.raises(RuntimeError, match="closed"):
        loop.create_task(coro)
    coro.close()


def test_cancelling_timers_counts_the_scheduled_ones_in_c(loop):
    # TimerHandle.cancel() calls loop._timer_handle_cancelled(), in C here:
    # a scheduled timer counts, one already run or never scheduled does not
    # (CPython's test_base_events.test__run_once and TimerHandle's tests).
    assert type(loop)._timer_handle_cancelled is _LoopCore._timer_handle_cancelled
    h = loop.call_later(10, lambda: None)
    h.cancel()
    h.cancel()  # once only
    assert loop._timer_cancelled_count == 1
    loose = events.TimerHandle(time.monotonic() + 10, lambda: None, (), loop)
    loose.cancel()  # never scheduled
    assert loop._timer_cancelled_count == 1
    with pytest.raises(AttributeError):  # as the stdlib's
        loop._timer_handle_cancelled(object())
