"""The examples that `python -m fastiocp bench` drives must be correct, not
only fast: the HTTP server (keep-alive, pipelining, static files, errors)
and the file-copy tool. Run in CI's smoke mode with the benchmarks.

    python -m pytest benchmarks/bench_examples.py
"""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

import fastiocp

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
PKG = pathlib.Path(fastiocp.__file__).resolve().parent
LINUX = sys.platform.startswith("linux")

pytestmark = pytest.mark.skipif(not (EXAMPLES / "http_server.py").exists(),
                                reason="run from a source checkout")


def _env():
    return dict(os.environ, PYTHONPATH=str(PKG.parent))


class Server:
    def __init__(self, cmd, cwd=None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=_env(), cwd=cwd)
        line = self.proc.stdout.readline()
        assert "127.0.0.1:" in line, line + self.proc.stderr.read()
        self.port = int(line.rsplit(":", 1)[1])

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()
        return rc


def _read_response(sock, buf=b""):
    """(status, headers, body, rest) of one response with Content-Length."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {buf!r}"
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    length = int(headers[b"content-length"])
    return status, headers, buf, length


def _get(sock, request, buf=b"", head=False):
    sock.sendall(request)
    status, headers, buf, length = _read_response(sock, buf)
    if head:
        return status, headers, b"", buf
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        assert chunk
        buf += chunk
    return status, headers, buf[:length], buf[length:]


def _closed(sock):
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def www(tmp_path):
    (tmp_path / "static").mkdir()
    (tmp_path / "index.html").write_bytes(b"<h1>hello</h1>\n")
    big = os.urandom(700_000)
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "empty.txt").write_bytes(b"")
    return tmp_path, big


@pytest.mark.skipif(not LINUX, reason="stops on SIGTERM; a POSIX signal")
def test_http_example(www):
    root, big = www
    srv = Server([sys.executable, str(EXAMPLES / "http_server.py"), "--port", "0", "--root", str(root)])
    try:
        s = srv.connect()
        # Keep-alive: several requests on one connection, fixed body and files.
        st, h, body, rest = _get(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (st, body) == (200, b"Hello, World!\n") and b"connection" not in h
        st, h, body, rest = _get(s, b"GET /static/index.html HTTP/1.1\r\nHost: x\r\n\r\n", rest)
        assert (st, body, h[b"content-type"]) == (200, b"<h1>hello</h1>\n", b"text/html")
        st, h, body, rest = _get(s, b"GET /static/big.bin HTTP/1.1\r\nHost: x\r\n\r\n", rest)
        assert st == 200 and body == big
        st, h, body, rest = _get(s, b"GET /static/empty.txt HTTP/1.1\r\nHost: x\r\n\r\n", rest)
        assert st == 200 and body == b""
        st, h, body, rest = _get(s, b"HEAD /static/big.bin HTTP/1.1\r\nHost: x\r\n\r\n", rest, head=True)
        assert st == 200 and int(h[b"content-length"]) == len(big)
        for path in (b"/nope", b"/static/../index.html", b"/static/missing", b"/static/"):
            st, h, body, rest = _get(s, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", rest)
            assert st == 404, path
        st, h, body, rest = _get(s, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", rest)
        assert st == 405 and h[b"allow"] == b"GET, HEAD"
        # Pipelining, a request split across sends, then Connection: close.
        s.sendall(b"GET / HTTP/1.1\r\n\r\nGET /static/index.html HTTP/1.1\r\n\r\nGET / HT")
        time.sleep(0.05)
        st1, _, b1, rest = _get(s, b"TP/1.1\r\nConnection: close\r\n\r\n", rest)
        st2, _, b2, rest = _get(s, b"", rest)
        st3, h3, b3, rest = _get(s, b"", rest)
        assert (st1, b1, st2, b2, st3, b3) == (200, b"Hello, World!\n", 200, b"<h1>hello</h1>\n",
                                               200, b"Hello, World!\n")
        assert h3[b"connection"] == b"close" and rest == b"" and _closed(s)
        s.close()
        # HTTP/1.0 closes unless asked to keep alive.
        s = srv.connect()
        st, h, body, rest = _get(s, b"GET / HTTP/1.0\r\n\r\n")
        assert st == 200 and _closed(s)
        s.close()
        s = srv.connect()
        st, h, body, rest = _get(s, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        st, h, body, rest = _get(s, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", rest)
        assert st == 200 and body == b"Hello, World!\n"
        s.close()
        # Garbage gets 400 and a close; chunked bodies 501.
        for bad, code in ((b"HELLO\r\n\r\n", 400), (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
                          (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501)):
            s = srv.connect()
            st, h, body, rest = _get(s, bad)
            assert st == code and _closed(s), bad
            s.close()
        # Many connections at once, each with a few requests.
        conns = [srv.connect() for _ in range(40)]
        for _ in range(3):
            for c in conns:
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            for c in conns:
                st, _, body, rest = _get(c, b"")
                assert (st, body, rest) == (200, b"Hello, World!\n", b"")
        for c in conns:
            c.close()
        # A client that vanishes mid-download does not hurt the server.
        s = srv.connect()
        s.sendall(b"GET /static/big.bin HTTP/1.1\r\n\r\n")
        s.recv(100)
        s.close()
        s = srv.connect()
        assert _get(s, b"GET / HTTP/1.1\r\n\r\n")[0] == 200
        s.close()
    finally:
        assert srv.stop() == 0


@pytest.mark.skipif(not LINUX, reason="the bench servers are Linux-only")
def test_asyncio_twin_answers_the_same_bytes(www):
    root, _big = www
    requests = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HEAD / HTTP/1.1\r\n\r\n",
                b"DELETE / HTTP/1.1\r\n\r\n", b"GET /static/index.html HTTP/1.1\r\n\r\n",
                b"GET /nope HTTP/1.1\r\n\r\n"]
    answers = []
    for cmd in ([sys.executable, "-m", "fastiocp.bench.http_example", "--port", "0"],
                [sys.executable, "-m", "fastiocp.bench.servers", "http-asyncio", "0"]):
        srv = Server(cmd, cwd=str(root))
        try:
            s = srv.connect()
            s.sendall(b"".join(requests))
            got = b""
            deadline = time.monotonic() + 10
            while got.count(b"HTTP/1.1 ") < len(requests) or not got.endswith(b"Not Found\n"):
                chunk = s.recv(65536)
                assert chunk and time.monotonic() < deadline, got
                got += chunk
            answers.append(got)
            s.close()
        finally:
            srv.stop()
    assert answers[0] == answers[1]


def test_file_copy_example(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import file_copy  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))
    data = os.urandom(3 * (1 << 20) + 12345)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    for block, depth in ((1 << 20, 16), (65536, 3), (4096, 64), (1000, 7)):
        dst = tmp_path / f"dst-{block}-{depth}.bin"
        assert file_copy.copy(str(src), str(dst), block, depth) == len(data)
        assert dst.read_bytes() == data
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_copy.copy(str(empty), str(tmp_path / "empty2")) == 0
    assert (tmp_path / "empty2").read_bytes() == b""
    # O_DIRECT where the file system supports it (not tmpfs).
    try:
        f = fastiocp.open(src, "rb", direct=True)
        f.close()
    except OSError:
        return
    dst = tmp_path / "direct.bin"
    file_copy.copy(str(src), str(dst), 1 << 18, 8, direct=True)
    assert dst.read_bytes() == data
