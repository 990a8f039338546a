"""Memory per pending operation: 100,000 receives in flight on one socket,
RSS measured before (buffers already allocated) and after submitting.

    python -m pytest benchmarks/bench_memory.py -s
"""
from __future__ import annotations

import gc
import os
import socket
import sys

import pytest

import fastiocp

N = int(os.environ.get("FASTIOCP_BENCH_PENDING", "100000"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.benchmark(group="memory")
def test_pending_recv_bytes_each(benchmark, backend):
    def measure():
        a, b = socket.socketpair()
        port = fastiocp.CompletionPort(backend=backend)
        port.register(b)
        buffers = [bytearray(1) for _ in range(N)]
        gc.collect()
        before = _rss()
        ops = [port.recv(b, buf) for buf in buffers]
        after = _rss()
        per_op = (after - before) / N
        port.close()
        assert all(op.cancelled for op in ops)
        a.close()
        b.close()
        return per_op

    per_op = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info["pending_ops"] = N
    benchmark.extra_info["bytes_per_pending_recv"] = round(per_op, 1)
    print(f"\n{backend}: {per_op:.0f} bytes of RSS per pending receive "
          f"(beyond its buffer; {N} in flight, the Completion object the caller holds included)")
