"""post + get in one thread: the cost of one packet through the port,
beside queue.SimpleQueue and queue.Queue doing the same put + get.

    python -m pytest benchmarks/bench_post_get.py --benchmark-group-by=group
"""
from __future__ import annotations

import os
import queue

import pytest

import fastiocp

N = int(os.environ.get("FASTIOCP_BENCH_N", "100000"))


@pytest.mark.benchmark(group="post+get")
def test_post_get_fastiocp(benchmark, backend):
    port = fastiocp.CompletionPort(backend=backend)
    post, get = port.post, port.get

    def run():
        for i in range(N):
            post(None, i)
            get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)
    port.close()


@pytest.mark.benchmark(group="post+get")
def test_post_get_simplequeue(benchmark):
    q: queue.SimpleQueue = queue.SimpleQueue()
    put, get = q.put, q.get

    def run():
        for i in range(N):
            put(i)
            get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)


@pytest.mark.benchmark(group="post+get")
def test_post_get_queue(benchmark):
    q: queue.Queue = queue.Queue()
    put, get = q.put, q.get

    def run():
        for i in range(N):
            put(i)
            get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)
