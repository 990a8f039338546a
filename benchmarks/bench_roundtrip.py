"""Round trips on a socketpair: a sends 64 bytes, b echoes them back.
fastiocp (recv + send through the port) beside plain blocking calls and
asyncio (loop.sock_sendall / loop.sock_recv).

    python -m pytest benchmarks/bench_roundtrip.py --benchmark-group-by=group
"""
from __future__ import annotations

import os
import socket

import pytest

import fastiocp

ROUNDS = int(os.environ.get("FASTIOCP_BENCH_N", "20000")) // 5
MSG = b"m" * 64


@pytest.mark.benchmark(group="roundtrip")
def test_roundtrip_fastiocp(benchmark, backend):
    a, b = socket.socketpair()
    port = fastiocp.CompletionPort(backend=backend)
    port.register(a, key="a")
    port.register(b, key="b")
    abuf, bbuf = bytearray(64), bytearray(64)
    recv, send, get_many = port.recv, port.send, port.get_many

    batch = port.batch

    def run():
        # Each leg is one batch: the send and the receive reach the kernel
        # in one system call, as blocking code makes one call for each. The
        # two legs are written out, as in the contenders below: a call per
        # leg cost 3-13% of this timing, a loop over the two 1-2% (measured).
        for _ in range(ROUNDS):
            with batch():
                send(a, MSG)
                recv(b, bbuf)
            done = 0
            while done < 2:
                done += len(get_many())
            with batch():
                send(b, bbuf)
                recv(a, abuf)
            done = 0
            while done < 2:
                done += len(get_many())

    benchmark.extra_info["round_trips"] = ROUNDS
    benchmark.pedantic(run, rounds=5, iterations=1)
    port.close()
    a.close()
    b.close()


@pytest.mark.benchmark(group="roundtrip")
def test_roundtrip_blocking(benchmark):
    a, b = socket.socketpair()

    def run():
        for _ in range(ROUNDS):
            a.send(MSG)
            data = b.recv(64)
            b.send(data)
            a.recv(64)

    benchmark.extra_info["round_trips"] = ROUNDS
    benchmark.pedantic(run, rounds=5, iterations=1)
    a.close()
    b.close()


@pytest.mark.benchmark(group="roundtrip")
def test_roundtrip_asyncio(benchmark):
    import asyncio

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    loop = asyncio.new_event_loop()

    async def rounds():
        sendall, recv = loop.sock_sendall, loop.sock_recv
        for _ in range(ROUNDS):
            await sendall(a, MSG)
            data = await recv(b, 64)
            await sendall(b, data)
            await recv(a, 64)

    benchmark.extra_info["round_trips"] = ROUNDS
    benchmark.pedantic(lambda: loop.run_until_complete(rounds()), rounds=5, iterations=1)
    loop.close()
    a.close()
    b.close()
