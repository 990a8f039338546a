"""Issue 18's benchmarks: what idle connections cost with pooled receives,
and what zero-copy sends save.

    python benchmarks/bench_pools.py --only idle --conns 100000
    python benchmarks/bench_pools.py --only zerocopy --rounds 5
    python -m pytest benchmarks/bench_pools.py -s     # pytest-benchmark form

idle: a server process accepts N TCP connections from a client process
(multishot accepts on several listeners: one source port range per
listener), keeps each as a bare descriptor, registers it and starts one
receive on it: a pooled receive (BufferPool of 4 KiB buffers) or, for
comparison, a receive into a 4 KiB bytearray of its own. It reports the
server's RSS growth per connection for the registration and the pending
receive, then the client sends one byte on every connection and the server
checks that each of them completes with its byte. More connections than
one process may hold (RLIMIT_NOFILE) are split between several such
servers, which hold theirs all at once before any client sends.

loop-idle: the same N idle connections held by an asyncio Protocol server
on asyncio's default loop, uvloop and the fastiocp loop (with its receive
pool, the default on Linux, and without: FASTIOCP_LOOP_POOL=0): the
server's RSS growth per connection, from before the first connection to
all of them accepted with their transports reading (issue 16's idle
target), then one byte on every connection, each received.

zerocopy: 1 MiB sends over loopback TCP, port.send(zerocopy=True) against
a plain port.send, alternating; the receiver is another process on the
other CPU. Reports the sending thread's CPU time per byte (thread_time).

The multishot accept rate and the pooled multishot echo are sections of
the bench runner: `python -m fastiocp bench --only accept,echo --pin`.
"""
from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

import fastiocp

HOST = "127.0.0.1"
PER_LISTENER = 20000  # well inside the 28,232 ephemeral ports of one destination

# What every child script of this file starts with (N, the connections, is
# its first argument): a descriptor limit for N connections, as far as the
# hard limit allows (max_connections() said how many fit), and rss().
CHILD_PRELUDE = textwrap.dedent("""
    import os, resource, sys
    _soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _soft < int(sys.argv[1]) + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(int(sys.argv[1]) + 500, _hard), _hard))

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
""")

IDLE_CHILD = CHILD_PRELUDE + textwrap.dedent("""
    import gc, socket, subprocess, time
    import fastiocp
    N, backend, mode, per = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])

    nl = (N + per - 1) // per
    listeners = [socket.create_server(("127.0.0.1", 0), backlog=4096) for _ in range(nl)]
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(N), str(per)] +
                              [str(l.getsockname()[1]) for l in listeners],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = fastiocp.CompletionPort(backend=backend)
    for l in listeners:
        port.register(l)
        port.accept(l, multishot=True)
    fds = []
    while len(fds) < N:
        for c in port.get_many(1024, timeout=30):
            assert c.error is None, c.error
            sock, _ = c.result()
            fds.append(sock.detach())
    assert client.stdout.readline().strip() == "connected"
    for l in listeners:
        port.unregister(l)
    pool = fastiocp.BufferPool(4096, 1024)
    ops = []
    gc.collect()
    before = rss()
    for fd in fds:
        port.register(fd)
        ops.append(port.recv(fd, pool) if mode == "pooled" else port.recv(fd, bytearray(4096)))
    gc.collect()
    after = rss()
    # With several servers (more connections than one process may hold),
    # each waits here until all hold theirs: the connections are all idle
    # at once, then all become active.
    print((after - before) / N, flush=True)
    assert sys.stdin.readline().strip() == "go"
    # Every connection is still served when it becomes active.
    t0 = time.perf_counter()
    client.stdin.write("send\\n")
    client.stdin.flush()
    done = 0
    while done < N:
        got = port.get_many(1024, timeout=30)
        assert got, f"{done} of {N} receives completed"
        for c in got:
            assert c.error is None and c.nbytes == 1, (c.error, c.nbytes)
            assert bytes(c.buffer[:1]) == b"!"
            c.release()
            done += 1
    served = time.perf_counter() - t0
    client.stdin.write("quit\\n")
    client.stdin.flush()
    client.wait(60)
    port.close()
    for fd in fds:
        os.close(fd)
    print(served)
""")

IDLE_CLIENT = CHILD_PRELUDE + textwrap.dedent("""
    import socket
    N, per, ports = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
    socks = []
    for i in range(N):
        socks.append(socket.create_connection(("127.0.0.1", ports[i // per])))
    print("connected", flush=True)
    for line in sys.stdin:
        if line.strip() == "send":
            for s in socks:
                s.send(b"!")
        elif line.strip() == "quit":
            break
""")


def max_connections() -> int:
    """How many connections one process can hold here: its descriptor
    limit (the hard one, which only CAP_SYS_RESOURCE may raise; 20,000 on
    the project's CI machines) less some for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit * 2))
        limit *= 2
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ValueError, OSError):
        pass  # cannot raise it: the hard limit is the limit
    return limit - 500


def idle_shards(n: int) -> list[int]:
    """The connections of each server process for n idle connections: one
    process when they fit in its descriptor limit, else as few as hold
    them, the same number each (to within one)."""
    k = -(-n // max_connections())
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def measure_idle(n: int, backend: str, mode: str) -> tuple[float, float]:
    """(bytes of server RSS per connection for its registration and pending
    receive, seconds to serve one byte on every connection). Past one
    process's descriptor limit, several server processes (idle_shards())
    each hold their share: all n connections are open and idle at once,
    and the figure is their RSS growth summed over all n; served is the
    time until the last of them had served its share."""
    shards = idle_shards(n)
    servers = [subprocess.Popen([sys.executable, "-c", f"CLIENT = {IDLE_CLIENT!r}\n" + IDLE_CHILD,
                                 str(k), backend, mode, str(PER_LISTENER)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for k in shards]
    try:
        grown = []
        for srv in servers:
            line = pipe_line(srv, 900)
            grown.append(float(line) * shards[len(grown)])
        for srv in servers:  # all n are idle now: every server goes on
            srv.stdin.write("go\n")
            srv.stdin.flush()
        served = max(float(pipe_line(srv, 300)) for srv in servers)
        for srv in servers:
            if srv.wait(120) != 0:
                raise RuntimeError(f"the idle benchmark's server failed: {srv.stderr.read()[-2000:]}")
    finally:
        for srv in servers:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
    return sum(grown) / n, served


def pipe_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line proc prints; RuntimeError with its error output if it
    ends first."""
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"the idle benchmark's server said nothing in {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        raise RuntimeError(f"the idle benchmark's server failed: {proc.stderr.read()[-2000:]}")
    return line.strip()


LOOP_IDLE_SERVER = CHILD_PRELUDE + textwrap.dedent("""
    import asyncio, gc
    N, which = int(sys.argv[1]), sys.argv[2]

    if which == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    elif which.startswith("fastiocp"):
        import fastiocp
        loop = fastiocp.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    got = 0
    done = loop.create_future()

    class Idle(asyncio.Protocol):
        def data_received(self, data):
            global got
            got += len(data)
            if got >= N and not done.done():
                done.set_result(None)

    async def main():
        servers = [await loop.create_server(Idle, "127.0.0.1", 0, backlog=4096)
                   for _ in range((N + PER - 1) // PER)]
        await asyncio.sleep(0.1)
        gc.collect()
        before = rss()
        print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)  # "connected"
        await asyncio.sleep(0.5)  # the last transports start reading
        gc.collect()
        after = rss()
        print((after - before) / N, flush=True)
        await asyncio.wait_for(done, 60)
        print("served", flush=True)

    loop.run_until_complete(main())
""")

ZC_RECEIVER = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    buf = bytearray(1 << 20)
    while s.recv_into(buf):
        pass
""")


def measure_zerocopy(zerocopy: bool, total: int, backend: str) -> float:
    """Sender thread CPU nanoseconds per byte for total bytes of 1 MiB
    sends."""
    lsock = socket.create_server((HOST, 0))
    cmd = [sys.executable, "-c", ZC_RECEIVER, str(lsock.getsockname()[1])]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        cmd = ["taskset", "-c", str(cpus[0])] + cmd
    recv_proc = subprocess.Popen(cmd)
    conn, _ = lsock.accept()
    lsock.close()
    data = bytes(range(256)) * 4096  # 1 MiB
    with fastiocp.CompletionPort(backend=backend) as port:
        port.register(conn)
        sent = 0
        cpu0 = time.thread_time()
        while sent < total:
            view = memoryview(data)
            while view:
                c = port.send(conn, view, zerocopy=zerocopy)
                port.get(timeout=30)
                c.result()
                view = view[c.nbytes:]
                sent += c.nbytes
        cpu = time.thread_time() - cpu0
    conn.close()
    recv_proc.wait(60)
    return cpu * 1e9 / sent


def measure_loop_idle(n: int, which: str) -> float:
    """Bytes of server RSS per idle connection of an asyncio Protocol
    server on loop `which` (asyncio, uvloop, fastiocp, fastiocp-nopool),
    after checking that every connection is still served."""
    env = dict(os.environ)
    if which == "fastiocp-nopool":
        env["FASTIOCP_LOOP_POOL"] = "0"
    server = subprocess.Popen([sys.executable, "-c", f"PER = {PER_LISTENER}\n" + LOOP_IDLE_SERVER, str(n), which],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert server.stdin is not None and server.stdout is not None
    try:
        ports = server.stdout.readline().split()
        if not ports:
            raise RuntimeError(f"the {which} server did not start")
        client = subprocess.Popen([sys.executable, "-c", IDLE_CLIENT, str(n), str(PER_LISTENER)] + ports,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != "connected":
            raise RuntimeError("the client could not connect")
        server.stdin.write("connected\n")
        server.stdin.flush()
        per_conn = float(server.stdout.readline())
        client.stdin.write("send\n")
        client.stdin.flush()
        if server.stdout.readline().strip() != "served":
            raise RuntimeError(f"the {which} server did not receive a byte from every connection")
        client.stdin.write("quit\n")
        client.stdin.flush()
        client.wait(60)
        return per_conn
    finally:
        server.kill()
        server.wait()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="idle,loop-idle,zerocopy")
    ap.add_argument("--conns", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gib", type=float, default=2.0, help="zerocopy: GiB per measurement")
    ap.add_argument("--backend", default=None, help="default: every available backend")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    backends = [args.backend] if args.backend else fastiocp.available_backends()
    if len(os.sched_getaffinity(0)) >= 2 and "zerocopy" in only:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    if "loop-idle" in only:
        conns = min(args.conns, max_connections())
        for which in ("asyncio", "uvloop", "fastiocp", "fastiocp-nopool"):
            try:
                per_conn = measure_loop_idle(conns, which)
            except (RuntimeError, OSError) as exc:
                print(f"loop-idle {which}: failed: {exc}", flush=True)
                continue
            print(f"loop-idle {which:16} {conns:,} idle connections: {per_conn:,.0f} bytes of RSS per "
                  "connection (each served after)", flush=True)
    for backend in backends:
        if "idle" in only:
            conns = args.conns
            shards = idle_shards(conns)
            if len(shards) > 1:
                print(f"idle: {conns:,} connections need more descriptors than one process may have "
                      f"here (RLIMIT_NOFILE's hard limit, no CAP_SYS_RESOURCE): {len(shards)} server "
                      f"processes of {max(shards):,} connections or fewer hold them, all at once")
            for mode in ("pooled", "own buffer"):
                per_conn, served = measure_idle(conns, backend, "pooled" if mode == "pooled" else "buffer")
                print(f"idle {backend:8} {mode:10} {conns:,} connections: "
                      f"{per_conn:,.0f} bytes of RSS per connection (registration + pending receive); "
                      f"one byte on every connection served in {served:.2f} s", flush=True)
        if "zerocopy" in only:
            total = int(args.gib * (1 << 30))
            zc, plain = [], []
            for _ in range(args.rounds):
                zc.append(measure_zerocopy(True, total, backend))
                plain.append(measure_zerocopy(False, total, backend))
            mz, mp = statistics.median(zc), statistics.median(plain)
            print(f"zerocopy {backend:8} 1 MiB sends, {args.rounds} rounds of {args.gib} GiB: "
                  f"zerocopy {mz:.3f} ns/byte, plain {mp:.3f} ns/byte of sender CPU: "
                  f"{mz / mp:.2f}x (native: {sorted(fastiocp.CompletionPort(backend=backend).native)})",
                  flush=True)
    return 0


# ---- pytest-benchmark (CI: smoke sizes) ---------------------------------------

CONNS = min(int(os.environ.get("FASTIOCP_BENCH_POOL_CONNS", "10000")), max_connections())
ZC_MIB = int(os.environ.get("FASTIOCP_BENCH_FILE_MIB", "256"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.benchmark(group="pools")
@pytest.mark.parametrize("mode", ["pooled", "buffer"])
def test_idle_connections_bytes_each(benchmark, backend, mode):
    result = benchmark.pedantic(lambda: measure_idle(CONNS, backend, mode), rounds=1, iterations=1)
    per_conn, served = result
    benchmark.extra_info["connections"] = CONNS
    benchmark.extra_info["bytes_per_connection"] = round(per_conn, 1)
    print(f"\n{backend} {mode}: {per_conn:.0f} bytes of RSS per idle connection; "
          f"all {CONNS} served in {served:.2f} s")


@pytest.mark.benchmark(group="pools")
@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "plain"])
def test_send_1mib_cpu_per_byte(benchmark, backend, zerocopy):
    ns = benchmark.pedantic(lambda: measure_zerocopy(zerocopy, ZC_MIB << 20, backend),
                            rounds=1, iterations=1)
    benchmark.extra_info["sender_cpu_ns_per_byte"] = round(ns, 4)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
