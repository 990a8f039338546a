"""python -m fastiocp: the commands a new user runs first."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastiocp


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    return subprocess.run([sys.executable, "-m", "fastiocp", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_info_names_backend_and_others():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert f"fastiocp {fastiocp.__version__}" in r.stdout
    assert "backend: " in r.stdout
    for name, _works, _why in fastiocp.backend_status():
        assert name in r.stdout


def test_info_lists_how_each_backend_does_each_operation():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("operations (native / emulated / unsupported):\n", 1)[1].splitlines()
    names = [name for name, _works, _why in fastiocp.backend_status()]
    assert table[0].split() == names
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    for i, name in enumerate(names):
        expected = fastiocp.backend_operations(name)
        for op, how in expected.items():
            assert rows["timeout=" if op == "timeout" else op][i] == how, (name, op)
    assert set(rows) >= {"poll", "sendmsg", "recvmsg", "sendfile", "wait_process", "timer", "fsync", "connect_pipe"}


def test_info_with_forced_backend(backend):
    env = dict(os.environ, FASTIOCP_BACKEND=backend)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    r = subprocess.run([sys.executable, "-m", "fastiocp", "info"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert f"backend: {backend} (forced by FASTIOCP_BACKEND={backend})" in r.stdout


def test_version():
    r = _run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"fastiocp {fastiocp.__version__}"


@pytest.mark.parametrize("name", ["bogus", "IO_URING", "epoll" if sys.platform == "win32" else "iocp"])
def test_info_explains_a_wrong_forced_backend(name):
    """A FASTIOCP_BACKEND naming no backend (or another platform's) is
    explained, with the fix, and no traceback."""
    env = dict(os.environ, FASTIOCP_BACKEND=name)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    r = subprocess.run([sys.executable, "-m", "fastiocp", "info"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert f"backend: none: FASTIOCP_BACKEND={name!r}" in r.stdout, r.stdout
    assert "to fix: " in r.stdout and "unset it" in r.stdout, r.stdout
    for working in fastiocp.available_backends():
        assert working in r.stdout


def test_demo_runs():
    r = _run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    for what in ("read", "send", "recv", "post", "EXIT", "dequeued 4 completions"):
        assert what in r.stdout
    assert "Hello from a file" in r.stdout


def test_unknown_command_fails():
    r = _run("nope")
    assert r.returncode != 0


def test_bench_help_names_the_loop_section():
    """`bench --only` lists every section; loop (the asyncio loops beside
    uvloop) is named as one a plain run leaves out."""
    r = _run("bench", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for section in ("echo", "pingpong", "http", "file", "handoff", "loop"):
        assert section in text
    assert "default: echo,pingpong,http,file,handoff;" in text, text
    assert "loop, the asyncio loops' echo shapes" in text, text
