"""Reproducers of the bugs found by the reliability work (issue 6), one test
per bug, each in a child interpreter so that a crash fails the test instead
of ending the run. Fixed bugs stay as regression tests; the tests of open
ones carry the marker `known_bug` and FAIL until the core is fixed
(deselect them with -m "not known_bug"). docs/RELIABILITY.md has the
diagnosis and the fix of each.

All fixed in the core: BUG-1, BUG-2, BUG-3 (binding re-checks, fork), BUG-4 (size
refused before allocating), BUG-5 (io_uring maps io-wq's -EINTR).

BUG-1  Python code that runs in the middle of a call (a fileno() method, the
       socket's `family` property, an address's __fspath__, a finalizer run
       by the garbage collector when the call allocates its Completion, or
       another thread while getaddrinfo() runs with the GIL released) closes
       the port: the call goes on with self->handles == NULL or
       self->port == NULL (freed): segmentation fault.
BUG-2  The same window, unregister() instead of close(): submit_op() holds a
       borrowed reference to the registered key across that Python code;
       the key is freed and the new Completion INCREFs freed memory
       (ASan: heap-use-after-free).
BUG-3  fork(): a child that ends normally finalizes the ports it inherited,
       and they are the parent's kernel objects. io_uring: the child cancels
       the parent's operations through the shared ring and reaps their
       completions from the shared CQ: the parent's operation is never
       completed, and the parent's close() then spins forever (the shared
       SQ tail moved behind its private copy). epoll, once the file pool has
       threads: the child hangs at exit in pthread_join() of pool threads
       that do not exist in it.
"""
from __future__ import annotations

import sys

import pytest

from relutil import ON_LINUX, assert_clean_exit, run_child

pytestmark = pytest.mark.reliability

REENTRANT_CLOSE = {
    "register": """
        class Evil:
            def fileno(self):
                port.close()
                return b.fileno()
        try:
            port.register(Evil())
        except fastiocp.PortClosedError:
            pass
    """,
    "unregister": """
        port.register(b)
        class Evil:
            def fileno(self):
                port.close()
                return b.fileno()
        try:
            port.unregister(Evil())
        except fastiocp.PortClosedError:
            pass
    """,
    "recv-fileno": """
        port.register(b)
        class Evil:
            def fileno(self):
                port.close()
                return b.fileno()
        try:
            port.recv(Evil(), 10)
        except fastiocp.PortClosedError:
            pass
    """,
    "sendto-family": """
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        port.register(u)
        class Evil:
            def fileno(self):
                return u.fileno()
            @property
            def family(self):
                port.close()
                return socket.AF_INET
        try:
            port.sendto(Evil(), b"x", ("127.0.0.1", 9))
        except fastiocp.PortClosedError:
            pass
    """,
    "connect-fspath": """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        port.register(s)
        class Path:
            def __fspath__(self):
                port.close()
                return "/nonexistent/fastiocp.sock"
        try:
            port.connect(s, Path())
        except fastiocp.PortClosedError:
            pass
    """,
    "post-gc-finalizer": """
        import gc
        class Closer:
            def __del__(self):
                port.close()
        gc.disable()
        c = Closer(); c.cycle = c; del c   # garbage with a finalizer
        gc.set_threshold(1)
        gc.enable()
        try:
            for i in range(100):
                port.post(context=[i])     # allocating the Completion runs the GC
        except fastiocp.PortClosedError:
            pass
    """,
}


@pytest.mark.skipif(not ON_LINUX, reason="AF_UNIX and the Linux backends; the binding code is shared with Windows")
@pytest.mark.parametrize("case", sorted(REENTRANT_CLOSE))
def test_bug1_port_closed_by_python_code_inside_a_call(case):
    """BUG-1: expected PortClosedError (or success), got SIGSEGV."""
    import textwrap

    body = textwrap.dedent(REENTRANT_CLOSE[case])
    code = ("import socket, fastiocp\n"
            "port = fastiocp.CompletionPort()\n"
            "a, b = socket.socketpair()\n" + body + "\nprint('survived')\n")
    r = run_child(code, timeout=30)
    assert_clean_exit(r)
    assert "survived" in r.stdout


@pytest.mark.skipif(not ON_LINUX, reason="AF_UNIX address with __fspath__")
def test_bug2_key_freed_by_unregister_inside_submit():
    """BUG-2: the registered key must stay alive in the Completion (or the
    call must raise because the socket is no longer registered)."""
    r = run_child("""
        import socket, weakref, fastiocp
        port = fastiocp.CompletionPort()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        class Key:
            pass
        key = Key()
        ref = weakref.ref(key)
        port.register(s, key=key)
        del key                       # only the registration holds the key now
        class Path:
            def __fspath__(self):
                port.unregister(s)    # drops the key while connect() holds it
                return "/nonexistent/fastiocp.sock"
        try:
            op = port.connect(s, Path())
        except (ValueError, KeyError) as exc:
            print("raised", type(exc).__name__)
        else:
            print("key alive:", ref() is not None and op.key is ref())
            port.get(timeout=5)
        port.close()
    """, timeout=30)
    assert_clean_exit(r)
    assert "raised" in r.stdout or "key alive: True" in r.stdout, r.stdout


FORK_PARENT = """
import os, socket, sys, time, tempfile, fastiocp
port = fastiocp.CompletionPort(backend={backend!r})
a, b = socket.socketpair()
port.register(b)
if {with_file!r}:
    f = fastiocp.open(os.path.join(tempfile.mkdtemp(), "f"), "w+b")
    port.register(f)
    port.write(f, b"x" * 100, offset=0)   # epoll: starts a file-pool thread
    assert port.get(timeout=5).nbytes == 100
    time.sleep(0.2)                       # the pool thread now waits on its condvar
op = port.recv(b, bytearray(100), context="parent's recv")
pid = os.fork()
if pid == 0:
    sys.exit(0)                            # the child ends normally: finalizers run
deadline = time.monotonic() + 5
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung at exit")
        sys.exit(3)
    time.sleep(0.01)
print("child exit status", status)
a.sendall(b"hello")
c = port.get(timeout=3)
print("parent got", c and bytes(c.buffer[:c.nbytes]))
if c is None:
    os._exit(4)                            # close() would spin forever
t0 = time.monotonic()
port.close()
print("close took %.1f s" % (time.monotonic() - t0))
"""


@pytest.mark.skipif(not ON_LINUX, reason="fork() is POSIX")
@pytest.mark.parametrize("backend_name,with_file", [("io_uring", False), ("epoll", True)])
def test_bug3_forked_child_exit_breaks_parent_port(backend, backend_name, with_file):
    """BUG-3: after fork(), the child's normal exit must leave the parent's
    port alone: the parent's pending receive completes with its data, and
    both processes exit promptly."""
    if backend != backend_name:
        pytest.skip(f"this case is for the {backend_name} backend")
    r = run_child(FORK_PARENT.format(backend=backend, with_file=with_file), timeout=60)
    assert_clean_exit(r)
    assert "child exit status 0" in r.stdout
    assert "parent got b'hello'" in r.stdout


def test_bug4_absurd_receive_size_trips_cpython_error_path():
    """BUG-4 (minor): recv(sock, 2**62) allocates with
    PyByteArray_FromStringAndSize(), whose failure path in CPython <= 3.13
    deallocates a half-built bytearray with ob_exports uninitialized: with
    recycled memory it prints "SystemError: deallocated bytearray object has
    exported buffers". Expected: a clean ValueError or MemoryError, nothing
    on stderr (refuse sizes above the 0x7ffff000 a single operation can
    move, before allocating)."""
    r = run_child("""
        import socket, fastiocp
        port = fastiocp.CompletionPort()
        a, b = socket.socketpair()
        port.register(b)
        for attempt in range(500):
            junk = [bytes(16) + b"\\x01\\x00\\x00\\x00" + bytes(i % 3) for i in range(300)]
            del junk                     # recycled blocks with ob_exports == 1
            try:
                port.recv(b, 2**62)
            except (MemoryError, ValueError, OverflowError):
                pass
        print("done")
    """, timeout=60)
    hits = r.stderr.count("SystemError")
    assert hits == 0, f"{hits} times: {r.stderr[:200]}"
    assert_clean_exit(r)


BUG5_CHILD = """
import socket, sys, threading, time, fastiocp
mode = {mode!r}
port = fastiocp.CompletionPort(backend="io_uring")
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
port.register(b)
victim, ready, stolen, leave = [], threading.Event(), threading.Event(), threading.Event()

def submitter():
    victim.append(port.recv(b, bytearray(8), context="victim"))
    ready.set()
    for _ in range(127):
        b.recv(8)          # this thread's blocking recv takes every message; the
                           # victim's retry (task work, run as the thread returns
                           # to user mode) finds nothing: 127 lost wake-ups
    stolen.set()
    leave.wait()

t = threading.Thread(target=submitter)
t.start()
ready.wait()
time.sleep(0.2)            # let the submitter block in its recv first, or the
                           # victim may get the first message
for i in range(127):
    a.send(b"m%d" % i)
    time.sleep(0.002)
assert stolen.wait(20)
time.sleep(0.1)
op = victim[0]
assert not op.done
if mode == "cancel":
    assert op.cancel() is True
else:
    leave.set()
    t.join()               # the submitting thread exits: nobody cancels
    time.sleep(0.2)
    a.send(b"late")        # a resubmitted receive gets this
c = port.get(timeout=5)
print("victim:", c is op, c.cancelled, repr(c.error), c.nbytes)
leave.set()
t.join()
port.close()
"""


@pytest.mark.skipif(not ON_LINUX, reason="io_uring")
@pytest.mark.parametrize("mode", ["cancel", "thread-exit"])
def test_bug5_receive_moved_to_io_wq_completes_with_eintr(backend, mode):
    """BUG-5: a cancelled receive must complete cancelled (ECANCELED,
    cancelled == True); one whose thread exited must be resubmitted and
    receive its data."""
    if backend != "io_uring":
        pytest.skip("io_uring only")
    r = run_child(BUG5_CHILD.format(mode=mode), timeout=60)
    assert_clean_exit(r)
    if mode == "cancel":
        assert "victim: True True OSError(125" in r.stdout, r.stdout
    else:
        assert "victim: True False None 4" in r.stdout, r.stdout


@pytest.mark.known_bug
@pytest.mark.xfail(reason="open BUG-6 (IOCP): not fixed yet; see docs/RELIABILITY.md", strict=False)
@pytest.mark.skipif(sys.platform != "win32", reason="IOCP backend (Windows; seen under Wine)")
def test_bug6_file_write_failing_at_once_completes_twice():
    """BUG-6: one completion per submission, even when the OS both fails
    the call at once and queues a packet for it."""
    r = run_child("""
        import os, sys, tempfile, fastiocp
        port = fastiocp.CompletionPort()
        path = os.path.join(tempfile.mkdtemp(), "f")
        with open(path, "wb") as fh:
            fh.write(bytes(8192))
        f = fastiocp.open(path, "r+b")
        port.register(f)
        for off in (2**50, 2**62):
            op = port.write(f, b"x" * 10, offset=off)
            c = port.get(timeout=5)
            assert c is op, c
            extra = port.get(timeout=1)
            assert extra is None, f"a second completion: {extra!r}"
        port.close()
        f.close()
        print("once each")
    """, timeout=20)
    assert_clean_exit(r)
    assert "once each" in r.stdout
