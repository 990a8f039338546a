"""Alternating A/B rounds of echo servers under the bench's C load
generator: the comparison this project's noisy 2-CPU machines allow
(contenders alternate round by round; medians, and every contender taken
pair by pair against the first). Each round is the bench runner's echo
measurement (`python -m fastiocp bench --pin`): the server on the last
CPU, the load generator on the others, its warm-up, wrong echoes an
error.

    python tools/ab_echo.py echo-fastiocp-loop echo-uvloop
    python tools/ab_echo.py --rounds 10 --conns 50 --size 64 \\
        /tmp/old:echo-fastiocp-loop echo-fastiocp-loop echo-uvloop
    python tools/ab_echo.py "FASTIOCP_LOOP_POOL=0|echo-fastiocp-loop" echo-fastiocp-loop
    python tools/ab_echo.py c:echo_uring echo-uvloop

A contender is [ENV=VALUE,...|][TREE:]SERVER: SERVER a name of
fastiocp.bench.servers, run from TREE's src/ (default: this tree) with the
environment variables given; or c:NAME, the bench's C server
fastiocp/bench/csrc/NAME.c (echo_uring: the same echo in C on io_uring).
Per round it prints msg/s, the server's CPU time per message (user +
system, all its threads) and the load generator's CPU use; at the end the
medians, and for each contender the median of its per-round ratios to the
first (CPU per message and msg/s) with the number of rounds in which it
was cheaper.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Any

from fastiocp.bench import runner

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_command(spec: str) -> list[str]:
    """The command of contender spec ([ENV=V,...|][TREE:]SERVER, or c:NAME
    for a C server the runner builds): env sets the variables and execs
    Python, so the pid measured stays the server's."""
    if spec.startswith("c:"):
        exe, note = runner.build_c(spec[2:])
        if exe is None:
            raise SystemExit(note)
        return [exe, "0"]
    assigns, body = spec.split("|", 1) if "|" in spec else ("", spec)
    tree, name = body.split(":", 1) if ":" in body else (HERE, body)
    env = [kv for kv in assigns.split(",") if kv] + [f"PYTHONPATH={os.path.join(tree, 'src')}"]
    return ["env", *env, sys.executable, "-m", "fastiocp.bench.servers", name, "0"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("contenders", nargs="+")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    cfg = runner.Config(quick=False, rounds=args.rounds, echo_seconds=args.seconds, echo_warmup=1.0,
                        connections=args.conns, http_seconds=0, file_seconds=0.0, file_mib=0, handoff_items=0,
                        directory=tempfile.gettempdir(), pin=True)
    bench = runner.Runner(cfg)
    bench.loadgen, note = runner.build_c("loadgen")
    if bench.loadgen is None:
        print(note, file=sys.stderr)
        return 2
    bench.progress = runner.Progress(args.rounds * len(args.contenders))
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in args.contenders}
    try:
        for k in range(args.rounds):
            for c in args.contenders:
                r = bench.echo(server_command(c), args.conns, args.size)
                results[c].append(r)
                print(f"round {k} {c}: {r['msgs_per_s']:.0f} msg/s {r['server_us_per_msg']:.2f} us/msg, "
                      f"load generator {r['loadgen_cpu_pct']:.0f}%", flush=True)
    finally:
        bench.cleanup()
    print("--- medians")
    first = args.contenders[0]
    for c in args.contenders:
        rs = results[c]
        line = (f"{c:55s} {statistics.median(x['msgs_per_s'] for x in rs):9.0f} msg/s "
                f"{statistics.median(x['server_us_per_msg'] for x in rs):6.2f} us/msg")
        if c != first:
            cpu = [x["server_us_per_msg"] / y["server_us_per_msg"] for x, y in zip(rs, results[first])]
            rate = [x["msgs_per_s"] / y["msgs_per_s"] for x, y in zip(rs, results[first])]
            line += (f"   pair by pair vs the first: CPU {statistics.median(cpu):.3f}x, "
                     f"msg/s {statistics.median(rate):.3f}x, cheaper in {sum(x < 1 for x in cpu)}/{len(cpu)}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
