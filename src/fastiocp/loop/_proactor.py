"""The proactor the stdlib's BaseProactorEventLoop drives, on a CompletionPort.

asyncio.proactor_events.BaseProactorEventLoop (transports, servers, SSL,
sock_* methods) is written against a *proactor*: an object whose methods
start an operation and return a Future, and whose select(timeout) waits and
finishes the futures of the operations that completed. IocpProactor is the
stdlib's, on Windows only; this one runs on every fastiocp backend. Each
operation's Completion carries (future, finish) as its context: select()
dequeues a batch with one get_many() and resolves each future with
finish(completion)."""
from __future__ import annotations

import errno
import os
import socket
import sys
import weakref
from asyncio import events, futures, proactor_events
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._fastiocp import (
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLOUT,
    BufferPool,
    Completion,
    CompletionPort,
    PortClosedError,
    _FileHandle,
    _loop_core_setup,
    _proactor_select,
)

WINDOWS = sys.platform == "win32"
# Largest batch one select() dequeues.
BATCH = 256
# The loop's receive pool (issue 18): its socket transports with a plain
# Protocol receive into one pool instead of a 64 KiB buffer each, so an
# idle connection pins no receive buffer. 256 buffers of 256 KiB: a receive
# takes what one read of uvloop's takes (256,000 bytes), so a 100 KiB
# message comes in one receive, not two (a 100 KiB echo: 32-34 µs of server
# CPU per message against 44-47 with 64 KiB buffers). 64 MiB of address
# space, of which only the pages receives wrote to become resident.
# FASTIOCP_LOOP_POOL=0 turns it off (_pooled_default).
def _pooled_default() -> bool:
    """FASTIOCP_LOOP_POOL=1/0, else on Linux (io_uring's provided buffers;
    on epoll a pooled receive costs what a plain one does) and off on
    Windows, where each pooled receive is a zero-byte WSARecv, then a
    recv(): two calls per message where a plain receive needs one."""
    env = os.environ.get("FASTIOCP_LOOP_POOL")
    if env is not None:
        return env != "0"
    return sys.platform != "win32"


POOL_BUFFER_SIZE = 256 * 1024
POOL_BUFFERS = 256


class _OpFuture(futures.Future):
    """A Future whose cancel() also cancels the operation (the completion
    still comes, and is then dropped)."""

    __slots__ = ("_op", "_sent")

    def __init__(self, *, loop: Any) -> None:
        super().__init__(loop=loop)
        self._op: Optional[Completion] = None
        self._sent = 0  # send/sendfile: bytes the kernel took so far

    def cancel(self, msg: Any = None) -> bool:
        op = self._op
        if op is not None and not op.done:
            try:
                op.cancel()
            except (OSError, PortClosedError):
                pass
        return super().cancel(msg) if msg is not None else super().cancel()


def _nbytes(c: Completion) -> int:
    return c.nbytes


def _data(c: Completion) -> bytes:
    return bytes(c.buffer[: c.nbytes])


def _none(c: Completion) -> None:
    return None


def _is_socket(obj: Any) -> bool:
    # type(), not isinstance(): a Mock(spec=sock) claims to be a socket.
    return issubclass(type(obj), socket.socket)


def _os_file(file: Any) -> Any:
    """What port.sendfile() takes for file: on Windows a Python file's
    fileno() is a C runtime descriptor, and TransmitFile needs its HANDLE
    (the stdlib's IocpProactor converts it the same way)."""
    if not WINDOWS or isinstance(file, (int, _FileHandle)):
        return file
    import msvcrt

    return msvcrt.get_osfhandle(file.fileno())


class PortProactor:
    """Operations on one CompletionPort for one event loop (one thread)."""

    def __init__(self, backend: Optional[str] = None) -> None:
        self._port = CompletionPort(backend=backend or "auto")
        self._loop: Any = None
        # Descriptor number -> the object registered under it. asyncio closes
        # sockets without unregistering them, and a number comes back for
        # the next socket: a different object under a known number is
        # registered again (IOCP associates the kernel object).
        self._owners: Dict[int, Any] = {}
        # Operations in flight: cancelled and waited for by close().
        self._pending: Dict[Completion, futures.Future] = {}
        self._stopped_serving: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        # Completions dequeued but not finished: a KeyboardInterrupt in a
        # direct callback left them for the next select().
        self._backlog: List[Completion] = []
        self._pool: Optional[BufferPool] = None
        self.pooled = _pooled_default()

    # ---- plumbing -------------------------------------------------------------

    @property
    def port(self) -> CompletionPort:
        return self._port

    def set_loop(self, loop: Any) -> None:
        self._loop = loop

    def _register(self, obj: Any) -> int:
        fd = obj if isinstance(obj, int) else obj.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "file descriptor closed")
        known = self._owners.get(fd)
        if known is not None:
            owner = known() if isinstance(known, weakref.ref) else known
            if owner is obj or isinstance(obj, int):
                return fd
            try:
                self._port.unregister(fd)
            except (ValueError, OSError):
                pass
        self._port.register(fd)
        try:
            self._owners[fd] = weakref.ref(obj)
        except TypeError:
            self._owners[fd] = obj
        return fd

    def _start(self, submit: Callable[..., Completion], finish: Callable[[Completion], Any],
               *args: Any, **kwargs: Any) -> futures.Future:
        fut = _OpFuture(loop=self._loop)
        op = submit(*args, context=(fut, finish), **kwargs)
        fut._op = op
        self._pending[op] = fut
        return fut

    def _done(self, value: Any) -> futures.Future:
        fut = self._loop.create_future()
        fut.set_result(value)
        return fut

    def _failed(self, exc: BaseException) -> futures.Future:
        fut = self._loop.create_future()
        fut.set_exception(exc)
        return fut

    def select(self, timeout: Optional[float] = None) -> List[futures.Future]:
        """Waits up to timeout seconds (None: until something completes) and
        finishes the futures of every completion dequeued; a direct
        operation's callback is called. What the callbacks submit reaches
        the kernel in one system call at the end. In C (csrc/loop/core.c),
        which the loop's _run_once() calls without this frame."""
        return _proactor_select(self, timeout)

    def wake(self) -> None:
        """Makes a select() in progress return (any thread)."""
        try:
            self._port.post()
        except (PortClosedError, ValueError):
            pass

    # ---- operations the stdlib loop and transports call ------------------------

    def recv(self, conn: Any, nbytes: int, flags: int = 0) -> futures.Future:
        try:
            self._register(conn)
            if _is_socket(conn):
                return self._start(self._port.recv, _data, conn, nbytes)
            return self._start(self._port.read, _data, conn, nbytes, None)
        except OSError as exc:
            return self._failed(exc)

    def recv_into(self, conn: Any, buf: Any, flags: int = 0) -> futures.Future:
        try:
            self._register(conn)
            if _is_socket(conn):
                return self._start(self._port.recv, _nbytes, conn, buf)
            return self._start(self._port.read, _nbytes, conn, buf, None)
        except OSError as exc:
            return self._failed(exc)

    def recv_direct(self, conn: Any, buf: Any, callback: Callable[[Completion], Any]) -> Completion:
        """Receives into buf; select() calls callback(completion) when it is
        done, with no Future in between (the transports' read loop). conn
        must be registered already (register()); errors raise here."""
        return self._port.recv(conn, buf, context=callback)

    def recv_pooled(self, conn: Any, callback: Callable[[Completion], Any]) -> Completion:
        """A receive into the loop's buffer pool (a buffer is taken only
        when data is there); select() calls callback(completion) when it is
        done. conn must be registered."""
        pool = self._pool
        if pool is None:
            pool = self._pool = BufferPool(POOL_BUFFER_SIZE, POOL_BUFFERS)
        return self._port.recv(conn, pool, context=callback)

    def again(self, op: Completion) -> Completion:
        """Starts a finished direct operation again, the same way (same
        buffer, same callback): no new Completion."""
        self._port.resubmit((op,))
        return op

    def register(self, conn: Any) -> None:
        """Associates conn with the port for the direct operations."""
        self._register(conn)

    def recvfrom(self, conn: socket.socket, nbytes: int, flags: int = 0) -> futures.Future:
        try:
            self._register(conn)
            return self._start(self._port.recvfrom, lambda c: (bytes(c.buffer[: c.nbytes]), c.result()[1]),
                               conn, nbytes)
        except OSError as exc:
            return self._failed(exc)

    def recvfrom_into(self, conn: socket.socket, buf: Any, nbytes: int = 0, flags: int = 0) -> futures.Future:
        try:
            self._register(conn)
            view = memoryview(buf)
            if nbytes:
                view = view[:nbytes]
            return self._start(self._port.recvfrom, lambda c: c.result(), conn, view)
        except OSError as exc:
            return self._failed(exc)

    def send(self, conn: Any, buf: Any, flags: int = 0) -> futures.Future:
        """Sends all of buf (the transports assume it): a short send goes on
        with the rest before the future is done."""
        try:
            self._register(conn)
            data = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else buf
            total = len(data)
            if _is_socket(conn):
                submit = self._port.send
                args: Tuple[Any, ...] = ()
            else:
                submit = self._port.write
                args = (None,)
            fut = _OpFuture(loop=self._loop)

            def finish(c: Completion, sent: int = 0) -> Any:
                sent += c.nbytes
                fut._sent = sent
                if sent >= total or c.nbytes == 0:
                    return sent
                rest = memoryview(data)[sent:]
                op = submit(conn, rest, *args, context=(fut, lambda c2: finish(c2, sent)))
                fut._op = op
                self._pending[op] = fut
                return _CONTINUED

            op = submit(conn, data, *args, context=(fut, finish))
            fut._op = op
            self._pending[op] = fut
            return fut
        except OSError as exc:
            return self._failed(exc)

    def sendto(self, conn: socket.socket, buf: Any, flags: int = 0, addr: Any = None) -> futures.Future:
        try:
            fd = self._register(conn)
            # A socket-like object (a wrapper, a test's Mock) goes by its number.
            target = conn if _is_socket(conn) else fd
            if addr is None:
                return self._start(self._port.send, _nbytes, target, buf)
            return self._start(self._port.sendto, _nbytes, target, buf, addr)
        except OSError as exc:
            return self._failed(exc)

    def accept(self, listener: socket.socket) -> futures.Future:
        try:
            self._register(listener)
        except OSError as exc:
            return self._failed(exc)

        def finish(c: Completion) -> Tuple[socket.socket, Any]:
            conn, addr = c.result()
            conn.setblocking(False)
            return conn, addr

        return self._start(self._port.accept, finish, listener)

    def connect(self, conn: socket.socket, address: Any) -> futures.Future:
        if conn.type == socket.SOCK_DGRAM:
            # Connecting a datagram socket only records the peer.
            try:
                conn.connect(address)
            except OSError as exc:
                return self._failed(exc)
            return self._done(None)
        try:
            self._register(conn)
            return self._start(self._port.connect, _none, conn, address)
        except OSError as exc:
            return self._failed(exc)

    def sendfile(self, sock: socket.socket, file: Any, offset: int, count: int) -> futures.Future:
        """Sends count bytes of file from offset (less at its end), the kernel
        copying; the loop counts on all of them having been sent."""
        try:
            self._register(sock)
            fut = _OpFuture(loop=self._loop)
            port = self._port
            file = _os_file(file)

            def finish(c: Completion, sent: int = 0) -> Any:
                sent += c.nbytes
                fut._sent = sent
                if sent >= count or c.nbytes == 0:
                    return sent
                op = port.sendfile(sock, file, offset + sent, count - sent,
                                   context=(fut, lambda c2: finish(c2, sent)))
                fut._op = op
                self._pending[op] = fut
                return _CONTINUED

            op = port.sendfile(sock, file, offset, count, context=(fut, finish))
            fut._op = op
            self._pending[op] = fut
            return fut
        except OSError as exc:
            return self._failed(exc)

    def wait_hangup(self, fileobj: Any) -> futures.Future:
        """Completes with b"" when the other end of a pipe or pty goes away
        (POLLERR/POLLHUP): how a write pipe transport learns that its reader
        closed (on Windows the stdlib reads the write end for that)."""
        try:
            self._register(fileobj)
            return self._start(self._port.poll, lambda c: b"", fileobj, 0)
        except OSError as exc:
            return self._failed(exc)

    def poll(self, fileobj: Any, events: int) -> futures.Future:
        """One-shot readiness; the future's result is the events that fired."""
        try:
            self._register(fileobj)
            return self._start(self._port.poll, _nbytes, fileobj, events)
        except OSError as exc:
            return self._failed(exc)

    def wait_process(self, process: Any) -> futures.Future:
        """Completes with the return code when the child exits (not reaped)."""
        return self._start(self._port.wait_process, lambda c: c.result(), process)

    # Windows pipe servers and process handles (IocpProactor's names).
    def connect_pipe(self, pipe: Any) -> futures.Future:
        self._register(pipe)
        return self._start(self._port.connect_pipe, lambda c: pipe, pipe)

    def wait_for_handle(self, handle: Any, timeout: Optional[float] = None) -> futures.Future:
        return self._start(self._port.wait_process, lambda c: True, handle, timeout=timeout)

    def _stop_serving(self, sock: socket.socket) -> None:
        self._stopped_serving.add(sock)

    def _unregister(self, obj: Any) -> None:
        fd = obj if isinstance(obj, int) else obj.fileno()
        if self._owners.pop(fd, None) is not None:
            try:
                self._port.unregister(fd)
            except (ValueError, OSError):
                pass

    def close(self) -> None:
        """Cancels every operation in flight, finishes their futures as
        cancelled, closes the port."""
        port = self._port
        if port.closed:
            return
        for op, fut in list(self._pending.items()):
            if not fut.done():
                fut.cancel()
        # close() waits (bounded) for the cancelled operations and releases
        # their buffers; their completions are not dequeued any more.
        port.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        self._owners.clear()
        self._backlog.clear()

    def __repr__(self) -> str:
        return f"<PortProactor backend={self._port.backend if not self._port.closed else 'closed'}>"


class _Continued:
    """finish() started the rest of the operation: the future stays pending."""


_CONTINUED = _Continued()

# _LoopCore (csrc/loop/core.c) does the stdlib's scheduling in C: call_soon,
# call_at, call_later, time and _run_once, on genuine events.Handle and
# TimerHandle objects, and this proactor's select(). It needs their classes;
# if the handles' slots are not what it fills in (another CPython), the loop
# calls the stdlib's methods.
_loop_core_setup(events.Handle, events.TimerHandle, proactor_events.BaseProactorEventLoop, PortProactor, _CONTINUED)


__all__ = ["PortProactor", "POLLIN", "POLLOUT", "POLLERR", "POLLHUP"]
