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
    BackendUnavailableError,
    Completion,
    FastIOCPError,
    InvalidStateError,
    PortClosedError,
    __version__,
    backend_status,
)
from ._fastiocp import CompletionPort as _CCompletionPort
from ._files import File, open
from ._workers import EXIT, WorkerPool

__all__ = [
    "BackendUnavailableError",
    "Completion",
    "CompletionPort",
    "EXIT",
    "FastIOCPError",
    "File",
    "InvalidStateError",
    "PortClosedError",
    "WorkerPool",
    "__version__",
    "available_backends",
    "backend_status",
    "open",
]


class _Batch:
    """Context manager returned by CompletionPort.batch()."""

    __slots__ = ("_port",)

    def __init__(self, port: CompletionPort) -> None:
        self._port = port

    def __enter__(self) -> CompletionPort:
        self._port._batch_enter()
        return self._port

    def __exit__(self, *exc: object) -> None:
        self._port._batch_exit()


class CompletionPort(_CCompletionPort):
    """An I/O completion port.

    CompletionPort(concurrency=0, backend="auto", entries=0)

    concurrency: on Windows, the IOCP concurrency value (0: number of CPUs).
        Elsewhere it is recorded but not enforced yet (see the README).
    backend: "auto" (the FASTIOCP_BACKEND environment variable, else the best
        that works here), or "iocp", "io_uring", "epoll".
    entries: kernel queue size hint for io_uring (0: default 1024).
    """

    __slots__ = ()

    def batch(self) -> _Batch:
        """Defer submissions made inside the block and submit them at once.

        On io_uring, operations submitted inside ``with port.batch():`` reach
        the kernel in one system call when the block ends (or earlier, when a
        thread waits in get()). Use it around the handling of a batch of
        completions. Other backends submit at once; the block is harmless.
        """
        return _Batch(self)


def available_backends() -> list[str]:
    """Names of the backends that work on this machine, best first."""
    return [name for name, works, _why in backend_status() if works]
