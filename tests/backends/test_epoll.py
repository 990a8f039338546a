"""epoll-only behaviour, and the automatic fallback to it when the kernel
refuses io_uring (as Docker's default seccomp profile does, moby#47532)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import fastiocp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux backends")

# A child that installs a seccomp filter making io_uring_setup fail with
# EPERM, then uses fastiocp as a user would.
SECCOMP_PRELUDE = """
import ctypes, errno, platform, struct
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
NR_IO_URING_SETUP = 425
def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
prog = b"".join([
    insn(LD_ABS, 0, 0, 4),                    # A = seccomp_data.arch
    insn(JEQ, 1, 0, ARCH),                    # other arch: allow
    insn(RET, 0, 0, 0x7FFF0000),
    insn(LD_ABS, 0, 0, 0),                    # A = seccomp_data.nr
    insn(JEQ, 0, 1, NR_IO_URING_SETUP),
    insn(RET, 0, 0, 0x00050000 | errno.EPERM),  # SECCOMP_RET_ERRNO | EPERM
    insn(RET, 0, 0, 0x7FFF0000),              # SECCOMP_RET_ALLOW
])
buf = ctypes.create_string_buffer(prog)
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, ctypes.get_errno()
assert libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()
"""


def _child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTIOCP_BACKEND", None)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    return subprocess.run([sys.executable, "-c", SECCOMP_PRELUDE + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(sys.platform.startswith("linux") and platform.machine() not in ("x86_64", "aarch64"),
                    reason="seccomp filter written for x86_64/aarch64")
def test_auto_falls_back_to_epoll_when_io_uring_is_refused():
    r = _child("""
        import fastiocp, socket
        status = dict((n, (w, why)) for n, w, why in fastiocp.backend_status())
        assert status["io_uring"][0] is False, status
        print("io_uring:", status["io_uring"][1])
        with fastiocp.CompletionPort() as port:
            print("auto:", port.backend)
            a, b = socket.socketpair()
            port.register(a); port.register(b)
            port.recv(b, 10); port.send(a, b"fallback")
            cs = port.get_many(2, timeout=5)
            while len(cs) < 2:
                cs += port.get_many(2, timeout=5)
            print("data:", [bytes(c.buffer[:c.nbytes]) for c in cs if c.op == "recv"])
        from fastiocp.__main__ import main
        raise SystemExit(main(["demo"]) or main(["info"]))
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "io_uring: io_uring_setup failed with EPERM: blocked by seccomp or kernel.io_uring_disabled" in r.stdout
    assert "auto: epoll" in r.stdout
    assert "data: [b'fallback']" in r.stdout
    assert "dequeued 4 completions" in r.stdout
    assert "backend: epoll" in r.stdout


@pytest.mark.skipif(sys.platform.startswith("linux") and platform.machine() not in ("x86_64", "aarch64"),
                    reason="seccomp filter written for x86_64/aarch64")
def test_forcing_io_uring_when_refused_says_why():
    r = _child("""
        import fastiocp
        try:
            fastiocp.CompletionPort(backend="io_uring")
        except fastiocp.BackendUnavailableError as exc:
            print("refused:", exc)
    """)
    assert r.returncode == 0, r.stderr
    assert "refused: backend io_uring is unavailable: io_uring_setup failed with EPERM" in r.stdout
