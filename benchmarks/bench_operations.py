"""The operations of issue 14, measured against what a program would use
without them (Linux; each backend that works here):

- sendfile: a cached file sent over loopback TCP to a reader process on
  another CPU. port.sendfile() (the kernel copies) beside a read-into-buffer
  + send loop through the same port (256 KiB buffer, asyncio's sendfile
  fallback's size; FASTIOCP_BENCH_READ_SEND_KIB changes it), and beside
  os.sendfile() in a blocking loop. Targets: >= 1.5x the read+send loop,
  >= 0.9x os.sendfile. Each line gives the sender's and the reader's CPU
  per GiB, and how much of the machine other work took meanwhile (the
  transfers are CPU-bound: figures taken on a busy machine mean little;
  --quiet waits for a quiet one). --reader-lowat makes the reader ask to be
  woken per that many KiB (SO_RCVLOWAT), for every contender alike: on
  loopback the sender pays for the receiver's wake-ups.
- timers: 10,000 port.timer()s with random delays of 200-300 ms (all
  pending at once), armed 64 per batch(): every one fires, in the order of
  their deadlines within 1 ms; CPU per timer (arm and fire, the Python calls
  included) <= 2 µs.
- poll: one active socket among 1,000 idle ones with a pending poll each:
  re-arming port.poll() per event beside selectors.EpollSelector (interest
  kept registered). Target: CPU per event <= 1.3x the selector's.

pytest-benchmark (smoke sizes with FASTIOCP_BENCH_FILE_MIB and --benchmark-disable in CI):

    python -m pytest benchmarks/bench_operations.py --benchmark-group-by=group

The table (contenders alternate, medians, ratios from one run; the targets
are checked there):

    python benchmarks/bench_operations.py [--rounds 5] [--mib 256] [--backend io_uring]
        [--only sendfile,timers,poll] [--quiet 0.05 [--patience 60]] [--reader-lowat 256]
"""
from __future__ import annotations

import argparse
import os
import random
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import pytest

import fastiocp

LINUX = sys.platform.startswith("linux")
MIB = int(os.environ.get("FASTIOCP_BENCH_FILE_MIB", "256"))
TIMERS = 10_000
IDLE = 1000
POLL_EVENTS = int(os.environ.get("FASTIOCP_BENCH_N", "20000"))
CHUNK = 1 << 20
# The read+send loop's buffer: asyncio's own sendfile fallback reads 256 KiB
# at a time (asyncio.constants.SENDFILE_FALLBACK_READBUFFER_SIZE).
READ_SEND_BUFFER = int(os.environ.get("FASTIOCP_BENCH_READ_SEND_KIB", "256")) * 1024

pytestmark = pytest.mark.skipif(not LINUX, reason="the benchmarks run on Linux")


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})


# ---- sendfile -----------------------------------------------------------------

READER = r"""
import os, socket, sys
if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
    os.sched_setaffinity(0, {0})
lowat = int(sys.argv[1])
lsock = socket.create_server(("127.0.0.1", 0))
print(lsock.getsockname()[1], flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    want = int(line)
    conn, _ = lsock.accept()
    if lowat:
        # Woken once per `lowat` bytes rather than per segment: on loopback
        # the sender's CPU runs the receiver's TCP processing and its
        # wake-ups, which a receiver on another machine would not cost it.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
    got = 0
    # The reader must not be what limits the transfer: the kernel moves the
    # data from the socket to /dev/null through a pipe, no copy to Python.
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        while got < want:
            n = os.splice(conn.fileno(), w, 1 << 20)
            if n == 0:
                break
            got += n
            while n:
                n -= os.splice(r, null, n)
    finally:
        for fd in (r, w, null):
            os.close(fd)
    conn.close()
    print(got, flush=True)
"""


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process pid, its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every CPU, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Quiet:
    """How busy the machine was with other work while we measured: CPU the
    machine used beyond this process and the reader, as a fraction of all
    its CPUs. The figures are only meaningful when that is near 0."""

    def __init__(self, pids: List[int]) -> None:
        self.pids = pids
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.b0 = _machine_busy()
        self.o0 = sum(_proc_cpu(p) for p in self.pids)

    def other(self) -> float:
        """The fraction since start()."""
        elapsed = time.perf_counter() - self.t0
        ours = sum(_proc_cpu(p) for p in self.pids) - self.o0
        other = _machine_busy() - self.b0 - ours
        return max(0.0, other / (elapsed * (os.cpu_count() or 1)))


def wait_quiet(pids: List[int], below: float, patience: float) -> float:
    """Waits (up to patience seconds) until other work used under `below`
    of the machine over half a second; returns the last fraction seen."""
    deadline = time.monotonic() + patience
    while True:
        q = Quiet(pids)
        time.sleep(0.5)
        frac = q.other()
        if frac < below or time.monotonic() >= deadline:
            return frac


class Reader:
    """A reader process on CPU 0 that accepts one connection per transfer
    and reads it to the end (asking to be woken per `lowat` bytes if set:
    SO_RCVLOWAT)."""

    def __init__(self, lowat: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(lowat)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def connect(self, nbytes: int) -> socket.socket:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{nbytes}\n")
        self.proc.stdin.flush()
        return socket.create_connection(("127.0.0.1", self.port))

    def cpu(self) -> float:
        """The reader's CPU seconds (ns resolution: /proc's schedstat)."""
        with open(f"/proc/{self.proc.pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9

    def received(self) -> int:
        assert self.proc.stdout is not None
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def make_file(mib: int) -> str:
    fd, path = tempfile.mkstemp(prefix="fastiocp-sendfile-")
    chunk = os.urandom(CHUNK)
    with os.fdopen(fd, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
    with open(path, "rb") as f:  # into the page cache
        while f.read(CHUNK):
            pass
    return path


def send_port_sendfile(backend: str, sock: socket.socket, path: str, size: int) -> None:
    with fastiocp.CompletionPort(backend=backend) as port, fastiocp.open(path, "rb") as f:
        port.register(sock)
        off = 0
        while off < size:
            port.sendfile(sock, f, off, min(size - off, 64 * CHUNK))
            c = port.get()
            assert c is not None and c.error is None and c.nbytes > 0, c
            off += c.nbytes


def send_port_read_send(backend: str, sock: socket.socket, path: str, size: int) -> None:
    with fastiocp.CompletionPort(backend=backend) as port, fastiocp.open(path, "rb") as f:
        port.register(sock)
        port.register(f)
        buf = bytearray(READ_SEND_BUFFER)
        view = memoryview(buf)
        off = 0
        while off < size:
            port.read(f, buf, off)
            c = port.get()
            assert c is not None and c.error is None and c.nbytes > 0, c
            n, sent = c.nbytes, 0
            while sent < n:
                port.send(sock, view[sent:n])
                s = port.get()
                assert s is not None and s.error is None, s
                sent += s.nbytes
            off += n


def send_os_sendfile(backend: str, sock: socket.socket, path: str, size: int) -> None:
    with open(path, "rb") as f:
        off = 0
        while off < size:
            n = os.sendfile(sock.fileno(), f.fileno(), off, size - off)
            assert n > 0
            off += n


SENDERS: Dict[str, Callable[[str, socket.socket, str, int], None]] = {
    "port.sendfile": send_port_sendfile,
    "port read+send": send_port_read_send,
    "os.sendfile loop": send_os_sendfile,
}


def one_transfer(reader: Reader, sender: Callable, backend: str, path: str, size: int,
                 cpu: Optional[List[float]] = None, reader_cpu: Optional[List[float]] = None) -> float:
    """Sends size bytes of path to the reader; returns the seconds it took
    (and appends the sender's CPU seconds, its kernel threads included, to
    cpu, and the reader's to reader_cpu)."""
    sock = reader.connect(size)
    try:
        r0 = reader.cpu() if reader_cpu is not None else 0.0
        c0 = time.process_time()
        t0 = time.perf_counter()
        sender(backend, sock, path, size)
        sock.shutdown(socket.SHUT_WR)
        got = reader.received()
        elapsed = time.perf_counter() - t0
        if cpu is not None:
            cpu.append(time.process_time() - c0)
        if reader_cpu is not None:
            reader_cpu.append(reader.cpu() - r0)
    finally:
        sock.close()
    assert got == size, (got, size)
    return elapsed


# ---- timers -------------------------------------------------------------------

def run_timers(backend: str, n: int = TIMERS, seed: int = 7) -> Dict[str, float]:
    """Arms n timers with random delays in [0, 100 ms), collects them all.
    Returns the CPU per timer (µs), the worst ordering inversion (ms: how
    much earlier a timer's deadline was than one already delivered) and the
    worst lateness (ms after its deadline)."""
    rng = random.Random(seed)
    # All pending at once: arming 10,000 takes tens of ms, the first fires
    # after 200 ms (so lateness measures the port, not the arming loop).
    delays = [0.2 + rng.random() * 0.1 for _ in range(n)]
    deadlines = [0.0] * n
    monotonic = time.monotonic
    with fastiocp.CompletionPort(backend=backend) as port:
        timer, batch = port.timer, port.batch
        cpu0 = time.process_time()
        for start in range(0, n, 64):
            # 64 per batch, as one loop iteration arms its timers (io_uring:
            # one system call for them).
            with batch():
                for i in range(start, min(n, start + 64)):
                    timer(delays[i], i)
            # The deadline as armed: taken after the call, which only
            # errs late by the call's own duration (an allocation inside
            # timer() is not counted as the port's inversion).
            now = monotonic()
            for i in range(start, min(n, start + 64)):
                deadlines[i] = now + delays[i]
        got: List[tuple] = []
        while len(got) < n:
            batch = port.get_many(256, timeout=5)
            at = monotonic()
            got.extend((c.context, at) for c in batch)
        cpu = time.process_time() - cpu0
    inversion = lateness = 0.0
    latest = float("-inf")
    for i, at in got:
        deadline = deadlines[i]
        inversion = max(inversion, latest - deadline)
        latest = max(latest, deadline)
        lateness = max(lateness, at - deadline)
    return {"cpu_us": cpu / n * 1e6, "inversion_ms": inversion * 1e3, "late_ms": lateness * 1e3}


# ---- poll ---------------------------------------------------------------------

class PollBench:
    """IDLE idle socket pairs plus one active pair; each round trip writes a
    byte to the active pair and waits for its readiness."""

    def __init__(self) -> None:
        import resource  # 2,002 descriptors: more than a default soft limit of 1,024

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 4 * (IDLE + 1) + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        self.pairs = [socket.socketpair() for _ in range(IDLE + 1)]
        self.active_r, self.active_w = self.pairs[-1]

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()

    def port_loop(self, backend: str, events: int) -> float:
        with fastiocp.CompletionPort(backend=backend) as port:
            for r, _w in self.pairs:
                port.register(r)
                port.poll(r, fastiocp.POLLIN)
            r, w = self.active_r, self.active_w
            poll, get, POLLIN = port.poll, port.get, fastiocp.POLLIN
            send, recv = w.send, r.recv
            t0 = time.process_time()
            for _ in range(events):
                send(b"x")
                c = get()
                recv(1)
                poll(r, POLLIN)
            return (time.process_time() - t0) / events

    def selector_loop(self, events: int) -> float:
        sel = selectors.EpollSelector()
        try:
            for r, _w in self.pairs:
                sel.register(r, selectors.EVENT_READ)
            r, w = self.active_r, self.active_w
            select, send, recv = sel.select, w.send, r.recv
            t0 = time.process_time()
            for _ in range(events):
                send(b"x")
                ready = select()
                recv(1)
            assert ready
            return (time.process_time() - t0) / events
        finally:
            sel.close()


# ---- pytest-benchmark (CI: smoke sizes) ---------------------------------------

@pytest.fixture(scope="module")
def sendfile_setup():
    path = make_file(MIB)
    reader = Reader()
    yield reader, path, MIB * CHUNK
    reader.close()
    os.unlink(path)


@pytest.mark.benchmark(group="sendfile")
@pytest.mark.parametrize("contender", list(SENDERS))
def test_sendfile_throughput(benchmark, backend, sendfile_setup, contender):
    reader, path, size = sendfile_setup
    benchmark.extra_info["bytes"] = size
    benchmark.pedantic(one_transfer, args=(reader, SENDERS[contender], backend, path, size),
                       rounds=3, iterations=1)


@pytest.mark.benchmark(group="timers")
def test_timers_fire_in_order(benchmark, backend):
    result = benchmark.pedantic(run_timers, args=(backend, 2000 if MIB < 64 else TIMERS),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["inversion_ms"] <= 1.0 + (50.0 if MIB < 64 else 0.0)


@pytest.mark.benchmark(group="poll-1000-idle")
@pytest.mark.parametrize("contender", ["port.poll", "EpollSelector"])
def test_poll_one_active_among_idle(benchmark, backend, contender):
    bench = PollBench()
    events = min(POLL_EVENTS, 20000)
    try:
        if contender == "port.poll":
            benchmark.pedantic(bench.port_loop, args=(backend, events), rounds=3, iterations=1)
        else:
            benchmark.pedantic(bench.selector_loop, args=(events,), rounds=3, iterations=1)
    finally:
        bench.close()


# ---- the table ----------------------------------------------------------------

def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--backend", default=None, help="default: every backend that works here")
    ap.add_argument("--only", default="sendfile,timers,poll")
    ap.add_argument("--quiet", type=float, default=None, metavar="FRACTION",
                    help="sendfile: before each round, wait (up to --patience s) until other "
                         "processes use less than FRACTION of the machine's CPU")
    ap.add_argument("--patience", type=float, default=60.0)
    ap.add_argument("--reader-lowat", type=int, default=0, metavar="KIB",
                    help="sendfile: the reader sets SO_RCVLOWAT to KIB KiB (woken less often; "
                         "the same reader for every contender)")
    args = ap.parse_args(argv)
    backends = [args.backend] if args.backend else fastiocp.available_backends()
    only = set(args.only.split(","))
    pin(1)
    missed: List[str] = []
    print(f"fastiocp {fastiocp.__version__}, CPython {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"medians of {args.rounds} rounds, contenders alternating")
    if "sendfile" in only:
        path = make_file(args.mib)
        reader = Reader(args.reader_lowat * 1024)
        size = args.mib * CHUNK
        try:
            for backend in backends:
                times: Dict[str, List[float]] = {name: [] for name in SENDERS}
                cpus: Dict[str, List[float]] = {name: [] for name in SENDERS}
                rcpus: Dict[str, List[float]] = {name: [] for name in SENDERS}
                pids = [os.getpid(), reader.proc.pid]
                others: List[float] = []
                discarded = 0
                while len(others) < args.rounds:
                    if args.quiet is not None:
                        wait_quiet(pids, args.quiet, args.patience)
                    q = Quiet(pids)
                    got = {name: one_transfer(reader, sender, backend, path, size, cpus[name], rcpus[name])
                           for name, sender in SENDERS.items()}
                    other = q.other()
                    if (args.quiet is not None and other > 2 * args.quiet
                            and discarded < 2 * args.rounds):
                        # Other work took the CPU mid-round: the round says
                        # little (every contender's round is dropped alike).
                        discarded += 1
                        for name in SENDERS:
                            del cpus[name][-1], rcpus[name][-1]
                        continue
                    for name, t in got.items():
                        times[name].append(t)
                    others.append(other)
                med = {name: statistics.median(ts) for name, ts in times.items()}
                lowat = f", reader SO_RCVLOWAT {args.reader_lowat} KiB" if args.reader_lowat else ""
                print(f"\nsendfile of a {args.mib} MiB cached file over loopback TCP ({backend}{lowat}; "
                      f"other work used {statistics.median(others):.0%} of the machine, "
                      f"worst round {max(others):.0%}"
                      + (f"; {discarded} busier rounds dropped" if discarded else "") + "):")
                for name, t in med.items():
                    gib = size / (1 << 30)
                    cpu_per_gib = statistics.median(cpus[name]) / gib
                    rcpu_per_gib = statistics.median(rcpus[name]) / gib
                    spread = " ".join(f"{size / x / 1e9:.2f}" for x in times[name])
                    print(f"  {name:<18} {size / t / 1e9:6.2f} GB/s, sender CPU {cpu_per_gib * 1e3:6.1f} ms/GiB, "
                          f"reader CPU {rcpu_per_gib * 1e3:6.1f} ms/GiB  (rounds: {spread})")
                vs_rs = med["port read+send"] / med["port.sendfile"]
                vs_os = med["os.sendfile loop"] / med["port.sendfile"]
                # Each round's own ratios: its contenders ran within a second
                # of each other, under the same load.
                per_rs = statistics.median(a / b for a, b in zip(times["port read+send"], times["port.sendfile"]))
                per_os = statistics.median(a / b for a, b in zip(times["os.sendfile loop"], times["port.sendfile"]))
                print(f"  port.sendfile / read+send: {vs_rs:.2f}x (target >= 1.5x); "
                      f"/ os.sendfile: {vs_os:.2f}x (target >= 0.9x); "
                      f"median of the rounds' own ratios: {per_rs:.2f}x, {per_os:.2f}x")
                if vs_rs < 1.5 or vs_os < 0.9:
                    missed.append(f"sendfile ({backend})")
        finally:
            reader.close()
            os.unlink(path)
    if "timers" in only:
        for backend in backends:
            results = [run_timers(backend, TIMERS, seed) for seed in range(args.rounds)]
            cpu = statistics.median(r["cpu_us"] for r in results)
            inv = max(r["inversion_ms"] for r in results)
            late = statistics.median(r["late_ms"] for r in results)
            print(f"\n{TIMERS} timers, random delays 200-300 ms ({backend}): all fired; "
                  f"CPU per timer {cpu:.2f} µs (target <= 2); worst order inversion {inv:.3f} ms "
                  f"(target <= 1); worst lateness (median of rounds) {late:.2f} ms")
            if cpu > 2.0 or inv > 1.0:
                missed.append(f"timers ({backend})")
    if "poll" in only:
        bench = PollBench()
        try:
            for backend in backends:
                port_t: List[float] = []
                sel_t: List[float] = []
                for _ in range(args.rounds):
                    port_t.append(bench.port_loop(backend, POLL_EVENTS))
                    sel_t.append(bench.selector_loop(POLL_EVENTS))
                p, s = statistics.median(port_t), statistics.median(sel_t)
                print(f"\npoll: 1 active socket among {IDLE} idle ({backend}): port.poll {p * 1e6:.2f} µs "
                      f"CPU/event, EpollSelector {s * 1e6:.2f} µs: {p / s:.2f}x (target <= 1.3x)")
                if p / s > 1.3:
                    missed.append(f"poll ({backend})")
        finally:
            bench.close()
    print("\ntargets missed: " + (", ".join(missed) if missed else "none"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
