"""Re-arming receives: 64 connections (socketpairs) each get one byte, and
their receives are started again, by a recv() call per connection or by one
resubmit() of the dequeued completions. The difference is the Python cost
of a submission, the part of a server's work that resubmit() saves.

    python -m pytest benchmarks/bench_rearm.py --benchmark-group-by=group
"""
from __future__ import annotations

import os
import socket

import pytest

import fastiocp
from fastiocp import Completion

CONNS = 64
ROUNDS = max(1, int(os.environ.get("FASTIOCP_BENCH_N", "20000")) // 100)


def _setup(backend: str):
    port = fastiocp.CompletionPort(backend=backend)
    pairs = [socket.socketpair() for _ in range(CONNS)]
    for _, b in pairs:
        port.register(b, key=b)
    return port, pairs


def _receive_all(port: fastiocp.CompletionPort, pairs: list) -> list[Completion]:
    for a, _ in pairs:
        a.send(b"x")
    got: list[Completion] = []
    while len(got) < CONNS:
        got += port.get_many(CONNS)
    for c in got:
        assert c.nbytes == 1
    return got


def _close(port, pairs) -> None:
    port.close()
    for a, b in pairs:
        a.close()
        b.close()


@pytest.mark.benchmark(group="rearm-64-receives")
def test_rearm_recv_each(benchmark, backend):
    port, pairs = _setup(backend)
    recv, batch = port.recv, port.batch
    buffers = [bytearray(64) for _ in pairs]

    def run():
        for _ in range(ROUNDS):
            with batch():
                for (_, b), buf in zip(pairs, buffers):
                    recv(b, buf)
            _receive_all(port, pairs)

    benchmark.extra_info["receives"] = ROUNDS * CONNS
    benchmark.pedantic(run, rounds=5, iterations=1)
    _close(port, pairs)


@pytest.mark.benchmark(group="rearm-64-receives")
def test_rearm_resubmit(benchmark, backend):
    port, pairs = _setup(backend)
    for _, b in pairs:
        port.recv(b, bytearray(64))
    received = [_receive_all(port, pairs)]

    def run():
        for _ in range(ROUNDS):
            with port.batch():
                port.resubmit(received[0])
            received[0] = _receive_all(port, pairs)

    benchmark.extra_info["receives"] = ROUNDS * CONNS
    benchmark.pedantic(run, rounds=5, iterations=1)
    _close(port, pairs)
