"""The socket transports' writes through the io_uring submission queue
(csrc/loop/transport.c, _RingWrite): inside a batch of completions (a
protocol's data_received called by the loop's select()), write() on an
idle transport queues a send that reaches the kernel when the batch ends;
while it is in flight the _RingWrite is the transport's _write_fut, so
the stdlib's write path (queueing, close, write_eof, abort, the buffer
size) sees a write pending. Outside a batch, and on the other backends,
write() sends at once as before. Every test also runs on the backends
without a ring, where the same program must behave the same."""
from __future__ import annotations

import asyncio
import socket

import pytest

from fastiocp._fastiocp import _RingWrite
from loop_util import linux_only, loop, run  # noqa: F401  (the fixture)

pytestmark = linux_only


class _Server(asyncio.Protocol):
    """Answers each data_received with on_data(transport, data), and
    records what it saw of the transport at that moment."""

    def __init__(self, on_data):
        self.on_data = on_data
        self.seen = []
        self.lost = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.seen.append(self.on_data(self.transport, data))

    def connection_lost(self, exc):
        self.lost = exc if exc is not None else "clean"


async def _serve(loop, on_data):
    """A server on loop; returns (protocol, the client socket, blocking)."""
    proto = _Server(on_data)
    server = await loop.create_server(lambda: proto, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.settimeout(10)
    while not hasattr(proto, "transport"):
        await asyncio.sleep(0.001)
    return server, proto, client


async def _recv_until(loop, sock, n):
    got = bytearray()
    while len(got) < n:
        chunk = await loop.run_in_executor(None, sock.recv, 1 << 20)
        if not chunk:
            break
        got += chunk
    return bytes(got)


async def _lost(proto, seconds=3.0):
    """Waits up to seconds for proto's connection_lost()."""
    for _ in range(int(seconds * 100)):
        if proto.lost is not None:
            return
        await asyncio.sleep(0.01)


def _in_flight(transport):
    return type(transport._write_fut) is _RingWrite


def test_a_reply_from_data_received_goes_through_the_ring(loop, backend):
    def reply(t, data):
        t.write(b"re:" + data)
        return (_in_flight(t), t.get_write_buffer_size())

    async def main():
        server, proto, client = await _serve(loop, reply)
        for i in range(20):
            client.sendall(b"ping%d" % i)
            assert await _recv_until(loop, client, len(b"re:ping%d" % i)) == b"re:ping%d" % i
        assert proto.transport._write_fut is None and proto.transport.get_write_buffer_size() == 0
        client.close()
        server.close()
        return proto.seen

    seen = run(loop, main())
    if backend == "io_uring":
        # In flight while the batch ran, and counted as pending.
        assert all(s[0] for s in seen), seen
        assert all(s[1] == len(b"re:ping0") or s[1] == len(b"re:ping10") for s in seen), seen
    else:
        assert not any(s[0] for s in seen), seen


def test_writes_behind_the_ring_send_keep_their_order(loop, backend):
    parts = [b"a" * 10, bytearray(b"b" * 3000), memoryview(b"c" * 70000), b"d"]

    def reply(t, data):
        for p in parts:
            t.write(p)
        return t.get_write_buffer_size()

    async def main():
        server, proto, client = await _serve(loop, reply)
        client.sendall(b"go")
        total = sum(len(p) for p in parts)
        got = await _recv_until(loop, client, total)
        client.close()
        server.close()
        return got, proto.seen

    got, seen = run(loop, main())
    assert got == b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize("end", ["close", "write_eof"])
def test_ending_after_a_ring_write_sends_it_then_the_end(loop, backend, end):
    """close() or write_eof() right after the write: the peer gets the
    data, then the end of the stream; close() then loses the connection
    cleanly."""

    def reply(t, data):
        t.write(b"last words")
        getattr(t, end)()

    async def main():
        server, proto, client = await _serve(loop, reply)
        client.sendall(b"x")
        got = await _recv_until(loop, client, 100)  # to end of stream
        if end == "close":
            await _lost(proto)
        client.close()
        server.close()
        return got, proto.lost

    got, lost = run(loop, main())
    assert got == b"last words"
    assert lost == ("clean" if end == "close" else None)


def test_abort_with_a_ring_write_in_flight(loop, backend):
    def reply(t, data):
        t.write(b"maybe")
        t.abort()
        return t._write_fut

    async def main():
        server, proto, client = await _serve(loop, reply)
        client.sendall(b"x")
        await _lost(proto)
        client.close()
        server.close()
        return proto

    proto = run(loop, main())
    assert proto.lost is not None
    assert proto.seen == [None]


def test_a_write_past_the_high_water_mark_is_sent_at_once(loop, backend):
    big = b"z" * 200_000

    def reply(t, data):
        t.set_write_buffer_limits(high=1024)
        t.write(big)
        return _in_flight(t)

    async def main():
        server, proto, client = await _serve(loop, reply)
        client.sendall(b"x")
        got = await _recv_until(loop, client, len(big))
        client.close()
        server.close()
        return got, proto.seen

    got, seen = run(loop, main())
    assert got == big
    assert seen == [False]


def test_a_short_ring_send_goes_on_with_the_rest(loop, backend):
    """A send the kernel takes only part of (a small send buffer, a peer
    that does not read yet): the rest goes first, then what came after."""
    first = bytes(range(256)) * 200  # 51,200 bytes, under the high-water mark
    second = b"tail"

    def reply(t, data):
        t._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        t.write(first)
        t.write(second)

    async def main():
        server, proto, client = await _serve(loop, reply)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"x")
        await asyncio.sleep(0.2)  # the peer reads only now
        got = await _recv_until(loop, client, len(first) + len(second))
        client.close()
        server.close()
        return got

    assert run(loop, main()) == first + second


def test_a_failed_ring_send_loses_the_connection(loop, backend):
    """The peer is gone with an RST before the batch's sends go out: the
    transport's connection_lost gets the error (as for any failed send)."""

    def reply(t, data):
        for _ in range(50):
            t.write(b"x" * 1000)

    async def main():
        server, proto, client = await _serve(loop, reply)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.sendall(b"go")
        client.close()  # RST
        await _lost(proto)
        server.close()
        return proto.lost

    lost = run(loop, main())
    assert lost is not None


def test_a_write_outside_a_batch_is_sent_at_once(loop, backend):
    """From a ready callback (not a completion): the peer can read it
    before the loop runs again, as with the stdlib's loops."""

    async def main():
        server, proto, client = await _serve(loop, lambda t, d: None)
        proto.transport.write(b"now")
        client.settimeout(5)
        got = client.recv(10)  # blocking, the loop not running
        client.close()
        server.close()
        return got

    assert run(loop, main()) == b"now"


def test_the_ring_writer_is_made_at_the_first_ring_write(loop, backend):
    """An idle transport holds no _RingWrite (issue 16's memory per idle
    connection); the first write inside a batch on io_uring makes it, and
    the transport keeps it for its later writes."""

    def reply(t, data):
        t.write(data)
        return t._ring_writer

    async def main():
        server, proto, client = await _serve(loop, reply)
        idle = proto.transport._ring_writer
        for word in (b"one", b"two"):
            client.sendall(word)
            assert await _recv_until(loop, client, len(word)) == word
        writer = proto.transport._ring_writer
        client.close()
        await _lost(proto)
        server.close()
        return idle, proto.seen, writer, proto.transport._ring_writer

    idle, seen, writer, after = run(loop, main())
    assert idle is None and after is None
    if backend == "io_uring":
        assert isinstance(writer, _RingWrite)
        assert seen == [writer, writer]
    else:
        assert writer is None and seen == [None, None]


def test_the_ring_writer_stands_in_for_a_future(loop, backend):
    """What the stdlib's write path calls on _write_fut."""

    async def main():
        server, proto, client = await _serve(loop, lambda t, d: t.write(d))
        client.sendall(b"x")
        assert await _recv_until(loop, client, 1) == b"x"
        w = proto.transport._ring_writer
        if w is None:  # epoll: never on the ring; the object alone
            w = _RingWrite(proto.transport, loop._proactor.port)
        client.close()
        server.close()
        return w

    w = run(loop, main())
    assert isinstance(w, _RingWrite)
    assert w.done() is True and w.cancelled() is False
    assert w.result() is None
    assert w.cancel() is True and w.cancel("why") is True
    # A completion that is not its send in flight is ignored.
    assert w(object()) is None
    with pytest.raises(TypeError):
        _RingWrite(object(), object())


def test_writes_behind_the_ring_send_queue_in_buffer(loop, backend):
    """A second write while the ring send is in flight joins _buffer (as
    the stdlib's write() queues behind a proactor send); that goes on the
    ring in turn when the first completes."""

    def reply(t, data):
        t.write(b"head:")
        t.write(b"body1,")
        t.write(bytearray(b"body2"))
        return (_in_flight(t), bytes(t._buffer or b""), t.get_write_buffer_size())

    async def main():
        server, proto, client = await _serve(loop, reply)
        out = []
        for _ in range(5):
            client.sendall(b"x")
            out.append(await _recv_until(loop, client, 16))
        client.close()
        server.close()
        return out, proto.seen

    out, seen = run(loop, main())
    assert out == [b"head:body1,body2"] * 5
    if backend == "io_uring":
        assert seen == [(True, b"body1,body2", 16)] * 5


class _PausingServer(_Server):
    def __init__(self, on_data):
        super().__init__(on_data)
        self.flow = []

    def pause_writing(self):
        self.flow.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self):
        self.flow.append(("resume", self.transport.get_write_buffer_size()))


def test_queueing_past_the_high_water_mark_pauses_the_protocol(loop, backend):
    def reply(t, data):
        t.set_write_buffer_limits(high=100, low=10)
        t.write(b"a" * 60)
        t.write(b"b" * 60)  # behind the first: 120 pending > 100
        t.write(b"c" * 10)

    async def main():
        proto = _PausingServer(reply)
        server = await loop.create_server(lambda: proto, "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        client.settimeout(10)
        client.sendall(b"x")
        got = await _recv_until(loop, client, 130)
        for _ in range(100):
            if len(proto.flow) >= 2:
                break
            await asyncio.sleep(0.01)
        client.close()
        server.close()
        return got, proto.flow

    got, flow = run(loop, main())
    assert got == b"a" * 60 + b"b" * 60 + b"c" * 10
    if backend == "io_uring":
        assert flow == [("pause", 120), ("resume", 0)]
    else:
        assert [f[0] for f in flow] in ([], ["pause", "resume"])


def test_closing_the_loop_with_a_ring_send_in_flight(backend):
    """The peer reads nothing, so the send stays in flight: closing the
    loop then neither hangs nor leaks the transport (which its writer and
    the send's Completion refer to)."""
    import gc
    import weakref

    from fastiocp.loop import EventLoop

    lp = EventLoop(backend)
    state = {}

    def reply(t, data):
        t._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        t.write(b"q" * 60000)
        state["transport"] = weakref.ref(t)
        state["in_flight"] = _in_flight(t)

    async def main():
        server, proto, client = await _serve(lp, reply)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"x")
        for _ in range(100):
            if "in_flight" in state:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        server.close()
        return proto, client

    proto, client = lp.run_until_complete(asyncio.wait_for(main(), 15))
    proto.transport.abort()
    lp.run_until_complete(asyncio.sleep(0.05))
    lp.close()
    client.close()
    assert state["in_flight"] == (backend == "io_uring")
    del proto
    gc.collect()
    assert state["transport"]() is None
