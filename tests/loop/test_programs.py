"""Real programs on fastiocp's loop, each driven by a real client, on every
backend: an aiohttp application, uvicorn serving ASGI (in a subprocess,
loaded by --loop), a websockets echo, a TCP echo server serving a client
process, a subprocess pipeline and a TLS echo. Every test checks the data
that came back, not just that nothing raised.

Linux and Windows alike: on Windows (under Wine, tools/wine/test.sh) the
same tests run on the IOCP backend; wrk is a Linux binary, so there uvicorn
is driven by Python HTTP clients instead (see that test).

The third-party packages are the `loop-test` extra (pip install
'.[loop-test]'; under Wine, tools/wine/requirements.txt); each test skips
where its package is missing."""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.client
import os
import re
import shutil
import ssl
import subprocess
import sys
import textwrap
import threading

import pytest

from fastiocp.loop import EventLoop

from loop_util import loop, run  # noqa: F401 (loop: a fixture)

pytestmark = pytest.mark.timeout(20)



def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + 3 + seed) % 251 for i in range(n))


# ---- aiohttp ------------------------------------------------------------------

def test_aiohttp_app_serves_its_own_client_and_an_outside_one(loop):
    """An aiohttp web.Application (AppRunner + TCPSite) on fastiocp's loop
    answers 50 requests from aiohttp's ClientSession on the same loop (GET
    hello and POST echo of bodies up to ~50 KB, every body checked), and a
    plain blocking http.client in another thread, which shares nothing
    with the loop but the socket, gets the same answers."""
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    hello_text = "hello from fastiocp"

    async def hello(request):
        return web.Response(text=hello_text)

    async def echo(request):
        return web.Response(body=await request.read())

    def outside_client(port: int) -> list:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            got = []
            conn.request("GET", "/")
            r = conn.getresponse()
            got.append((r.status, r.read()))
            body = payload(100_000, seed=5)
            conn.request("POST", "/echo", body=body)
            r = conn.getresponse()
            got.append((r.status, r.read() == body))
            return got
        finally:
            conn.close()

    async def main():
        app = web.Application()
        app.router.add_get("/", hello)
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            checked = 0
            async with aiohttp.ClientSession() as session:
                for i in range(50):
                    if i % 2 == 0:
                        async with session.get(f"http://127.0.0.1:{port}/") as r:
                            assert r.status == 200
                            assert await r.text() == hello_text
                    else:
                        body = payload(i * 997 + 1, seed=i)
                        async with session.post(f"http://127.0.0.1:{port}/echo", data=body) as r:
                            assert r.status == 200
                            assert await r.read() == body
                    checked += 1
            outside = await asyncio.to_thread(outside_client, port)
            return checked, outside
        finally:
            await runner.cleanup()

    checked, outside = run(loop, main())
    assert checked == 50
    assert outside == [(200, hello_text.encode()), (200, True)]


# ---- uvicorn ------------------------------------------------------------------

_ASGI_APP = '''
import asyncio


async def app(scope, receive, send):
    assert scope["type"] == "http"
    loop = asyncio.get_running_loop()
    body = ("hello from %s.%s backend=%s" % (
        type(loop).__module__, type(loop).__name__, getattr(loop, "backend", "-"))).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''

# uvicorn < 0.36 took --loop module:function as a function that installs a
# policy, not as a loop factory: there the subprocess runs Server.serve()
# inside fastiocp.run() instead.
_UVICORN_VIA_RUN = '''
import sys, fastiocp, uvicorn
sys.path.insert(0, sys.argv[1])
config = uvicorn.Config("hello_asgi:app", host="127.0.0.1", port=0, lifespan="off",
                        access_log=False, log_level="info")
fastiocp.run(uvicorn.Server(config).serve())
'''


def _start_uvicorn(app_dir: str, backend: str) -> tuple[subprocess.Popen, int, str]:
    """uvicorn serving hello_asgi:app from app_dir on port 0 of 127.0.0.1,
    on fastiocp's loop with FASTIOCP_BACKEND=backend: (process, port, how)."""
    uvicorn = pytest.importorskip("uvicorn")
    env = dict(os.environ, FASTIOCP_BACKEND=backend, PYTHONUNBUFFERED="1")
    if hasattr(uvicorn.Config, "get_loop_factory"):  # uvicorn >= 0.36
        how = "--loop fastiocp:new_event_loop"
        argv = [sys.executable, "-m", "uvicorn", "hello_asgi:app", "--app-dir", app_dir,
                "--host", "127.0.0.1", "--port", "0", "--loop", "fastiocp:new_event_loop",
                "--lifespan", "off", "--no-access-log", "--log-level", "info"]
    else:
        how = "fastiocp.run(uvicorn.Server(config).serve())"
        argv = [sys.executable, "-c", _UVICORN_VIA_RUN, app_dir]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    found: list[int] = []
    lines: list[str] = []
    listening = threading.Event()

    def read_log() -> None:  # until EOF, so uvicorn never blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            # Colours or not (uvicorn colours a console; Wine's pipes may look like one).
            m = re.search(r"Uvicorn running on (?:\x1b\[[0-9;]*m)*http://127\.0\.0\.1:(\d+)", line)
            if m and not found:
                found.append(int(m.group(1)))
                listening.set()
        listening.set()

    threading.Thread(target=read_log, daemon=True).start()
    if not listening.wait(10) or not found:
        proc.kill()
        proc.wait(10)
        pytest.fail("uvicorn did not start listening:\n" + "".join(lines))
    return proc, found[0], how


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_uvicorn_serves_asgi_on_the_loop_under_wrk(backend, tmp_path):
    """uvicorn, started as `uvicorn --loop fastiocp:new_event_loop` with
    FASTIOCP_BACKEND set, serves an ASGI app from fastiocp's EventLoop on
    that backend (the app reports its running loop's class and backend in
    the body), then sustains wrk -t1 -c16 -d2s with no socket errors and
    no non-2xx answers. Where wrk is not installed (Windows, where wrk does
    not run: under Wine this is the path taken) Python HTTP clients drive
    it instead: 8 threads, each with its own keep-alive http.client
    connection, 25 requests each, every answer's status and body checked."""
    (tmp_path / "hello_asgi.py").write_text(_ASGI_APP)
    proc, port, how = _start_uvicorn(str(tmp_path), backend)
    try:
        expected = f"hello from fastiocp.loop._loop.EventLoop backend={backend}".encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/")
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, expected), how
        finally:
            conn.close()

        wrk = shutil.which("wrk")
        if wrk:
            out = subprocess.run([wrk, "-t1", "-c16", "-d2s", f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True, timeout=15)
            assert out.returncode == 0, out.stderr
            m = re.search(r"(\d+) requests in", out.stdout)
            assert m and int(m.group(1)) > 0, out.stdout
            assert "Socket errors" not in out.stdout, out.stdout
            assert "Non-2xx" not in out.stdout, out.stdout
        else:
            def client(_: int) -> int:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    ok = 0
                    for _ in range(25):
                        conn.request("GET", "/")
                        r = conn.getresponse()
                        ok += (r.status, r.read()) == (200, expected)
                    return ok
                finally:
                    conn.close()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                assert list(pool.map(client, range(8))) == [25] * 8
        assert proc.poll() is None, "uvicorn exited under load"
    finally:
        _stop(proc)


# ---- websockets ---------------------------------------------------------------

def test_websockets_echo_of_varied_messages(loop):
    """A websockets server and client, both on fastiocp's loop, echo 200
    messages of sizes from 0 bytes to 64 KiB, binary and text alternately
    (permessage-deflate on, as by default); every message comes back
    equal and of the same type, in order."""
    pytest.importorskip("websockets")
    try:
        from websockets.asyncio.client import connect
        from websockets.asyncio.server import serve
    except ImportError:  # websockets < 13: the legacy API only
        from websockets import connect, serve  # type: ignore[no-redef]

    sizes = [0, 1, 125, 126, 65535, 65536] + [(i * 4099) % 65537 for i in range(194)]
    messages: list = []
    for i, n in enumerate(sizes):
        data = payload(n, seed=i)
        messages.append(data if i % 3 else data.decode("latin-1"))

    async def handler(ws, path=None):  # path: the legacy API's second argument
        async for msg in ws:
            await ws.send(msg)

    async def main():
        async with serve(handler, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            got = []
            async with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
                for msg in messages:
                    await ws.send(msg)
                    got.append(await ws.recv())
            return got

    got = run(loop, main())
    assert len(got) == 200
    for i, (sent, back) in enumerate(zip(messages, got)):
        assert type(back) is type(sent) and back == sent, f"message {i} ({len(sent)} long)"


# ---- TCP echo with a client process -------------------------------------------

_ECHO_CLIENT = textwrap.dedent("""
    import asyncio, hashlib, sys

    async def one(port, i, size):
        data = bytes((j * 31 + i) % 256 for j in range(size))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        back = await reader.read()
        writer.close()
        await writer.wait_closed()
        return back == data

    async def main(port, conns, size):
        ok = await asyncio.gather(*(one(port, i, size) for i in range(conns)))
        print(sum(ok), conns)

    asyncio.run(main(*map(int, sys.argv[1:])))
""")


def test_tcp_echo_server_serves_a_client_process(loop):
    """An asyncio Protocol echo server on fastiocp's loop, and a client
    program in another process on that Python's own default asyncio loop
    (selector on Linux, proactor on Windows): 16 connections at once, each
    sending 64 KiB (made differently per connection) then EOF, each checks
    that exactly its bytes came back; the server counts every byte."""
    conns, size = 16, 64 * 1024
    received = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            received.append(len(data))
            self.transport.write(data)

        def eof_received(self):
            self.transport.close()

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _ECHO_CLIENT, str(port), str(conns), str(size),
                stdout=asyncio.subprocess.PIPE)
            out, _ = await client.communicate()
            return out, client.returncode
        finally:
            server.close()
            await server.wait_closed()

    out, rc = run(loop, main())
    assert rc == 0
    assert out.split() == [str(conns).encode(), str(conns).encode()]
    assert sum(received) == conns * size


# ---- subprocesses -------------------------------------------------------------

_PRODUCER = textwrap.dedent("""
    import sys
    block = bytes(range(256)) * 256          # 64 KiB
    for _ in range(16):                      # 1 MiB
        sys.stdout.buffer.write(block)
    sys.stdout.buffer.flush()
""")

_CONSUMER = textwrap.dedent("""
    import hashlib, sys
    h, n = hashlib.sha256(), 0
    while chunk := sys.stdin.buffer.read1(1 << 16):
        h.update(chunk)
        n += len(chunk)
    print(n, h.hexdigest())
""")


def test_subprocess_pipeline_producer_to_consumer(loop):
    """Two Python subprocesses made by asyncio.create_subprocess_exec,
    producer | consumer, with the loop moving the data between their pipes:
    the producer's 1 MiB reaches the consumer whole and in order (the
    consumer prints the count and SHA-256 of what it read), the loop
    forwarded exactly 1 MiB, and both exit 0."""
    expected = bytes(range(256)) * 256 * 16

    async def main():
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PRODUCER, stdout=asyncio.subprocess.PIPE)
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CONSUMER,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        forwarded = 0
        while chunk := await producer.stdout.read(65536):
            consumer.stdin.write(chunk)
            await consumer.stdin.drain()
            forwarded += len(chunk)
        consumer.stdin.close()
        await consumer.stdin.wait_closed()
        out, _ = await consumer.communicate()
        return forwarded, out, await producer.wait(), consumer.returncode

    forwarded, out, producer_rc, consumer_rc = run(loop, main())
    assert forwarded == len(expected) == 1 << 20
    assert out.split() == [str(1 << 20).encode(), hashlib.sha256(expected).hexdigest().encode()]
    assert (producer_rc, consumer_rc) == (0, 0)


# ---- TLS ----------------------------------------------------------------------

def _self_signed(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1, made now with
    the cryptography package, else the openssl command, else skip:
    (certfile, keyfile)."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if not openssl:
            pytest.skip("neither the cryptography package nor openssl to make a certificate")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-subj", "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert,
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=30)
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(k.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName(
             [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
             critical=False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .sign(k, hashes.SHA256()))
    with open(key, "wb") as f:
        f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    with open(cert, "wb") as f:
        f.write(c.public_bytes(serialization.Encoding.PEM))
    return cert, key


def test_tls_echo_with_a_verified_self_signed_certificate(loop, tmp_path):
    """asyncio.start_server(ssl=) and open_connection(ssl=) on fastiocp's
    loop: the client verifies the server's certificate (made in the test)
    and host name, then 100 round trips of 1 KiB each come back equal,
    through TLS over the loop's transports; then a clean TLS shutdown."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    # X.509 policy of a throwaway test certificate is not what is tested here.
    client_ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)

    async def handle(reader, writer):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
            version = writer.get_extra_info("ssl_object").version()
            got = []
            for i in range(100):
                msg = payload(1024, seed=i)
                writer.write(msg)
                await writer.drain()
                got.append(await reader.readexactly(1024) == msg)
            writer.close()
            await writer.wait_closed()
            return version, got
        finally:
            server.close()
            await server.wait_closed()

    version, got = run(loop, main())
    assert version.startswith("TLS")
    assert got == [True] * 100
