"""fastiocp: I/O completion ports for Python.

A port is a thread-safe queue of completion packets. Register files and
sockets with a key, submit asynchronous operations carrying any context
object, post packets of your own, and dequeue completions from any number of
threads with the GIL released while they wait. Backends: IOCP on Windows,
io_uring on Linux (epoll where io_uring is blocked).

    with fastiocp.CompletionPort() as port:
        port.register(sock, key="client")
        port.recv(sock, 4096, context="first read")
        c = port.get()
        print(c.key, c.context, c.nbytes, bytes(c.buffer[:c.nbytes]))
"""
from __future__ import annotations

from ._fastiocp import (
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLOUT,
    POLLPRI,
    POOL_MAX,
    BackendUnavailableError,
    BufferPool,
    Completion,
    CompletionPort,
    FastIOCPError,
    InvalidStateError,
    PooledBuffer,
    PortClosedError,
    backend_operations,
    backend_status,
)
from ._files import File, open
from ._version import __version__
from ._workers import EXIT, WorkerPool

__all__ = [
    "POLLERR",
    "POLLHUP",
    "POLLIN",
    "POLLOUT",
    "POLLPRI",
    "POOL_MAX",
    "BackendUnavailableError",
    "BufferPool",
    "Completion",
    "CompletionPort",
    "EXIT",
    "FastIOCPError",
    "File",
    "InvalidStateError",
    "PooledBuffer",
    "PortClosedError",
    "WorkerPool",
    "EventLoop",
    "EventLoopPolicy",
    "__version__",
    "available_backends",
    "backend_operations",
    "backend_status",
    "new_event_loop",
    "open",
    "run",
]

# The asyncio loop (fastiocp.loop) is imported on first use: a program that
# only uses ports does not pay for importing asyncio.
_LOOP_NAMES = ("EventLoop", "EventLoopPolicy", "new_event_loop", "run")


def __getattr__(name: str):
    if name in _LOOP_NAMES:
        from . import loop

        value = getattr(loop, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_backends() -> list[str]:
    """Names of the backends that work on this machine, best first."""
    return [name for name, works, _why in backend_status() if works]
