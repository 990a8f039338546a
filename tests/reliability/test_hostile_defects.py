"""Regression tests for the defects that hostile testing found on commit
7cbe4b8 (issue 11), one test per defect, on every backend it concerns.
Each failed (hang, crash, wrong descriptor, leak or wrong error) before its
fix; docs/RELIABILITY.md names the cause of each (HOSTILE-1 .. HOSTILE-11).
Code that could crash or hang the interpreter runs in a child interpreter,
so that it fails the test instead of ending the run.
"""
from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
import time
import weakref

import pytest

import fastiocp
from conftest import ON_LINUX, UNDER_ASAN, growth, open_fd_count
from relutil import REPO, assert_clean_exit, env_int, run_child

pytestmark = pytest.mark.reliability

linux_only = pytest.mark.skipif(not ON_LINUX, reason="a Linux backend's defect")


# ---------------------------------------------------------------------------
# HOSTILE-1: a forked child's exit must not touch the parent's port


@linux_only
def test_fork_child_exit_leaves_parent_port_working(backend):
    """A thread holds a concurrency slot when the process forks; the child
    ends normally (its thread-state dict is cleared, which gave the slot
    back through the parent's shared io_uring ring). The parent's next
    submission spun forever with the GIL held."""
    r = run_child(f"""
        import os, socket, sys, threading, time, fastiocp
        port = fastiocp.CompletionPort(concurrency=1, backend={backend!r})
        a, b = socket.socketpair()
        port.register(a)
        port.recv(a, 16)
        port.post(); port.get(timeout=5)            # this thread holds the slot
        got = []                                    # what any thread dequeued
        threading.Thread(target=lambda: got.append(port.get(timeout=30)), daemon=True).start()
        time.sleep(0.3)
        port.post(); time.sleep(0.3)
        pid = os.fork()
        if pid == 0:
            sys.exit(0)                             # a normal exit, not os._exit
        os.waitpid(pid, 0)
        c = port.recv(a, 16)                        # hung here
        b.send(b"ping")
        deadline = time.monotonic() + 10
        while not any(x is not None and x.op == "recv" and x.nbytes == 4 for x in got):
            assert time.monotonic() < deadline, got
            got += port.get_many(16, timeout=0.5)
        print("ok")
    """, timeout=60)
    assert_clean_exit(r)
    assert r.stdout.startswith("ok"), r.stdout


# ---------------------------------------------------------------------------
# HOSTILE-2: freeing a long chain of Completions must not overflow the stack


def test_deep_chain_of_completions_is_freed_without_recursion(backend):
    """Each Completion the context of the next, 2,000,000 deep (100,000
    under Wine, whose stack is smaller and whose packets slower): the
    recursive dealloc overflowed the C stack (SIGSEGV). Tuples and plain
    objects survive the same depth through CPython's trashcan."""
    depth = env_int("FASTIOCP_CHAIN_DEPTH", 2_000_000, wine=100_000)
    r = run_child(f"""
        import fastiocp
        port = fastiocp.CompletionPort(backend={backend!r})
        prev = None
        for i in range({depth}):
            port.post(context=prev)
            prev = port.get()
        del prev
        port.close()
        print("freed")
    """, timeout=600)
    assert_clean_exit(r)
    assert "freed" in r.stdout


# ---------------------------------------------------------------------------
# HOSTILE-3: a handle out of range must be refused, never truncated


@pytest.mark.skipif(sys.platform == "win32", reason="HANDLEs are pointer-sized: no truncation on Windows")
def test_file_handle_beyond_int_is_refused(backend, tmp_path):
    """fastiocp.File(2**32 + w) wrote to descriptor w on io_uring (the
    handle was truncated to 32 bits): 2**32 + 1 would write to stdout."""
    path = tmp_path / "target"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    stdin_before = os.fstat(0)
    try:
        for bad in (2**32 + fd, 2**31, 2**63 - 1, 2**64, -1):
            with pytest.raises((ValueError, OverflowError), match="descriptor|handle|int"):
                fastiocp.File(bad, "x", "wb")
            gc.collect()
        # the half-made Files above must not have closed descriptor 0 (a
        # File whose __init__ failed named it, and its __del__ closed it)
        assert os.fstat(0) == stdin_before
        with fastiocp.CompletionPort(backend=backend) as port:
            for bad in (2**32 + fd, 2**31):
                with pytest.raises((ValueError, OverflowError)):
                    port.register(bad)

                class Sock:
                    def fileno(self, v=bad):
                        return v

                with pytest.raises((ValueError, OverflowError)):
                    port.register(Sock())
        assert os.path.getsize(path) == 0
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# HOSTILE-4: a closed port with concurrency > 0 is freed


def test_closed_port_with_concurrency_is_freed(backend):
    """The concurrency slot token in the thread-state dict held a strong
    reference to the port: a closed port stayed alive forever."""
    p = fastiocp.CompletionPort(concurrency=1, backend=backend)
    p.post()
    p.get()
    p.close()
    w = weakref.ref(p)
    del p
    gc.collect()
    assert w() is None


def test_ports_with_concurrency_dropped_unclosed_release_their_descriptors(backend):
    """100 ports with concurrency=1 dropped without close() kept 100
    (io_uring) or 200 (epoll) descriptors open."""
    def cycles(n: int) -> None:
        for _ in range(n):
            p = fastiocp.CompletionPort(concurrency=1, backend=backend)
            got = []
            p.post()
            # a thread takes a slot and exits holding it
            t = threading.Thread(target=lambda: got.append(p.get(timeout=5)))
            t.start()
            t.join()
            p.post()
            got.append(p.get(timeout=5))          # this thread holds the slot now
            assert all(c is not None for c in got)

    (fds,) = growth(cycles, 1, 100, open_fd_count)
    assert fds <= 2


def test_get_close_cycles_with_concurrency_keep_memory_flat(backend):
    """2,000 create/get/close cycles grew memory linearly: every closed port
    stayed referenced from the dequeuing thread's state. Counted exactly:
    the ports alive afterwards, and RSS."""
    from conftest import assert_no_growth

    def live_ports() -> int:
        gc.collect()
        return sum(isinstance(o, fastiocp.CompletionPort) for o in gc.get_objects())

    def cycles(n: int) -> None:
        for _ in range(n):
            p = fastiocp.CompletionPort(concurrency=1, backend=backend)
            p.post()
            p.get()
            p.close()

    n = env_int("FASTIOCP_CYCLES", 2000, wine=300)
    before = live_ports()
    cycles(n)
    assert live_ports() - before <= 1
    if not UNDER_ASAN:  # its quarantine keeps the freed rings' memory
        assert_no_growth(cycles, warm_up=n // 4, n=n)


# ---------------------------------------------------------------------------
# HOSTILE-5: batch() belongs to the thread that opened it


def test_batch_of_one_thread_does_not_defer_another_threads_submissions(backend, sockpair):
    """Thread A sits in `with port.batch(): time.sleep(3)`; thread B, in no
    batch, sends: the data must reach the peer at once (io_uring deferred
    it until A's block ended)."""
    a, b = sockpair
    with fastiocp.CompletionPort(backend=backend) as port:
        port.register(a)
        inside = threading.Event()
        leave = threading.Event()

        def batcher() -> None:
            with port.batch():
                inside.set()
                leave.wait(10)

        t = threading.Thread(target=batcher)
        t.start()
        try:
            assert inside.wait(5)
            port.send(a, b"now")            # this thread opened no batch
            b.settimeout(2.0)
            assert b.recv(16) == b"now"
        finally:
            leave.set()
            t.join()
        c = port.get(timeout=5)
        assert c.op == "send" and c.nbytes == 3


def test_batch_still_defers_its_own_threads_submissions(backend, sockpair):
    """The other half: inside its own batch a thread's submissions do wait
    for the end of the block on io_uring (where batch() has an effect)."""
    if backend != "io_uring":
        pytest.skip("only io_uring defers submissions in a batch")
    a, b = sockpair
    b.setblocking(False)
    with fastiocp.CompletionPort(backend=backend) as port:
        port.register(a)
        with port.batch():
            port.send(a, b"later")
            time.sleep(0.2)
            with pytest.raises(BlockingIOError):
                b.recv(16)
        b.setblocking(True)
        b.settimeout(2.0)
        assert b.recv(16) == b"later"
        assert port.get(timeout=5).nbytes == 5


# ---------------------------------------------------------------------------
# HOSTILE-6: the port's own descriptors cannot be registered


def _fds() -> set[int]:
    """The open descriptors (not the one listdir() itself used)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        found.add(int(name))
    return found


@linux_only
def test_port_refuses_its_own_descriptors(backend):
    """Registering the epoll backend's eventfd and reading it overwrote the
    internal wake-up registration: later posts were seen only at the
    waiter's timeout. The port's descriptors (its epoll set and eventfd,
    its io_uring ring) are refused."""
    before = _fds()
    with fastiocp.CompletionPort(backend=backend) as port:
        own = _fds() - before
        assert own, "the port opened no descriptor?"
        for fd in own:
            with pytest.raises(ValueError, match="belongs to this CompletionPort"):
                port.register(fd)
        # posts still reach a waiter at once
        got = []
        t = threading.Thread(target=lambda: got.append(port.get(timeout=10)))
        t.start()
        time.sleep(0.2)
        start = time.monotonic()
        port.post(context="wake")
        t.join(10)
        assert got and got[0].context == "wake"
        assert time.monotonic() - start < 2


# ---------------------------------------------------------------------------
# HOSTILE-7: a large descriptor number must not reserve memory for every
# number below it


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


@linux_only
def test_large_descriptor_number_costs_no_table(backend):
    """register(2**31 - 1) and a recv on it grew the address space from 15 MB
    to 16.8 GB on epoll (a table indexed by descriptor number)."""
    with fastiocp.CompletionPort(backend=backend) as port:
        before = _vm_size()
        for fd in (2**31 - 1, 2**30 + 7, 10**9):
            port.register(fd)
            c = port.recv(fd, 8)
            got = port.get(timeout=5)
            assert got is c
            assert isinstance(c.error, OSError) and c.error.errno == 9  # EBADF
            port.unregister(fd)
        assert _vm_size() - before < 64 * 2**20


# ---------------------------------------------------------------------------
# HOSTILE-8: every error path sets an exception


def test_socket_like_object_with_bad_family_raises_cleanly(backend):
    """sendto() on an object whose `family` is negative raised SystemError
    ("returned NULL without setting an exception")."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with fastiocp.CompletionPort(backend=backend) as port:
            port.register(u)
            for family in (-1, -(2**40), 2**40, 70000):
                class Sock:
                    def fileno(self):
                        return u.fileno()
                Sock.family = family
                with pytest.raises((ValueError, OverflowError)):
                    port.sendto(Sock(), b"x", ("127.0.0.1", 9))
                with pytest.raises((ValueError, OverflowError)):
                    port.connect(Sock(), ("127.0.0.1", 9))
            assert port.pending == 0
    finally:
        u.close()


# ---------------------------------------------------------------------------
# HOSTILE-9: addresses are parsed as the socket module parses them


def _ipv6_udp() -> socket.socket:
    try:
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.bind(("::1", 0))
        return u
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")


def _outcome(call) -> tuple[str, str]:
    """(exception type name, message without the caller's prefix), or ("ok", "")."""
    try:
        call()
    except Exception as exc:  # the point is to compare whatever is raised
        return type(exc).__name__, str(exc).split("(): ")[-1]
    return "ok", ""


def test_ipv6_flowinfo_out_of_range_is_refused_like_socket_module(backend):
    """sendto(u, b"x", ("::1", 9, 2**20)) sent, where socket.sendto raises
    OverflowError: flowinfo must be 0-1048575 (also for -1). Every address
    below gets the socket module's outcome: the same exception type and
    message, or success (2**32 is taken modulo 2**32 by both, as C unsigned
    ints are)."""
    u = _ipv6_udp()
    try:
        with fastiocp.CompletionPort(backend=backend) as port:
            port.register(u)
            addresses = [("::1", 9, 2**20), ("::1", 9, -1), ("::1", 9, 2**32),
                         ("::1", 9, 0, -1), ("::1", -1), ("::1", 65536), ("::1", 2**31),
                         ("::1", 9.0), ("::1\0", 9), ["::1", 9], ("::1",), 42,
                         (b"::1", 9), (bytearray(b"::1"), 9), ("::1", 9, 0x12345)]
            for addr in addresses:
                expected = _outcome(lambda: u.sendto(b"x", addr))

                def through_port():
                    c = port.sendto(u, b"x", addr)
                    assert port.get(timeout=5) is c
                    c.result()
                assert _outcome(through_port) == expected, addr
            assert ("OverflowError", "flowinfo must be 0-1048575.") == _outcome(
                lambda: port.sendto(u, b"x", ("::1", 9, 2**20)))
            # what the socket module accepts, the port accepts: bytes hosts
            peer = _ipv6_udp()
            try:
                c = port.sendto(u, b"hi", (b"::1", peer.getsockname()[1], 5, 0))
                assert port.get(timeout=5) is c and c.result() == 2
                peer.settimeout(2)
                assert peer.recv(8) == b"hi"
            finally:
                peer.close()
            assert port.pending == 0
    finally:
        u.close()


def test_ipv4_special_hosts_like_socket_module(backend):
    """'<broadcast>' and bytes hosts are what the socket module accepts;
    an embedded NUL is refused the same way."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.1", 0))
        with fastiocp.CompletionPort(backend=backend) as port:
            port.register(u)
            c = port.sendto(u, b"b", (b"127.0.0.1", peer.getsockname()[1]))
            assert port.get(timeout=5) is c and c.result() == 1
            with pytest.raises((ValueError, TypeError)):
                u.sendto(b"x", ("127.0.0.1\0", 9))
            with pytest.raises((ValueError, TypeError)):
                port.sendto(u, b"x", ("127.0.0.1\0", 9))
            # '<broadcast>' resolves as the socket module resolves it: the
            # send then fails the same way (EACCES without SO_BROADCAST)
            try:
                u.sendto(b"x", ("<broadcast>", 9))
                expected = None
            except OSError as exc:
                expected = type(exc)
            c = port.sendto(u, b"x", ("<broadcast>", 9))
            assert port.get(timeout=5) is c
            if expected is None:
                assert c.error is None
            else:
                assert isinstance(c.error, expected)
    finally:
        u.close()
        peer.close()


# ---------------------------------------------------------------------------
# HOSTILE-10: a refused connect retried on the same socket


def _refused_address() -> tuple[str, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()  # nothing listens there now
    return addr


@linux_only
def test_refused_connect_retried_on_the_same_socket_reports_refused(backend):
    """The second connect of a socket whose first was refused gave
    ECONNABORTED on epoll (io_uring and a blocking connect give
    ECONNREFUSED each time; liburing's test/connect-rep.c)."""
    addr = _refused_address()
    plain = socket.socket()
    errors_plain = []
    for _ in range(2):
        try:
            plain.connect(addr)
        except OSError as exc:
            errors_plain.append(exc.errno)
    plain.close()
    s = socket.socket()
    try:
        with fastiocp.CompletionPort(backend=backend) as port:
            port.register(s)
            errors = []
            for _ in range(3):
                c = port.connect(s, addr)
                assert port.get(timeout=5) is c
                errors.append(c.error.errno if c.error else None)
        import errno
        assert errors_plain == [errno.ECONNREFUSED] * 2
        assert errors == [errno.ECONNREFUSED] * 3
    finally:
        s.close()


# ---------------------------------------------------------------------------
# HOSTILE-11: a hand-over wake is never dropped; Completion.port never dangles


HUB_TEST_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c", "hub_handover.c")


@linux_only
def test_hub_passes_on_a_wake_that_meets_a_timeout(tmp_path):
    """hub.c: a sleeper chosen to become the poller at the moment its own
    timeout expired returned 0 and dropped the hand-over: the other
    sleepers slept on (until their own timeouts) while completions waited
    in the kernel. A C test drives hub.c with a fake backend and forces
    that interleaving (the waker holds the hub's mutex past the sleeper's
    deadline), then checks the remaining sleeper takes over at once."""
    exe = tmp_path / "hub_handover"
    cc = os.environ.get("CC", "cc")
    build = subprocess.run(
        [cc, "-std=gnu99", "-O1", "-g", "-Wall", "-I", os.path.join(REPO, "csrc"),
         HUB_TEST_C, os.path.join(REPO, "csrc", "unix", "hub.c"),
         os.path.join(REPO, "csrc", "common.c"), "-o", str(exe), "-lpthread"],
        capture_output=True, text=True)
    if build.returncode != 0 and "not found" in build.stderr:
        pytest.skip(f"no C compiler: {build.stderr}")
    assert build.returncode == 0, build.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "handed over" in r.stdout


@linux_only
def test_cancel_of_inflight_completion_after_child_drops_inherited_port(backend):
    """Completion.port was a borrowed pointer: a forked child that dropped
    the inherited port (freed) and then cancelled a completion still
    pending from before the fork followed freed memory. Now the port
    detaches its pending completions when it is left behind, and cancel()
    says False."""
    r = run_child(f"""
        import gc, os, socket, fastiocp
        port = fastiocp.CompletionPort(backend={backend!r})
        a, b = socket.socketpair()
        port.register(a)
        c = port.recv(a, 16)
        pid = os.fork()
        if pid == 0:
            del port
            gc.collect()
            junk = [bytearray(200) for _ in range(20000)]   # reuse the freed memory
            code = 0 if c.cancel() is False and not c.done else 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        b.send(b"x")
        assert port.get(timeout=5) is c and c.nbytes == 1
        port.close()
        print("ok")
    """, timeout=60)
    assert_clean_exit(r)
    assert "ok" in r.stdout
