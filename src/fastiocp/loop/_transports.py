"""The stdlib's proactor transports, made to fit Linux.

On connection loss they call sock.shutdown(SHUT_RDWR) before closing (a
Windows cure for pending reads on the peer); Linux answers ENOTCONN for a
socket the peer reset or that never connected, and the stdlib would raise
it out of connection_lost's cleanup. Here a failing shutdown is ignored;
the socket is closed all the same."""
from __future__ import annotations

import socket
from asyncio import proactor_events
from typing import Any


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
                server._detach()
                self._server = None
            self._called_connection_lost = True


class SocketTransport(_ClosesQuietly, proactor_events._ProactorSocketTransport):
    """TCP and Unix stream connections."""


class DatagramTransport(_ClosesQuietly, proactor_events._ProactorDatagramTransport):
    """UDP endpoints."""


class ReadPipeTransport(_ClosesQuietly, proactor_events._ProactorReadPipeTransport):
    """connect_read_pipe()."""


class WritePipeTransport(_ClosesQuietly, proactor_events._ProactorWritePipeTransport):
    """connect_write_pipe()."""


class DuplexPipeTransport(_ClosesQuietly, proactor_events._ProactorDuplexPipeTransport):
    """Windows duplex pipes."""
