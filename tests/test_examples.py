"""The README's echo server example serves, echoes and stops on SIGTERM."""
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


@pytest.mark.skipif(not (EXAMPLES / "echo_server.py").exists(), reason="run from a source checkout")
@pytest.mark.skipif(sys.platform == "win32", reason="stops on SIGTERM, a POSIX signal")
def test_echo_server_example():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastiocp.__file__)))
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port_number = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "echo_server.py"), str(port_number)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "echo server on" in proc.stdout.readline()
        clients = [socket.create_connection(("127.0.0.1", port_number), timeout=10) for _ in range(10)]
        for i, c in enumerate(clients):
            c.sendall(b"message %d" % i)
        for i, c in enumerate(clients):
            assert c.recv(100) == b"message %d" % i
        big = os.urandom(512 << 10)  # fits the loopback buffers both ways
        clients[0].sendall(big)
        got = bytearray()
        while len(got) < len(big):
            got += clients[0].recv(1 << 20)
        assert got == big
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
