"""Helpers of the loop's tests: the `loop` fixture (a fastiocp EventLoop on
each backend of tests/conftest.py's `backend` fixture, shut down and closed
after the test) and run(). A module, not a conftest.py: a second conftest
module would shadow tests/conftest.py for the modules that import from it."""
from __future__ import annotations

import asyncio
import sys

import pytest

from fastiocp.loop import EventLoop

ON_LINUX = sys.platform.startswith("linux")
linux_only = pytest.mark.skipif(not ON_LINUX, reason="POSIX-only loop feature, tested on Linux")


@pytest.fixture
def loop(backend):
    lp = EventLoop(backend)
    assert lp.backend == backend
    yield lp
    if not lp.is_closed():
        lp.run_until_complete(lp.shutdown_asyncgens())
        lp.run_until_complete(lp.shutdown_default_executor())
        lp.close()


def run(loop, coro, timeout: float = 15.0):
    """Runs coro on loop, failing after timeout seconds."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))
