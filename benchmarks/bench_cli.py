"""`python -m fastiocp bench` end to end, scaled down to a smoke run: every
section runs (or says why it is skipped), the table and the JSON come out,
and no server is left behind. Figures are not checked: this machine may be
busy.

    python -m pytest benchmarks/bench_cli.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fastiocp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="python -m fastiocp bench runs on Linux")


def _processes_with(token: str) -> list:
    """Pids of the processes whose environment holds token."""
    found = []
    needle = token.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastiocp.__file__)),
               FASTIOCP_CACHE_DIR=str(tmp_path / "cache"),
               FASTIOCP_BENCH_SMOKE_TOKEN=f"smoke-{os.getpid()}-{id(tmp_path)}")
    r = subprocess.run([sys.executable, "-m", "fastiocp", "bench", "--quick", "--duration", "0.3",
                        "--items", "20000", "--file-mib", "8", "--dir", str(tmp_path),
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for title in ("TCP echo", "ping-pong", "HTTP/1.1", "page cache", "O_DIRECT", "hand-off"):
        assert title in r.stdout, r.stdout
    # The output speaks to users: no project targets, no internal references.
    assert "targets" not in r.stdout and "MISSED" not in r.stdout and "issue" not in r.stdout
    doc = json.loads(out.read_text())
    ids = [s["id"] for s in doc["sections"]]
    assert ids == ["echo", "pingpong", "http", "file-cached", "file-direct", "handoff"]
    for s in doc["sections"]:
        for c in s["contenders"]:
            assert not c["failed"], (s["id"], c)
            assert c["samples"] or c["skipped"], (s["id"], c)
    handoff = doc["sections"][-1]["contenders"]
    assert all(c["samples"] for c in handoff)
    assert not list(tmp_path.glob("fastiocp-bench-*.dat")), "the test file was left behind"
    assert _processes_with(env["FASTIOCP_BENCH_SMOKE_TOKEN"]) == [], "a server was left running"


def test_bench_rejects_unknown_section():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastiocp.__file__)))
    r = subprocess.run([sys.executable, "-m", "fastiocp", "bench", "--only", "nope"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "unknown section" in r.stderr
