"""Concurrency stress (issue 6, item 3): sixteen threads submitting,
cancelling, posting and dequeuing on one port at once, then an exact
accounting; and closing the port while threads are inside get_many() and
submit calls.

Sizes: FASTIOCP_STRESS_SECONDS (default 3 s per backend; 1 s under Wine),
FASTIOCP_STRESS_THREADS (16), FASTIOCP_STRESS_ROUNDS (close races, 20; 4
under Wine).
"""
from __future__ import annotations

import collections
import itertools
import os
import random
import threading
import time

import pytest

import fastiocp
from relutil import (RECORD, UNDER_WINE, check_record, drain_socket, env_float, env_int,
                     hard_watchdog, is_cancel_error, join_all, message_pair, record)

pytestmark = pytest.mark.reliability

SECONDS = env_float("FASTIOCP_STRESS_SECONDS", 3.0, wine=1.0)
THREADS = env_int("FASTIOCP_STRESS_THREADS", 16)
ROUNDS = env_int("FASTIOCP_STRESS_ROUNDS", 20, wine=4)
CANARY = 0xA5
RECV_SIZE = RECORD + 32          # room for a whole record, and canary bytes after it
FILE_SLOTS = 256                 # records in the file that reads check against
FILE_BASE = 1 << 40              # ids of the file's records (apart from send ids)
MAX_PENDING = 3000 if not UNDER_WINE else 400


class Stress:
    """Shared state of one stress run. Every operation carries a unique id
    in its context; each thread validates what it dequeues and files any
    fault in self.errors (assertions in threads would be lost)."""

    def __init__(self, port, tmp_path, nchannels: int):
        self.port = port
        self.ids = itertools.count(1)
        self.ops: dict[int, fastiocp.Completion] = {}      # id -> op (submitted)
        self.kinds: dict[int, str] = {}                    # id -> kind, posts included
        self.cancel_requested: set[int] = set()
        self.dequeued: list[tuple[int, object]] = []       # (id, completion)
        self.received: list[int] = []                      # record ids received by recv ops
        self.sent_ok: list[int] = []                       # ids of sends that completed whole
        self.sent_failed: list[int] = []
        self.written: list[tuple[int, int]] = []           # (id, offset) of completed writes
        self.errors: list[str] = []
        self.recent = collections.deque(maxlen=512)        # ops other threads may cancel
        self.channels = []
        self.reliable = True
        for i in range(nchannels):
            tx, rx, reliable = message_pair()
            self.reliable &= reliable
            port.register(tx, key=("tx", i))
            port.register(rx, key=("rx", i))
            self.channels.append((tx, rx))
        self.rpath = tmp_path / "records.bin"
        self.rpath.write_bytes(b"".join(record(FILE_BASE + i) for i in range(FILE_SLOTS)))
        self.rfile = fastiocp.open(self.rpath, "rb")
        port.register(self.rfile, key="rfile")
        self.wpath = tmp_path / "writes.bin"
        self.wfile = fastiocp.open(self.wpath, "w+b")
        port.register(self.wfile, key="wfile")
        self.wslots = itertools.count()

    def close(self):
        for tx, rx in self.channels:
            tx.close()
            rx.close()
        self.rfile.close()
        self.wfile.close()

    # -- submissions (each returns quietly on PortClosedError when asked) --

    def _track(self, ident, kind, op):
        self.ops[ident] = op
        self.kinds[ident] = kind
        self.recent.append(op)

    def submit(self, rng: random.Random, action: str) -> None:
        port = self.port
        ident = next(self.ids)
        if action == "post":
            self.kinds[ident] = "post"
            port.post(key=("post", ident), context=("post", ident), nbytes=ident % 1000)
        elif action == "recv":
            i = rng.randrange(len(self.channels))
            buf = bytearray([CANARY]) * RECV_SIZE
            op = port.recv(self.channels[i][1], buf, context=("recv", ident))
            self._track(ident, "recv", op)
            # Only the port keeps buf now (op.buffer aside): it must stay
            # pinned and alive until the completion is dequeued.
        elif action == "send":
            i = rng.randrange(len(self.channels))
            # A fresh object with no other reference: an early release would
            # put freed (and reused) memory on the wire, caught by the CRC.
            op = port.send(self.channels[i][0], bytearray(record(ident)), context=("send", ident))
            self._track(ident, "send", op)
        elif action == "read":
            slot = rng.randrange(FILE_SLOTS)
            op = port.read(self.rfile, bytearray(RECORD), offset=slot * RECORD,
                           context=("read", ident, slot))
            self._track(ident, "read", op)
        elif action == "write":
            offset = next(self.wslots) * RECORD
            op = port.write(self.wfile, bytearray(record(ident)), offset=offset,
                            context=("write", ident, offset))
            self._track(ident, "write", op)
        else:
            raise AssertionError(action)

    def cancel_one(self, rng: random.Random) -> None:
        if not self.recent:
            return
        try:
            op = self.recent[rng.randrange(len(self.recent))]
        except IndexError:
            return
        self.cancel_requested.add(op.context[1])  # before: the completion may race ahead
        op.cancel()

    # -- validation of one dequeued completion --

    def check(self, c) -> None:
        ctx = c.context
        kind, ident = ctx[0], ctx[1]
        self.dequeued.append((ident, c))
        err = c.error
        bad = None
        if not c.done:
            bad = "dequeued but not done"
        elif c.op != kind:
            bad = f"op {c.op!r} for a {kind}"
        elif kind == "post":
            if c.key != ("post", ident) or c.nbytes != ident % 1000 or err is not None:
                bad = f"post came back as key={c.key!r} nbytes={c.nbytes} error={err!r}"
        elif err is not None:
            if not (is_cancel_error(err) and ident in self.cancel_requested):
                bad = f"unexpected error {err!r} (cancel requested: {ident in self.cancel_requested})"
            elif kind == "send":
                self.sent_failed.append(ident)
        elif kind == "recv":
            buf = c.buffer
            if c.nbytes != RECORD:
                bad = f"recv of {c.nbytes} bytes on a message channel"
            else:
                try:
                    self.received.append(check_record(bytes(buf[:RECORD])))
                except AssertionError as exc:
                    bad = f"recv: {exc}"
                if any(b != CANARY for b in buf[RECORD:]):
                    bad = f"recv wrote past nbytes: {bytes(buf[RECORD:])!r}"
        elif kind == "send":
            if c.nbytes != RECORD:
                bad = f"send of {c.nbytes} bytes on a message channel"
            else:
                self.sent_ok.append(ident)
        elif kind == "read":
            if c.nbytes != RECORD or bytes(c.buffer) != record(FILE_BASE + ctx[2]):
                bad = f"read at slot {ctx[2]}: {c.nbytes} bytes {bytes(c.buffer[:16])!r}..."
        elif kind == "write":
            if c.nbytes != RECORD:
                bad = f"write of {c.nbytes} bytes"
            else:
                self.written.append((ident, ctx[2]))
        if bad:
            self.errors.append(f"{kind} #{ident}: {bad}")


ACTIONS = ["recv"] * 20 + ["send"] * 20 + ["post"] * 15 + ["read"] * 7 + ["write"] * 7 + \
          ["cancel"] * 10 + ["get"] * 21


def test_sixteen_threads_exact_accounting(backend, tmp_path, request):
    """THREADS threads do random mixes of recv/send (message channels),
    file reads and writes, posts, cancels (of their own and of others'
    operations) and get_many on one port for SECONDS. Then: every operation
    and every post completed exactly once, as the very object submitted;
    every record received is intact and was sent exactly once (and every
    send that completed arrived); every read and write moved the right
    bytes; no recv wrote past nbytes; no thread hung."""
    port = fastiocp.CompletionPort(backend=backend)
    s = Stress(port, tmp_path, nchannels=8)
    stop = threading.Event()
    counts = collections.Counter()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                action = rng.choice(ACTIONS)
                if action in ("recv", "send", "read", "write", "post") and port.pending > MAX_PENDING:
                    action = "get"
                counts[action] += 1
                if action == "cancel":
                    s.cancel_one(rng)
                elif action == "get":
                    for c in port.get_many(rng.randint(1, 64), timeout=rng.choice([0, 0.001, 0.005])):
                        s.check(c)
                else:
                    s.submit(rng, action)
        except BaseException as exc:  # noqa: BLE001 - reported below
            s.errors.append(f"thread {seed} died: {exc!r}")

    seed0 = random.randrange(1 << 30)
    threads = [threading.Thread(target=worker, args=(seed0 + i,), name=f"stress-{i}")
               for i in range(THREADS)]
    try:
        with hard_watchdog(SECONDS + 120, request.config):
            for t in threads:
                t.start()
            time.sleep(SECONDS)
            stop.set()
            join_all(threads, 30, "stress workers")
            # Cancel what is still in flight (receives without a sender,
            # sends into a full channel), then take every completion owed.
            for op in list(s.ops.values()):
                if not op.done:
                    s.cancel_requested.add(op.context[1])
                    op.cancel()
            deadline = time.monotonic() + 30
            while port.pending and time.monotonic() < deadline:
                for c in port.get_many(256, timeout=0.2):
                    s.check(c)
            assert port.pending == 0, f"{port.pending} completions never came (seed {seed0})"
            assert port.get(timeout=0.05) is None
            leftovers = [check_record(m) for _tx, rx in s.channels for m in drain_socket(rx)]
    finally:
        port.close()
        s.close()

    assert not s.errors, f"{len(s.errors)} faults (seed {seed0}), first: {s.errors[:10]}"
    # Exactly once, as the object submitted.
    seen = collections.Counter(ident for ident, _c in s.dequeued)
    assert set(seen) == set(s.kinds), (f"lost: {sorted(set(s.kinds) - set(seen))[:10]}, "
                                       f"unknown: {sorted(set(seen) - set(s.kinds))[:10]}")
    dupes = [i for i, n in seen.items() if n != 1]
    assert not dupes, f"completed more than once: {dupes[:10]}"
    assert all(c is s.ops[ident] for ident, c in s.dequeued if ident in s.ops)
    # Data: each record once, only from sends that completed, and (on a
    # reliable channel) every completed send arrived.
    got = collections.Counter(s.received + leftovers)
    assert not [i for i, n in got.items() if n != 1], "a record arrived twice"
    assert set(got) <= set(s.sent_ok), f"records from failed or unknown sends: {sorted(set(got) - set(s.sent_ok))[:10]}"
    if s.reliable:
        assert set(got) == set(s.sent_ok), f"sent but never arrived: {sorted(set(s.sent_ok) - set(got))[:10]}"
    # Writes landed intact.
    data = s.wpath.read_bytes()
    for ident, offset in s.written:
        assert data[offset:offset + RECORD] == record(ident), f"write #{ident} at {offset} corrupt"
    # Every buffer was released: a bytearray can be resized again.
    for op in list(s.ops.values())[:2000]:
        if isinstance(op.buffer, bytearray):
            op.buffer.append(0)
    total = sum(counts.values())
    assert counts["get"] and counts["cancel"] and total > 1000 * SECONDS / (10 if UNDER_WINE else 1)
    print(f"\n{backend}: {total} actions {dict(counts)}; {len(s.dequeued)} completions, "
          f"{len(got)} records, {len(s.cancel_requested)} cancels requested")


def test_close_while_threads_in_get_many_and_submit(backend, request):
    """ROUNDS times: eight threads blocked in or looping on get_many(), six
    submitting receives, sends and posts, two cancelling, and the main thread
    closes the port at a random moment. Every thread must end (getters and
    submitters with PortClosedError, nothing else), every operation must be
    done after close(), none dequeued twice, and every buffer released."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    for rnd in range(ROUNDS):
        port = fastiocp.CompletionPort(backend=backend)
        pairs = [message_pair()[:2] for _ in range(4)]
        for tx, rx in pairs:
            port.register(tx)
            port.register(rx)
        errors: list[str] = []
        ops: list = []
        dequeued: list = []
        buffers: list[bytearray] = []
        started = threading.Barrier(17)

        def getter(i: int) -> None:
            started.wait()
            try:
                while True:
                    timeout = None if i % 2 else 0.01
                    dequeued.extend(port.get_many(32, timeout=timeout))
            except fastiocp.PortClosedError:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(f"getter: {exc!r}")

        def submitter(i: int) -> None:
            r = random.Random(seed + i)
            started.wait()
            try:
                while True:
                    tx, rx = pairs[r.randrange(len(pairs))]
                    k = r.randrange(3)
                    if k == 0:
                        buf = bytearray(RECORD)
                        buffers.append(buf)
                        ops.append(port.recv(rx, buf))
                    elif k == 1:
                        ops.append(port.send(tx, record(r.randrange(1 << 30))))
                    else:
                        port.post(context=i)
                    if len(ops) > 2000:
                        time.sleep(0.001)
            except fastiocp.PortClosedError:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(f"submitter: {exc!r}")

        def canceller(i: int) -> None:
            r = random.Random(seed - i)
            started.wait()
            try:
                while not port.closed:
                    if ops:
                        ops[r.randrange(len(ops))].cancel()
                    else:
                        time.sleep(0.0005)
            except fastiocp.PortClosedError:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(f"canceller: {exc!r}")

        threads = [threading.Thread(target=getter, args=(i,)) for i in range(8)]
        threads += [threading.Thread(target=submitter, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=canceller, args=(i,)) for i in range(2)]
        with hard_watchdog(120, request.config):
            for t in threads:
                t.start()
            started.wait()
            time.sleep(rng.uniform(0.0, 0.05))
            port.close()
            join_all(threads, 30, f"round {rnd} (seed {seed})")
        assert not errors, f"round {rnd} (seed {seed}): {errors[:5]}"
        assert port.closed and port.pending == 0
        not_done = [op for op in ops if not op.done]
        assert not not_done, f"round {rnd}: {len(not_done)} operations not done after close()"
        ids = [id(c) for c in dequeued]
        assert len(ids) == len(set(ids)), f"round {rnd}: a completion was dequeued twice"
        for buf in buffers:
            buf.append(1)  # BufferError if still pinned
        for tx, rx in pairs:
            tx.close()
            rx.close()


@pytest.mark.parametrize("limit", [1, 2])
def test_concurrency_limit_under_churn(backend, limit, request):
    """CompletionPort(concurrency=N) with eight getter threads that hold
    what they dequeue for a moment, some of them exiting while they hold a
    slot (and replaced), while posts, receives and sends flow: never more
    than N threads hold packets at once, every packet arrives exactly once,
    no slot is lost (the port drains to zero)."""
    if backend == "iocp":
        pytest.skip("IOCP limits running threads, not holders (tests/backends/test_iocp.py)")
    port = fastiocp.CompletionPort(backend=backend, concurrency=limit)
    pairs = [message_pair()[:2] for _ in range(4)]
    for a, b in pairs:
        port.register(a)
        port.register(b)
    lock = threading.Lock()
    state = {"holding": 0, "max": 0}
    got: list = []
    errors: list = []
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def getter(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                cs = port.get_many(rng.randint(1, 8), timeout=0.02)
                if cs:
                    with lock:
                        state["holding"] += 1
                        state["max"] = max(state["max"], state["holding"])
                    got.extend(c.context for c in cs)
                    time.sleep(rng.choice([0, 0, 0.0005]))
                    with lock:
                        state["holding"] -= 1
                if rng.random() < 0.02:
                    return  # exits holding its slot: the thread's exit gives it back
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    def top_up() -> None:
        for _ in range(8 - sum(t.is_alive() for t in threads)):
            t = threading.Thread(target=getter, args=(len(threads),))
            threads.append(t)
            t.start()

    k = 0
    with hard_watchdog(SECONDS + 120, request.config):
        top_up()
        t_end = time.monotonic() + SECONDS / 2
        while time.monotonic() < t_end:
            for _ in range(50):
                a, b = pairs[k % len(pairs)]
                port.post(context=("p", k))
                port.recv(b, bytearray(RECV_SIZE), context=("r", k))
                port.send(a, record(k), context=("s", k))
                k += 1
            top_up()
            while port.pending > MAX_PENDING:
                time.sleep(0.001)
        deadline = time.monotonic() + 30
        while port.pending and time.monotonic() < deadline:
            top_up()
            time.sleep(0.02)
        stop.set()
        join_all(threads, 30, "getters")
    pending = port.pending
    port.close()
    for a, b in pairs:
        a.close()
        b.close()
    assert not errors, errors[:5]
    assert pending == 0, f"{pending} packets never handed out (a slot lost?)"
    assert state["max"] <= limit, f"{state['max']} threads held packets at once (limit {limit})"
    assert len(got) == len(set(got)) == 3 * k
