"""fastiocp's asyncio event loop: the stdlib's proactor loop on a
CompletionPort, completed with what the stdlib has only in its selector loop
(readers and writers, signals, Unix sockets, Unix subprocesses)."""
from __future__ import annotations

import errno
import inspect
import io
import os
import signal
import socket
import stat
import sys
import threading
import warnings
from asyncio import base_events, coroutines, events, proactor_events, tasks
from typing import Any, Callable, Dict, Optional

from .._fastiocp import _LoopCore
from . import _transports
from ._proactor import POLLERR, POLLHUP, POLLIN, POLLOUT, PortProactor

WINDOWS = sys.platform == "win32"
if not WINDOWS:
    from asyncio import unix_events


def _sighandler_noop(signum: int, frame: Any) -> None:
    """The wakeup fd carries the signal number; nothing to do here."""


class _Watch:
    """add_reader/add_writer state of one descriptor: one pending poll for
    the events someone watches, the handles to call when it fires."""

    __slots__ = ("reader", "writer", "fut", "events")

    def __init__(self) -> None:
        self.reader: Optional[events.Handle] = None
        self.writer: Optional[events.Handle] = None
        self.fut: Any = None
        self.events = 0


# Handle._run's report passes debug= where the stdlib's formatter takes it (3.13).
_FORMAT_TAKES_DEBUG = "debug" in inspect.signature(events.format_helpers._format_callback_source).parameters


class EventLoop(_LoopCore, proactor_events.BaseProactorEventLoop):
    """An asyncio event loop on a fastiocp CompletionPort (IOCP on Windows,
    io_uring or epoll on Linux). One loop per thread.

    backend: as for CompletionPort (None: FASTIOCP_BACKEND, else the best
    backend that works here)."""

    def __init__(self, backend: Optional[str] = None) -> None:
        self._watches: Dict[int, _Watch] = {}
        self._signal_handlers: Dict[int, events.Handle] = {}
        super().__init__(PortProactor(backend))
        # The self-pipe's reader carries signal numbers (set_wakeup_fd);
        # IocpProactor's loop starts it in run_forever, the base class never.
        self.call_soon(self._loop_self_reading)

    def _report_handle_error(self, handle: events.Handle, exc: BaseException) -> None:
        # Handle._run()'s report of a callback's exception, for the handles
        # _LoopCore._run_once() runs itself.
        fmt = events.format_helpers._format_callback_source
        if _FORMAT_TAKES_DEBUG:
            cb = fmt(handle._callback, handle._args, debug=self.get_debug())
        else:
            cb = fmt(handle._callback, handle._args)
        context = {"message": f"Exception in callback {cb}", "exception": exc, "handle": handle}
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    @property
    def backend(self) -> str:
        """The port's backend: 'iocp', 'io_uring' or 'epoll'."""
        return self._proactor.port.backend

    # ---- wake-ups: a packet posted to the port, no self-pipe ------------------

    def _write_to_self(self) -> None:
        proactor = self._proactor
        if proactor is not None:
            proactor.wake()

    def _loop_self_reading(self, f: Any = None) -> None:
        # The socket pair the base class makes only carries signal numbers
        # now (signal.set_wakeup_fd): read them, dispatch the handlers.
        try:
            if f is not None:
                data = f.result()
                if data and self._signal_handlers:
                    for signum in data:
                        self._handle_signal(signum)
            if self._self_reading_future is not f:
                return
            f = self._proactor.recv(self._ssock, 4096)
        except base_events.exceptions.CancelledError:
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001
            self.call_exception_handler({
                "message": "Error on reading from the event loop self pipe",
                "exception": exc,
                "loop": self,
            })
        else:
            self._self_reading_future = f
            f.add_done_callback(self._loop_self_reading)

    # ---- transports that tolerate Linux's shutdown() answers -------------------

    def _make_socket_transport(self, sock, protocol, waiter=None, extra=None, server=None):
        return _transports.SocketTransport(self, sock, protocol, waiter, extra, server)

    def _make_ssl_transport(self, rawsock, protocol, sslcontext, waiter=None, *, server_side=False,
                            server_hostname=None, extra=None, server=None, ssl_handshake_timeout=None,
                            ssl_shutdown_timeout=None):
        kwargs = {}
        if ssl_shutdown_timeout is not None or sys.version_info >= (3, 11):
            kwargs["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        ssl_protocol = base_events.sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout, **kwargs)
        _transports.SocketTransport(self, rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        return _transports.DatagramTransport(self, sock, protocol, address, waiter, extra)

    def _make_duplex_pipe_transport(self, sock, protocol, waiter=None, extra=None):
        return _transports.DuplexPipeTransport(self, sock, protocol, waiter, extra)

    def _make_read_pipe_transport(self, sock, protocol, waiter=None, extra=None):
        return _transports.ReadPipeTransport(self, sock, protocol, waiter, extra)

    def _make_write_pipe_transport(self, sock, protocol, waiter=None, extra=None):
        return _transports.WritePipeTransport(self, sock, protocol, waiter, extra)

    # ---- sendfile: progress kept when the peer goes away ------------------------

    async def _sock_sendfile_native(self, sock, file, offset, count):
        # As the stdlib proactor loop, but the file position also counts the
        # bytes a failed sendfile had sent (the selector loop's behaviour).
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise base_events.exceptions.SendfileNotAvailableError("not a regular file")
        try:
            fsize = os.fstat(fileno).st_size
        except OSError:
            raise base_events.exceptions.SendfileNotAvailableError("not a regular file")
        end = min(offset + count, fsize) if count else fsize
        offset = min(offset, fsize)
        sent = 0
        try:
            while offset + sent < end:
                fut = self._proactor.sendfile(sock, file, offset + sent, min(end - offset - sent, 0x7FFF_F000))
                try:
                    n = await fut
                finally:
                    sent += getattr(fut, "_sent", 0)
                if not n:
                    break  # the file ended early
            return sent
        finally:
            if sent > 0:
                file.seek(offset + sent)

    # ---- readiness: add_reader / add_writer through port.poll -----------------

    def _fd(self, fd: Any) -> int:
        if isinstance(fd, int):
            if fd < 0:
                raise ValueError(f"Invalid file descriptor: {fd}")
            return fd
        try:
            n = int(fd.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fd!r}") from None
        if n < 0:
            raise ValueError(f"Invalid file descriptor: {n}")
        return n

    def _arm(self, fd: int, watch: _Watch) -> None:
        want = (POLLIN if watch.reader is not None else 0) | (POLLOUT if watch.writer is not None else 0)
        if watch.fut is not None:
            if watch.events == want:
                return
            watch.fut.cancel()
            watch.fut = None
        if not want:
            return
        watch.events = want
        fut = self._proactor.poll(fd, want)
        watch.fut = fut
        fut.add_done_callback(lambda f, fd=fd, w=watch: self._fired(fd, w, f))

    def _fired(self, fd: int, watch: _Watch, fut: Any) -> None:
        if watch.fut is not fut:
            return  # replaced by a poll for other events
        watch.fut = None
        if fut.cancelled():
            return
        exc = fut.exception()
        mask = POLLIN | POLLOUT if exc is not None else fut.result()
        if self._watches.get(fd) is not watch:
            return
        reader, writer = watch.reader, watch.writer
        if mask & (POLLIN | POLLERR | POLLHUP) and reader is not None:
            if reader._cancelled:
                watch.reader = None
            else:
                self._add_callback(reader)
        if mask & (POLLOUT | POLLERR | POLLHUP) and writer is not None:
            if writer._cancelled:
                watch.writer = None
            else:
                self._add_callback(writer)
        if exc is not None and isinstance(exc, OSError) and exc.errno == errno.EBADF:
            return  # the descriptor was closed under us
        # Level-triggered, as a selector: armed again; it fires at once if
        # the callback leaves data unread.
        if watch.reader is not None or watch.writer is not None:
            self.call_soon(self._rearm, fd, watch)

    def _rearm(self, fd: int, watch: _Watch) -> None:
        if self._watches.get(fd) is watch and watch.fut is None and not self.is_closed():
            self._arm(fd, watch)

    def _add(self, fd: Any, which: str, callback: Callable[..., Any], args: Any) -> None:
        self._check_closed()
        n = self._fd(fd)
        watch = self._watches.setdefault(n, _Watch())
        old = getattr(watch, which)
        if old is not None:
            old.cancel()
        setattr(watch, which, events.Handle(callback, args, self, None))
        self._arm(n, watch)

    def add_reader(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        """Call callback(*args) whenever fd is readable."""
        self._add(fd, "reader", callback, args)

    def add_writer(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        """Call callback(*args) whenever fd is writable."""
        self._add(fd, "writer", callback, args)

    def _remove(self, fd: Any, which: str) -> bool:
        n = self._fd(fd)
        watch = self._watches.get(n)
        if watch is None or getattr(watch, which) is None:
            return False
        getattr(watch, which).cancel()
        setattr(watch, which, None)
        if watch.reader is None and watch.writer is None:
            del self._watches[n]
            if watch.fut is not None:
                watch.fut.cancel()
                watch.fut = None
        elif not self.is_closed():
            self._arm(n, watch)
        return True

    def remove_reader(self, fd: Any) -> bool:
        """Stop watching fd for reading. Returns whether it was watched."""
        if self.is_closed():
            return False
        return self._remove(fd, "reader")

    def remove_writer(self, fd: Any) -> bool:
        """Stop watching fd for writing. Returns whether it was watched."""
        if self.is_closed():
            return False
        return self._remove(fd, "writer")

    # ---- signals (POSIX) ------------------------------------------------------

    def _check_signal(self, sig: int) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig: int, callback: Callable[..., Any], *args: Any) -> None:
        """Call callback(*args) in the loop when signal sig arrives (POSIX,
        main thread)."""
        if WINDOWS:
            raise NotImplementedError
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        try:
            # ValueError off the main thread: a loop in another thread
            # cannot take signals.
            signal.set_wakeup_fd(self._csock.fileno())
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc))
        handle = events.Handle(callback, args, self, None)
        self._signal_handlers[sig] = handle
        try:
            signal.signal(sig, _sighandler_noop)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig} cannot be caught")
            raise

    def _handle_signal(self, sig: int) -> None:
        handle = self._signal_handlers.get(sig)
        if handle is None:
            return
        if handle._cancelled:
            self.remove_signal_handler(sig)
        else:
            self._add_callback_signalsafe(handle)

    def remove_signal_handler(self, sig: int) -> bool:
        """Remove the handler of signal sig. Returns whether there was one."""
        if WINDOWS:
            raise NotImplementedError
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig} cannot be caught")
            raise
        return True

    # ---- Unix sockets ---------------------------------------------------------

    async def create_unix_connection(self, protocol_factory, path=None, *, ssl=None, sock=None,
                                     server_hostname=None, ssl_handshake_timeout=None,
                                     ssl_shutdown_timeout=None):
        """Connect to a Unix socket at path (or use sock)."""
        if WINDOWS:
            raise NotImplementedError
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            sock.setblocking(False)
        kwargs = {}
        if ssl_shutdown_timeout is not None:
            kwargs["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        transport, protocol = await self._create_connection_transport(
            sock, protocol_factory, ssl, server_hostname, ssl_handshake_timeout=ssl_handshake_timeout,
            **kwargs)
        return transport, protocol

    async def create_unix_server(self, protocol_factory, path=None, *, sock=None, backlog=100, ssl=None,
                                 ssl_handshake_timeout=None, ssl_shutdown_timeout=None,
                                 start_serving=True, cleanup_socket=True):
        """A server on a Unix socket at path (or on sock)."""
        if WINDOWS:
            raise NotImplementedError
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # A stale socket file from a previous server is removed, as the
            # selector loop does; anything else at path is an error.
            if path[0] not in (0, "\x00"):
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    base_events.logger.error("Unable to check or remove stale UNIX socket %r: %r",
                                             path, err)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
        if cleanup_socket:
            path = sock.getsockname()
            if isinstance(path, str) and path and path[0] != "\x00":
                try:
                    self._unix_server_sockets[sock] = os.stat(path).st_ino
                except (FileNotFoundError, AttributeError):
                    pass
        sock.setblocking(False)
        kwargs = {}
        if ssl_shutdown_timeout is not None:
            kwargs["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        server = base_events.Server(self, [sock], protocol_factory, ssl, backlog, ssl_handshake_timeout,
                                    **kwargs)
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)  # let the accept loop start before returning
        return server

    @property
    def _unix_server_sockets(self) -> Dict[Any, int]:
        d = self.__dict__.get("_unix_sockets")
        if d is None:
            d = self.__dict__["_unix_sockets"] = {}
        return d

    def _stop_serving(self, sock: socket.socket) -> None:
        ino = self._unix_server_sockets.pop(sock, None)
        path = None
        if ino is not None:
            try:
                path = sock.getsockname()
            except OSError:
                path = None
        super()._stop_serving(sock)
        if path:
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass

    # ---- subprocesses (POSIX: pipes on the port, exits from wait_process) ----

    if not WINDOWS:
        async def _make_subprocess_transport(self, protocol, args, shell, stdin, stdout, stderr, bufsize,
                                             extra=None, **kwargs):
            if sys.version_info < (3, 14):
                watcher = getattr(events.get_event_loop_policy(), "_watcher", None)
                if watcher is not None:
                    self._check_child_watcher(watcher)
            waiter = self.create_future()
            transp = unix_events._UnixSubprocessTransport(
                self, protocol, args, shell, stdin, stdout, stderr, bufsize, waiter=waiter, extra=extra,
                **kwargs)
            pid = transp.get_pid()
            exited = self._proactor.wait_process(pid)
            exited.add_done_callback(lambda f: self._child_exited(pid, transp, f))
            return await _started(transp, waiter)

        @staticmethod
        def _check_child_watcher(watcher: Any) -> None:
            # Children are waited for on the port, not by a child watcher;
            # but a watcher the program installed and left inactive refuses
            # subprocesses, as with the stdlib loop (3.8-3.13).
            msg = "asyncio.get_child_watcher() is not activated, subprocess support is not installed."
            if sys.version_info < (3, 12):
                with watcher as entered:
                    if not entered.is_active():
                        raise RuntimeError(msg)
            else:
                with watcher:
                    if not watcher.is_active():
                        raise RuntimeError(msg)

        def _child_exited(self, pid: int, transp: Any, fut: Any) -> None:
            if fut.cancelled():
                return
            # wait_process does not reap: reap here, then tell the transport.
            try:
                _, status = os.waitpid(pid, 0)
                returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                exc = fut.exception()
                returncode = 255 if exc is not None else fut.result()
                if transp._proc is not None and transp._proc.returncode is not None:
                    returncode = transp._proc.returncode
            if self.is_closed():
                return
            transp._process_exited(returncode)
    else:
        async def _make_subprocess_transport(self, protocol, args, shell, stdin, stdout, stderr, bufsize,
                                             extra=None, **kwargs):
            from asyncio import windows_events

            waiter = self.create_future()
            transp = windows_events._WindowsSubprocessTransport(
                self, protocol, args, shell, stdin, stdout, stderr, bufsize, waiter=waiter, extra=extra,
                **kwargs)
            return await _started(transp, waiter)

    # ---- closing --------------------------------------------------------------

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        for sig in list(self._signal_handlers):
            self.remove_signal_handler(sig)
        for watch in self._watches.values():
            if watch.fut is not None:
                watch.fut.cancel()
        self._watches.clear()
        super().close()

    def __repr__(self) -> str:
        state = "closed" if self.is_closed() else ("running" if self.is_running() else "idle")
        backend = self._proactor.port.backend if self._proactor is not None else "-"
        return f"<fastiocp.EventLoop {state} backend={backend} debug={self.get_debug()}>"


async def _started(transp: Any, waiter: Any) -> Any:
    """The subprocess transport once its pipes are connected; if that
    fails, the child is closed and waited for before the error goes on."""
    try:
        await waiter
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        transp.close()
        await transp._wait()
        raise
    return transp


def new_event_loop(backend: Optional[str] = None) -> EventLoop:
    """A new EventLoop (the loop_factory for asyncio.run and asyncio.Runner)."""
    return EventLoop(backend)


class EventLoopPolicy(events.BaseDefaultEventLoopPolicy):
    """The default policy with fastiocp's loop: asyncio.set_event_loop_policy(
    fastiocp.EventLoopPolicy()) makes asyncio.new_event_loop() and
    asyncio.run() use it."""

    _loop_factory = EventLoop

    def new_event_loop(self) -> EventLoop:
        return EventLoop()


def run(main: Any, *, debug: Optional[bool] = None) -> Any:
    """Run the coroutine main on a new fastiocp EventLoop and close it, as
    asyncio.run() does."""
    if sys.version_info >= (3, 11):
        import asyncio

        with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
            return runner.run(main)
    import asyncio

    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(EventLoopPolicy())
    try:
        return asyncio.run(main, debug=debug)
    finally:
        asyncio.set_event_loop_policy(old)
