"""fastiocp.loop.EventLoop on every backend: each test drives a real
asyncio program through the loop and checks what came out of it."""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import signal
import socket
import sys
import tempfile
import threading
import time

import pytest

from fastiocp.loop import EventLoop

from loop_util import ON_LINUX, linux_only, loop, run  # noqa: F401 (loop: a fixture)

pytestmark = pytest.mark.timeout(30)


def payload(n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(n))


# ---- streams, protocols -------------------------------------------------------

def test_streams_echo_returns_every_byte(loop):
    data = payload(300_000)

    async def handle(reader, writer):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    assert run(loop, main()) == data


class _EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        assert type(data) is bytes  # cpython issue 99941: bytes, not bytearray slices
        self.transport.write(data)

    def eof_received(self):
        self.transport.close()


class _BufferedEcho(asyncio.BufferedProtocol):
    def __init__(self):
        self.buf = bytearray(4096)
        self.calls = 0

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.calls += 1
        self.transport.write(bytes(self.buf[:nbytes]))

    def eof_received(self):
        self.transport.close()


@pytest.mark.parametrize("proto", [_EchoProtocol, _BufferedEcho], ids=["Protocol", "BufferedProtocol"])
def test_protocol_server_echoes_every_byte(loop, proto):
    data = payload(200_000)
    made = []

    def factory():
        p = proto()
        made.append(p)
        return p

    async def main():
        server = await loop.create_server(factory, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        client = socket.create_connection(addr)
        client.setblocking(False)
        await loop.sock_sendall(client, data)
        client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := await loop.sock_recv(client, 65536):
            got += chunk
        client.close()
        server.close()
        await server.wait_closed()
        return bytes(got)

    assert run(loop, main()) == data
    if proto is _BufferedEcho:
        assert made[0].calls >= len(data) // 4096  # received into the protocol's 4 KiB buffer


class _RecordingBuffered(asyncio.BufferedProtocol):
    """Records get_buffer()'s size hints and the order of the calls; pauses
    reading after every `pause_every`-th buffer_updated() and resumes it
    from a later loop iteration."""

    def __init__(self, pause_every: int = 0):
        self.buf = bytearray(1000)
        self.hints: list = []
        self.order: list = []
        self.got = bytearray()
        self.pause_every = pause_every
        self.eof = asyncio.get_event_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        self.hints.append(sizehint)
        self.order.append("get")
        return self.buf

    def buffer_updated(self, nbytes):
        self.order.append("updated")
        self.got += self.buf[:nbytes]
        if self.pause_every and self.order.count("updated") % self.pause_every == 0:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.002, self.transport.resume_reading)

    def eof_received(self):
        self.eof.set_result(bytes(self.got))


async def _feed_in_pieces(loop, factory, made, data, piece):
    """Serves factory's protocols (each appended to made), sends data to
    the first in pieces of piece bytes with a pause between, then the end
    of the stream; returns what that protocol's eof future gives."""
    server = await loop.create_server(factory, "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname())
    client.setblocking(False)
    for i in range(0, len(data), piece):
        await loop.sock_sendall(client, data[i:i + piece])
        await asyncio.sleep(0.001)
    client.shutdown(socket.SHUT_WR)
    while not made:
        await asyncio.sleep(0.001)
    got = await made[0].eof
    client.close()
    server.close()
    await server.wait_closed()
    return got


@pytest.mark.parametrize("pause_every", [0, 3], ids=["reading", "paused_and_resumed"])
def test_buffered_protocol_is_received_into_straight(loop, pause_every):
    """The receive goes into the protocol's own buffer (get_buffer(-1), as
    the selector loop asks when it does not know the size; the stdlib
    proactor copies, asking for the size it has), buffer_updated() comes
    before the next get_buffer(), and pausing loses and reorders nothing."""
    data = payload(120_000)
    made = []

    def factory():
        made.append(_RecordingBuffered(pause_every))
        return made[-1]

    # several receives, some while paused
    assert run(loop, _feed_in_pieces(loop, factory, made, data, 7000)) == data
    proto = made[0]
    assert set(proto.hints) == {-1}
    order = proto.order
    assert all(a != b for a, b in zip(order, order[1:])), "get_buffer() twice without buffer_updated()"
    if pause_every:
        assert order.count("updated") > pause_every


@pytest.mark.parametrize("fails", ["buffer_updated", "get_buffer", "empty_buffer"])
def test_buffered_protocol_errors_are_fatal_to_the_connection(loop, fails):
    """A BufferedProtocol's buffer_updated() or get_buffer() raising, or
    get_buffer() giving an empty buffer, closes the connection with the
    error and reports it to the exception handler, as the stdlib's
    transports do (the loop goes on)."""
    errors = []
    lost = []

    class Failing(_RecordingBuffered):
        def get_buffer(self, sizehint):
            if fails == "get_buffer" and self.order.count("updated") >= 1:
                raise ValueError("get_buffer broke")
            if fails == "empty_buffer" and self.order.count("updated") >= 1:
                return bytearray()
            return super().get_buffer(sizehint)

        def buffer_updated(self, nbytes):
            super().buffer_updated(nbytes)
            if fails == "buffer_updated" and self.order.count("updated") >= 2:
                raise ValueError("buffer_updated broke")

        def connection_lost(self, exc):
            lost.append(exc)

    async def main():
        loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
        server = await loop.create_server(Failing, "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        client.setblocking(False)
        for i in range(5):
            try:
                await loop.sock_sendall(client, b"x" * 10)
            except OSError:
                break
            await asyncio.sleep(0.01)
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.01)
        client.close()
        server.close()
        await server.wait_closed()

    run(loop, main())
    if fails == "empty_buffer":
        assert len(lost) == 1 and isinstance(lost[0], RuntimeError) and "empty buffer" in str(lost[0])
        fails = "get_buffer"
    else:
        assert len(lost) == 1 and isinstance(lost[0], ValueError) and f"{fails} broke" in str(lost[0])
    assert any(f"protocol.{fails}() call failed" in ctx.get("message", "") for ctx in errors), errors


def test_buffered_protocol_with_a_new_buffer_each_time(loop):
    """get_buffer() may hand out a different buffer for every receive (a
    memoryview into a bigger one, here): each receive goes into the one
    it returned, in order."""
    data = payload(50_000)
    made = []

    class Fresh(_RecordingBuffered):
        def __init__(self):
            super().__init__()
            self.big = bytearray(1 << 20)
            self.at = 0

        def get_buffer(self, sizehint):
            self.order.append("get")
            if self.at + 4096 > len(self.big):
                self.at = 0
            self.view = memoryview(self.big)[self.at:self.at + 4096]
            return self.view

        def buffer_updated(self, nbytes):
            self.order.append("updated")
            self.got += self.view[:nbytes]
            self.at += nbytes

    def factory():
        made.append(Fresh())
        return made[-1]

    assert run(loop, _feed_in_pieces(loop, factory, made, data, 3000)) == data
    assert made[0].order.count("updated") >= len(data) // 4096


def test_set_protocol_mid_stream_hands_over_every_byte(loop):
    """A BufferedProtocol replaced by a Protocol (set_protocol, as start_tls
    and protocol upgrades do) while a receive into its buffer is pending:
    what that receive brings goes to the new protocol; nothing is lost."""
    data = payload(50_000)

    class Plain(asyncio.Protocol):
        def __init__(self, got, eof):
            self.got, self.eof = got, eof

        def data_received(self, chunk):
            assert type(chunk) is bytes
            self.got += chunk

        def eof_received(self):
            self.eof.set_result(bytes(self.got))

    class SwitchesAfterFirst(_RecordingBuffered):
        def buffer_updated(self, nbytes):
            super().buffer_updated(nbytes)
            if len(self.order) == 2:  # the next receive is not started yet: switch now
                self.transport.set_protocol(Plain(self.got, self.eof))

    made = []

    async def main():
        def factory():
            made.append(SwitchesAfterFirst())
            return made[-1]

        server = await loop.create_server(factory, "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        client.setblocking(False)
        await loop.sock_sendall(client, data[:100])
        while not made or not made[0].order:
            await asyncio.sleep(0.001)
        await loop.sock_sendall(client, data[100:])
        client.shutdown(socket.SHUT_WR)
        got = await made[0].eof
        client.close()
        server.close()
        await server.wait_closed()
        return got

    assert run(loop, main()) == data


def test_buffered_protocol_replaced_while_its_receive_is_pending(loop):
    """set_protocol() from outside the protocol's callbacks, with a receive
    into the old protocol's buffer in flight: the data that receive brings
    is handed to the new protocol, in order."""
    data = payload(30_000)

    class Plain(asyncio.Protocol):
        def __init__(self):
            self.got = bytearray()
            self.eof = asyncio.get_event_loop().create_future()

        def data_received(self, chunk):
            self.got += chunk

        def eof_received(self):
            self.eof.set_result(bytes(self.got))

    made = []

    async def main():
        server = await loop.create_server(lambda: made.append(_RecordingBuffered()) or made[-1], "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        client.setblocking(False)
        while not made or not made[0].order:  # get_buffer() called: a receive is pending
            await asyncio.sleep(0.001)
        new = Plain()
        made[0].transport.set_protocol(new)
        await loop.sock_sendall(client, data)
        client.shutdown(socket.SHUT_WR)
        got = await new.eof
        client.close()
        server.close()
        await server.wait_closed()
        return got

    assert run(loop, main()) == data


@linux_only
def test_read_pipe_closes_at_end_of_file(loop):
    """A read pipe's transport closes at end of file even when
    eof_received() returns true (StreamReaderProtocol does), as the selector
    loop's do on POSIX: the pipe is closed at once, not when the transport is
    collected (CPython's test_streams.test_unclosed_resource_warnings counts
    the ResourceWarnings of a later garbage collection)."""
    rfd, wfd = os.pipe()
    pipe = open(rfd, "rb", 0)

    async def main():
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_read_pipe(lambda: protocol, pipe)
        os.write(wfd, b"data")
        os.close(wfd)
        data = await reader.read()
        for _ in range(10):  # connection_lost comes through call_soon
            await asyncio.sleep(0)
        return data, transport.is_closing(), pipe.closed

    assert run(loop, main()) == (b"data", True, True)


def test_udp_datagrams_round_trip_with_addresses(loop):
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data.upper(), addr)

    class Client(asyncio.DatagramProtocol):
        def __init__(self):
            self.got = asyncio.Queue()

        def datagram_received(self, data, addr):
            self.got.put_nowait((data, addr))

    async def main():
        server, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        saddr = server.get_extra_info("sockname")
        client, cproto = await loop.create_datagram_endpoint(Client, remote_addr=saddr)
        replies = []
        for i in range(20):
            client.sendto(b"msg %d" % i)
            replies.append(await cproto.got.get())
        client.close()
        server.close()
        return saddr, replies

    saddr, replies = run(loop, main())
    assert [d for d, _ in replies] == [b"MSG %d" % i for i in range(20)]
    assert all(a[:2] == saddr[:2] for _, a in replies)


@linux_only
def test_unix_server_and_connection_echo(loop):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")

        async def handle(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        async def main():
            server = await asyncio.start_unix_server(handle, path)
            assert os.path.exists(path)
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"hello unix\n")
            line = await reader.readline()
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()
            return line

        assert run(loop, main()) == b"HELLO UNIX\n"
        assert not os.path.exists(path)  # the server removed its socket file


# ---- sendfile -----------------------------------------------------------------

@pytest.fixture
def datafile(tmp_path):
    data = payload(1 << 20) + b"tail"
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


def test_loop_sendfile_sends_the_file_range_and_moves_position(loop, datafile):
    f, data = datafile

    async def main():
        got = bytearray()
        done = loop.create_future()

        class Sink(asyncio.Protocol):
            def data_received(self, d):
                got.extend(d)

            def connection_lost(self, exc):
                done.set_result(None)

        server = await loop.create_server(Sink, "127.0.0.1", 0)
        tr, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname()[:2])
        sent = await loop.sendfile(tr, f, offset=100, count=len(data) - 200)
        tr.close()
        await done
        server.close()
        await server.wait_closed()
        return sent, bytes(got)

    sent, got = run(loop, main())
    assert sent == len(data) - 200
    assert got == data[100:-100]
    assert f.tell() == len(data) - 100


def test_sock_sendfile_sends_whole_file(loop, datafile):
    f, data = datafile

    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        got = bytearray()

        async def drain():
            while len(got) < len(data):
                chunk = await loop.sock_recv(b, 65536)
                if not chunk:
                    break
                got.extend(chunk)

        reader = loop.create_task(drain())
        sent = await loop.sock_sendfile(a, f)
        await reader
        a.close()
        b.close()
        return sent, bytes(got)

    sent, got = run(loop, main())
    assert sent == len(data) and got == data
    assert f.tell() == len(data)


# ---- readiness, signals, subprocesses ----------------------------------------

def test_add_reader_and_writer_fire_and_stop_when_removed(loop):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    reads: list[bytes] = []
    writable = []

    async def main():
        got_two = loop.create_future()

        def on_readable():
            reads.append(b.recv(100))
            if len(reads) == 2 and not got_two.done():
                got_two.set_result(None)

        def on_writable():
            writable.append(1)
            loop.remove_writer(a)

        loop.add_reader(b, on_readable)
        loop.add_writer(a.fileno(), on_writable)
        await asyncio.sleep(0.05)
        assert writable == [1]  # fired once, then removed
        a.send(b"one")
        await asyncio.sleep(0.05)
        a.send(b"two")
        await got_two
        assert loop.remove_reader(b) is True
        assert loop.remove_reader(b) is False
        a.send(b"three")  # nobody watches now
        await asyncio.sleep(0.05)

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()
    assert reads == [b"one", b"two"]
    assert writable == [1]


@linux_only
def test_signal_handler_runs_in_the_loop(loop):
    got = []

    async def main():
        fired = loop.create_future()

        def handler(tag):
            got.append((tag, threading.get_ident()))
            fired.set_result(None)

        loop.add_signal_handler(signal.SIGUSR1, handler, "usr1")
        os.kill(os.getpid(), signal.SIGUSR1)
        await fired
        assert loop.remove_signal_handler(signal.SIGUSR1) is True

    run(loop, main())
    assert got == [("usr1", threading.get_ident())]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


# On Windows (no cat) a Python child copies stdin to stdout instead; the
# shell is cmd.exe there, and "exit 7" means the same.
_CAT = ["cat"] if ON_LINUX else [
    sys.executable, "-c", "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)"]


def test_subprocess_pipeline_through_cat(loop):
    data = payload(100_000)

    async def main():
        proc = await asyncio.create_subprocess_exec(
            *_CAT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate(data)
        shell = await asyncio.create_subprocess_shell("exit 7")
        return out, proc.returncode, await shell.wait()

    out, rc, rc_shell = run(loop, main())
    assert out == data
    assert rc == 0 and rc_shell == 7


# ---- threads ------------------------------------------------------------------

def test_call_soon_threadsafe_wakes_a_loop_blocked_in_select(loop):
    async def main():
        woke = loop.create_future()
        t0 = time.monotonic()
        timer = threading.Timer(0.2, loop.call_soon_threadsafe, args=(woke.set_result, "woken"))
        timer.start()
        # Nothing else is scheduled: the loop sleeps in select() until the post.
        result = await woke
        return result, time.monotonic() - t0

    result, elapsed = run(loop, main())
    assert result == "woken"
    assert 0.15 < elapsed < 2.0


def test_run_in_executor_returns_worker_results(loop):
    async def main():
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a = loop.run_in_executor(pool, sum, range(1000))
            b = loop.run_in_executor(None, threading.get_ident)
            return await a, await b

    total, ident = run(loop, main())
    assert total == sum(range(1000))
    assert ident != threading.get_ident()


def test_two_threads_each_run_their_own_loop(backend):
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            lp = EventLoop(backend)
            try:
                async def main():
                    a, b = socket.socketpair()
                    a.setblocking(False)
                    b.setblocking(False)
                    for i in range(200):
                        await lp.sock_sendall(a, b"%d:%d;" % (n, i))
                    a.close()
                    got = bytearray()
                    while chunk := await lp.sock_recv(b, 4096):
                        got += chunk
                    b.close()
                    return bytes(got)

                results[n] = lp.run_until_complete(main())
            finally:
                lp.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    for n in range(2):
        assert results[n] == b"".join(b"%d:%d;" % (n, i) for i in range(200))


# ---- closing ------------------------------------------------------------------

def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@linux_only
def test_closing_a_loop_with_live_transports_and_operations_leaks_no_descriptor(backend):
    gc.collect()
    before = _open_fds()
    lp = EventLoop(backend)

    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        conns = [await asyncio.open_connection(*addr[:2]) for _ in range(3)]
        a, b = socket.socketpair()
        a.setblocking(False)
        pending_recv = lp.create_task(lp.sock_recv(a, 100))  # never completes
        udp, _ = await lp.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        lp.add_reader(b, lambda: None)
        await asyncio.sleep(0.05)
        return server, conns, (a, b), pending_recv, udp

    server, conns, (a, b), pending_recv, udp = lp.run_until_complete(main())
    # Closed with everything still open: only the objects' own close() is left.
    server.close()
    for _, w in conns:
        w.close()
    udp.close()
    pending_recv.cancel()
    lp.run_until_complete(asyncio.sleep(0.05))
    lp.remove_reader(b)
    a.close()
    b.close()
    lp.close()
    del server, conns, udp, pending_recv
    gc.collect()
    assert _open_fds() - before == set()


@linux_only
def test_closing_a_loop_with_operations_in_flight_closes_its_port(backend):
    gc.collect()
    before = _open_fds()
    lp = EventLoop(backend)
    a, b = socket.socketpair()
    a.setblocking(False)

    async def main():
        lp.create_task(lp.sock_recv(a, 100))
        lp.add_reader(b, lambda: None)
        await asyncio.sleep(0.02)

    lp.run_until_complete(main())
    lp.close()  # a receive and a poll still pending
    assert lp.is_closed()
    a.close()
    b.close()
    gc.collect()
    assert _open_fds() - before == set()
