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


def _run_bench(tmp_path, name: str, args: list, timeout: float = 240):
    """Runs `python -m fastiocp bench --quick ARGS --json FILE` in a child
    whose environment is marked with a token (see _processes_with); asserts
    it exited 0. Returns (stdout, the JSON document, the token)."""
    out = tmp_path / f"{name}.json"
    token = f"smoke-{name}-{os.getpid()}-{id(tmp_path)}"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastiocp.__file__)),
               FASTIOCP_CACHE_DIR=str(tmp_path / "cache"), FASTIOCP_BENCH_SMOKE_TOKEN=token)
    r = subprocess.run([sys.executable, "-m", "fastiocp", "bench", "--quick", *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, json.loads(out.read_text()), token


def test_bench_smoke(tmp_path):
    stdout, doc, token = _run_bench(tmp_path, "all", ["--duration", "0.3", "--items", "20000",
                                                      "--file-mib", "8", "--dir", str(tmp_path)], 280)
    for title in ("TCP echo", "ping-pong", "HTTP/1.1", "page cache", "O_DIRECT", "hand-off"):
        assert title in stdout, stdout
    # The output speaks to users: no project targets, no internal references.
    assert "targets" not in stdout and "MISSED" not in stdout and "issue" not in stdout
    ids = [s["id"] for s in doc["sections"]]
    assert ids == ["echo", "pingpong", "http", "file-cached", "file-direct", "handoff"]
    for s in doc["sections"]:
        for c in s["contenders"]:
            assert not c["failed"], (s["id"], c)
            assert c["samples"] or c["skipped"], (s["id"], c)
    handoff = doc["sections"][-1]["contenders"]
    assert all(c["samples"] for c in handoff)
    assert not list(tmp_path.glob("fastiocp-bench-*.dat")), "the test file was left behind"
    assert _processes_with(token) == [], "a server was left running"


def test_bench_rejects_unknown_section():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastiocp.__file__)))
    r = subprocess.run([sys.executable, "-m", "fastiocp", "bench", "--only", "nope"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "unknown section" in r.stderr


LOOP_IDS = [f"loop-{shape}-{size}k" for shape in ("protocol", "streams", "sock") for size in (1, 10, 100)] \
    + ["loop-buffered", "loop-tls"]


def test_bench_loop_section_smoke(tmp_path):
    """--only loop, briefly: every shape and size on every loop runs (uvloop's
    rows say why not when it is missing), 100 KiB echoes come back whole, and
    no server is left behind."""
    stdout, doc, token = _run_bench(tmp_path, "loop", ["--only", "loop", "--duration", "0.1"])
    assert "issue" not in stdout and "targets" not in stdout
    assert [s["id"] for s in doc["sections"]] == LOOP_IDS
    try:
        import uvloop  # noqa: F401
        have_uvloop = True
    except ImportError:
        have_uvloop = False
    for s in doc["sections"]:
        assert len(s["contenders"]) == (6 if s["id"] == "loop-buffered" else 3), s["id"]
        for c in s["contenders"]:
            assert not c["failed"], (s["id"], c)
            if c["name"].startswith("uvloop") and not have_uvloop:
                assert "uvloop not installed" in c["skipped"], (s["id"], c)
            elif s["id"] == "loop-tls" and c["skipped"]:
                assert "openssl" in c["skipped"], (s["id"], c)  # no openssl command here
            else:
                assert c["samples"], (s["id"], c)
                assert all(x["messages"] > 0 and x["bad_echoes"] == 0 for x in c["samples"]), c
    buffered = next(s for s in doc["sections"] if s["id"] == "loop-buffered")
    assert any("BufferedProtocol / Protocol on the same loop" in n for n in buffered["notes"])
    assert _processes_with(token) == [], "a server was left running"


def test_loadgen_keeps_one_large_message_in_flight(tmp_path, monkeypatch):
    """The C load generator with 100 KiB messages against a server that echoes
    in small pieces, slowly: each echo comes back whole (compared byte for
    byte) before the next message starts; a changed byte stops the run."""
    import socket
    import threading

    from fastiocp.bench import runner

    monkeypatch.setenv("FASTIOCP_CACHE_DIR", str(tmp_path / "cache"))
    exe, note = runner.build_c("loadgen")
    if exe is None:
        pytest.skip(note)
    size = 100 * 1024

    def serve(lsock, corrupt_at, seen):
        conn, _ = lsock.accept()
        with conn:
            pending = total = 0
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:  # the load generator's end
                    return
                if not data:
                    return
                pending += len(data)
                seen["max_pending"] = max(seen["max_pending"], pending)
                if corrupt_at is not None and total <= corrupt_at < total + len(data):
                    i = corrupt_at - total
                    data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
                total += len(data)
                for k in range(0, len(data), 7000):  # short writes
                    try:
                        conn.sendall(data[k:k + 7000])
                    except OSError:
                        return
                pending -= len(data)

    for corrupt_at in (None, 3 * size + 12345):
        seen = {"max_pending": 0}
        lsock = socket.create_server(("127.0.0.1", 0))
        t = threading.Thread(target=serve, args=(lsock, corrupt_at, seen), daemon=True)
        t.start()
        r = subprocess.run([exe, "echo", "127.0.0.1", str(lsock.getsockname()[1]), "1", str(size),
                            "0.05", "0.3", "0"], capture_output=True, text=True, timeout=60)
        t.join(10)
        lsock.close()
        if corrupt_at is None:
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert res["messages"] > 3 and res["bad_echoes"] == 0, res
            assert seen["max_pending"] <= size, seen  # never a second message in flight
        else:
            assert r.returncode == 3 and "wrong echo" in r.stderr, (r.returncode, r.stderr)


def test_bench_accept_and_frameworks_sections_smoke(tmp_path):
    """--only accept,frameworks, briefly: both accept servers accept
    connections from the C client; each framework row runs, or says which
    package is missing; no server is left behind."""
    _, doc, token = _run_bench(tmp_path, "accept", ["--only", "accept,frameworks", "--duration", "0.2"])
    sections = {s["id"]: s for s in doc["sections"]}
    assert set(sections) <= {"accept", "http-uvicorn", "http-aiohttp"} and "accept" in sections
    for c in sections["accept"]["contenders"]:
        assert not c["failed"] and c["samples"], c
        assert all(x["connections"] > 0 for x in c["samples"]), c
    for sid in ("http-uvicorn", "http-aiohttp"):
        for c in sections.get(sid, {"contenders": []})["contenders"]:
            assert not c["failed"], (sid, c)
            assert c["samples"] or "not installed" in (c["skipped"] or ""), (sid, c)
    assert _processes_with(token) == [], "a server was left running"
