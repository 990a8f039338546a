"""The asyncio loop's scheduling, beside the stdlib loop and uvloop (issue 16:
each >= 0.9x uvloop): the same coroutine on each loop, a fresh loop per
benchmark.

    python -m pytest benchmarks/bench_loop.py --benchmark-group-by=group
    python benchmarks/bench_loop.py [--rounds 7]      # a table of medians and ratios

- call_soon chain: a callback that schedules the next one with call_soon, N
  times (the loop's ready queue and one iteration per callback).
- sleep(0): a task awaiting asyncio.sleep(0) N times (a task step per
  iteration).
- create_task + gather(100): 100 trivial tasks gathered, N/100 times.
- call_later: N timers with spread delays of up to 1 ms, all run (the
  timer heap and the port's wait with a timeout).

FASTIOCP_BENCH_N sets N (default 20,000); uvloop rows are skipped when
uvloop is not installed.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

N = int(os.environ.get("FASTIOCP_BENCH_N", "20000"))


def _fastiocp_loop() -> asyncio.AbstractEventLoop:
    import fastiocp

    return fastiocp.new_event_loop()


def _uvloop_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop()


LOOPS: Dict[str, Callable[[], Optional[asyncio.AbstractEventLoop]]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": _uvloop_loop,
    "fastiocp": _fastiocp_loop,
}


async def call_soon_chain(n: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [n]

    def step() -> None:
        left[0] -= 1
        if left[0]:
            loop.call_soon(step)
        else:
            done.set_result(None)

    loop.call_soon(step)
    await done


async def sleep0(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _nothing() -> None:
    pass


async def gather100(n: int) -> None:
    for _ in range(max(1, n // 100)):
        await asyncio.gather(*[asyncio.ensure_future(_nothing()) for _ in range(100)])


async def call_later(n: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [n]

    def fire() -> None:
        left[0] -= 1
        if not left[0]:
            done.set_result(None)

    for i in range(n):
        loop.call_later((i % 1000) / 1e6, fire)
    await done


CASES: Dict[str, Callable[[int], Any]] = {
    "call_soon chain": call_soon_chain,
    "sleep(0)": sleep0,
    "create_task + gather(100)": gather100,
    "call_later": call_later,
}


def run_case(loop_name: str, case: str, n: int = N) -> Optional[float]:
    """Seconds the case took on a fresh loop (None: the loop is not installed)."""
    loop = LOOPS[loop_name]()
    if loop is None:
        return None
    try:
        t0 = time.perf_counter()
        loop.run_until_complete(CASES[case](n))
        return time.perf_counter() - t0
    finally:
        loop.close()


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("-n", type=int, default=N)
    args = p.parse_args(argv)
    print(f"{sys.version.split()[0]}, n = {args.n:,}, {args.rounds} rounds, loops alternating")
    print(f"{'case':28} {'loop':9} {'ns/op':>8} {'vs uvloop':>10} {'vs asyncio':>11}")
    for case in CASES:
        samples: Dict[str, List[float]] = {name: [] for name in LOOPS}
        for r in range(args.rounds):
            names = list(LOOPS) if r % 2 == 0 else list(reversed(LOOPS))
            for name in names:
                t = run_case(name, case, args.n)
                if t is not None:
                    samples[name].append(t)
        med = {name: statistics.median(v) for name, v in samples.items() if v}
        for name, t in med.items():
            vs_uv = f"{med['uvloop'] / t:.2f}x" if "uvloop" in med else "-"
            vs_as = f"{med['asyncio'] / t:.2f}x"
            print(f"{case:28} {name:9} {t * 1e9 / args.n:8.0f} {vs_uv:>10} {vs_as:>11}")
    print("(ratios: speed, higher is faster; ns/op: median time / n)")
    return 0


try:
    import pytest
except ImportError:  # the table runner needs no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.mark.parametrize("loop_name", list(LOOPS))
    @pytest.mark.parametrize("case", list(CASES))
    def test_loop_scheduling(benchmark: Any, case: str, loop_name: str) -> None:
        if loop_name == "uvloop" and importlib.util.find_spec("uvloop") is None:
            pytest.skip("uvloop not installed")
        benchmark.group = f"loop: {case}"
        benchmark.extra_info["n"] = N
        result = benchmark.pedantic(lambda: run_case(loop_name, case), rounds=3, iterations=1)
        assert result is not None and result > 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
