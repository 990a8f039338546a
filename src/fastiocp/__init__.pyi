"""Type stubs for fastiocp."""
import os
from typing import Any, Union

from ._fastiocp import (
    POLLERR as POLLERR,
    POLLHUP as POLLHUP,
    POLLIN as POLLIN,
    POLLOUT as POLLOUT,
    POLLPRI as POLLPRI,
    POOL_MAX as POOL_MAX,
    BackendUnavailableError as BackendUnavailableError,
    BufferPool as BufferPool,
    Completion as Completion,
    CompletionPort as CompletionPort,
    FastIOCPError as FastIOCPError,
    InvalidStateError as InvalidStateError,
    PooledBuffer as PooledBuffer,
    PortClosedError as PortClosedError,
    backend_operations as backend_operations,
    backend_status as backend_status,
)
from ._files import File as File, open as open
from .loop import EventLoop as EventLoop, EventLoopPolicy as EventLoopPolicy, new_event_loop as new_event_loop, run as run
from ._version import __version__ as __version__
from ._workers import EXIT as EXIT, WorkerPool as WorkerPool

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

def available_backends() -> list[str]: ...
