"""Files and pipes: reads and writes at offsets, EOF, short reads, open()."""
from __future__ import annotations

import os
import sys

import pytest

import fastiocp
from conftest import ON_WINDOWS, collect


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return path


def test_read_at_offsets(port, data_file):
    with fastiocp.open(data_file, "rb") as f:
        port.register(f, key="f")
        ops = [port.read(f, bytearray(100), offset=off, context=off) for off in (0, 1000, 4096)]
        got = {c.context: c for c in collect(port, 3)}
        expected = data_file.read_bytes()
        for off in (0, 1000, 4096):
            c = got[off]
            assert c.key == "f" and c.nbytes == 100 and c.error is None
            assert bytes(c.buffer) == expected[off : off + 100]
        assert all(op.done for op in ops)


def test_short_read_at_end_of_file(port, data_file):
    size = data_file.stat().st_size
    with fastiocp.open(data_file) as f:
        port.register(f)
        port.read(f, bytearray(100), offset=size - 10)
        (c,) = collect(port, 1)
        assert c.nbytes == 10 and c.error is None


def test_read_past_end_is_eof(port, data_file):
    size = data_file.stat().st_size
    with fastiocp.open(data_file) as f:
        port.register(f)
        port.read(f, 100, offset=size + 5)
        (c,) = collect(port, 1)
        assert c.nbytes == 0 and c.error is None and c.result() == 0


def test_write_then_read_back(port, tmp_path):
    path = tmp_path / "out.bin"
    with fastiocp.open(path, "w+b") as f:
        port.register(f)
        port.write(f, b"A" * 10, offset=0)
        port.write(f, b"B" * 10, offset=20)
        assert [c.nbytes for c in collect(port, 2)] == [10, 10]
        assert f.size() == 30
    assert path.read_bytes() == b"A" * 10 + b"\0" * 10 + b"B" * 10


def test_large_file_round_trip(port, tmp_path):
    path = tmp_path / "big.bin"
    blob = os.urandom(4 << 20)
    with fastiocp.open(path, "w+b") as f:
        port.register(f)
        chunk = 1 << 18
        for off in range(0, len(blob), chunk):
            port.write(f, memoryview(blob)[off : off + chunk], offset=off)
        assert sum(c.nbytes for c in collect(port, len(blob) // chunk)) == len(blob)
        back = bytearray(len(blob))
        for off in range(0, len(blob), chunk):
            port.read(f, memoryview(back)[off : off + chunk], offset=off)
        assert sum(c.nbytes for c in collect(port, len(blob) // chunk)) == len(blob)
    assert back == blob


def test_open_modes(tmp_path):
    path = tmp_path / "m.bin"
    with pytest.raises(FileNotFoundError):
        fastiocp.open(path, "r")
    with fastiocp.open(path, "w") as f:
        assert f.fileno() >= 0 and not f.closed
    assert path.exists()
    with pytest.raises(FileExistsError):
        fastiocp.open(path, "x")
    for bad in ("rw", "q", "rt", "", "rr"):
        with pytest.raises(ValueError):
            fastiocp.open(path, bad)
    f = fastiocp.open(path, "a")
    f.close()
    f.close()
    assert f.closed
    with pytest.raises(ValueError):
        f.fileno()


def test_write_read_only_file_fails_in_completion(port, data_file):
    with fastiocp.open(data_file, "rb") as f:
        port.register(f)
        op = port.write(f, b"nope", offset=0)
        (c,) = collect(port, 1)
        assert c is op and isinstance(c.error, OSError)
        with pytest.raises(OSError):
            c.result()


def overlapped_pipe():
    """(read end, write end, close function) of a pipe a port can use.

    On Windows, os.pipe() gives C runtime descriptors of an anonymous pipe,
    which is opened for synchronous I/O only: no completion port accepts it
    (tests/backends/test_iocp.py checks that). Windows' pipe for overlapped
    I/O is a named pipe opened with FILE_FLAG_OVERLAPPED at both ends, as
    asyncio's proactor makes them; its ends are HANDLEs."""
    if ON_WINDOWS:
        import _winapi
        from asyncio.windows_utils import pipe

        r, w = pipe(duplex=False, overlapped=(True, True))
        return r, w, _winapi.CloseHandle
    r, w = os.pipe()
    return r, w, os.close


def test_pipe_read_write(port):
    r, w, close = overlapped_pipe()
    try:
        port.register(r, key="r")
        port.register(w, key="w")
        rd = port.read(r, bytearray(32), offset=None)
        wr = port.write(w, b"through a pipe", offset=None)
        got = {c.key: c for c in collect(port, 2)}
        assert got["w"].nbytes == 14
        assert bytes(got["r"].buffer[: got["r"].nbytes]) == b"through a pipe"
        close(w)
        w = -1
        port.read(r, 10, offset=None)
        (eof,) = collect(port, 1)
        assert eof.nbytes == 0 and eof.error is None
    finally:
        close(r)
        if w >= 0:
            close(w)
