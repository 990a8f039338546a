"""The TLS echo client of ``python -m fastiocp bench --only loop``: the C load
generator's protocol over TLS, in Python (the load generator has no TLS).

    python -m fastiocp.bench.tls_client HOST PORT CONNS MSGSIZE WARMUP_S DURATION_S SERVER_PID

The same client drives every server: the standard library's asyncio loop
(whatever loop the server runs), CONNS TLS connections each with one message
in flight: send MSGSIZE bytes, wait until all of them came back (each piece
compared with the bytes sent at its offset), send again. After WARMUP_S
seconds it samples its own CPU time and the server's (/proc/SERVER_PID/stat:
the server's process only, never this one), counts messages for DURATION_S
seconds and prints the load generator's JSON object on stdout. A wrong echo,
a closed connection or no echo for 5 s: a message on stderr, exit status 2.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import ssl
import sys
import time
from typing import Any, List, Optional


def cpu_of_pid(pid: int) -> float:
    """utime + stime of a whole process, in seconds; -1 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return -1.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _State:
    def __init__(self, msg: bytes) -> None:
        self.msg = msg
        self.measuring = False
        self.messages = 0
        self.latencies: List[float] = []
        self.last_echo = time.monotonic()
        self.error: Optional[str] = None
        self.done = False
        self.failed: Optional[asyncio.Future[None]] = None


class _EchoClient(asyncio.Protocol):
    def __init__(self, state: _State, index: int) -> None:
        self.state = state
        self.index = index
        self.got = 0
        self.sent = 0.0
        self.view = memoryview(state.msg)
        self.size = len(state.msg)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self) -> None:
        self.sent = time.monotonic()
        self.transport.write(self.state.msg)

    def fail(self, why: str) -> None:
        st = self.state
        if st.error is None and not st.done:
            st.error = f"connection {self.index}: {why}"
            if st.failed is not None and not st.failed.done():
                st.failed.set_result(None)

    def data_received(self, data: bytes) -> None:
        got, n = self.got, len(data)
        if got + n > self.size or self.view[got:got + n] != data:
            self.fail(f"wrong echo at byte {got}")
            return
        got += n
        if got < self.size:
            self.got = got
            return
        self.got = 0
        st = self.state
        now = time.monotonic()
        st.last_echo = now
        if st.measuring:
            st.latencies.append(now - self.sent)
            st.messages += 1
        self.sent = now
        self.transport.write(st.msg)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.fail(f"closed by the server ({exc})" if exc else "closed by the server")


def _percentile(sorted_us: List[float], q: float) -> float:
    if not sorted_us:
        return 0.0
    return sorted_us[min(len(sorted_us) - 1, int(len(sorted_us) * q))]


async def _run(host: str, port: int, conns: int, size: int, warmup: float, duration: float,
               server_pid: int) -> int:
    loop = asyncio.get_running_loop()
    st = _State(bytes((ord("a") + i % 26) for i in range(size)))
    st.failed = loop.create_future()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench's own throw-away certificate
    clients = []
    for i in range(conns):
        _t, proto = await loop.create_connection(functools.partial(_EchoClient, st, i), host, port,
                                                 ssl=ctx)
        clients.append(proto)
    for c in clients:
        c.send()

    async def wait(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while st.error is None:
            left = end - time.monotonic()
            if left <= 0:
                return True
            assert st.failed is not None
            await asyncio.wait([st.failed], timeout=min(left, 0.5))
            if time.monotonic() - st.last_echo > 5.0:
                st.error = "no echo for 5 s: the server is stuck"
        return False

    if await wait(warmup):
        st.measuring = True
        t0, cpu0, scpu0 = time.monotonic(), time.process_time(), cpu_of_pid(server_pid)
        if await wait(duration):
            st.measuring = False
            t1, cpu1, scpu1 = time.monotonic(), time.process_time(), cpu_of_pid(server_pid)
    st.done = True
    for c in clients:
        c.transport.abort()
    if st.error is not None:
        print(f"tls_client: {st.error}", file=sys.stderr)
        return 2
    secs = t1 - t0
    lat = sorted(x * 1e6 for x in st.latencies)
    print(json.dumps({
        "messages": st.messages, "seconds": round(secs, 6), "msgs_per_s": round(st.messages / secs, 1),
        "lat_p50_us": round(_percentile(lat, 0.50)), "lat_p90_us": round(_percentile(lat, 0.90)),
        "lat_p99_us": round(_percentile(lat, 0.99)), "lat_p999_us": round(_percentile(lat, 0.999)),
        "loadgen_cpu_s": round(cpu1 - cpu0, 4),
        "server_cpu_s": -1.0 if scpu0 < 0 or scpu1 < 0 else round(scpu1 - scpu0, 4),
        "bad_echoes": 0, "connections": conns}), flush=True)
    return 0


def main(argv: List[str]) -> int:
    if len(argv) != 7:
        print("usage: python -m fastiocp.bench.tls_client HOST PORT CONNS MSGSIZE WARMUP_S "
              "DURATION_S SERVER_PID", file=sys.stderr)
        return 64
    host, port, conns, size = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    warmup, duration, pid = float(argv[4]), float(argv[5]), int(argv[6])
    if conns < 1 or not 1 <= size <= 1 << 20 or duration <= 0:
        print("tls_client: bad arguments", file=sys.stderr)
        return 64
    signal.alarm(int(warmup + duration + 30))
    loop = asyncio.new_event_loop()  # the standard library's, whatever the server runs
    try:
        return loop.run_until_complete(_run(host, port, conns, size, warmup, duration, pid))
    except OSError as exc:
        print(f"tls_client: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
