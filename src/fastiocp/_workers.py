"""The worker-thread pattern of completion ports, as a helper.

N threads wait on one port; each completion goes to handler(completion). To
stop, one EXIT packet per thread is posted and the threads are joined: the
seed's "post an EXIT key to stop workers", done right.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import Any, Callable, Optional

from ._fastiocp import Completion, CompletionPort, PortClosedError

__all__ = ["EXIT", "WorkerPool"]


class _ExitKey:
    """The key of the packets that stop WorkerPool threads."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "fastiocp.EXIT"


EXIT = _ExitKey()
"""Key of the packet that tells one WorkerPool thread to stop."""


def _default_threads() -> int:
    return 2 * (os.cpu_count() or 1)


class WorkerPool:
    """A pool of threads that dequeue completions and call a handler.

    WorkerPool(port, handler, threads=None, max_batch=64, on_error=None,
               batch_submissions=False)

    handler(completion) runs in a worker thread for every completion except
    the EXIT packets that stop the pool. threads defaults to two per logical
    CPU. If handler raises, on_error(exc, completion) is called (by default
    the traceback is printed to stderr), the exception is kept in
    ``errors``, and the worker goes on: one bad packet never kills the pool
    silently. stop() raises the first handler error, if any, once every
    thread has stopped.

    Each thread dequeues up to max_batch completions at a time; with
    several threads and costly handlers a smaller max_batch spreads the
    work more evenly. With batch_submissions=True the handler calls of
    one dequeued batch run inside ``port.batch()``: what they submit
    reaches the kernel in one system call when the batch is handled
    (io_uring; other backends submit at once anyway). A handler must then
    not block waiting for I/O it submitted itself.
    """

    def __init__(
        self,
        port: CompletionPort,
        handler: Callable[[Completion], Any],
        threads: Optional[int] = None,
        max_batch: int = 64,
        on_error: Optional[Callable[[BaseException, Completion], Any]] = None,
        batch_submissions: bool = False,
    ) -> None:
        if threads is None:
            threads = _default_threads()
        if threads < 1:
            raise ValueError("threads must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.port = port
        self.handler = handler
        self.nthreads = threads
        self.max_batch = max_batch
        self.on_error = on_error
        self.batch_submissions = batch_submissions
        self.errors: list[BaseException] = []
        self._errors_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = False

    def start(self) -> WorkerPool:
        """Start the worker threads. Returns self."""
        if self._started:
            raise RuntimeError("WorkerPool already started")
        self._started = True
        for i in range(self.nthreads):
            t = threading.Thread(target=self._run, name=f"fastiocp-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _report(self, exc: BaseException, completion: Completion) -> None:
        with self._errors_lock:
            self.errors.append(exc)
        if self.on_error is not None:
            try:
                self.on_error(exc, completion)
                return
            except BaseException as hook_exc:  # the hook itself failed: say so
                exc = hook_exc
        print(f"fastiocp.WorkerPool: handler failed on {completion!r}:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)

    def _run(self) -> None:
        port, max_batch, batched = self.port, self.max_batch, self.batch_submissions
        handle = self._handle
        while True:
            try:
                completions = port.get_many(max_batch)
            except PortClosedError:
                return
            exits = self._handle_batched(completions) if batched else handle(completions)
            if exits:
                # One EXIT stops one thread: hand the extra ones on.
                for _ in range(exits - 1):
                    try:
                        port.post(EXIT)
                    except PortClosedError:
                        pass
                return

    def _handle_batched(self, completions: list[Completion]) -> int:
        """_handle() inside port.batch(); a port closed meanwhile (no batch
        to open, or none to flush) still has every completion handled."""
        try:
            scope = self.port.batch()
            scope.__enter__()
        except PortClosedError:
            return self._handle(completions)
        try:
            return self._handle(completions)
        finally:
            try:
                scope.__exit__(None, None, None)
            except PortClosedError:
                pass

    def _handle(self, completions: list[Completion]) -> int:
        """Runs the handler on each completion; returns the EXIT packets met."""
        handler = self.handler
        exits = 0
        for c in completions:
            if c.key is EXIT and c.op == "post":
                exits += 1
                continue
            try:
                handler(c)
            except Exception as exc:
                self._report(exc, c)
        return exits

    def stop(self, timeout: Optional[float] = None) -> None:
        """Post one EXIT per thread, join them, raise the first handler error.

        If the port is already closed the threads have stopped on their own.
        """
        alive = [t for t in self._threads if t.is_alive()]
        for _ in alive:
            try:
                self.port.post(EXIT)
            except PortClosedError:
                break
        for t in self._threads:
            t.join(timeout)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise TimeoutError(f"worker threads did not stop: {', '.join(stuck)}")
        self._threads.clear()
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> WorkerPool:
        if not self._started:
            self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.stop()
        else:
            try:
                self.stop()
            except Exception:
                pass  # the exception already propagating is the one to see
