"""User-space instructions per message of an echo server, counted by
valgrind's callgrind: repeatable where CPU time is not (this project's
machines vary by 10-20% between rounds, and their VMs give perf no
hardware counters). The kernel's share is not counted.

    python tools/instructions_per_message.py echo-fastiocp-loop
    python tools/instructions_per_message.py echo-uvloop --conns 50 --size 64
    python tools/instructions_per_message.py echo-streams-fastiocp-loop --size 102400

The server (a name of fastiocp.bench.servers) runs under callgrind with
instrumentation off, pinned to the last CPU; the bench's C load generator
drives it from another CPU. After a warm-up, instrumentation is switched
on for the measured seconds, then the counts are dumped. The figure is
the instructions counted over the calls of a function the server calls
once per message: the transport's write() (fastiocp's SocketWrite_call,
uvloop's UVStream.write; --marker names another).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from fastiocp.bench import runner

MARKERS = {"uvloop": "__pyx_pw_6uvloop_4loop_8UVStream_5write", "fastiocp": "SocketWrite_call"}


def calls_of(profile: str, marker: str) -> int:
    """How many calls of functions whose name contains marker the
    callgrind profile records (names are compressed: "(id) name" once,
    "(id)" after)."""
    names: dict[str, str] = {}
    total, target = 0, None
    with open(profile) as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                m = re.match(r"\((\d+)\)(?: (.*))?", line.split("=", 1)[1].strip())
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
                if line.startswith("cfn="):
                    target = names.get(m.group(1), "") if m else ""
            elif line.startswith("calls=") and target is not None:
                if marker in target:
                    total += int(line.split("=", 1)[1].split()[0])
                target = None
    return total


def total_of(profile: str) -> int:
    """The instructions the profile counted (its "totals:" line)."""
    with open(profile) as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"{profile}: no totals")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("server", help="a server of fastiocp.bench.servers, e.g. echo-fastiocp-loop")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--marker", help="a function called once per message (default: the write)")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is needed (apt-get install valgrind)", file=sys.stderr)
        return 2
    marker = args.marker or MARKERS["uvloop" if "uvloop" in args.server else "fastiocp"]
    loadgen, note = runner.build_c("loadgen")
    if loadgen is None:
        print(note, file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = cpus[-1], cpus[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        server = subprocess.Popen(
            ["taskset", "-c", str(server_cpu), "valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", sys.executable, "-m", "fastiocp.bench.servers", args.server, "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            port = re.search(r"127\.0\.0\.1:(\d+)", line)
            if port is None:
                print(f"the server said {line!r}", file=sys.stderr)
                return 1
            total_s = args.warmup + args.seconds + 4
            client = subprocess.Popen(
                ["taskset", "-c", str(client_cpu), loadgen, "echo", "127.0.0.1", port.group(1),
                 str(args.conns), str(args.size), "1", str(total_s), str(server.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(args.warmup)
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(args.seconds)
            subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client.kill()
            client.wait()
        finally:
            server.kill()
            server.wait()
        dumps = sorted(p for p in glob.glob(out + ".*") if os.path.getsize(p) > 0)
        if not dumps:
            print("callgrind wrote no dump", file=sys.stderr)
            return 1
        total, calls = total_of(dumps[-1]), calls_of(dumps[-1], marker)
    if calls == 0:
        print(f"no call of {marker} was counted", file=sys.stderr)
        return 1
    print(f"{args.server} {args.conns} x {args.size} B: {total / calls:,.0f} instructions per message "
          f"in user space ({total:,} over {calls:,} calls of {marker})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
