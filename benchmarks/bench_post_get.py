"""post + get in one thread: the cost of one packet through the port,
beside queue.SimpleQueue and queue.Queue doing the same put + get.

    python -m pytest benchmarks/bench_post_get.py --benchmark-group-by=group
"""
from __future__ import annotations

import os
import queue

import pytest

N = int(os.environ.get("FASTIOCP_BENCH_N", "100000"))


@pytest.mark.benchmark(group="post+get")
def test_post_get_fastiocp(benchmark, port):
    post, get = port.post, port.get

    def run():
        for i in range(N):
            post(None, i)
            get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)


def _bench_queue(benchmark, q) -> None:
    """N put() + get() pairs on q in one thread."""
    put, get = q.put, q.get

    def run():
        for i in range(N):
            put(i)
            get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)


@pytest.mark.benchmark(group="post+get")
def test_post_get_simplequeue(benchmark):
    _bench_queue(benchmark, queue.SimpleQueue())


@pytest.mark.benchmark(group="post+get")
def test_post_get_queue(benchmark):
    _bench_queue(benchmark, queue.Queue())
