"""The stdlib's proactor transports, made to fit the port and Linux.

Where they depart from asyncio.proactor_events, each in a mixin below:
- _ClosesQuietly: on connection loss the stdlib calls
  sock.shutdown(SHUT_RDWR) before closing (a Windows cure for pending reads
  on the peer); Linux answers ENOTCONN for a socket the peer reset or that
  never connected. A failing shutdown is ignored; the socket is closed.
- _WritesAtOnce: write() sends at once when nothing is queued.
- _ReceivesBytes: data_received() gets bytes on every version.
- _ReadsDirect: socket receives without a Future, their common case in C
  (csrc/loop/transport.c); a BufferedProtocol is received into straight;
  a plain Protocol through pooled receives (issue 18): no buffer of its
  own.
- _FlushesOnClose: close() with writes pending lets them, and what the
  protocol writes meanwhile, go out first.
- Read pipes close at end of file on POSIX, as the selector loop's do."""
from __future__ import annotations

import collections
import errno
import os
import socket
import sys
from asyncio import base_events, proactor_events, protocols
from typing import Any

from .._fastiocp import PooledBuffer, _ReadLoop, _SocketWrite


# Server._attach/_detach take the transport since 3.13 (the server keeps its
# clients, for close_clients()).
_DETACH_TAKES_TRANSPORT = base_events.Server._detach.__code__.co_argcount == 2


class _ClosesQuietly:
    _called_connection_lost: bool
    _protocol: Any
    _sock: Any
    _server: Any

    def _call_connection_lost(self, exc: Any) -> None:
        if self._called_connection_lost:
            return
        try:
            self._protocol.connection_lost(exc)
        finally:
            sock = self._sock
            if sock is not None:
                if hasattr(sock, "shutdown") and sock.fileno() != -1:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # ENOTCONN after a reset, on UDP, ...
                sock.close()
            self._sock = None
            server = self._server
            if server is not None:
                if _DETACH_TAKES_TRANSPORT:
                    server._detach(self)
                else:
                    server._detach()
                self._server = None
            self._called_connection_lost = True


class _WritesAtOnce:
    """write() hands the data to the kernel at once when nothing is queued
    (as the selector loop does: a peer reading right after write() sees the
    bytes); only what the kernel does not take goes through the proactor."""

    _buffer: Any
    _conn_lost: int
    _eof_written: bool
    _empty_waiter: Any
    _write_fut: Any
    _sock: Any

    def _send_now(self, data: Any) -> int:
        return self._sock.send(data)

    def write(self, data: Any) -> None:
        fut = self._write_fut
        if (data and not self._buffer and not self._conn_lost and not self._eof_written
                and self._empty_waiter is None and (fut is None or fut.done()) and self._sock is not None
                and isinstance(data, (bytes, bytearray, memoryview))):
            try:
                n = self._send_now(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n = 0  # the proactor's send reports the error the same way
            if n:
                if n >= len(data):
                    return
                data = memoryview(data).cast("B")[n:]
        super().write(data)  # type: ignore[misc]

    # The fallbacks of the C write() of socket transports (_SocketWrite).
    _write_python = write

    def _write_queued(self, data: Any) -> None:
        super().write(data)  # type: ignore[misc]


class _ReceivesBytes:
    """data_received() gets bytes, as documented (the stdlib proactor
    transports of 3.10 and 3.11 pass bytearray slices: cpython issue 99941)."""

    def _data_received(self, data: Any, length: int) -> None:
        if type(data) is bytearray:
            data = bytes(data)
        super()._data_received(data, length)  # type: ignore[misc]


class _ReadsDirect:
    """The read loop of the stdlib's proactor transports, with no Future per
    receive: the proactor's select() calls the receive's context, the
    transport's _ReadLoop (csrc/loop/transport.c), with its Completion; it
    does the common case below in C and hands every other to _loop_reading.
    _read_fut is that Completion (close() cancels it; its completion then
    comes back here and is dropped).

    A Protocol gets what the stdlib gives it: the receive is started again
    before data_received() gets a copy of the data; a paused transport keeps
    one receive pending and holds its data until resume_reading(). A
    BufferedProtocol is received into straight: the receive goes into the
    buffer get_buffer(-1) returned, and buffer_updated(n) comes before the
    next get_buffer() (so the next receive starts after it). Data received
    while paused waits in that buffer for resume_reading(); data received
    into the buffer of a protocol replaced since (set_protocol) goes to the
    new protocol as the stdlib hands over data.

    A plain Protocol, when the loop's proactor has its buffer pool on (the
    default), receives into the loop's BufferPool instead of a buffer of
    its own (issue 18): a pending receive holds no buffer, so an idle
    connection costs no receive buffer. Its results go to _pooled_reading
    (the common case to C); each is copied into bytes and its buffer given
    back at once. One receive at a time, started again before the protocol
    sees the data, as above: a multishot receive would read on while the
    protocol has not run, which is not the flow control asyncio programs
    (and CPython's tests) expect. Data and the end of the stream that come
    while paused wait in _held_chunks for resume_reading().
    """

    _closing: bool
    _paused: bool
    _loop: Any
    _sock: Any
    _data: bytearray
    _read_fut: Any
    _protocol: Any
    # The BufferedProtocol whose buffer the pending receive fills (None: the
    # transport's own buffer), and a receive into one that completed while
    # paused: (protocol, buffer, nbytes), delivered on resume_reading().
    _buffer_owner: Any = None
    _held: Any = None
    _reader: Any = None
    _ring_writer: Any = None
    # Data of pooled receives waiting for resume_reading() (a deque; b"":
    # end of stream), or None.
    _held_chunks: Any = None

    def _loop_reading(self, fut: Any = None) -> None:
        length = -1
        data = None
        try:
            if fut is not None:
                if self._read_fut is fut:
                    self._read_fut = None
                elif self._read_fut is not None or not self._closing:
                    return  # not our receive any more
                if fut.cancelled:
                    return  # cancelled by close()
                err = fut.error
                if err is not None:
                    raise err
                length = fut.nbytes
                buf = fut.buffer
                if buf is not self._data and length:
                    owner, self._buffer_owner = self._buffer_owner, None
                    length = -1  # delivered here, not by "finally"
                    if self._closing:
                        return
                    if self._paused:
                        self._held = (owner, buf, fut.nbytes)
                        return
                    self._deliver(owner, buf, fut.nbytes)  # then the next receive
                elif length == 0:
                    return  # end of file: no new receive ("finally" delivers it)
                else:
                    data = bytes(memoryview(buf)[:length])
                    if isinstance(self._protocol, protocols.BufferedProtocol):
                        # Switched to one by set_protocol(): it gets this data
                        # before its get_buffer() is called for the next receive.
                        length = -1
                        self._data_received(data, len(data))  # type: ignore[attr-defined]
                        fut = None
            else:
                held = self._held
                if held is not None:
                    self._held = None
                    self._deliver(*held)
                elif self._read_fut is not None:
                    return  # a receive is pending already
                else:
                    self._loop._proactor.register(self._sock)
                    if self._reader is None:
                        # The receives' callback: C (csrc/loop/transport.c)
                        # for the common case, this method for the others.
                        self._reader = _ReadLoop(self, self._loop._proactor.port)
                        # On io_uring the C write() makes the transport's
                        # _RingWrite at its first write inside a batch of
                        # completions.
                        if self._loop._proactor.pooled:
                            self._data = _NO_BUFFER  # the pool's buffers serve
            self._start_receive(fut)
        except OSError as exc:
            self._read_failed(exc)
        finally:
            if length > -1:
                self._data_received(data, length)  # type: ignore[attr-defined]

    def _start_receive(self, done: Any = None) -> None:
        """Starts the next receive unless the transport is closing or paused
        or one is pending: into the buffer of a BufferedProtocol's
        get_buffer(-1), else into the transport's own. done, the Completion
        of the receive just delivered, is started again (resubmit) when its
        buffer is the one to receive into. Raises OSError if the receive
        cannot start."""
        if self._closing or self._paused or self._read_fut is not None:
            return  # closing: data read from now on is dropped
        proto = self._protocol
        proactor = self._loop._proactor
        if isinstance(proto, protocols.BufferedProtocol):
            try:
                buf = proto.get_buffer(-1)
                if not len(buf):
                    raise RuntimeError("get_buffer() returned an empty buffer")
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")  # type: ignore[attr-defined]
                return
            if done is not None and buf is done.buffer:
                self._read_fut = proactor.again(done)
            else:
                self._read_fut = proactor.recv_direct(self._sock, buf, self._reader)
            self._buffer_owner = proto
        elif proactor.pooled:
            if done is not None and type(done.buffer) is PooledBuffer:
                self._read_fut = proactor.again(done)  # the pool again
            else:
                self._read_fut = proactor.recv_pooled(self._sock, self._reader)
        elif done is not None and done.buffer is self._data:
            self._read_fut = proactor.again(done)  # same buffer, same callback
        else:
            self._read_fut = proactor.recv_direct(self._sock, self._data, self._reader)

    def _pooled_reading(self, c: Any) -> None:
        """A pooled receive finished. _ReadLoop hands the common case (data,
        not closing, not paused, a plain Protocol, nothing held) to the
        protocol itself."""
        data = bytes(c.buffer) if c.nbytes and c.error is None else None
        c.release()
        if self._read_fut is not c:
            return  # cancelled by close(), or no longer ours
        self._read_fut = None
        if self._closing:
            return  # data read from now on is dropped
        err = c.error
        if err is not None:
            if c.cancelled:
                return
            if err.errno in _ENOBUFS:
                # Every buffer was in use when data came: nothing was read.
                self._start_receive()
            else:
                self._read_failed(err)
            return
        if data is None:
            self._pass_on(b"")  # end of stream
            return
        try:
            self._start_receive(c)  # before the protocol sees the data
        except OSError as exc:
            self._read_failed(exc)
        self._pass_on(data)

    def _pass_on(self, data: bytes) -> None:
        """data (b"": end of stream) to the protocol, or held while paused
        or while older data is held."""
        if self._paused or self._held_chunks:
            if self._held_chunks is None:
                self._held_chunks = collections.deque()
            self._held_chunks.append(data)
        else:
            self._data_received(data, len(data))  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        super().resume_reading()  # type: ignore[misc]
        if self._held_chunks and not self._paused and not self._closing:
            self._loop.call_soon(self._deliver_held_chunks)

    def _deliver_held_chunks(self) -> None:
        chunks = self._held_chunks
        while chunks and not self._paused and not self._closing:
            data = chunks.popleft()
            self._data_received(data, len(data))  # type: ignore[attr-defined]
        if not chunks or self._closing:
            self._held_chunks = None

    def _read_failed(self, exc: OSError) -> None:
        """A receive failed or could not start (the stdlib's rules)."""
        if isinstance(exc, ConnectionAbortedError):
            if not self._closing:
                self._fatal_error(exc, "Fatal read error on pipe transport")  # type: ignore[attr-defined]
        elif isinstance(exc, ConnectionResetError):
            self._force_close(exc)  # type: ignore[attr-defined]
        else:
            self._fatal_error(exc, "Fatal read error on pipe transport")  # type: ignore[attr-defined]

    def _call_connection_lost(self, exc: Any) -> None:
        # The reader and the writer refer to the transport: without them, a
        # closed transport (and its protocol, an SSL context...) goes with
        # its last reference, not at the next garbage collection (CPython's
        # test_ssl checks).
        self._reader = None
        self._ring_writer = None
        super()._call_connection_lost(exc)  # type: ignore[misc]

    def _deliver(self, owner: Any, buf: Any, nbytes: int) -> None:
        """nbytes were received into owner's buffer buf."""
        if owner is self._protocol:
            try:
                owner.buffer_updated(nbytes)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")  # type: ignore[attr-defined]
        else:  # the protocol changed meanwhile
            self._data_received(bytes(memoryview(buf)[:nbytes]), nbytes)  # type: ignore[attr-defined]


# The receive buffer of a transport whose receives go into the loop's pool.
_NO_BUFFER = bytearray()
_ENOBUFS = (errno.ENOBUFS, getattr(errno, "WSAENOBUFS", errno.ENOBUFS))


class _FlushesOnClose:
    """close() with writes pending lets the protocol go on writing until
    they are done, as the selector loop's transports do: the connection is
    lost (and the socket closed) only when nothing is left to send.

    The stdlib's proactor transports count the connection lost at close(),
    so whatever the protocol writes when the last write's completion calls
    its resume_writing() is dropped. SSLProtocol holds its close_notify
    while the transport has paused it and sends it from resume_writing(),
    after it has asked for close(): the close_notify never went out, and a
    peer waiting for it spun forever (CPython's test_ssl
    test_remote_shutdown_receives_trailing_data: every run on Linux once the
    4 MiB write completed after close(), now and then on the stdlib's
    ProactorEventLoop under Wine)."""

    _closing: bool
    _conn_lost: int
    _buffer: Any
    _write_fut: Any
    _read_fut: Any

    def close(self) -> None:
        if self._closing:
            return
        if not self._buffer and self._write_fut is None:
            super().close()  # type: ignore[misc]
            return
        # The last write's completion calls _call_connection_lost (the
        # stdlib's _loop_writing does, for a closing transport).
        self._closing = True
        if self._read_fut is not None:
            self._read_fut.cancel()
            self._read_fut = None

    def _call_connection_lost(self, exc: Any) -> None:
        if exc is None and self._write_fut is not None:
            return  # written after close(): that write's completion calls again
        if not self._conn_lost:
            self._conn_lost = 1  # later writes are dropped
        super()._call_connection_lost(exc)  # type: ignore[misc]


class SocketTransport(_FlushesOnClose, _ReadsDirect, _ClosesQuietly, _ReceivesBytes, _WritesAtOnce,
                      proactor_events._ProactorSocketTransport):
    """TCP and Unix stream connections."""

    # What the C fast path (csrc/loop/transport.c) reads and writes at every
    # message, as slots: it reads them at their offset in the object, where
    # a __dict__ lookup each cost more than the rest of its work. The
    # stdlib's code sets and reads them as ever (_FlowControlMixin keeps its
    # own state in slots too); the __dict__ holds the rest.
    __slots__ = ("_read_fut", "_closing", "_paused", "_data", "_protocol", "_buffer_owner",
                 "_held_chunks", "_buffer", "_conn_lost", "_eof_written", "_empty_waiter",
                 "_write_fut", "_sock", "_ring_writer", "_pending_write", "_reader")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The slots whose class defaults (_ReadsDirect's) they shadow: an
        # empty slot would raise AttributeError where the default was read.
        self._buffer_owner = self._held_chunks = self._ring_writer = self._reader = None
        super().__init__(*args, **kwargs)

    if sys.platform != "win32":
        # _WritesAtOnce.write() in C (csrc/loop/transport.c) for bytes and
        # bytearray sent whole at once; it calls the Python one otherwise.
        write = _SocketWrite()


class DatagramTransport(_ClosesQuietly, proactor_events._ProactorDatagramTransport):
    """UDP endpoints."""


class _PipeRepr:
    _sock: Any
    _closing: bool

    def __repr__(self) -> str:
        # The selector loop's pipe transports say open/closing/closed.
        try:
            text = super().__repr__()
        except ValueError:  # the pipe's file object was closed under it
            return f"<{type(self).__name__} closed file>"
        if self._sock is not None and not self._closing:
            name, _, rest = text[1:].partition(" ")
            text = f"<{name} open {rest}" if rest else f"<{name} open>"
        return text


class ReadPipeTransport(_PipeRepr, _ClosesQuietly, _ReceivesBytes, proactor_events._ProactorReadPipeTransport):
    """connect_read_pipe()."""

    def _eof_received(self) -> None:
        if sys.platform == "win32":
            super()._eof_received()  # type: ignore[misc]
            return
        # As the selector loop's read pipes on POSIX: at end of file the
        # transport closes, whatever eof_received() returns (the stdlib's
        # proactor keeps it open when it returns true, and the pipe's file
        # stays open until the transport is collected).
        try:
            self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")  # type: ignore[attr-defined]
            return
        self.close()  # type: ignore[attr-defined]


if sys.platform == "win32":
    class WritePipeTransport(_ClosesQuietly, proactor_events._ProactorWritePipeTransport):
        """connect_write_pipe() on Windows (overlapped pipe handles, as
        asyncio's subprocesses have): the stdlib's transport, which learns
        that the reader went away from a read of the write end. Nothing is
        written at once: the handle is not a C runtime descriptor, and
        polling a pipe (AFD) works on sockets only."""
else:
    class WritePipeTransport(_PipeRepr, _ClosesQuietly, _WritesAtOnce,  # type: ignore[no-redef]
                             proactor_events._ProactorBaseWritePipeTransport):
        """connect_write_pipe(). It never reads its descriptor (a pty or a
        read-write FIFO shares it with a reader): it waits for the reader to
        go away with a poll for no events (POLLERR/POLLHUP only)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            try:
                os.set_blocking(self._sock.fileno(), False)  # as the selector loop's pipes
            except (OSError, AttributeError, ValueError):
                pass
            self._read_fut = self._loop._proactor.wait_hangup(self._sock)
            self._read_fut.add_done_callback(self._pipe_closed)

        def _send_now(self, data: Any) -> int:
            return os.write(self._sock.fileno(), data)

        _pipe_closed = proactor_events._ProactorWritePipeTransport._pipe_closed


class DuplexPipeTransport(_ClosesQuietly, proactor_events._ProactorDuplexPipeTransport):
    """Windows duplex pipes."""
