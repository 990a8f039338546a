"""Command line: python -m fastiocp {info,demo,bench}."""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
from typing import Optional, Sequence

import fastiocp


def cmd_info(args: argparse.Namespace) -> int:
    """Print the version, the backend a port gets here and why, and the state
    of every other backend. A FASTIOCP_BACKEND that names no backend, or one
    that does not work here, is explained with the fix (exit status 1)."""
    print(f"fastiocp {fastiocp.__version__} on Python {platform.python_version()} "
          f"({sys.platform}, {platform.machine()})")
    env = os.environ.get("FASTIOCP_BACKEND", "")
    forced = env if env and env != "auto" else None
    status = fastiocp.backend_status()
    working = [name for name, works, _why in status if works]
    chosen: Optional[str] = None
    try:
        with fastiocp.CompletionPort() as port:
            chosen = port.backend
    except (fastiocp.BackendUnavailableError, ValueError) as exc:
        # FASTIOCP_BACKEND names no backend of this build, one of another
        # platform, or one this machine blocks; or nothing works at all.
        print(f"backend: none: {exc}")
        if forced is not None and working:
            print(f"to fix: set FASTIOCP_BACKEND to a backend that works here ({', '.join(working)}), "
                  "or unset it (or set it to 'auto') to let fastiocp choose")
        elif forced is not None:
            print("to fix: no backend works on this machine (reasons below); unsetting "
                  "FASTIOCP_BACKEND will not help")
    if chosen is not None:
        if forced is not None:
            print(f"backend: {chosen} (forced by FASTIOCP_BACKEND={forced})")
        elif len(status) == 1:
            print(f"backend: {chosen} (the only backend of this build)")
        else:
            print(f"backend: {chosen} (the first that works, in the order {', '.join(n for n, _w, _y in status)})")
    others = [(name, works, why) for name, works, why in status if name != chosen]
    if others:
        print("other backends:" if chosen is not None else "backends of this build:")
    for name, works, why in others:
        if not works:
            state = f"unavailable: {why}" if why else "unavailable"
        elif chosen is None:
            state = "works here"
        else:
            state = f"works here, not chosen (FASTIOCP_BACKEND={name} or backend={name!r} selects it)"
        print(f"  {name}: {state}")
    print_operations([name for name, _w, _y in status])
    return 0 if chosen is not None else 1


def print_operations(backends: Sequence[str]) -> None:
    """A table: how each backend of this build does each operation (native:
    one OS call does it; emulated: readiness plus a non-blocking call, or a
    helper thread)."""
    tables = {name: fastiocp.backend_operations(name) for name in backends}
    ops = list(next(iter(tables.values())))
    ops.append(ops.pop(ops.index("timeout")))  # per-operation timeouts last
    print("operations (native / emulated / unsupported):")
    width = max(len(op) for op in ops)
    print("  " + " " * width + "".join(f"  {name:<11}" for name in backends))
    for op in ops:
        label = "timeout=" if op == "timeout" else op
        print(f"  {label:<{width}}" + "".join(f"  {tables[name][op]:<11}" for name in backends))


def cmd_demo(args: argparse.Namespace) -> int:
    """The seed's walkthrough: one port, a file read, a socket send, an own
    packet and an EXIT key, dequeued by worker threads."""
    lock = threading.Lock()
    seen = []

    def show(c: fastiocp.Completion) -> None:
        if c.error is not None:
            what = f"error={c.error!r}"
        elif c.op in ("read", "recv"):
            what = f"nbytes={c.nbytes} data={bytes(c.buffer[:c.nbytes])!r}"
        else:
            what = f"nbytes={c.nbytes}"
        with lock:
            seen.append(c)
            print(f"  [{threading.current_thread().name}] {c.op:<5} key={c.key!r:<8} "
                  f"context={c.context!r} {what}")

    with tempfile.TemporaryDirectory() as tmp, fastiocp.CompletionPort() as port:
        print(f"port backend: {port.backend}")
        path = os.path.join(tmp, "hello.txt")
        with open(path, "wb") as f:
            f.write(b"Hello from a file, read asynchronously.\n")
        left, right = socket.socketpair()
        with fastiocp.open(path, "rb") as file, left, right:
            port.register(file, key="file")
            port.register(left, key="sock")
            port.register(right, key="peer")
            with fastiocp.WorkerPool(port, show, threads=2) as pool:
                print(f"{pool.nthreads} worker threads waiting; submitting:")
                port.read(file, bytearray(64), offset=0, context={"isread": True})
                port.send(left, b"ping over a socket", context={"isread": False})
                port.recv(right, 64, context={"isread": True})
                port.post(key="own", context="a packet of my own", nbytes=42)
                # Wait until all four completions were handled, then stop the
                # pool: one EXIT packet per worker thread.
                while True:
                    with lock:
                        if len(seen) >= 4:
                            break
                    threading.Event().wait(0.01)
            print(f"posted {pool.nthreads} EXIT packets; workers joined")
    print(f"dequeued {len(seen)} completions")
    return 0 if len(seen) == 4 and all(c.error is None for c in seen) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fastiocp``."""
    parser = argparse.ArgumentParser(prog="python -m fastiocp",
                                     description="fastiocp: I/O completion ports for Python")
    parser.add_argument("--version", action="version", version=f"fastiocp {fastiocp.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backend chosen, and why others were not")
    sub.add_parser("demo", help="run the completion-port walkthrough")
    from .bench import runner as bench

    bench.add_arguments(sub.add_parser(
        "bench", help="fastiocp beside asyncio, uvloop, threads, os.pread, queue (this machine)",
        description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo, "bench": bench.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
