"""The in-process contenders of ``python -m fastiocp bench``: file reads and
thread hand-off. The runner starts each in a fresh interpreter:

    python -m fastiocp.bench.tasks file KIND PATH DIRECT DURATION [DEPTH]
    python -m fastiocp.bench.tasks handoff KIND N

and reads one JSON object from its stdout. Every contender of a group does
the same work: the same random 4 KiB-aligned offsets (fixed seed), or the
same N items handed from one thread to another.
"""
from __future__ import annotations

import itertools
import json
import mmap
import os
import random
import sys
import threading
import time
from typing import Any, Callable, Dict, List

BLOCK = 4096
NOFFSETS = 1 << 16


def offsets(path: str, seed: int = 5) -> List[int]:
    nblocks = os.path.getsize(path) // BLOCK
    rng = random.Random(seed)
    return [rng.randrange(nblocks) * BLOCK for _ in range(NOFFSETS)]


def aligned_buffers(count: int) -> List[memoryview]:
    """count page-aligned 4 KiB buffers (O_DIRECT needs aligned memory)."""
    mm = mmap.mmap(-1, BLOCK * count)
    view = memoryview(mm)
    return [view[i * BLOCK:(i + 1) * BLOCK] for i in range(count)]


def _timed(run: Callable[[float], int], duration: float) -> Dict[str, Any]:
    """run(deadline) reads until deadline and returns the count. A short
    warm-up pass first, then the measured one."""
    run(time.perf_counter() + min(0.2, duration / 5))
    cpu0, t0 = time.process_time(), time.perf_counter()
    n = run(t0 + duration)
    t1, cpu1 = time.perf_counter(), time.process_time()
    return {"ops": n, "seconds": t1 - t0, "ops_per_s": n / (t1 - t0), "cpu_s": cpu1 - cpu0}


def file_fastiocp(path: str, direct: bool, duration: float, depth: int) -> Dict[str, Any]:
    import fastiocp

    offs = offsets(path)
    mask = NOFFSETS - 1
    bufs = aligned_buffers(depth) if direct else [bytearray(BLOCK) for _ in range(depth)]
    f = fastiocp.open(path, "rb", direct=direct)
    port = fastiocp.CompletionPort()
    port.register(f)
    read, get_many, resubmit = port.read, port.get_many, port.resubmit
    clock = time.perf_counter
    state = {"i": 0, "bad": 0}

    # Dequeued completions go back with resubmit(): one call per batch, no
    # Python call per read (half the Python time of a read() per completion).
    # From the page cache the CPU is the limit: one system call submits a
    # whole batch of reads, which complete during that call. From the disk
    # the device is the limit: each read goes back to it at once, unbatched.
    # This machine's virtual disk completes a whole batch at once and idled
    # while Python handled it: 0.75x fio with a batched resubmit, 0.9-1.0x
    # unbatched.
    def run(deadline: float) -> int:
        i = state["i"]
        done = 0
        with port.batch():
            for b in bufs:
                read(f, b, offs[i])
                i = (i + 1) & mask
        inflight = depth
        while True:
            cs = get_many(depth)
            n = len(cs)
            inflight -= n
            for c in cs:
                if c.nbytes != BLOCK:
                    state["bad"] += 1
            done += n
            if clock() >= deadline:
                break
            if i + n > NOFFSETS:
                i = 0
            if direct:
                for c in cs:
                    resubmit((c,), (offs[i],))
                    i += 1
            else:
                resubmit(cs, offs[i:i + n])
                i += n
            inflight += n
        while inflight:  # drain, uncounted
            inflight -= len(get_many(depth))
        state["i"] = i
        return done

    out = _timed(run, duration)
    port.close()
    f.close()
    out["bad_reads"] = state["bad"]
    return out


def _read_offsets(path: str, direct: bool, duration: float, chunk: int,
                  read_part: Callable[[int, List[int]], None]) -> Dict[str, Any]:
    """The loop of the contenders that read through a descriptor: opens
    path (O_DIRECT if direct), and times read_part(fd, part) over the
    shared offsets, chunk at a time, from where the warm-up stopped and
    round again from the first."""
    offs = offsets(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    clock = time.perf_counter
    state = {"k": 0}

    def run(deadline: float) -> int:
        done, k = 0, state["k"]
        while True:
            part = offs[k:k + chunk]
            k = (k + chunk) % NOFFSETS
            read_part(fd, part)
            done += len(part)
            if clock() >= deadline:
                state["k"] = k
                return done

    try:
        return _timed(run, duration)
    finally:
        os.close(fd)


def file_pread(path: str, direct: bool, duration: float, depth: int) -> Dict[str, Any]:
    pread, preadv = os.pread, os.preadv
    buf = aligned_buffers(1)

    def read_part(fd: int, part: List[int]) -> None:
        if direct:
            for off in part:
                preadv(fd, buf, off)
        else:
            for off in part:
                pread(fd, BLOCK, off)

    return _read_offsets(path, direct, duration, 512, read_part)


def file_threadpool(path: str, direct: bool, duration: float, depth: int) -> Dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def read_direct(fd: int, off: int) -> int:
        b = getattr(local, "buf", None)
        if b is None:
            b = local.buf = aligned_buffers(1)
        return os.preadv(fd, b, off)

    def read_cached(fd: int, off: int) -> bytes:
        return os.pread(fd, BLOCK, off)

    fn = read_direct if direct else read_cached

    with ThreadPoolExecutor(8) as ex:
        def read_part(fd: int, part: List[int]) -> None:
            for _ in ex.map(fn, itertools.repeat(fd, len(part)), part):
                pass

        return _read_offsets(path, direct, duration, 1024, read_part)


FILE_KINDS = {"fastiocp": file_fastiocp, "pread": file_pread, "threadpool": file_threadpool}


# ---- Hand-off between two threads -------------------------------------------

def _pair(produce: Callable[[], None], consume: Callable[[], None]) -> Dict[str, Any]:
    t = threading.Thread(target=produce)
    cpu0, t0 = time.process_time(), time.perf_counter()
    t.start()
    consume()
    t.join()
    t1, cpu1 = time.perf_counter(), time.process_time()
    return {"seconds": t1 - t0, "cpu_s": cpu1 - cpu0}


def handoff_fastiocp(n: int) -> Dict[str, Any]:
    import fastiocp

    port = fastiocp.CompletionPort()
    post, get_many = port.post, port.get_many

    def produce() -> None:
        for i in range(n):
            post(None, i)

    def consume() -> None:
        got = 0
        while got < n:
            got += len(get_many(256))

    try:
        return _pair(produce, consume)
    finally:
        port.close()


def _queue_handoff(q: Any, n: int) -> Dict[str, Any]:
    put, get = q.put, q.get

    def produce() -> None:
        for i in range(n):
            put(i)

    def consume() -> None:
        for _ in range(n):
            get()

    return _pair(produce, consume)


def handoff_simplequeue(n: int) -> Dict[str, Any]:
    import queue

    return _queue_handoff(queue.SimpleQueue(), n)


def handoff_queue(n: int) -> Dict[str, Any]:
    import queue

    return _queue_handoff(queue.Queue(), n)


def handoff_asyncio(n: int) -> Dict[str, Any]:
    import asyncio

    loop = asyncio.new_event_loop()
    done = loop.create_future()
    count = [0]

    def on_item(i: int) -> None:
        count[0] += 1
        if count[0] == n:
            done.set_result(None)

    def produce() -> None:
        call = loop.call_soon_threadsafe
        for i in range(n):
            call(on_item, i)

    def consume() -> None:
        loop.run_until_complete(done)

    try:
        return _pair(produce, consume)
    finally:
        loop.close()


HANDOFF_KINDS = {"fastiocp": handoff_fastiocp, "simplequeue": handoff_simplequeue,
                 "queue": handoff_queue, "asyncio": handoff_asyncio}


def main(argv: List[str]) -> int:
    if len(argv) >= 5 and argv[0] == "file" and argv[1] in FILE_KINDS:
        depth = int(argv[5]) if len(argv) > 5 else 32
        out = FILE_KINDS[argv[1]](argv[2], argv[3] == "1", float(argv[4]), depth)
    elif len(argv) == 3 and argv[0] == "handoff" and argv[1] in HANDOFF_KINDS:
        n = int(argv[2])
        out = HANDOFF_KINDS[argv[1]](n)
        out["ops"] = n
        out["ops_per_s"] = n / out["seconds"]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
