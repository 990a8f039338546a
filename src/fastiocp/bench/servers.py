"""The server contenders of ``python -m fastiocp bench``.

    python -m fastiocp.bench.servers NAME [PORT]

NAME is one of SERVERS below. Each server listens on 127.0.0.1:PORT (0: any
free port; the echo-tls-* servers also take CERTFILE KEYFILE), prints ``<what> on 127.0.0.1:<port>`` on stdout once it accepts
connections, and serves until it is killed (SIGTERM's default action: the
runner kills every server it starts). The fastiocp servers use only the
public API. The HTTP server on fastiocp is the example
(examples/http_server.py runs fastiocp/bench/http_example.py); the asyncio
and uvloop HTTP servers here answer the same requests with the same bytes.
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import threading
from typing import Any, Callable, Dict, Optional

HOST = "127.0.0.1"


def _listen(port: int) -> socket.socket:
    lsock = socket.create_server((HOST, port), backlog=1024)
    return lsock


def _listen_tcp(port: int) -> socket.socket:
    """A listener whose proto is IPPROTO_TCP, as getaddrinfo() gives
    loop.create_server(host, port): asyncio sets TCP_NODELAY on a
    connection only when its socket says so (base_events._set_nodelay),
    and an accepted socket takes its listener's proto. A framework handed
    a socket.socket() listener (proto 0) would wait out delayed ACKs."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(1024)
    return lsock


def _announce(what: str, lsock_or_port: Any) -> None:
    port = lsock_or_port if isinstance(lsock_or_port, int) else lsock_or_port.getsockname()[1]
    print(f"{what} on {HOST}:{port}", flush=True)


# ---- TCP echo --------------------------------------------------------------

def echo_batch_loop(cp: Any, lsock: socket.socket,
                    work: Optional[Callable[[], None]] = None) -> None:
    """The fastest echo loop on a completion port (cp has lsock registered
    and an accept pending): one receive in flight per connection; the echo
    is sent, and the receive started again (the same Completion, by one
    resubmit() for the whole batch) when the send completed. Every
    submission made while handling one batch of completions reaches the
    kernel in one system call (port.batch()). work(), if given, runs once
    per received message (benchmarks/bench_free_threading.py). Returns when
    the port is closed; several threads may run it on one port."""
    import fastiocp

    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    get_many, recv, send, resubmit, batch = cp.get_many, cp.recv, cp.send, cp.resubmit, cp.batch
    rearm: list = []  # receives whose echo went out: started again together
    while True:
        try:
            completions = get_many(256)
        except fastiocp.PortClosedError:
            return
        with batch():
            for c in completions:
                op = c.op
                if op == "send":
                    conn = c.key
                    received = c.context  # the receive's Completion
                    n = c.nbytes
                    if c.error is not None:
                        cp.unregister(conn)
                        conn.close()
                    elif n < len(c.buffer):  # short send: the rest first
                        send(conn, c.buffer[n:], received)
                    else:
                        rearm.append(received)
                elif op == "recv":
                    n = c.nbytes
                    conn = c.key
                    if n and c.error is None:
                        if work is not None:
                            work()
                        send(conn, memoryview(c.buffer)[:n], c)
                    else:
                        cp.unregister(conn)
                        conn.close()
                else:  # accept
                    if c.error is None:
                        conn, _ = c.result()
                        conn.setsockopt(*nodelay)
                        cp.register(conn, key=conn)
                        recv(conn, bytearray(65536))
                    cp.accept(lsock)
            if rearm:
                resubmit(rearm)
                rearm.clear()


def echo_pool_handler(cp: Any, lsock: socket.socket,
                      work: Optional[Callable[[], None]] = None) -> Callable[[Any], None]:
    """The handler of the echo server on fastiocp.WorkerPool: one
    completion per call, each submission a call of its own (the pool's
    batch_submissions decides when they reach the kernel). work(), if
    given, runs once per received message."""
    recv, send = cp.recv, cp.send

    def handle(c: Any) -> None:
        op = c.op
        if op == "send":
            conn = c.key
            n = c.nbytes
            if c.error is not None:
                cp.unregister(conn)
                conn.close()
            elif n < len(c.buffer):
                send(conn, c.buffer[n:], c.context)
            else:
                recv(conn, c.context)
        elif op == "recv":
            n = c.nbytes
            conn = c.key
            if n and c.error is None:
                if work is not None:
                    work()
                buf = c.buffer
                send(conn, memoryview(buf)[:n], buf)
            else:
                cp.unregister(conn)
                conn.close()
        else:
            if c.error is None:
                conn, _ = c.result()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                cp.register(conn, key=conn)
                recv(conn, bytearray(65536))
            cp.accept(lsock)

    return handle


def echo_multishot_loop(cp: Any, lsock: socket.socket, pool: Any) -> None:
    """The echo server of issue 18: one multishot accept for the listener
    and one pooled multishot receive per connection, so that nothing is
    submitted per message but the echo itself, which is sent straight
    from the pool's buffer (the send pins it; it goes back to the pool
    when the send completed). Per connection nothing is pinned while it
    is idle. Messages of one connection are echoed in order as long as
    each is echoed before the next arrives (one message in flight per
    connection, as the load generator sends)."""
    import fastiocp

    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    get_many, recv, send, batch = cp.get_many, cp.recv, cp.send, cp.batch
    while True:
        try:
            completions = get_many(256)
        except fastiocp.PortClosedError:
            return
        with batch():
            for c in completions:
                op = c.op
                if op == "send":
                    received = c.context  # the receive's Completion
                    n = c.nbytes
                    if c.error is None and n < len(received.buffer):
                        send(c.key, memoryview(received.buffer)[n:], received)
                        continue
                    received.release()
                elif op == "recv":
                    conn = c.key
                    if c.nbytes:
                        send(conn, c.buffer, c)
                    if c.more:
                        continue
                    # The last result. The pool ran dry (ENOBUFS: nothing
                    # was lost) or the kernel stopped with data: receive
                    # again. End of stream or an error: close.
                    if c.nbytes or (c.error is not None and c.error.errno == errno.ENOBUFS):
                        recv(conn, pool, multishot=True)
                    else:
                        cp.unregister(conn)
                        conn.close()
                elif c.error is None:  # accept
                    conn, _ = c.result()
                    conn.setsockopt(*nodelay)
                    cp.register(conn, key=conn)
                    recv(conn, pool, multishot=True)
                    if not c.more:
                        cp.accept(lsock, multishot=True)


def echo_fastiocp(port: int) -> None:
    """Single thread on one completion port: echo_batch_loop()."""
    import fastiocp

    lsock = _listen(port)
    with fastiocp.CompletionPort() as cp:
        cp.register(lsock, key=object())
        cp.accept(lsock)
        _announce("echo server", lsock)
        echo_batch_loop(cp, lsock)


def echo_fastiocp_multishot(port: int) -> None:
    """Single thread on one completion port: echo_multishot_loop(), with a
    pool of 1,024 buffers of 64 KiB (the per-connection echo's size)."""
    import fastiocp

    lsock = _listen(port)
    with fastiocp.CompletionPort() as cp:
        pool = fastiocp.BufferPool(65536, 1024)
        cp.register(lsock, key=object())
        cp.accept(lsock, multishot=True)
        _announce("echo server", lsock)
        echo_multishot_loop(cp, lsock, pool)


def echo_fastiocp_pool(port: int, threads: int = 2) -> None:
    """The same server on fastiocp.WorkerPool: `threads` threads dequeue
    completions and run echo_pool_handler(), the submissions of each
    dequeued batch going to the kernel together (batch_submissions)."""
    import fastiocp

    lsock = _listen(port)
    cp = fastiocp.CompletionPort()
    cp.register(lsock, key=object())
    with fastiocp.WorkerPool(cp, echo_pool_handler(cp, lsock), threads=threads, max_batch=64,
                             batch_submissions=True):
        cp.accept(lsock)
        _announce("echo server", lsock)
        threading.Event().wait()


# ---- TCP accept (issue 18) ---------------------------------------------------

def _accept_server(multishot: bool) -> Callable[[int], None]:
    """A server that accepts every connection and closes it at once: with
    one multishot accept, or with one accept submitted again for each
    connection (what a server without multishot does), its submissions of
    one dequeued batch reaching the kernel together either way."""
    def run(port: int) -> None:
        import fastiocp

        lsock = _listen(port)
        with fastiocp.CompletionPort() as cp:
            cp.register(lsock)
            cp.accept(lsock, multishot=multishot)
            _announce("accept server", lsock)
            while True:
                with cp.batch():
                    for c in cp.get_many(256):
                        if c.error is None:
                            c.result()[0].close()
                        if not c.more:
                            cp.accept(lsock, multishot=multishot)
    return run


class _EchoProtocol(asyncio.Protocol):
    """The echo server of the asyncio, uvloop and fastiocp loop contenders."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # asyncio and uvloop set TCP_NODELAY

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _echo_protocol_server(loop_factory: Callable[[], Any]) -> Callable[[int], None]:
    def serve(port: int) -> None:
        loop = loop_factory()
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(loop.create_server(_EchoProtocol, HOST, port, backlog=1024))
        _announce("echo server", server.sockets[0])
        loop.run_forever()

    return serve


def _asyncio_loop() -> Any:
    return asyncio.new_event_loop()


def _uvloop_loop() -> Any:
    from fastiocp.bench import optional_import

    return optional_import("uvloop").new_event_loop()


def _fastiocp_loop() -> Any:
    import fastiocp

    return fastiocp.new_event_loop()


# The loop section: uvloop's echo benchmark shapes (its examples/bench), each
# server the same code on every loop. READ_SIZE bounds one read (a 100 KiB
# message fits); the BufferedProtocol's buffer has that size too.
READ_SIZE = 256 * 1024


class _EchoBufferedProtocol(asyncio.BufferedProtocol):
    """BufferedProtocol echo: the loop reads into one buffer per connection;
    the bytes received are copied out for write() (the next read may land
    in the buffer before they are sent)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = bytearray(READ_SIZE)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(self.buffer[:nbytes])


def _protocol_server(loop_factory: Callable[[], Any],
                     protocol: Callable[[], asyncio.BaseProtocol]) -> Callable[..., None]:
    def serve(port: int, certfile: str = "", keyfile: str = "") -> None:
        loop = loop_factory()
        asyncio.set_event_loop(loop)
        ctx = None
        if certfile:  # TLS: the same server behind ssl=
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile or None)
        server = loop.run_until_complete(
            loop.create_server(protocol, HOST, port, backlog=1024, ssl=ctx))
        _announce("echo server", server.sockets[0])
        loop.run_forever()

    return serve


async def _streams_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # write() without drain(), as in uvloop's benchmark: one message is in
    # flight per connection, so the write buffer never grows past one.
    read, write = reader.read, writer.write
    try:
        while True:
            data = await read(READ_SIZE)
            if not data:
                break
            write(data)
    except ConnectionError:  # the load generator's end
        pass
    writer.close()


def _streams_server(loop_factory: Callable[[], Any]) -> Callable[[int], None]:
    def serve(port: int) -> None:
        loop = loop_factory()
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            asyncio.start_server(_streams_echo, HOST, port, backlog=1024, limit=READ_SIZE))
        _announce("echo server", server.sockets[0])
        loop.run_forever()

    return serve


async def _sock_echo(loop: Any, conn: socket.socket) -> None:
    sock_recv, sock_sendall = loop.sock_recv, loop.sock_sendall
    with conn:
        try:
            while True:
                data = await sock_recv(conn, READ_SIZE)
                if not data:
                    break
                await sock_sendall(conn, data)
        except ConnectionError:  # the load generator's end
            pass


async def _sock_accept_loop(loop: Any, lsock: socket.socket) -> None:
    while True:
        conn, _ = await loop.sock_accept(lsock)
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.create_task(_sock_echo(loop, conn))


def _sock_server(loop_factory: Callable[[], Any]) -> Callable[[int], None]:
    def serve(port: int) -> None:
        loop = loop_factory()
        asyncio.set_event_loop(loop)
        lsock = _listen(port)
        lsock.setblocking(False)
        loop.create_task(_sock_accept_loop(loop, lsock))
        _announce("echo server", lsock)
        loop.run_forever()

    return serve


def echo_threads(port: int) -> None:
    """A thread per connection, blocking calls."""
    lsock = _listen(port)
    _announce("echo server", lsock)

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            recv, sendall = conn.recv, conn.sendall
            while True:
                data = recv(65536)
                if not data:
                    return
                sendall(data)

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


# ---- HTTP/1.1 (the asyncio twin of examples/http_server.py) ----------------

BODY = b"Hello, World!\n"


# fastiocp.bench.http_example, imported by the HTTP servers only (the other
# contenders' processes never load fastiocp).
_http: Any = None


class _HTTPProtocol(asyncio.Protocol):
    """The HTTP server of the asyncio and uvloop contenders: the example's
    parse() and responses, served from root."""

    def __init__(self, root: str) -> None:
        self.root = root

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        http = _http
        if self.pending:
            data = self.pending + data
        requests, self.pending = http.parse(data)
        out = []
        close = False
        for method, path, keep_alive in requests:
            if method is None:
                out.append(http.error_response(path, False))
            elif method != b"GET" and method != b"HEAD":
                out.append(http.error_response(b"405 Method Not Allowed", keep_alive,
                                               b"Allow: GET, HEAD\r\n"))
            elif path == b"/":
                out.append(http.FIXED[keep_alive] if method == b"GET"
                           else http.FIXED_HEAD[keep_alive])
            else:
                out.append(self.static(method, path, keep_alive))
            if not keep_alive:
                close = True
                break
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            self.transport.close()

    def static(self, method: bytes, path: bytes, keep_alive: bool) -> bytes:
        # Plain blocking reads: this twin exists for the fixed body.
        http = _http
        full = http.static_path(self.root, path)
        if full is None:
            missing: bytes = http.error_response(b"404 Not Found", keep_alive)
            return missing
        with open(full, "rb") as f:
            data = f.read()
        head: bytes = http.file_head(full, len(data), keep_alive)
        return head + data if method == b"GET" else head


def _http_protocol_server(loop_factory: Callable[[], Any]) -> Callable[[int], None]:
    def serve(port: int) -> None:
        global _http
        from fastiocp.bench import http_example

        _http = http_example
        root = os.path.abspath(http_example.DEFAULT_ROOT)
        loop = loop_factory()
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            loop.create_server(lambda: _HTTPProtocol(root), HOST, port, backlog=1024))
        _announce("http server", server.sockets[0])
        loop.run_forever()

    return serve


def _uvicorn_server(loop_factory: Callable[[], Any]) -> Callable[[int], None]:
    """uvicorn (httptools when installed), a plain ASGI hello world, on the
    given loop: issue 16's framework row."""
    def serve(port: int) -> None:
        from fastiocp.bench import optional_import

        uvicorn = optional_import("uvicorn")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
            await send({"type": "http.response.body", "body": b"Hello, world!"})

        loop = loop_factory()
        asyncio.set_event_loop(loop)
        lsock = _listen_tcp(port)
        config = uvicorn.Config(app, loop="none", log_level="warning", access_log=False,
                                lifespan="off", http="auto")
        _announce("http server", lsock)
        loop.run_until_complete(uvicorn.Server(config).serve(sockets=[lsock]))

    return serve


def _aiohttp_server(loop_factory: Callable[[], Any]) -> Callable[[int], None]:
    """aiohttp's web server, a hello-world handler, on the given loop."""
    def serve(port: int) -> None:
        from fastiocp.bench import optional_import

        web = optional_import("aiohttp.web")

        async def hello(request: Any) -> Any:
            return web.Response(text="Hello, world!")

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/", hello)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            lsock = _listen_tcp(port)
            await web.SockSite(runner, lsock).start()
            _announce("http server", lsock)
            await asyncio.Event().wait()

        loop = loop_factory()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())

    return serve


# The loops of the loop section, by the name the server names end with.
LOOPS: Dict[str, Callable[[], Any]] = {
    "asyncio": _asyncio_loop,
    "uvloop": _uvloop_loop,
    "fastiocp-loop": _fastiocp_loop,
}

SERVERS: Dict[str, Callable[..., None]] = {
    "echo-fastiocp": echo_fastiocp,
    "echo-fastiocp-pool": echo_fastiocp_pool,
    "echo-fastiocp-multishot": echo_fastiocp_multishot,
    "accept-multishot": _accept_server(True),
    "accept-single": _accept_server(False),
    "echo-asyncio": _echo_protocol_server(_asyncio_loop),
    "echo-uvloop": _echo_protocol_server(_uvloop_loop),
    "echo-fastiocp-loop": _echo_protocol_server(_fastiocp_loop),
    "echo-threads": echo_threads,
    **{f"echo-{shape}-{name}": make(factory)
       for name, factory in LOOPS.items()
       for shape, make in (("streams", _streams_server), ("sock", _sock_server),
                           ("buffered", lambda f: _protocol_server(f, _EchoBufferedProtocol)),
                           ("tls", lambda f: _protocol_server(f, _EchoProtocol)))},
    "http-asyncio": _http_protocol_server(_asyncio_loop),
    "http-uvloop": _http_protocol_server(_uvloop_loop),
    "http-fastiocp-loop": _http_protocol_server(_fastiocp_loop),
    **{f"http-{framework}-{name}": make(factory)
       for name, factory in LOOPS.items()
       for framework, make in (("uvicorn", _uvicorn_server), ("aiohttp", _aiohttp_server))},
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SERVERS:
        print(f"usage: python -m fastiocp.bench.servers {{{','.join(SERVERS)}}} [PORT] "
              "[CERTFILE KEYFILE (echo-tls-*)]", file=sys.stderr)
        return 2
    SERVERS[argv[0]](int(argv[1]) if len(argv) > 1 else 0, *argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
