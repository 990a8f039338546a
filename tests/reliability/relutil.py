"""Helpers of the reliability suite (tests/reliability/): sizes from the
environment, watchdogs, child interpreters, message-preserving channels and
self-checking records.

Imported by the test modules as ``relutil`` (pytest puts this directory on
sys.path, as it puts tests/ there for ``conftest``).
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import traceback
import zlib

import pytest

import fastiocp
from conftest import ON_LINUX, ON_WINDOWS, UNDER_WINE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if ON_WINDOWS:
    # A crash must end the process, not open an error box.
    import ctypes

    _k32 = ctypes.WinDLL("kernel32")
    _k32.SetErrorMode(_k32.GetErrorMode() | 0x0001 | 0x0002)  # FAILCRITICALERRORS | NOGPFAULTERRORBOX
TOOLS = os.path.join(REPO, "tools")


def env_int(name: str, default: int, wine: int | None = None) -> int:
    """An integer size from the environment; `wine` is the default under Wine."""
    value = os.environ.get(name)
    if value:
        return int(value)
    return wine if (UNDER_WINE and wine is not None) else default


def env_float(name: str, default: float, wine: float | None = None) -> float:
    value = os.environ.get(name)
    if value:
        return float(value)
    return wine if (UNDER_WINE and wine is not None) else default


# ---------------------------------------------------------------------------
# Watchdogs


def _saved_stderr_fd(config=None) -> int:
    """The process's real stderr, past pytest's fd-level capture, so that a
    watchdog's stack dump is seen even when it ends the process."""
    try:
        capman = config.pluginmanager.getplugin("capturemanager") if config else None
        capturing = getattr(capman, "_global_capturing", None)
        fd = getattr(getattr(capturing, "err", None), "targetfd_save", None)
        if isinstance(fd, int):
            return fd
    except Exception:
        pass
    return sys.__stderr__.fileno() if sys.__stderr__ else 2


@contextlib.contextmanager
def hard_watchdog(seconds: float, config=None):
    """Ends the whole process, after dumping every thread's stack to the real
    stderr, if the block runs longer than `seconds`: the last resort against
    a deadlock that holds the GIL (no Python-level timeout can fire then).
    Pass request.config so the dump gets past pytest's capture. Costs
    nothing while the block behaves."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=_saved_stderr_fd(config))
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def thread_stacks() -> str:
    """Python stacks of every live thread, for a failure message."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def join_all(threads: list[threading.Thread], timeout: float, what: str) -> None:
    """Joins threads within a shared deadline, or fails with their stacks
    (a soft watchdog: it needs the GIL, so hard_watchdog backs it up)."""
    import time

    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in threads if t.is_alive()]
    if alive:
        pytest.fail(f"{what}: {len(alive)} thread(s) still running after {timeout:.0f}s "
                    f"(deadlock or lost wake-up)\n{thread_stacks()}")


# ---------------------------------------------------------------------------
# Child interpreters


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(fastiocp.__file__))
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [pkg_parent, here, tests_dir, env.get("PYTHONPATH", "")] if p)
    env.pop("FASTIOCP_BACKEND", None)
    if UNDER_WINE:
        # Wine starts winedbg for a crashed process whatever its error mode;
        # a child waiting in the debugger keeps its pipes open and the test
        # hangs instead of failing. Disabled, the child just dies.
        env["WINEDLLOVERRIDES"] = ";".join(p for p in [env.get("WINEDLLOVERRIDES", ""), "winedbg.exe=d"] if p)
    env.update(extra)
    return env


SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
                   "Fatal Python error", "Segmentation fault")


def run_child(code: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (this one's), fastiocp importable.
    Returns the CompletedProcess; fails the test on a timeout (a hang).
    Output goes through files, not pipes: a crashed child that Wine hands
    to its debugger keeps running, and its pipes would keep the reader
    threads of subprocess waiting past any timeout."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, text=True, env=child_env(**env))
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            rc = None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc is None:
        pytest.fail(f"child interpreter hung (or crashed into a debugger) for {timeout}s\n"
                    f"stdout: {stdout[-2000:]!r}\nstderr: {stderr[-4000:]!r}")
    return subprocess.CompletedProcess(proc.args, rc, stdout, stderr)


def assert_clean_exit(r: subprocess.CompletedProcess, expect_rc: int = 0) -> None:
    """The child ended with expect_rc and printed no crash or sanitizer report."""
    detail = f"rc={r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-8000:]}"
    found = [mark for mark in SANITIZER_MARKS if mark in r.stderr]
    ok = r.returncode == expect_rc and not found
    assert ok, (f"found {found}; " if found else "") + detail


# ---------------------------------------------------------------------------
# Channels and records

RECORD = 64  # bytes: id (8) | crc32 of the rest (4) | pattern (52)


def record(ident: int) -> bytes:
    """A self-checking 64-byte record for ident: garbage (memory freed and
    reused under the kernel) cannot pass check_record()."""
    body = bytes((ident * 7 + i * 13) & 0xFF for i in range(RECORD - 12))
    head = struct.pack("<Q", ident)
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


def check_record(data: bytes) -> int:
    """The id of a valid record, or AssertionError."""
    assert len(data) == RECORD, f"record of {len(data)} bytes"
    ident = struct.unpack_from("<Q", data)[0]
    assert data == record(ident), f"corrupt record: {bytes(data)!r}"
    return ident


def message_pair() -> tuple[socket.socket, socket.socket, bool]:
    """A connected pair whose every send arrives as one message: (tx, rx,
    reliable). Linux: an AF_UNIX SOCK_SEQPACKET socketpair (reliable: every
    message sent arrives). Windows: two connected UDP sockets on loopback
    (not reliable: a full receive buffer drops datagrams)."""
    if ON_LINUX:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return a, b, True
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    tx.connect(rx.getsockname())
    rx.connect(tx.getsockname())
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return tx, rx, False


def drain_socket(sock: socket.socket, bufsize: int = 4096) -> list[bytes]:
    """Reads every message left in sock without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            try:
                data = sock.recv(bufsize)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not data:
                break
            out.append(data)
    finally:
        sock.setblocking(True)
    return out


def is_cancel_error(err: BaseException | None) -> bool:
    """The error a cancelled operation completes with (ECANCELED, or
    ERROR_OPERATION_ABORTED on Windows)."""
    if err is None:
        return False
    if getattr(err, "winerror", None) == 995:
        return True
    import errno

    return getattr(err, "errno", None) == errno.ECANCELED


__all__ = [
    "ON_LINUX", "ON_WINDOWS", "UNDER_WINE", "REPO", "TOOLS", "RECORD", "env_int", "env_float",
    "hard_watchdog", "join_all", "thread_stacks", "run_child", "assert_clean_exit", "child_env",
    "record", "check_record", "message_pair", "drain_socket", "is_cancel_error",
]
