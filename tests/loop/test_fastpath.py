"""The loop's C fast path (csrc/loop/transport.c) on its own: _SocketWrite
sends whole bytes at once or hands the case to the transport's Python
methods; _ReadLoop leaves every case but the common one to
transport._loop_reading. (The loop's tests and CPython's asyncio suite
drive both through real transports.)"""
from __future__ import annotations

import array
import socket
import sys

import pytest

import fastiocp
from fastiocp._fastiocp import _ReadLoop, _SocketWrite

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the C write() is the POSIX transports'")


class FakeTransport:
    """The attributes _SocketWrite reads, and its two fallbacks recorded."""

    write = _SocketWrite()

    def __init__(self, sock):
        self._sock = sock
        self._buffer = None
        self._conn_lost = 0
        self._eof_written = False
        self._empty_waiter = None
        self._write_fut = None
        self.python: list = []
        self.queued: list = []

    def _write_python(self, data):
        self.python.append(data)

    def _write_queued(self, data):
        self.queued.append(bytes(data))


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_the_descriptor_binds_like_a_method(pair):
    assert isinstance(FakeTransport.__dict__["write"], _SocketWrite)
    assert FakeTransport.write is FakeTransport.__dict__["write"]
    t = FakeTransport(pair[0])
    with pytest.raises(TypeError):
        t.write()
    with pytest.raises(TypeError):
        t.write(b"x", flags=1)


@posix_only
@pytest.mark.parametrize("data", [b"hello", bytearray(b"hello"), memoryview(b"xhello")[1:]],
                         ids=["bytes", "bytearray", "memoryview"])
def test_whole_bytes_are_sent_at_once(pair, data):
    a, b = pair
    t = FakeTransport(a)
    t.write(data)
    assert b.recv(100) == b"hello"
    assert t.python == [] and t.queued == []


@pytest.mark.parametrize("setup", ["memoryview", "empty", "queued", "conn_lost", "eof", "waiter", "write_fut",
                                   "no_socket"])
def test_every_other_case_goes_to_python(pair, setup):
    a, b = pair
    t = FakeTransport(a)
    data = b"data"
    if setup == "memoryview":
        data = memoryview(b"d-a-t-a")[::2]  # not contiguous
    elif setup == "empty":
        data = b""
    elif setup == "queued":
        t._buffer = bytearray(b"earlier")
    elif setup == "conn_lost":
        t._conn_lost = 1
    elif setup == "eof":
        t._eof_written = True
    elif setup == "waiter":
        t._empty_waiter = object()
    elif setup == "write_fut":
        t._write_fut = object()
    else:
        t._sock = None
    t.write(data)
    assert len(t.python) == 1 and t.python[0] is data and t.queued == []
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(100)  # nothing was sent by C


@posix_only
@pytest.mark.parametrize("wide", [False, True], ids=["bytes", "memoryview_of_ints"])
def test_a_short_send_queues_exactly_the_rest(pair, wide):
    """What the kernel does not take goes to _write_queued(), counted in
    bytes (a memoryview of 4-byte items too)."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = memoryview(array.array("i", range(1 << 18))) if wide else bytes(range(256)) * 4096  # 1 MiB
    raw = bytes(data)
    t = FakeTransport(a)
    t.write(data)
    assert t.python == [] and len(t.queued) == 1
    rest = t.queued[0]
    assert 0 < len(rest) < len(raw) and raw.endswith(rest)
    got = bytearray()
    b.setblocking(False)
    while True:
        try:
            chunk = b.recv(1 << 20)
        except BlockingIOError:
            break
        got += chunk
    assert bytes(got) + rest == raw


@posix_only
def test_a_failed_send_goes_to_python(pair):
    a, b = pair
    b.close()  # EPIPE on send
    t = FakeTransport(a)
    t.write(b"data")
    assert t.python == [b"data"]


def test_read_loop_leaves_other_cases_to_the_transport(pair):
    a, b = pair
    calls = []

    class T:
        _closing = _paused = False
        _protocol = None
        _read_fut = None
        _buffer_owner = None

        def _loop_reading(self, c):
            calls.append(c)

    with fastiocp.CompletionPort() as port:
        t = T()
        reader = _ReadLoop(t, port)
        reader("not a completion")
        assert calls == ["not a completion"]
        t._data = bytearray(16)
        port.register(a)
        op = port.recv(a, t._data, context=reader)
        b.send(b"abc")
        c = port.get(timeout=5)
        assert c is op and c.nbytes == 3
        reader(c)  # not the transport's pending receive (_read_fut is None)
        assert calls[-1] is c
        t._read_fut = c
        t._closing = True
        reader(c)  # closing
        assert calls[-1] is c and len(calls) == 3
    with pytest.raises(RuntimeError):
        _ReadLoop.__new__(_ReadLoop)(None)
    with pytest.raises(TypeError):
        _ReadLoop(T(), "not a port")


@posix_only
def test_a_type_changed_after_its_first_check_is_checked_again(pair):
    """The C write path reads a transport's attributes from its __dict__
    only when its type defines none of them as a data descriptor; that
    verdict is kept per type and must not outlive a change to the type."""
    a, b = pair

    class Transport(FakeTransport):
        pass

    first = Transport(a)
    first.write(b"one")  # the type checked: fit
    assert b.recv(100) == b"one" and first.python == []

    # Now _buffer is a property saying something is queued: write() must
    # see it (and leave the data to Python), not the dict's None.
    Transport._buffer = property(lambda self: bytearray(b"queued"), lambda self, v: None)
    second = Transport(a)
    second.__dict__["_buffer"] = None
    second.write(b"two")
    assert second.python == [b"two"]
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(100)


class SlottedTransport(FakeTransport):
    """FakeTransport with the attributes _SocketWrite reads as __slots__,
    as the loop's SocketTransport has them: the C path reads them at their
    offsets."""

    __slots__ = ("_sock", "_buffer", "_conn_lost", "_eof_written", "_empty_waiter", "_write_fut")


def test_the_socket_transport_keeps_the_fast_path_s_attributes_in_slots():
    import types

    from fastiocp.loop._transports import SocketTransport
    for name in ("_read_fut", "_closing", "_paused", "_protocol", "_buffer", "_write_fut", "_sock",
                 "_reader", "_ring_writer", "_held_chunks", "_buffer_owner"):
        assert isinstance(SocketTransport.__dict__[name], types.MemberDescriptorType), name


@posix_only
def test_slots_are_read_and_written_where_python_sees_them(pair):
    a, b = pair
    t = SlottedTransport(a)
    assert "_buffer" not in t.__dict__
    t.write(b"one")
    assert b.recv(100) == b"one" and t.python == []
    t._buffer = bytearray(b"queued")  # something queued: Python's write() decides
    t.write(b"two")
    assert t.python == [b"two"]
    t._buffer = None
    t._conn_lost = 1
    t.write(b"three")
    assert t.python == [b"two", b"three"]
    del t._conn_lost  # an empty slot reads as getattr() does: AttributeError
    with pytest.raises(AttributeError):
        t.write(b"four")
