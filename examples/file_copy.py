"""Copy a file with many reads and writes in flight on one completion port.

    python examples/file_copy.py SRC DST [--block 1M] [--depth 16] [--direct]

The source is cut into blocks; `depth` of them are in flight at once. Each
block is read at its offset, then written at the same offset in the
destination, and its buffer goes on to the next unread block. Reads and
writes therefore overlap, and finish in any order: offsets, not the order of
completions, keep the copy right. Short reads and writes are continued
where they stopped. With --direct both files bypass the page cache
(O_DIRECT / FILE_FLAG_NO_BUFFERING): buffers are page-aligned, every
transfer is a whole number of blocks, and the destination is cut to the
source's size at the end.

Only fastiocp's public API is used: fastiocp.open, CompletionPort
(register, read, write, get_many, batch).
"""
from __future__ import annotations

import argparse
import mmap
import sys
import time
from typing import Optional

import fastiocp

ALIGN = 4096


class Block:
    """One buffer on its way through read -> write -> next read."""

    __slots__ = ("buf", "offset", "length", "done")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.offset = 0      # where this block sits in both files
        self.length = 0      # bytes to move: the block size, less at the end
        self.done = 0        # bytes moved so far in the current step


def _buffers(block: int, depth: int) -> list:
    """depth buffers of block bytes, page-aligned (mmap memory is)."""
    area = mmap.mmap(-1, block * depth)
    view = memoryview(area)
    return [view[i * block:(i + 1) * block] for i in range(depth)]


def copy(src: str, dst: str, block: int = 1 << 20, depth: int = 16, direct: bool = False) -> int:
    """Copies src to dst; returns the number of bytes copied."""
    if block <= 0 or depth <= 0:
        raise ValueError("block and depth must be > 0")
    if direct and block % ALIGN:
        raise ValueError(f"--direct needs a block size that is a multiple of {ALIGN}")
    with fastiocp.open(src, "rb", direct=direct) as fin, \
            fastiocp.open(dst, "w+b", direct=direct) as fout, \
            fastiocp.CompletionPort() as port:
        size = fin.size()
        port.register(fin, key="src")
        port.register(fout, key="dst")
        next_offset = 0
        inflight = 0

        def start(b: Block) -> None:
            """Gives b the next unread block, if any, and reads it."""
            nonlocal next_offset, inflight
            if next_offset >= size:
                return
            b.offset, b.done = next_offset, 0
            b.length = min(block, size - next_offset)
            next_offset += b.length
            _read(b)
            inflight += 1

        def _read(b: Block) -> None:
            want = b.length - b.done
            if direct:  # whole aligned blocks; the end of file cuts the read short
                want = -(-want // ALIGN) * ALIGN
            port.read(fin, b.buf[b.done:b.done + want], offset=b.offset + b.done, context=b)

        def _write(b: Block) -> None:
            end = b.length
            if direct:  # whole blocks; the extra bytes are cut off by truncate()
                end = -(-end // ALIGN) * ALIGN
            port.write(fout, b.buf[b.done:end], offset=b.offset + b.done, context=b)

        with port.batch():
            for buf in _buffers(block, depth):
                start(Block(buf))
        while inflight:
            completions = port.get_many(depth)
            with port.batch():
                for c in completions:
                    b = c.context
                    c.result()  # raises the operation's OSError, if any
                    if c.op == "read":
                        if c.nbytes == 0:
                            raise OSError(f"{src} shrank while being copied")
                        b.done += c.nbytes
                        if b.done < b.length:
                            _read(b)  # a short read: read the rest
                        else:
                            b.done = 0
                            _write(b)
                    else:
                        b.done += c.nbytes
                        if b.done < b.length:
                            _write(b)  # a short write: write the rest
                        else:
                            inflight -= 1
                            start(b)
        if direct:
            fout.truncate(size)
    return size


def _size(text: str) -> int:
    """4096, 64k, 1M, 1MiB, 2g ..."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    for suffix in ("ib", "b"):
        if text.endswith(suffix) and len(text) > len(suffix) and text[-len(suffix) - 1] in units:
            text = text[:-len(suffix)]
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--block", type=_size, default=1 << 20, help="block size (default 1M)")
    parser.add_argument("--depth", type=int, default=16, help="blocks in flight (default 16)")
    parser.add_argument("--direct", action="store_true", help="bypass the page cache")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    n = copy(args.src, args.dst, args.block, args.depth, args.direct)
    dt = time.perf_counter() - t0
    print(f"copied {n:,} bytes in {dt:.3f} s ({n / (1 << 20) / max(dt, 1e-9):,.0f} MiB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
