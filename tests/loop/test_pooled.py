"""The loop's pooled multishot receives (issue 18): a plain Protocol's
transport receives through one multishot receive into the loop's buffer
pool. Every byte arrives once and in order, pausing holds data until
resume_reading() (then end of stream after it), an empty pool loses
nothing, and every buffer goes back to the pool."""
from __future__ import annotations

import asyncio
import gc

import pytest

import fastiocp.loop._proactor as proactor_mod
from loop_util import loop, run  # noqa: F401  (the fixture)


@pytest.fixture
def pooled(loop, monkeypatch):  # noqa: F811
    loop._proactor.pooled = True
    return loop


class _Collect(asyncio.Protocol):
    """Collects what it receives; pauses reading after every data_received
    when pause_for is set, resuming pause_for seconds later."""

    def __init__(self, loop, pause_for=None):
        self.loop = loop
        self.data = bytearray()
        self.events = []
        self.pause_for = pause_for
        self.done = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        assert type(data) is bytes
        assert not self.events or self.events[-1] != "eof", "data after end of stream"
        self.data += data
        self.events.append("data")
        if self.pause_for is not None:
            self.transport.pause_reading()
            self.loop.call_later(self.pause_for, self.transport.resume_reading)

    def eof_received(self):
        self.events.append("eof")
        if not self.done.done():
            self.done.set_result(bytes(self.data))

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(bytes(self.data))


def _serve_and_send(loop, make_protocol, chunks, delay=0.0):  # noqa: F811
    """Starts a server of make_protocol() on loop, connects a client that
    sends chunks (with delay between them) and closes its side; returns
    the protocol once it saw the end of the stream."""
    protos = []

    def factory():
        protos.append(make_protocol())
        return protos[-1]

    async def main():
        server = await loop.create_server(factory, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if delay:
                await asyncio.sleep(delay)
        writer.write_eof()
        while not protos:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(protos[0].done, 10)
        writer.close()
        server.close()
        await server.wait_closed()
        return protos[0]

    return run(loop, main(), timeout=30)


def _pool_is_back(loop):  # noqa: F811
    pool = loop._proactor._pool
    assert pool is not None, "the transport did not receive through the pool"
    gc.collect()
    assert pool.in_use == 0


def test_every_byte_once_in_order(pooled):
    chunks = [b"%05d|" % i * (1 + i % 50) for i in range(300)]
    proto = _serve_and_send(pooled, lambda: _Collect(pooled), chunks)
    assert bytes(proto.data) == b"".join(chunks)
    assert proto.events[-1] == "eof"
    _pool_is_back(pooled)


def test_pausing_holds_data_until_resume_then_end_of_stream(pooled):
    chunks = [b"chunk%03d;" % i for i in range(60)]
    proto = _serve_and_send(pooled, lambda: _Collect(pooled, pause_for=0.002), chunks, delay=0.001)
    assert bytes(proto.data) == b"".join(chunks)
    assert proto.events.count("eof") == 1 and proto.events[-1] == "eof"
    _pool_is_back(pooled)


def test_an_empty_pool_loses_nothing(pooled, monkeypatch):
    # One buffer of 7 bytes: the multishot receive ends with ENOBUFS again
    # and again and is started again; every byte still arrives, in order.
    monkeypatch.setattr(proactor_mod, "POOL_BUFFER_SIZE", 7)
    monkeypatch.setattr(proactor_mod, "POOL_BUFFERS", 1)
    chunks = [bytes([65 + i % 26]) * 100 for i in range(100)]
    proto = _serve_and_send(pooled, lambda: _Collect(pooled), chunks)
    assert bytes(proto.data) == b"".join(chunks)
    _pool_is_back(pooled)


def test_switching_to_a_buffered_protocol_mid_stream(pooled):
    class Buffered(asyncio.BufferedProtocol):
        def __init__(self, first):
            self.first = first
            self.buf = bytearray(64)

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, n):
            self.first.data += self.buf[:n]

        def eof_received(self):
            self.first.eof_received()

    class Switching(_Collect):
        def data_received(self, data):
            super().data_received(data)
            if len(self.data) >= 1000 and not isinstance(self.transport.get_protocol(), Buffered):
                self.transport.set_protocol(Buffered(self))

    chunks = [b"%04d," % i for i in range(1000)]
    proto = _serve_and_send(pooled, lambda: Switching(pooled), chunks, delay=0.0005)
    assert bytes(proto.data) == b"".join(chunks)
    _pool_is_back(pooled)


def test_closing_with_the_receive_pending_gives_every_buffer_back(pooled):
    async def main():
        closed = pooled.create_future()

        class Closer(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                self.transport.close()

            def connection_lost(self, exc):
                closed.set_result(exc)

        server = await pooled.create_server(Closer, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"x" * 100_000)
        assert await asyncio.wait_for(closed, 10) is None
        writer.close()
        server.close()
        await server.wait_closed()

    run(pooled, main())
    _pool_is_back(pooled)
