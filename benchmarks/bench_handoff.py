"""Hand-off between two threads: fastiocp post+get_many beside queue.Queue,
queue.SimpleQueue and asyncio's call_soon_threadsafe, in the same run.

    python -m pytest benchmarks/bench_handoff.py --benchmark-group-by=group
"""
from __future__ import annotations

import os
import queue
import threading

import pytest

N = int(os.environ.get("FASTIOCP_BENCH_N", "100000"))


def _run_pair(produce, consume) -> None:
    t = threading.Thread(target=produce)
    t.start()
    consume()
    t.join()


@pytest.mark.benchmark(group="handoff")
def test_handoff_fastiocp(benchmark, port):
    post, get_many = port.post, port.get_many

    def produce():
        for i in range(N):
            post(None, i)

    def consume():
        got = 0
        while got < N:
            got += len(get_many(256))

    benchmark.extra_info["items"] = N
    benchmark.pedantic(_run_pair, args=(produce, consume), rounds=5, iterations=1)


def _bench_queue(benchmark, q) -> None:
    """N items through q.put() in one thread and q.get() in another."""

    def produce():
        for i in range(N):
            q.put(i)

    def consume():
        for _ in range(N):
            q.get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(_run_pair, args=(produce, consume), rounds=5, iterations=1)


@pytest.mark.benchmark(group="handoff")
def test_handoff_queue(benchmark):
    _bench_queue(benchmark, queue.Queue())


@pytest.mark.benchmark(group="handoff")
def test_handoff_simplequeue(benchmark):
    _bench_queue(benchmark, queue.SimpleQueue())


@pytest.mark.benchmark(group="handoff")
def test_handoff_asyncio_call_soon_threadsafe(benchmark):
    import asyncio

    loop = asyncio.new_event_loop()

    def one_round():
        done = loop.create_future()
        count = [0]

        def on_item(i):
            count[0] += 1
            if count[0] == N:
                done.set_result(None)

        def produce():
            call = loop.call_soon_threadsafe
            for i in range(N):
                call(on_item, i)

        _run_pair(produce, lambda: loop.run_until_complete(done))

    benchmark.extra_info["items"] = N
    benchmark.pedantic(one_round, rounds=3, iterations=1)
    loop.close()
