"""4 KiB random reads at aligned offsets of a file in the page cache:
fastiocp with 32 reads in flight beside an os.pread loop and a
ThreadPoolExecutor(8) running os.pread (the same offsets for each).

    python -m pytest benchmarks/bench_files.py --benchmark-group-by=group

FASTIOCP_BENCH_FILE_MIB sets the file size (default 64 MiB; `python -m
fastiocp bench` uses 256 MiB and adds O_DIRECT reads and fio).
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastiocp

N = int(os.environ.get("FASTIOCP_BENCH_N", "100000"))
MIB = int(os.environ.get("FASTIOCP_BENCH_FILE_MIB", "64"))
BLOCK = 4096
DEPTH = 32


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_files") / "data.bin"
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(MIB):
            f.write(chunk)
    with open(path, "rb") as f:  # into the page cache
        while f.read(1 << 20):
            pass
    rng = random.Random(5)
    offsets = [rng.randrange(MIB * 256) * BLOCK for _ in range(N)]
    yield str(path), offsets
    os.unlink(path)


@pytest.mark.benchmark(group="file-read-4k")
def test_read_fastiocp_qd32(benchmark, backend, data_file):
    path, offsets = data_file
    f = fastiocp.open(path, "rb")
    port = fastiocp.CompletionPort(backend=backend)
    port.register(f)
    read, get_many, batch = port.read, port.get_many, port.batch
    buffers = [bytearray(BLOCK) for _ in range(DEPTH)]

    def run():
        it = iter(offsets)
        inflight = 0
        with batch():
            for buf, off in zip(buffers, it):
                read(f, buf, off)
                inflight += 1
        while inflight:
            cs = get_many(DEPTH)
            inflight -= len(cs)
            with batch():
                for c in cs:
                    assert c.nbytes == BLOCK
                    off = next(it, None)
                    if off is not None:
                        read(f, c.buffer, off)
                        inflight += 1

    benchmark.extra_info["reads"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)
    port.close()
    f.close()


@pytest.mark.benchmark(group="file-read-4k")
def test_read_fastiocp_qd32_resubmit(benchmark, backend, data_file):
    """The same reads, each batch of dequeued completions started again
    with one resubmit() call instead of a read() call per completion."""
    path, offsets = data_file
    f = fastiocp.open(path, "rb")
    port = fastiocp.CompletionPort(backend=backend)
    port.register(f)
    get_many, resubmit = port.get_many, port.resubmit

    def run():
        with port.batch():
            for i in range(DEPTH):
                port.read(f, bytearray(BLOCK), offsets[i])
        inflight, k = DEPTH, DEPTH
        while inflight:
            cs = get_many(DEPTH)
            inflight -= len(cs)
            for c in cs:
                assert c.nbytes == BLOCK
            more = offsets[k : k + len(cs)]
            if more:
                resubmit(cs[: len(more)], more)
                k += len(more)
                inflight += len(more)

    benchmark.extra_info["reads"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)
    port.close()
    f.close()


@pytest.mark.benchmark(group="file-read-4k")
def test_read_pread_loop(benchmark, data_file):
    path, offsets = data_file
    fd = os.open(path, os.O_RDONLY)
    pread = os.pread

    def run():
        for off in offsets:
            pread(fd, BLOCK, off)

    benchmark.extra_info["reads"] = N
    benchmark.pedantic(run, rounds=5, iterations=1)
    os.close(fd)


@pytest.mark.benchmark(group="file-read-4k")
def test_read_threadpool8_pread(benchmark, data_file):
    path, offsets = data_file
    fd = os.open(path, os.O_RDONLY)

    def one(off):
        return os.pread(fd, BLOCK, off)

    with ThreadPoolExecutor(8) as ex:
        def run():
            for _ in ex.map(one, offsets):
                pass

        benchmark.extra_info["reads"] = N
        benchmark.pedantic(run, rounds=3, iterations=1)
    os.close(fd)
