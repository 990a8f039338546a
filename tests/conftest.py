"""Shared fixtures: every behaviour test runs once per backend that works on
this machine (narrowed by FASTIOCP_BACKEND), as CPython's test_selectors
runs one suite per selector."""
from __future__ import annotations

import gc
import os
import socket
import sys
import textwrap
import threading
import time
from typing import Callable

import pytest

import fastiocp

ON_WINDOWS = sys.platform == "win32"
ON_LINUX = sys.platform.startswith("linux")
# Wine runs the Windows suite correctly but slowly: scale loops down there.
UNDER_WINE = ON_WINDOWS and bool(os.environ.get("FASTIOCP_UNDER_WINE"))
# tools/sanitize.sh preloads libasan: ASan's quarantine keeps freed memory
# mapped, so RSS says nothing about leaks there (LeakSanitizer does).
UNDER_ASAN = "asan" in os.environ.get("LD_PRELOAD", "")


def _backends() -> list[str]:
    forced = os.environ.get("FASTIOCP_BACKEND")
    names = [name for name, _works, _why in fastiocp.backend_status()]
    if forced and forced != "auto":
        return [forced]
    return names


@pytest.fixture(params=_backends())
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    status = {n: (w, why) for n, w, why in fastiocp.backend_status()}
    if name not in status:
        pytest.fail(f"FASTIOCP_BACKEND={name} is not a backend of this build")
    works, why = status[name]
    if not works:
        pytest.skip(f"backend {name} unavailable here: {why}")
    return name


@pytest.fixture
def port(backend: str):
    p = fastiocp.CompletionPort(backend=backend)
    yield p
    p.close()


@pytest.fixture
def sockpair():
    a, b = socket.socketpair()  # Windows: emulated over TCP loopback
    yield a, b
    a.close()
    b.close()


def loopback_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over IPv4 loopback: (client, server_side)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    return client, server


@pytest.fixture
def tcp_pair():
    """loopback_tcp_pair() with TCP_NODELAY on both ends, closed after the test."""
    client, server = loopback_tcp_pair()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    yield client, server
    client.close()
    server.close()


def loopback_udp_pair(family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
    """Two UDP sockets bound to the loopback address of family, each on a
    port of its own: (a, b)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    a = socket.socket(family, socket.SOCK_DGRAM)
    b = socket.socket(family, socket.SOCK_DGRAM)
    try:
        a.bind((host, 0))
        b.bind((host, 0))
    except BaseException:
        a.close()
        b.close()
        raise
    return a, b


def collect(port: fastiocp.CompletionPort, n: int, timeout: float = 10.0) -> list:
    """Dequeue exactly n completions or fail after timeout seconds."""
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(out)} of {n} completions within {timeout}s; last: {out[-3:]!r}")
        out.extend(port.get_many(n - len(out), timeout=left))
    return out


def contexts_got_by_waiters(port: fastiocp.CompletionPort, threads: int, each: int,
                            settle: float = 0.0) -> list:
    """`threads` threads each dequeue `each` packets with get(timeout=10);
    after settle seconds (time to block in get()), threads * each posts
    carry the contexts 0, 1, ... Returns the contexts the threads got,
    sorted: range(threads * each) when every packet went to one waiter."""
    got: list = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(each):
            c = port.get(timeout=10)
            with lock:
                got.append(c.context)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    if settle:
        time.sleep(settle)
    for i in range(threads * each):
        port.post(context=i)
    for t in workers:
        t.join(20)
    return sorted(got)


def ctrl_c_child_script(backend: str, other_waiter: bool, raise_after: float | None = None) -> str:
    """The child interpreter of the Ctrl-C tests (tests/test_invariants.py on
    POSIX, tests/backends/test_iocp.py on Windows): a port with a receive in
    flight; with other_waiter, a second thread already blocked in get() on
    it. The main thread prints "ready" and blocks in get(timeout=30); on
    KeyboardInterrupt it prints "interrupted after S" (seconds) and exits 0,
    else exits 3. raise_after: the child raises SIGINT itself after that
    many seconds, through C raise() as Windows' Ctrl-C does (CPython's
    handler sets its flag and event from another thread); None: the parent
    sends it. The child takes SIGINT as Python's default does even when
    started with it ignored (a shell's background job is)."""
    return textwrap.dedent(f"""
        import signal, socket, sys, threading, time, fastiocp
        signal.signal(signal.SIGINT, signal.default_int_handler)
        port = fastiocp.CompletionPort(backend={backend!r})
        a, b = socket.socketpair()
        port.register(b)
        port.recv(b, 10)
        if {other_waiter!r}:
            threading.Thread(target=lambda: port.get(timeout=30), daemon=True).start()
            time.sleep(0.2)
        if {raise_after!r} is not None:
            threading.Timer({raise_after!r}, signal.raise_signal, args=(signal.SIGINT,)).start()
        print("ready", flush=True)
        t0 = time.monotonic()
        try:
            port.get(timeout=30)
        except KeyboardInterrupt:
            print("interrupted after %.2f" % (time.monotonic() - t0), flush=True)
            sys.exit(0)
        sys.exit(3)
    """)


def open_fd_count() -> int:
    """Open descriptors (Linux) or handles (Windows) of this process."""
    if ON_WINDOWS:
        import ctypes
        from ctypes import wintypes

        k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        k32.GetCurrentProcess.restype = wintypes.HANDLE
        k32.GetProcessHandleCount.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD)]
        count = wintypes.DWORD()
        if not k32.GetProcessHandleCount(k32.GetCurrentProcess(), ctypes.byref(count)):
            raise ctypes.WinError(ctypes.get_last_error())
        # A live process always holds handles: 0 is Wine's stub, whose
        # system-wide handle table answers instead.
        return count.value or _nt_handle_count()
    return len(os.listdir("/proc/self/fd"))


def _nt_handle_count() -> int:
    """This process's handles, from NtQuerySystemInformation's
    SystemExtendedHandleInformation (64), which lists every handle."""
    import ctypes
    from ctypes import wintypes

    class Entry(ctypes.Structure):  # SYSTEM_HANDLE_TABLE_ENTRY_INFO_EX
        _fields_ = [("Object", ctypes.c_void_p), ("UniqueProcessId", ctypes.c_size_t),
                    ("HandleValue", ctypes.c_size_t), ("GrantedAccess", wintypes.ULONG),
                    ("CreatorBackTraceIndex", wintypes.USHORT), ("ObjectTypeIndex", wintypes.USHORT),
                    ("HandleAttributes", wintypes.ULONG), ("Reserved", wintypes.ULONG)]

    ntdll = ctypes.WinDLL("ntdll")
    ntdll.NtQuerySystemInformation.restype = wintypes.LONG
    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        needed = wintypes.ULONG()
        status = ntdll.NtQuerySystemInformation(64, buf, size, ctypes.byref(needed)) & 0xFFFFFFFF
        if status == 0xC0000004:  # STATUS_INFO_LENGTH_MISMATCH
            size = max(2 * size, needed.value + 4096)
            continue
        if status != 0:
            raise OSError(f"NtQuerySystemInformation failed with NTSTATUS {status:#x}")
        n = ctypes.c_size_t.from_buffer(buf).value  # NumberOfHandles, then one reserved word
        entries = (Entry * n).from_buffer(buf, 2 * ctypes.sizeof(ctypes.c_size_t))
        pid = os.getpid()
        return sum(1 for e in entries if e.UniqueProcessId == pid)


def rss_bytes() -> int:
    """Resident set size (Linux) or working set (Windows) of this process."""
    if ON_WINDOWS:
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                    "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage",
                    "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]

        k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        k32.GetCurrentProcess.restype = wintypes.HANDLE
        k32.K32GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
        counters = Counters()
        counters.cb = ctypes.sizeof(counters)
        if not k32.K32GetProcessMemoryInfo(k32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            raise ctypes.WinError(ctypes.get_last_error())
        return counters.WorkingSetSize
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth(cycles: Callable[[int], None], warm_up: int, n: int, *counters: Callable[[], int]) -> list[int]:
    """Runs cycles(warm_up) (slabs, pymalloc arenas, pools made on first
    use), then cycles(n), each followed by gc.collect(); returns how much
    each counter (open_fd_count, rss_bytes) grew over cycles(n)."""
    cycles(warm_up)
    gc.collect()
    before = [count() for count in counters]
    cycles(n)
    gc.collect()
    return [count() - b for count, b in zip(counters, before)]


def assert_no_growth(cycles: Callable[[int], None], warm_up: int, n: int) -> None:
    """Fails if cycles(n), after cycles(warm_up), changed the handle count
    or grew RSS by 2 MiB or more."""
    fds, rss = growth(cycles, warm_up, n, open_fd_count, rss_bytes)
    # Fewer is no leak: on Windows the thread pool's idle threads (timers,
    # process waits of earlier tests) exit and close their handles meanwhile.
    assert fds <= 0, f"{fds} more descriptors or handles"

    assert rss < 2 * 1024 * 1024, f"RSS grew by {rss / 1024:.0f} KiB"
