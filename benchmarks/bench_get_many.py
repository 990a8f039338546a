"""Draining N queued packets: get_many() at several batch sizes and get()
one at a time, beside queue.SimpleQueue.get(). The posts are made in each
round's setup, outside the timing: only the dequeue is measured.

    python -m pytest benchmarks/bench_get_many.py --benchmark-group-by=group
"""
from __future__ import annotations

import os
import queue

import pytest

import fastiocp

N = int(os.environ.get("FASTIOCP_BENCH_N", "100000"))


def _filled_port(port: fastiocp.CompletionPort):
    def setup():
        post = port.post
        for i in range(N):
            post(None, i)
        return (), {}
    return setup


@pytest.mark.benchmark(group="get_many")
@pytest.mark.parametrize("size", [1, 16, 64, 256])
def test_get_many_fastiocp(benchmark, port, size):
    get_many = port.get_many

    def drain():
        got = 0
        while got < N:
            got += len(get_many(size))

    benchmark.extra_info["items"] = N
    benchmark.pedantic(drain, setup=_filled_port(port), rounds=5, iterations=1)


@pytest.mark.benchmark(group="get_many")
def test_get_one_by_one_fastiocp(benchmark, port):
    get = port.get

    def drain():
        for _ in range(N):
            get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(drain, setup=_filled_port(port), rounds=5, iterations=1)


@pytest.mark.benchmark(group="get_many")
def test_get_simplequeue(benchmark):
    q: queue.SimpleQueue = queue.SimpleQueue()

    def setup():
        put = q.put
        for i in range(N):
            put(i)
        return (), {}

    def drain():
        get = q.get
        for _ in range(N):
            get()

    benchmark.extra_info["items"] = N
    benchmark.pedantic(drain, setup=setup, rounds=5, iterations=1)
