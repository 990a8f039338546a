"""Memory per pending operation: 100,000 receives in flight on one socket,
RSS measured before (buffers already allocated) and after submitting, in a
fresh interpreter (completions recycled by earlier benchmarks would hide the
cost).

    python -m pytest benchmarks/bench_memory.py -s
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastiocp

N = int(os.environ.get("FASTIOCP_BENCH_PENDING", "100000"))


CHILD = """
import gc, os, socket, sys
import fastiocp
N, backend = int(sys.argv[1]), sys.argv[2]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
a, b = socket.socketpair()
port = fastiocp.CompletionPort(backend=backend)
port.register(b)
buffers = [bytearray(1) for _ in range(N)]
ops = [None] * N
gc.collect()
before = rss()
for i, buf in enumerate(buffers):
    ops[i] = port.recv(b, buf)
after = rss()
port.close()
assert all(op.cancelled for op in ops)
print((after - before) / N)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.benchmark(group="memory")
def test_pending_recv_bytes_each(benchmark, backend):
    def measure():
        out = subprocess.run([sys.executable, "-c", CHILD, str(N), backend], check=True,
                             capture_output=True, text=True, timeout=300)
        return float(out.stdout.strip())

    per_op = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info["pending_ops"] = N
    benchmark.extra_info["bytes_per_pending_recv"] = round(per_op, 1)
    print(f"\n{backend}: {per_op:.0f} bytes of RSS per pending receive "
          f"(beyond its buffer; {N} in flight, the Completion object the caller holds included)")
