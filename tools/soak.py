#!/usr/bin/env python3
"""Soak test: millions of mixed operations through fastiocp, checking that
memory and descriptor counts stay flat (DESIGN.md invariant 5) and that
every operation completes exactly once with the right data.

    python3 tools/soak.py --ops 1000000                # every backend here
    python3 tools/soak.py --ops 200000 --backend epoll --json

One round submits and completes, on one port: two posts; a receive and a
send on a socketpair; a 4 KiB send and the receives that take it on a TCP
loopback connection; a sendto/recvfrom on UDP; a file write and the read
that checks it; a receive that is cancelled. Every 50th round also accepts
and connects a new TCP connection through the port, echoes on it and closes
it; every 500th round creates a second port, leaves a receive in flight on
it and closes it. An "operation" is one completion dequeued.

After a warm-up (a tenth of the run, at least 20,000 operations) the tool
samples, at ten checkpoints: RSS, open descriptors (Windows: handles),
CPython's allocated memory blocks (sys.getallocatedblocks(): any Python
object leaked per operation shows here), and on glibc the C heap in use
(mallinfo2: any malloc leaked per operation or per port). It fails (exit
status 1) if descriptors grow at all, Python blocks grow by more than
--max-blocks, the C heap by more than --max-heap bytes, or RSS by more than
--max-rss bytes from the first checkpoint to the last; and on any lost,
duplicated or wrong completion.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if os.path.isdir(os.path.join(REPO, "src", "fastiocp")) and "fastiocp" not in sys.modules:
    try:
        import fastiocp  # noqa: F401  (an installed or PYTHONPATH copy wins)
    except ImportError:
        sys.path.insert(0, os.path.join(REPO, "src"))
import fastiocp  # noqa: E402

ON_WINDOWS = sys.platform == "win32"


# ---------------------------------------------------------------------------
# Measurements


def fd_count() -> int:
    if ON_WINDOWS:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from conftest import open_fd_count  # the suite's handle counter (Wine-aware)

        return open_fd_count()
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    if ON_WINDOWS:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from conftest import rss_bytes as rss

        return rss()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None  # not glibc >= 2.33
    fn.restype = _Mallinfo2
    return fn


MALLINFO2 = _mallinfo2()


def _sanitized() -> bool:
    """Whether AddressSanitizer runs in this process (tools/sanitize.sh): its
    quarantine keeps freed memory for a while and it replaces malloc, so RSS
    and mallinfo say nothing about leaks then (LeakSanitizer does)."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


SANITIZED = _sanitized()


def heap_in_use() -> int | None:
    """Bytes of C heap allocated (malloc'd and not freed), or None."""
    if MALLINFO2 is None:
        return None
    m = MALLINFO2()
    return m.uordblks + m.hblkhd


_OWN_BLOCKS = [0]  # blocks held by the samples kept so far (not a leak)


def sample(ops: int, t: float) -> dict:
    gc.collect()
    raw = sys.getallocatedblocks()
    s = {"fds": fd_count(), "rss": rss_bytes(), "blocks": raw - _OWN_BLOCKS[0], "heap": heap_in_use(),
         "ops": ops, "t": t}
    _OWN_BLOCKS[0] += sys.getallocatedblocks() - raw
    return s


# ---------------------------------------------------------------------------
# The workload


class Failure(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)


def tcp_pair():
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


class Soak:
    def __init__(self, backend: str, tmpdir: str):
        self.backend = backend
        self.port = fastiocp.CompletionPort(backend=backend)
        self.ops = 0  # completions dequeued
        self.rounds = 0
        p = self.port
        self.sp = socket.socketpair()
        self.tcp = tcp_pair()
        self.idle = socket.socketpair()
        self.udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        for u in self.udp:
            u.bind(("127.0.0.1", 0))
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.file = fastiocp.open(os.path.join(tmpdir, "soak.bin"), "w+b")
        for i, s in enumerate([*self.sp, *self.tcp, self.idle[1], *self.udp, self.lsock, self.file]):
            p.register(s, key=i)
        self.payload = bytes(range(256)) * 16  # 4 KiB
        self.rbuf = bytearray(4096)
        self.fbuf = bytearray(512)

    def close(self) -> None:
        self.port.close()
        for s in (*self.sp, *self.tcp, *self.idle, *self.udp, self.lsock):
            s.close()
        self.file.close()

    def take(self, n: int, timeout: float = 10.0) -> list:
        """Exactly n completions (every one dequeued counts as an operation)."""
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            check(left > 0, f"lost completions: {len(out)} of {n} within {timeout}s")
            out += self.port.get_many(n - len(out), timeout=left)
        self.ops += len(out)
        for c in out:
            check(c.done, f"dequeued but not done: {c!r}")
        return out

    def round(self) -> None:
        p = self.port
        r = self.rounds
        self.rounds += 1
        tag = r.to_bytes(4, "little")
        # posts
        p.post(context=("post", r, 0), nbytes=r & 0xFFFF)
        p.post(context=("post", r, 1))
        # socketpair recv + send
        a, b = self.sp
        msg = tag * (1 + r % 16)
        p.recv(b, bytearray(64), context="sp-recv")
        p.send(a, msg, context="sp-send")
        # UDP
        u0, u1 = self.udp
        p.recvfrom(u1, bytearray(64), context="udp-recv")
        p.sendto(u0, tag, u1.getsockname(), context="udp-send")
        # file write
        off = (r % 64) * 512
        p.write(self.file, tag * 128, offset=off, context="f-write")
        # cancelled receive
        idle = p.recv(self.idle[1], 16, context="cancelled")
        idle.cancel()
        got = {}
        for c in self.take(8):
            ctx = c.context
            if isinstance(ctx, tuple):
                check(c.error is None and c.nbytes == (r & 0xFFFF if ctx[2] == 0 else 0),
                      f"post {ctx}: {c!r}")
                continue
            got[ctx] = c
        check(set(got) == {"sp-recv", "sp-send", "udp-recv", "udp-send", "f-write", "cancelled"},
              f"round {r}: got {sorted(got)}")
        c = got["sp-recv"]
        check(c.error is None and bytes(c.buffer[: c.nbytes]) == msg, f"socketpair recv {c!r}")
        check(got["sp-send"].nbytes == len(msg), "socketpair short send")
        c = got["udp-recv"]
        check(c.error is None and c.result() == (4, u0.getsockname()) and bytes(c.buffer[:4]) == tag,
              f"udp {c!r}")
        check(got["f-write"].nbytes == 512, "file short write")
        c = got["cancelled"]
        check(c.cancelled and c.error is not None, f"cancel {c!r}")
        # file read back
        p.read(self.file, self.fbuf, offset=off, context="f-read")
        (c,) = self.take(1)
        check(c.nbytes == 512 and self.fbuf == tag * 128, "file read back")
        # TCP 4 KiB, receives until all arrived
        client, server = self.tcp
        p.send(client, self.payload, context="tcp-send")
        p.recv(server, self.rbuf, context="tcp-recv")
        received = bytearray()
        sent = 0
        while len(received) < len(self.payload) or not sent:
            for c in self.take(1):
                check(c.error is None, f"tcp {c!r}")
                if c.context == "tcp-send":
                    sent = c.nbytes
                    check(sent == len(self.payload), "tcp short send")
                else:
                    check(c.nbytes > 0, "tcp EOF")
                    received += self.rbuf[: c.nbytes]
                    if len(received) < len(self.payload):
                        p.recv(server, self.rbuf, context="tcp-recv")
        check(received == self.payload, "tcp data")
        if r % 50 == 0:
            self.connection(r)
        if r % 500 == 0:
            self.second_port()

    def connection(self, r: int) -> None:
        """accept + connect through the port, one echo, close."""
        p = self.port
        client = socket.socket()
        if ON_WINDOWS:
            client.bind(("127.0.0.1", 0))
        p.register(client, key="client")
        p.accept(self.lsock, context="accept")
        p.connect(client, self.lsock.getsockname(), context="connect")
        got = {c.context: c for c in self.take(2)}
        check(got["connect"].error is None, f"connect {got['connect']!r}")
        conn, addr = got["accept"].result()
        p.register(conn, key="conn")
        p.send(client, b"ping %d" % r, context="ping")
        p.recv(conn, bytearray(32), context="pong")
        got = {c.context: c for c in self.take(2)}
        check(bytes(got["pong"].buffer[: got["pong"].nbytes]) == b"ping %d" % r, "echo")
        for s in (client, conn):
            p.unregister(s)
            s.close()

    def second_port(self) -> None:
        """A port created, used, and closed with an operation in flight."""
        a, b = socket.socketpair()
        with fastiocp.CompletionPort(backend=self.backend) as q:
            q.register(b)
            q.post(context="x")
            check(q.get(timeout=5).context == "x", "second port post")
            op = q.recv(b, bytearray(16))
        check(op.done and op.cancelled, "second port close() did not cancel")
        a.close()
        b.close()


def run(backend: str, nops: int, checkpoints: int = 10, quiet: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(backend, tmp)
        t0 = time.monotonic()
        warm = max(min(nops // 10, 200_000), min(20_000, nops // 2))
        try:
            while soak.ops < warm:
                soak.round()
            samples = [sample(soak.ops, time.monotonic() - t0)]
            step = max(1, (nops - soak.ops) // checkpoints)
            while soak.ops < nops:
                target = min(nops, soak.ops + step)
                while soak.ops < target:
                    soak.round()
                samples.append(sample(soak.ops, time.monotonic() - t0))
                if not quiet:
                    s = samples[-1]
                    print(f"  {backend:8} {s['ops']:>10,} ops {s['t']:7.1f}s  rss {s['rss'] / 2**20:7.1f} MiB"
                          f"  fds {s['fds']:4}  py blocks {s['blocks']:>8,}"
                          + (f"  C heap {s['heap'] / 2**20:7.2f} MiB" if s["heap"] is not None else ""),
                          flush=True)
            pending = soak.port.pending
            error = None
        except Failure as exc:
            error = str(exc)
            pending = soak.port.pending
            samples = locals().get("samples", [])
        finally:
            soak.close()
        elapsed = time.monotonic() - t0
    return {"backend": backend, "ops": soak.ops, "rounds": soak.rounds, "seconds": elapsed,
            "sanitized": SANITIZED,
            "ops_per_s": soak.ops / elapsed if elapsed else 0.0, "pending_at_end": pending,
            "error": error, "samples": samples}


def verdict(res: dict, max_rss: int, max_blocks: int, max_heap: int) -> list[str]:
    problems = []
    if res["error"]:
        problems.append(res["error"])
    if res["pending_at_end"]:
        problems.append(f"{res['pending_at_end']} completions still pending at the end")
    s = res["samples"]
    if len(s) >= 2:
        first, last = s[0], s[-1]
        if last["fds"] != first["fds"]:
            problems.append(f"descriptors {first['fds']} -> {last['fds']}")
        if last["blocks"] - first["blocks"] > max_blocks:
            problems.append(f"Python blocks grew by {last['blocks'] - first['blocks']:,} (> {max_blocks:,})")
        if SANITIZED:
            pass  # RSS and C heap are ASan's business here: not judged
        elif first["heap"] is not None and last["heap"] - first["heap"] > max_heap:
            problems.append(f"C heap grew by {(last['heap'] - first['heap']) / 2**10:,.0f} KiB "
                            f"(> {max_heap / 2**10:,.0f} KiB)")
        if not SANITIZED and last["rss"] - first["rss"] > max_rss:
            problems.append(f"RSS grew by {(last['rss'] - first['rss']) / 2**20:.1f} MiB "
                            f"(> {max_rss / 2**20:.1f} MiB)")
    else:
        problems.append("too few samples")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=1_000_000, help="operations per backend (default 1,000,000)")
    ap.add_argument("--backend", action="append", help="backend to soak (repeatable; default: every one that works)")
    ap.add_argument("--max-rss", type=float, default=8.0, help="MiB of RSS growth allowed (default 8)")
    ap.add_argument("--max-blocks", type=int, default=2000, help="Python memory blocks of growth allowed (default 2000)")
    ap.add_argument("--max-heap", type=float, default=1024.0, help="KiB of C heap growth allowed (default 1024)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per backend")
    args = ap.parse_args(argv)
    backends = args.backend or fastiocp.available_backends()
    failed = False
    for backend in backends:
        if not args.json:
            print(f"soak: {backend}, {args.ops:,} operations", flush=True)
        res = run(backend, args.ops, quiet=args.json)
        problems = verdict(res, int(args.max_rss * 2**20), args.max_blocks, int(args.max_heap * 1024))
        res["problems"] = problems
        failed |= bool(problems)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            s = res["samples"]
            first, last = (s[0], s[-1]) if s else ({}, {})
            print(f"soak: {backend}: {res['ops']:,} ops in {res['seconds']:.1f}s "
                  f"({res['ops_per_s']:,.0f}/s); after warm-up: RSS "
                  f"{(last.get('rss', 0) - first.get('rss', 0)) / 2**10:+,.0f} KiB, fds "
                  f"{last.get('fds', 0) - first.get('fds', 0):+d}, Python blocks "
                  f"{last.get('blocks', 0) - first.get('blocks', 0):+,}"
                  + (f", C heap {(last['heap'] - first['heap']) / 2**10:+,.0f} KiB"
                     if first.get("heap") is not None else "")
                  + (": OK" if not problems else ": FAILED: " + "; ".join(problems)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
