"""Type stubs for the C core of fastiocp.

Checked against the built module by ``python -m mypy.stubtest fastiocp``
(.ci/run; what stubtest cannot see is listed, with reasons, in
tools/stubtest-allowlist.txt).
"""
import sys
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Protocol, Union, final, overload

# typing_extensions is read by type checkers only (it ships with them): a
# plain install of fastiocp needs nothing at run time for these stubs.
from typing_extensions import Buffer, TypeAlias, disjoint_base

class _HasFileno(Protocol):
    def fileno(self) -> int: ...

_Handle: TypeAlias = Union[int, _HasFileno]
_OpKind: TypeAlias = Literal[
    "read",
    "write",
    "recv",
    "send",
    "recvfrom",
    "sendto",
    "accept",
    "connect",
    "post",
    "poll",
    "sendmsg",
    "recvmsg",
    "sendfile",
    "wait_process",
    "timer",
    "fsync",
    "connect_pipe",
]
_BackendName: TypeAlias = Literal["iocp", "io_uring", "epoll"]

# Buffers (PEP 688). The data of a write, send or sendto is any object with
# the buffer protocol (bytes, bytearray, memoryview, array, mmap...). A read,
# recv or recvfrom needs a *writable* one (bytearray, a writable memoryview,
# array, mmap...), or an int: the size of a bytearray made for it. Python's
# typing has no writable-buffer type (PEP 688 has one Buffer protocol for
# both; typeshed's own WriteableBuffer is the same alias), so both aliases are
# Buffer and the name carries the requirement: a read-only buffer passed to a
# read type-checks, and raises TypeError at once when called (nothing is
# submitted).
_ReadableBuffer: TypeAlias = Buffer
_WritableBuffer: TypeAlias = Buffer
_Address: TypeAlias = Union[tuple[Any, ...], str, bytes]
# A subprocess.Popen (anything with a pid, and on Windows a _handle), or a
# pid (POSIX) / process handle (Windows).
_Process: TypeAlias = Any
_Ancdata: TypeAlias = Iterable[tuple[int, int, _ReadableBuffer]]

POLLIN: int
POLLPRI: int
POLLOUT: int
POLLERR: int
POLLHUP: int
POOL_MAX: int

class FastIOCPError(Exception):
    """Base class of fastiocp's own exceptions."""

class BackendUnavailableError(FastIOCPError, OSError):
    """No usable backend, or the one asked for cannot work here."""

class PortClosedError(FastIOCPError, ValueError):
    """The CompletionPort is closed."""

class InvalidStateError(FastIOCPError, RuntimeError):
    """result() was called before the operation completed."""

@final
class BufferPool:
    """count buffers of size bytes for pooled receives."""

    def __new__(cls, size: int, count: int) -> "BufferPool": ...
    @property
    def size(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def in_use(self) -> int: ...

@final  # made by the port only
class PooledBuffer:
    """The data of a pooled receive, in a buffer of a BufferPool."""

    if sys.version_info >= (3, 12):  # PEP 688: the buffer protocol in Python
        def __buffer__(self, flags: int, /) -> memoryview: ...
        def __release_buffer__(self, buffer: memoryview, /) -> None: ...

    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, key: int, /) -> int: ...
    @overload
    def __getitem__(self, key: slice, /) -> memoryview: ...
    def release(self) -> None: ...
    @property
    def released(self) -> bool: ...

@final  # made by the port only; not subclassable at run time
class Completion:
    """The record of one operation or posted packet."""

    @property
    def key(self) -> Any: ...
    @property
    def context(self) -> Any: ...
    @property
    def op(self) -> _OpKind: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def error(self) -> Optional[OSError]: ...
    # The buffer the operation used (the object passed, or the bytearray made
    # for an int size); None for accept, connect and post. Any, not Buffer:
    # the usual next step, c.buffer[:c.nbytes], needs the concrete type.
    @property
    def buffer(self) -> Any: ...
    @property
    def done(self) -> bool: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def address(self) -> Any: ...
    @property
    def more(self) -> bool: ...
    def release(self) -> None: ...
    # result() depends on op: nbytes (read, write, recv, send, sendto, post,
    # sendmsg, sendfile; the events that fired for poll), (nbytes, address)
    # for recvfrom, (socket.socket, address) for accept, (nbytes, ancdata,
    # msg_flags, address) for recvmsg, the return code for wait_process,
    # None for connect, timer, fsync and connect_pipe; it raises the
    # operation's error (TimeoutError when its timeout expired).
    def result(self) -> Any: ...
    def cancel(self) -> bool: ...

class _Batch:
    def __enter__(self) -> "CompletionPort": ...
    def __exit__(self, *exc: object) -> None: ...

@disjoint_base
class CompletionPort:
    """An I/O completion port."""

    def __init__(self, concurrency: int = 0, backend: str = "auto", entries: int = 0) -> None: ...
    @property
    def backend(self) -> _BackendName: ...
    @property
    def closed(self) -> bool: ...
    @property
    def pending(self) -> int: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def native(self) -> frozenset[str]: ...
    def register(self, fileobj: _Handle, key: Any = None) -> None: ...
    def unregister(self, fileobj: _Handle) -> None: ...
    def read(
        self,
        file: _Handle,
        buffer: Union[_WritableBuffer, int],
        offset: Optional[int] = 0,
        context: Any = None,
        timeout: Optional[float] = None,
    ) -> Completion: ...
    def write(
        self,
        file: _Handle,
        data: _ReadableBuffer,
        offset: Optional[int] = 0,
        context: Any = None,
        timeout: Optional[float] = None,
    ) -> Completion: ...
    def recv(
        self,
        sock: _Handle,
        buffer: Union[_WritableBuffer, int, BufferPool],
        context: Any = None,
        timeout: Optional[float] = None,
        multishot: bool = False,
    ) -> Completion: ...
    def send(
        self, sock: _Handle, data: _ReadableBuffer, context: Any = None, timeout: Optional[float] = None, zerocopy: bool = False
    ) -> Completion: ...
    def recvfrom(
        self, sock: _Handle, buffer: Union[_WritableBuffer, int], context: Any = None, timeout: Optional[float] = None
    ) -> Completion: ...
    def sendto(
        self, sock: _Handle, data: _ReadableBuffer, address: _Address, context: Any = None, timeout: Optional[float] = None
    ) -> Completion: ...
    def accept(self, sock: _Handle, context: Any = None, timeout: Optional[float] = None, multishot: bool = False) -> Completion: ...
    def connect(self, sock: _Handle, address: _Address, context: Any = None, timeout: Optional[float] = None) -> Completion: ...
    def poll(self, fileobj: _Handle, events: int, context: Any = None, timeout: Optional[float] = None) -> Completion: ...
    def sendmsg(
        self,
        sock: _Handle,
        buffers: Iterable[_ReadableBuffer],
        ancdata: _Ancdata = (),
        flags: int = 0,
        address: Optional[_Address] = None,
        context: Any = None,
        timeout: Optional[float] = None,
    ) -> Completion: ...
    def recvmsg(
        self,
        sock: _Handle,
        buffers: Iterable[_WritableBuffer],
        ancbufsize: int = 0,
        flags: int = 0,
        context: Any = None,
        timeout: Optional[float] = None,
    ) -> Completion: ...
    def sendfile(
        self, sock: _Handle, file: _Handle, offset: int, count: int, context: Any = None, timeout: Optional[float] = None
    ) -> Completion: ...
    def wait_process(self, process: _Process, context: Any = None, timeout: Optional[float] = None) -> Completion: ...
    def timer(self, delay: float, context: Any = None) -> Completion: ...
    def fsync(self, file: _Handle, datasync: bool = False, context: Any = None, timeout: Optional[float] = None) -> Completion: ...
    def connect_pipe(self, pipe: _Handle, context: Any = None, timeout: Optional[float] = None) -> Completion: ...
    def post(self, key: Any = None, context: Any = None, nbytes: int = 0) -> None: ...
    def get(self, timeout: Optional[float] = None) -> Optional[Completion]: ...
    def get_many(self, max: int = 64, timeout: Optional[float] = None) -> list[Completion]: ...
    def cancel(self, op: Completion) -> bool: ...
    def flush(self) -> None: ...
    def resubmit(
        self, completions: Iterable[Completion], offsets: Optional[Iterable[Optional[int]]] = None
    ) -> None: ...
    def batch(self) -> _Batch: ...
    def close(self) -> None: ...
    def __enter__(self) -> "CompletionPort": ...
    def __exit__(self, *exc: object) -> None: ...
    def __iter__(self) -> Iterator[Completion]: ...
    def __next__(self) -> Completion: ...

def backend_status() -> list[tuple[str, bool, str]]: ...
def backend_operations(name: str, /) -> dict[str, Literal["native", "emulated", "unsupported"]]: ...

@disjoint_base
class _FileHandle:
    """Base of fastiocp.File: an OS handle kept in C."""

    def __init__(self, handle: int) -> None: ...
    def fileno(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def _detach(self) -> int: ...

# The asyncio loop's C fast path (csrc/loop/transport.c), used by
# fastiocp.loop's socket transports.
@final
class _ReadLoop:
    """The receive callback of the asyncio loop's socket transports."""

    def __init__(self, transport: Any, port: CompletionPort) -> None: ...
    def __call__(self, completion: Any, /) -> Any: ...

@final
class _RingWrite:
    """A socket transport's writes through the io_uring submission queue;
    the transport's _write_fut while its send is in flight."""

    def __init__(self, transport: Any, port: CompletionPort) -> None: ...
    def __call__(self, completion: Any, /) -> None: ...
    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def cancel(self, msg: Any = None) -> bool: ...
    def result(self) -> Optional[int]: ...

@final
class _SocketWrite:
    """The write() method of the asyncio loop's socket transports, in C."""

    @overload
    def __get__(self, obj: None, owner: Optional[type] = None, /) -> _SocketWrite: ...
    @overload
    def __get__(self, obj: object, owner: Optional[type] = None, /) -> Callable[[Any], None]: ...
    def __call__(self, transport: Any, data: Any, /) -> None: ...

@disjoint_base
class _LoopCore:
    """The scheduling of fastiocp's asyncio loop in C: a base of EventLoop."""

    _ready: Any
    _scheduled: Any
    _stopping: Any
    _debug: Any
    _closed: Any
    _selector: Any
    _timer_cancelled_count: int
    _clock_resolution: float
    def call_soon(self, callback: Callable[..., object], /, *args: Any, context: Any = None) -> Any: ...
    def call_at(self, when: float, callback: Callable[..., object], /, *args: Any, context: Any = None) -> Any: ...
    def call_later(self, delay: float, callback: Callable[..., object], /, *args: Any,
                   context: Any = None) -> Any: ...
    def get_debug(self) -> bool: ...
    def create_future(self) -> Any: ...
    def time(self) -> float: ...
    def _run_once(self) -> None: ...

def _loop_core_setup(handle: type, timer_handle: type, base_loop: type, proactor: type, continued: object, /) -> bool: ...
def _proactor_select(proactor: Any, timeout: Optional[float] = None, /) -> list[Any]: ...

if sys.platform == "win32":
    # Private helpers of fastiocp.open() (_files.py); handles are ints.
    def _win_open(path: str, readable: bool, writable: bool, kind: str, direct: bool, /) -> int: ...
    def _win_close_handle(handle: int, /) -> None: ...
    def _win_file_size(handle: int, /) -> int: ...
    def _win_truncate(handle: int, size: int, /) -> None: ...
