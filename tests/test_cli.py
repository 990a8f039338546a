"""python -m fastiocp: the commands a new user runs first."""
from __future__ import annotations

import os
import subprocess
import sys

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


def test_info_with_forced_backend(backend):
    env = dict(os.environ, FASTIOCP_BACKEND=backend)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    r = subprocess.run([sys.executable, "-m", "fastiocp", "info"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert f"backend: {backend} (forced by FASTIOCP_BACKEND={backend})" in r.stdout


def test_demo_runs():
    r = _run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    for what in ("read", "send", "recv", "post", "EXIT", "dequeued 4 completions"):
        assert what in r.stdout
    assert "Hello from a file" in r.stdout


def test_unknown_command_fails():
    r = _run("nope")
    assert r.returncode != 0
