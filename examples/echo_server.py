"""A TCP echo server on one completion port, single thread.

    python examples/echo_server.py PORT

Serves on 127.0.0.1:PORT until SIGTERM or Ctrl-C. Every connection has one
receive in flight; each received chunk is sent back, and the receive is
started again when the send completes: the same Completion, by one
resubmit() call for all the receives of a batch (no Python call per
receive). Submissions made while handling a batch of completions reach the
kernel together (port.batch()).
"""
from __future__ import annotations

import signal
import socket
import sys

import fastiocp

LISTENER = "listener"


def serve(port_number: int, ready=None) -> None:
    lsock = socket.create_server(("127.0.0.1", port_number), backlog=1024)
    stop = False

    def on_sigterm(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_sigterm)
    with fastiocp.CompletionPort() as port, lsock:
        port.register(lsock, key=LISTENER)
        port.accept(lsock)
        if ready is not None:
            ready(lsock.getsockname())
        rearm = []  # receives whose echo has gone out
        while not stop:
            completions = port.get_many(256, timeout=0.5)
            with port.batch():
                for c in completions:
                    if c.key is LISTENER:
                        if c.error is None:
                            conn, _addr = c.result()
                            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                            port.register(conn, key=conn)
                            port.recv(conn, bytearray(65536))
                        port.accept(lsock)
                    elif c.op == "recv":
                        conn = c.key
                        if c.error is not None or c.nbytes == 0:
                            port.unregister(conn)
                            conn.close()  # peer closed or failed
                        else:
                            data = memoryview(c.buffer)[: c.nbytes]
                            port.send(conn, data, context=c)  # c: the receive
                    elif c.op == "send":
                        conn = c.key
                        if c.error is not None:
                            port.unregister(conn)
                            conn.close()
                        elif c.nbytes < len(c.buffer):
                            # A short send: send the rest before reading on.
                            port.send(conn, c.buffer[c.nbytes :], context=c.context)
                        else:
                            rearm.append(c.context)
                if rearm:
                    port.resubmit(rearm)
                    rearm.clear()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        serve(int(sys.argv[1]), ready=lambda addr: print(f"echo server on {addr[0]}:{addr[1]}", flush=True))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
