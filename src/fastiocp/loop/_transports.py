"""The stdlib's proactor transports, made to fit Linux.

On connection loss they call sock.shutdown(SHUT_RDWR) before closing (a
Windows cure for pending reads on the peer); Linux answers ENOTCONN for a
socket the peer reset or that never connected, and the stdlib would raise
it out of connection_lost's cleanup. Here a failing shutdown is ignored;
the socket is closed all the same."""
from __future__ import annotations

import os
import socket
import sys
from asyncio import base_events, proactor_events
from typing import Any


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


class _ReceivesBytes:
    """data_received() gets bytes, as documented (the stdlib proactor
    transports of 3.10 and 3.11 pass bytearray slices: cpython issue 99941)."""

    def _data_received(self, data: Any, length: int) -> None:
        if type(data) is bytearray:
            data = bytes(data)
        super()._data_received(data, length)  # type: ignore[misc]


class SocketTransport(_ClosesQuietly, _ReceivesBytes, _WritesAtOnce, proactor_events._ProactorSocketTransport):
    """TCP and Unix stream connections."""


class DatagramTransport(_ClosesQuietly, proactor_events._ProactorDatagramTransport):
    """UDP endpoints."""


class _PipeRepr:
    _sock: Any
    _closing: bool

    def __repr__(self) -> str:
        # The selector loop's pipe transports say open/closing/closed.
        text = super().__repr__()
        if self._sock is not None and not self._closing:
            name, _, rest = text[1:].partition(" ")
            text = f"<{name} open {rest}" if rest else f"<{name} open>"
        return text


class ReadPipeTransport(_PipeRepr, _ClosesQuietly, _ReceivesBytes, proactor_events._ProactorReadPipeTransport):
    """connect_read_pipe()."""


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
