"""Alternating A/B rounds of echo servers under the bench's C load
generator: the comparison this project's noisy 2-CPU machines allow
(contenders alternate round by round, server pinned to the last CPU, load
generator to CPU 0; medians, and every contender taken pair by pair
against the first).

    python tools/ab_echo.py echo-fastiocp-loop echo-uvloop
    python tools/ab_echo.py --rounds 10 --conns 50 --size 64 \\
        /tmp/old:echo-fastiocp-loop echo-fastiocp-loop echo-uvloop
    python tools/ab_echo.py "FASTIOCP_LOOP_POOL=0|echo-fastiocp-loop" echo-fastiocp-loop

A contender is [ENV=VALUE,...|][TREE:]SERVER: SERVER a name of
fastiocp.bench.servers, run from TREE's src/ (default: this tree) with the
environment variables given. Per round it prints msg/s, the server's CPU
time per message (user + system, all its threads) and the load
generator's CPU use; at the end the medians, and for each contender the
median of its per-round ratios to the first (CPU per message and msg/s)
with the number of rounds in which it was cheaper.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from fastiocp.bench import runner

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_round(spec: str, loadgen: str, conns: int, size: int, seconds: float) -> tuple[float, float, float]:
    """One round of one contender: (msg/s, server µs per message, load
    generator's share of a CPU)."""
    env = dict(os.environ)
    body = spec
    if "|" in spec:
        assigns, body = spec.split("|", 1)
        for kv in assigns.split(","):
            name, value = kv.split("=", 1)
            env[name] = value
    tree = HERE
    if ":" in body:
        tree, body = body.split(":", 1)
    env["PYTHONPATH"] = os.path.join(tree, "src")
    last = str(os.cpu_count() - 1)
    server = subprocess.Popen(["taskset", "-c", last, sys.executable, "-m", "fastiocp.bench.servers", body, "0"],
                              stdout=subprocess.PIPE, env=env)
    try:
        line = server.stdout.readline().decode()
        port = int(line.rsplit(":", 1)[1].split()[0])
        out = subprocess.run(["taskset", "-c", "0", loadgen, "echo", "127.0.0.1", str(port), str(conns), str(size),
                              "1", str(seconds), str(server.pid)], capture_output=True, check=True)
    finally:
        server.kill()
        server.wait()
    r = json.loads(out.stdout)
    return (r["msgs_per_s"], r["server_cpu_s"] * 1e6 / max(r["messages"], 1),
            r["loadgen_cpu_s"] / r["seconds"])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("contenders", nargs="+")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    loadgen, _note = runner.build_c("loadgen")
    results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in args.contenders}
    for k in range(args.rounds):
        for c in args.contenders:
            r = run_round(c, loadgen, args.conns, args.size, args.seconds)
            results[c].append(r)
            print(f"round {k} {c}: {r[0]:.0f} msg/s {r[1]:.2f} us/msg, load generator {100 * r[2]:.0f}%", flush=True)
    print("--- medians")
    first = args.contenders[0]
    for c in args.contenders:
        rs = results[c]
        line = (f"{c:55s} {statistics.median(x[0] for x in rs):9.0f} msg/s "
                f"{statistics.median(x[1] for x in rs):6.2f} us/msg")
        if c != first:
            cpu = [x[1] / y[1] for x, y in zip(rs, results[first])]
            rate = [x[0] / y[0] for x, y in zip(rs, results[first])]
            line += (f"   pair by pair vs the first: CPU {statistics.median(cpu):.3f}x, "
                     f"msg/s {statistics.median(rate):.3f}x, cheaper in {sum(x < 1 for x in cpu)}/{len(cpu)}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
