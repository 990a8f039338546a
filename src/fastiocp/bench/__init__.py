"""``python -m fastiocp bench``: fastiocp beside asyncio, uvloop, threads,
``os.pread``, fio and ``queue``, measured on this machine in one run.

Not part of the library's API: nothing in ``fastiocp`` imports this package
except the command line (``fastiocp.__main__``), and its optional
dependencies (uvloop, matplotlib: ``pip install 'fastiocp[bench]'``) are
imported only here, when a run needs them, through optional_import(): by
name, so that type-checking fastiocp (mypy, stubtest) needs none of them.

    runner.py        the command: plan, child processes, table, --json, --plot
    servers.py       the server contenders (``python -m fastiocp.bench.servers``)
    tasks.py         file-read and hand-off contenders (``python -m fastiocp.bench.tasks``)
    tls_client.py    the TLS echo client of the loop section (the C load generator's
                     protocol over TLS, on the standard library's loop)
    http_example.py  the HTTP/1.1 example server (examples/http_server.py runs it)
    csrc/            C programs compiled on the spot: the echo load generator
                     (loadgen.c) and the C io_uring echo server (echo_uring.c)
"""
from __future__ import annotations

import importlib
from typing import Any


def optional_import(name: str) -> Any:
    """The module of an optional dependency of the bench (uvloop, matplotlib);
    ImportError if it is not installed."""
    return importlib.import_module(name)
