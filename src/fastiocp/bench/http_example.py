"""A small HTTP/1.1 keep-alive server on one completion port, single thread.

    python examples/http_server.py [--port 8080] [--root DIR]

GET / answers a fixed body ("Hello, World!"); GET /static/NAME answers the
file NAME under DIR (default: the current directory), read asynchronously
through the same port in 64 KiB chunks. HEAD works too. Connections stay
open (HTTP/1.1, or HTTP/1.0 with "Connection: keep-alive") until the client
closes them or sends "Connection: close"; pipelined requests are answered in
order. Serves on 127.0.0.1 until SIGTERM or Ctrl-C. Try it with

    wrk -t2 -c64 -d10s --latency http://127.0.0.1:8080/

Only fastiocp's public API is used: CompletionPort (register, recv, send,
read, accept, get_many, batch) and fastiocp.open. Each connection has at
most one operation in flight, so its state is a plain object and the order
of events is simply: receive, answer (send, or read+send for a file), then
receive again.

The code lives in the package (fastiocp/bench/http_example.py) so that
``python -m fastiocp bench`` can drive it with wrk after ``pip install .``,
beside the same server on asyncio and uvloop (which reuse parse() and the
response builders below); examples/http_server.py runs it.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import sys
from typing import Callable, Deque, List, Optional, Tuple

import fastiocp

BODY = b"Hello, World!\n"
SERVER = b"Server: fastiocp-example\r\n"
MAX_HEADER = 64 << 10     # a request head larger than this is refused (431)
CHUNK = 64 << 10          # static files are read and sent in chunks this big
DEFAULT_ROOT = "."


def _head(status: bytes, length: int, ctype: bytes, keep_alive: bool) -> bytes:
    conn = b"" if keep_alive else b"Connection: close\r\n"
    return (b"HTTP/1.1 " + status + b"\r\n" + SERVER + b"Content-Type: " + ctype +
            b"\r\nContent-Length: " + str(length).encode() + b"\r\n" + conn + b"\r\n")


FIXED = {True: _head(b"200 OK", len(BODY), b"text/plain", True) + BODY,
         False: _head(b"200 OK", len(BODY), b"text/plain", False) + BODY}
FIXED_KEEP_ALIVE = FIXED[True]
FIXED_HEAD = {k: _head(b"200 OK", len(BODY), b"text/plain", k) for k in (True, False)}
TYPES = {".html": b"text/html", ".htm": b"text/html", ".txt": b"text/plain",
         ".css": b"text/css", ".js": b"text/javascript", ".json": b"application/json",
         ".png": b"image/png", ".jpg": b"image/jpeg", ".svg": b"image/svg+xml"}


def error_response(status: bytes, keep_alive: bool, extra: bytes = b"") -> bytes:
    """A complete response with a short text body naming the status."""
    body = status + b"\n"
    head = _head(status, len(body), b"text/plain", keep_alive)
    return head[:-2] + extra + b"\r\n" + body


# A parsed request: (method, path, keep_alive). None as the method marks a
# request that could not be parsed: its answer is the error in path, and
# the connection closes after it.
Request = Tuple[Optional[bytes], bytes, bool]


def parse(data: bytes) -> Tuple[List[Request], bytes]:
    """Splits the complete requests off the front of data.

    Returns (requests, rest): rest is an incomplete request still to be
    received. Request bodies (Content-Length) are skipped; a chunked body or
    a malformed request ends the list with an error entry."""
    requests: List[Request] = []
    start = 0
    size = len(data)
    while start < size:
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            if size - start > MAX_HEADER:
                requests.append((None, b"431 Request Header Fields Too Large", False))
                return requests, b""
            break
        lines = data[start:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            requests.append((None, b"400 Bad Request", False))
            return requests, b""
        method, path, version = parts
        keep_alive = version == b"HTTP/1.1"
        length = 0
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                requests.append((None, b"400 Bad Request", False))
                return requests, b""
            name = name.strip().lower()
            if name == b"connection":
                tokens = value.strip().lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0:
                    requests.append((None, b"400 Bad Request", False))
                    return requests, b""
            elif name == b"transfer-encoding":
                requests.append((None, b"501 Not Implemented", False))
                return requests, b""
        if end + 4 + length > size:
            break  # the body has not fully arrived
        requests.append((method, path, keep_alive))
        start = end + 4 + length
    return requests, data[start:]


def static_path(root: str, path: bytes) -> Optional[str]:
    """The file under root that /static/NAME names, or None."""
    if not path.startswith(b"/static/"):
        return None
    name = path[len(b"/static/"):].split(b"?", 1)[0].decode("utf-8", "replace")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or any("\\" in p or "\0" in p for p in parts):
        return None
    full = os.path.join(root, *parts)
    return full if os.path.isfile(full) else None


def file_head(full: str, size: int, keep_alive: bool) -> bytes:
    ctype = TYPES.get(os.path.splitext(full)[1].lower(), b"application/octet-stream")
    return _head(b"200 OK", size, ctype, keep_alive)


class Conn:
    """One client connection: at most one operation in flight at a time."""

    __slots__ = ("sock", "buf", "view", "recv_op", "pending", "requests", "closing", "file",
                 "offset", "left", "fbuf")

    def __init__(self, sock: socket.socket, port: fastiocp.CompletionPort) -> None:
        self.sock = sock
        self.buf = bytearray(16384)
        self.view = memoryview(self.buf)  # slicing a kept view is the cheapest copy-out
        # The first receive; later ones reuse its Completion (resubmit()).
        self.recv_op = port.recv(sock, self.buf, context=self)
        self.pending = b""           # the start of a request not yet complete
        self.requests: Deque[Request] = collections.deque()
        self.closing = False         # close once everything queued is sent
        self.file: Optional[fastiocp.File] = None
        self.offset = 0              # next offset to read in file
        self.left = 0                # bytes of file still to send
        self.fbuf: Optional[bytearray] = None


class Server:
    def __init__(self, port: fastiocp.CompletionPort, lsock: socket.socket, root: str) -> None:
        self.port = port
        self.lsock = lsock
        self.root = root
        # Receives to start again once this batch of completions is handled:
        # one resubmit() call for all of them.
        self.rearm: List[fastiocp.Completion] = []

    def answer(self, c: Conn) -> None:
        """Called when c has nothing in flight: start its next operation."""
        out = []
        while c.requests and c.file is None:
            method, path, keep_alive = c.requests.popleft()
            if not keep_alive:
                c.closing = True
                c.requests.clear()
            if method is None:
                out.append(error_response(path, False))
            elif method != b"GET" and method != b"HEAD":
                out.append(error_response(b"405 Method Not Allowed", keep_alive,
                                          b"Allow: GET, HEAD\r\n"))
            elif path == b"/":
                out.append(FIXED[keep_alive] if method == b"GET" else FIXED_HEAD[keep_alive])
            else:
                out.append(self.open_static(c, method, path, keep_alive))
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.port.send(c.sock, data, context=c)
        elif c.file is not None:
            assert c.fbuf is not None  # open_static() made it with the file
            self.port.read(c.file, c.fbuf, offset=c.offset, context=c)
        elif c.closing:
            self.drop(c)
        else:
            self.rearm.append(c.recv_op)

    def open_static(self, c: Conn, method: bytes, path: bytes, keep_alive: bool) -> bytes:
        full = static_path(self.root, path)
        if full is None:
            return error_response(b"404 Not Found", keep_alive)
        try:
            f = fastiocp.open(full, "rb")
        except OSError:
            return error_response(b"404 Not Found", keep_alive)
        size = f.size()
        if method == b"GET" and size > 0:
            self.port.register(f, key="file")
            c.file, c.offset, c.left = f, 0, size
            if c.fbuf is None:
                c.fbuf = bytearray(CHUNK)
        else:
            f.close()
        return file_head(full, size, keep_alive)

    def close_file(self, c: Conn) -> None:
        if c.file is not None:
            self.port.unregister(c.file)
            c.file.close()
            c.file = None

    def drop(self, c: Conn) -> None:
        self.close_file(c)
        self.port.unregister(c.sock)
        c.sock.close()

    def on_recv(self, c: Conn, comp: fastiocp.Completion) -> None:
        n = comp.nbytes
        if n == 0 or comp.error is not None:  # EOF or reset
            self.drop(c)
            return
        data = c.view[:n].tobytes()
        if c.pending:
            data = c.pending + data
        requests, c.pending = parse(data)
        if len(requests) == 1 and not c.requests and c.file is None:
            # The common case, one request with nothing queued: answered
            # without the queue.
            method, path, keep_alive = requests[0]
            if method == b"GET" and path == b"/" and keep_alive:
                self.port.send(c.sock, FIXED_KEEP_ALIVE, context=c)
                return
        c.requests.extend(requests)
        self.answer(c)

    def on_send(self, c: Conn, comp: fastiocp.Completion) -> None:
        if comp.error is not None:
            self.drop(c)
            return
        data = comp.buffer
        if comp.nbytes < len(data):  # a short send: send the rest first
            self.port.send(c.sock, memoryview(data)[comp.nbytes:], context=c)
        elif c.requests or c.file is not None or c.closing:
            self.answer(c)
        else:  # the common case: wait for the next request
            self.rearm.append(c.recv_op)

    def on_read(self, c: Conn, comp: fastiocp.Completion) -> None:
        n = comp.nbytes
        if comp.error is not None or n == 0:  # the file shrank or failed
            self.drop(c)
            return
        n = min(n, c.left)
        c.offset += n
        c.left -= n
        if c.left == 0:
            self.close_file(c)
        assert c.fbuf is not None
        self.port.send(c.sock, memoryview(c.fbuf)[:n], context=c)

    def on_accept(self, comp: fastiocp.Completion) -> None:
        if comp.error is None:
            sock, _addr = comp.result()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.port.register(sock, key="conn")
            Conn(sock, self.port)  # lives on as its receive's context
        self.port.accept(self.lsock)

    def run(self, stop: List[bool]) -> None:
        port = self.port
        on_recv, on_send, on_read = self.on_recv, self.on_send, self.on_read
        rearm = self.rearm
        port.register(self.lsock, key="listener")
        port.accept(self.lsock)
        while not stop:
            completions = port.get_many(256, timeout=0.5)
            with port.batch():  # one system call for all the answers
                for comp in completions:
                    op = comp.op
                    if op == "recv":
                        on_recv(comp.context, comp)
                    elif op == "send":
                        on_send(comp.context, comp)
                    elif op == "read":
                        on_read(comp.context, comp)
                    else:
                        self.on_accept(comp)
                if rearm:
                    port.resubmit(rearm)
                    rearm.clear()


def serve(port_number: int, root: str = DEFAULT_ROOT,
          ready: Optional[Callable[[Tuple[str, int]], object]] = None) -> None:
    lsock = socket.create_server(("127.0.0.1", port_number), backlog=1024)
    stop: List[bool] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(True))
    with fastiocp.CompletionPort() as port, lsock:
        server = Server(port, lsock, os.path.abspath(root))
        if ready is not None:
            ready(lsock.getsockname())
        server.run(stop)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="directory of /static/ files")
    args = parser.parse_args(argv)
    try:
        serve(args.port, args.root,
              ready=lambda addr: print(f"http server on {addr[0]}:{addr[1]}", flush=True))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
