"""``python -m fastiocp bench``: fastiocp beside what you would use instead,
measured on this machine in one run.

Every contender runs in a process of its own, one after another: servers
listen on 127.0.0.1 and are driven by the same load generator (a small C
program built here with the system compiler, or wrk for HTTP); file reads
and hand-offs run in a fresh interpreter each. The table gives absolute
figures and, for each, the ratio to the best baseline of the same run; with
several rounds (the default outside --quick) the contenders take turns and
the medians are reported. Servers are always killed at the end.

Sections (--only takes their ids):
  echo      TCP echo, 64-byte messages, 50 connections with one message each
  pingpong  the same on 1 connection (latency)
  http      HTTP/1.1 keep-alive, fixed body, wrk -t2 -c64 (wrk installed)
  file      4 KiB random reads of a 256 MiB file: page cache, and O_DIRECT
  handoff   items from one thread to another
  loop      asyncio event loops (not run by default: --only loop): the same
            servers on asyncio's loop, uvloop and the fastiocp loop; uvloop's
            echo benchmark shapes (Protocol, streams, sock_* at 1, 10 and
            100 KiB, 4 connections), BufferedProtocol beside Protocol at
            64 bytes (50 connections), and a TLS echo at 1 KiB driven by a
            Python client
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import platform
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

import fastiocp

from . import optional_import

HERE = os.path.dirname(os.path.abspath(__file__))
# The C sources of the load generator and the reference server.
CSRC = os.path.join(HERE, "csrc")
HOST = "127.0.0.1"
SECTION_IDS = ("echo", "pingpong", "http", "file", "handoff", "loop", "accept", "frameworks")
# What a plain `python -m fastiocp bench` runs; "loop" (36 measurements a
# round) only when asked for with --only.
DEFAULT_SECTIONS = ("echo", "pingpong", "http", "file", "handoff")
# The loop section: uvloop's echo benchmark (its examples/bench) uses 4
# connections and these message sizes.
LOOP_CONNECTIONS = 4
LOOP_SIZES = (1024, 10 * 1024, 100 * 1024)
# The accept section: connects the C client keeps in flight.
ACCEPT_INFLIGHT = 64


class Skip(Exception):
    """This contender cannot run here (the reason is shown in the table)."""


# ---- configuration ----------------------------------------------------------

@dataclass
class Config:
    quick: bool
    rounds: int
    echo_seconds: float
    echo_warmup: float
    connections: int
    http_seconds: int
    file_seconds: float
    file_mib: int
    handoff_items: int
    directory: str
    pin: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        quick = bool(args.quick)
        scale = args.duration
        cfg = cls(
            quick=quick,
            rounds=args.rounds if args.rounds else (1 if quick else 3),
            echo_seconds=1.0 if quick else 5.0,
            echo_warmup=0.3 if quick else 1.0,
            connections=args.connections,
            http_seconds=1 if quick else 5,
            file_seconds=1.0 if quick else 3.0,
            file_mib=args.file_mib,
            handoff_items=args.items or (200_000 if quick else 1_000_000),
            directory=args.dir or tempfile.gettempdir(),
            pin=bool(args.pin),
        )
        if scale:
            cfg.echo_seconds = scale
            cfg.echo_warmup = min(cfg.echo_warmup, max(0.1, scale / 3))
            cfg.http_seconds = max(1, int(round(scale)))
            cfg.file_seconds = scale
        return cfg


# ---- child processes ----------------------------------------------------------

_children: Dict[int, subprocess.Popen[Any]] = {}


def _child_setup() -> None:  # runs in the child before exec (the runner has no threads)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def child_env() -> Dict[str, str]:
    """The environment of every child: this very fastiocp importable."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastiocp.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn(cmd: List[str], cpus: Optional[List[int]] = None, **kw: Any) -> subprocess.Popen[Any]:
    """Starts a child in a session of its own (Ctrl-C reaches the runner
    only, which then kills it), killed by the kernel if the runner dies;
    cpus pins it (--pin)."""
    def setup() -> None:
        _child_setup()
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(cmd, env=child_env(), start_new_session=True,
                            preexec_fn=setup if os.name == "posix" else None, **kw)
    _children[proc.pid] = proc
    return proc


def kill(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 2 s; reaps the process."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        except OSError:
            pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    _children.pop(proc.pid, None)


def kill_all() -> None:
    for proc in list(_children.values()):
        kill(proc)


atexit.register(kill_all)


def pipe(stream: Optional[IO[bytes]]) -> IO[bytes]:
    """A child's stdout or stderr, which spawn() was asked to open."""
    assert stream is not None
    return stream


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """The first line the child prints on stdout, within timeout seconds."""
    sel = selectors.DefaultSelector()
    sel.register(pipe(proc.stdout), selectors.EVENT_READ)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"no answer within {timeout:.0f} s")
            chunk = os.read(pipe(proc.stdout).fileno(), 4096)
            if not chunk:
                raise RuntimeError("exited before it was ready")
            data += chunk
    finally:
        sel.close()
    return data.split(b"\n", 1)[0].decode(errors="replace")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (every thread), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_clock() -> Tuple[float, float, float, float]:
    """(machine busy CPU-s, machine steal CPU-s, CPU-s of this process and
    its reaped children, monotonic time): the deltas between two readings
    tell how much CPU other processes took meanwhile."""
    import resource

    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
    steal = v[7] / hz if len(v) > 7 else 0.0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    return busy, steal, ours, time.monotonic()


def other_load(before: Tuple[float, float, float, float]) -> Tuple[float, float]:
    """CPUs used by other processes, and stolen by the hypervisor, on
    average since before."""
    after = cpu_clock()
    dt = max(after[3] - before[3], 1e-6)
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(others, 0.0) / dt, max(after[1] - before[1], 0.0) / dt


def stderr_tail(proc: subprocess.Popen[Any], path: Optional[str]) -> str:
    if path and os.path.exists(path):
        with open(path, errors="replace") as f:
            lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
    return ""


# ---- progress ----------------------------------------------------------------

class Progress:
    """One line per finished job; on a terminal, a live line while it runs."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.label = ""
        self.t0 = 0.0
        self.started = time.monotonic()
        self.last_draw = 0.0

    def start(self, label: str) -> None:
        self.label = label
        self.t0 = time.monotonic()
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        line = f"[{self.done + 1:>2}/{self.total}] {self.label} ... {now - self.t0:4.1f} s"
        sys.stderr.write("\r\x1b[2K" + line[:shutil.get_terminal_size().columns - 1])
        sys.stderr.flush()

    def finish(self, outcome: str) -> None:
        self.done += 1
        line = (f"[{self.done:>2}/{self.total}] {self.label}: {outcome} "
                f"({time.monotonic() - self.t0:.1f} s)")
        sys.stderr.write(("\r\x1b[2K" if self.tty else "") + line + "\n")
        sys.stderr.flush()

    def wait(self, proc: subprocess.Popen[Any], timeout: float) -> None:
        """Waits for proc, redrawing the live line; kills it after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                proc.wait(0.1)
                return
            except subprocess.TimeoutExpired:
                self.tick()
                if time.monotonic() > deadline:
                    kill(proc)
                    raise RuntimeError(f"took longer than {timeout:.0f} s: killed")


# ---- C helpers -----------------------------------------------------------------

def cache_dir() -> str:
    base = os.environ.get("FASTIOCP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fastiocp")
    return base


def find_cc() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def build_c(name: str) -> Tuple[Optional[str], str]:
    """Compiles fastiocp/bench/csrc/<name>.c into the cache directory once;
    returns (path of the program or None, a note for the report)."""
    src = os.path.join(CSRC, f"{name}.c")
    if not os.path.exists(src):
        return None, f"{name}: source {src} missing from this install"
    cc = find_cc()
    if cc is None:
        return None, f"{name}: no C compiler (cc, gcc, clang or $CC) found: install one (e.g. apt-get install gcc)"
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read() + cc.encode() + platform.machine().encode()).hexdigest()[:16]
    out_dir = cache_dir()
    exe = os.path.join(out_dir, f"{name}-{digest}")
    if os.path.exists(exe):
        return exe, f"{name}: {exe} (cached)"
    try:
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{exe}.{os.getpid()}.tmp"
        r = subprocess.run(cc.split() + ["-O2", "-o", tmp, src], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{name}: could not build with {cc}: {exc}"
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["?"])[0][:160]
        return None, f"{name}: {cc} failed: {first}"
    os.replace(tmp, exe)
    return exe, f"{name}: built {exe} with {cc}"


# ---- the contenders ------------------------------------------------------------

@dataclass
class Contender:
    name: str
    role: str                    # "fastiocp", "baseline" or "reference"
    run: Callable[["Runner"], Dict[str, Any]]
    samples: List[Dict[str, Any]] = field(default_factory=list)
    skipped: Optional[str] = None
    failed: Optional[str] = None


@dataclass
class Column:
    title: str
    key: str
    fmt: str                     # format spec for the median of key
    scale: float = 1.0


@dataclass
class Section:
    id: str
    title: str
    unit: str                    # of the main figure, e.g. "msg/s"
    metric: str                  # key of the main figure in each sample
    contenders: List[Contender]
    columns: List[Column]
    notes: List[str] = field(default_factory=list)
    setup: Optional[Callable[["Runner"], None]] = None
    teardown: Optional[Callable[["Runner"], None]] = None

    def __post_init__(self) -> None:
        # Other processes' CPU use during each measurement: the noise gauge.
        self.columns = list(self.columns) + [Column("others", "other_cpus", "{:.1f} CPU")]

    def median(self, c: Contender, key: str) -> Optional[float]:
        vals = [s[key] for s in c.samples if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    def best_baseline(self) -> Optional[Contender]:
        base = [c for c in self.contenders if c.role == "baseline" and c.samples]
        return max(base, key=lambda c: self.median(c, self.metric) or 0.0) if base else None

    def by_name(self, prefix: str) -> Optional[Contender]:
        for c in self.contenders:
            if c.name.startswith(prefix):
                return c
        return None


class Runner:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.notes: List[str] = []
        self.loadgen: Optional[str] = None
        self.echo_c: Optional[str] = None
        self.wrk = shutil.which("wrk")
        self.fio = shutil.which("fio")
        self.progress: Optional[Progress] = None
        # --pin: servers on the last CPU, load generators on the others.
        self.server_cpus: Optional[List[int]] = None
        self.client_cpus: Optional[List[int]] = None
        if cfg.pin:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) >= 2:
                self.server_cpus, self.client_cpus = cpus[-1:], cpus[:-1]
                self.notes.append(f"--pin: servers on CPU {cpus[-1]}, load generators on CPU "
                                  f"{','.join(map(str, cpus[:-1]))}")
            else:
                self.notes.append("--pin ignored: fewer than 2 CPUs")
        self.tmp = tempfile.mkdtemp(prefix="fastiocp-bench-")
        self.file_path: Optional[str] = None
        self.direct_ok: Optional[str] = None   # None: works; else why not
        try:
            optional_import("uvloop")
            self.uvloop: Optional[str] = None
        except ImportError:
            self.uvloop = "uvloop not installed (pip install uvloop, or fastiocp[bench])"
        # The TLS echo's certificate (made on first use): (certfile, keyfile),
        # or why there is none.
        self.tls_cert: Optional[Tuple[str, str]] = None
        self.tls_skip: Optional[str] = None

    # -- servers and load -------------------------------------------------------

    def start_server(self, cmd: List[str]) -> Tuple[subprocess.Popen[Any], int, str]:
        errpath = os.path.join(self.tmp, f"server-{len(os.listdir(self.tmp))}.err")
        with open(errpath, "wb") as err:
            proc = spawn(cmd, self.server_cpus, stdout=subprocess.PIPE, stderr=err,
                         stdin=subprocess.DEVNULL)
        try:
            line = read_line(proc, 20)
        except RuntimeError as exc:
            kill(proc)
            raise RuntimeError(f"server {exc}: {stderr_tail(proc, errpath)}") from None
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not m:
            kill(proc)
            raise RuntimeError(f"server said {line!r}, not its address")
        return proc, int(m.group(1)), errpath

    def echo(self, cmd: List[str], connections: int, size: int = 64, tls: bool = False) -> Dict[str, Any]:
        """One echo measurement: the server cmd driven by the C load
        generator (size-byte messages, one in flight per connection), or
        with tls by the Python TLS client (fastiocp/bench/tls_client.py),
        which prints the same figures. The server's CPU is its process's
        only: never the client's."""
        if tls:
            cert = self.tls_certificate()
            client = [sys.executable, "-m", "fastiocp.bench.tls_client"]
            cmd = cmd + list(cert)
        elif self.loadgen is None:
            raise Skip("no load generator (see notes)")
        else:
            client = [self.loadgen, "echo"]
        what = "TLS client" if tls else "load generator"
        r = self.drive(cmd, lambda port, pid: client + [HOST, str(port), str(connections), str(size),
                                                        str(self.cfg.echo_warmup), str(self.cfg.echo_seconds),
                                                        str(pid)], what, (0, 3))
        if r["bad_echoes"]:
            raise RuntimeError(f"{r['bad_echoes']} wrong echoes")
        msgs = max(r["messages"], 1)
        r["server_us_per_msg"] = r["server_cpu_s"] * 1e6 / msgs if r["server_cpu_s"] >= 0 else None
        return r

    def drive(self, cmd: List[str], client: Callable[[int, int], List[str]], what: str,
              ok: Tuple[int, ...] = (0,)) -> Dict[str, Any]:
        """Starts the server cmd, runs client(port, server pid) (the C load
        generator or the TLS client, on the client CPUs) for the warm-up and
        the measurement, and returns the JSON it printed, with its CPU and
        the server's as percentages. The server is killed after."""
        server, port, errpath = self.start_server(cmd)
        try:
            cfg = self.cfg
            lg = spawn(client(port, server.pid), self.client_cpus,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert self.progress is not None
            self.progress.wait(lg, cfg.echo_warmup + cfg.echo_seconds + 40)
            out, err = pipe(lg.stdout).read(), pipe(lg.stderr).read()
            rc = lg.returncode
            kill(lg)
            if server.poll() is not None:
                raise RuntimeError(f"server died: {stderr_tail(server, errpath)}")
            if rc not in ok or not out.strip():
                raise RuntimeError(f"{what} failed ({rc}): {err.decode(errors='replace').strip()[:200]}")
            r: Dict[str, Any] = json.loads(out)
            r["loadgen_cpu_pct"] = 100.0 * r["loadgen_cpu_s"] / r["seconds"]
            r["server_cpu_pct"] = 100.0 * r["server_cpu_s"] / r["seconds"]
            return r
        finally:
            kill(server)

    def accept(self, cmd: List[str]) -> Dict[str, Any]:
        """One accept measurement: the server cmd (it accepts and closes
        every connection) driven by the C load generator's connect mode."""
        if self.loadgen is None:
            raise Skip("no load generator (see notes)")
        loadgen = self.loadgen
        r = self.drive(cmd, lambda port, pid: [loadgen, "connect", HOST, str(port), str(ACCEPT_INFLIGHT),
                                               str(self.cfg.echo_warmup), str(self.cfg.echo_seconds), str(pid)],
                       "load generator")
        conns = max(r["connections"], 1)
        r["server_us_per_conn"] = r["server_cpu_s"] * 1e6 / conns if r["server_cpu_s"] >= 0 else None
        return r

    def tls_certificate(self) -> Tuple[str, str]:
        """A throw-away self-signed certificate and key for the TLS echo,
        made with the openssl command in the run's temporary directory."""
        if self.tls_cert is None and self.tls_skip is None:
            openssl = shutil.which("openssl")
            cert, key = os.path.join(self.tmp, "tls-cert.pem"), os.path.join(self.tmp, "tls-key.pem")
            if openssl is None:
                self.tls_skip = "no openssl command to make a certificate (apt-get install openssl)"
            else:
                try:
                    r = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                                        "-subj", f"/CN={HOST}", "-keyout", key, "-out", cert],
                                       capture_output=True, text=True, timeout=60)
                    if r.returncode == 0:
                        self.tls_cert = (cert, key)
                    else:
                        self.tls_skip = f"openssl could not make a certificate: {r.stderr.strip()[-160:]}"
                except (OSError, subprocess.SubprocessError) as exc:
                    self.tls_skip = f"openssl could not make a certificate: {exc}"
        if self.tls_cert is None:
            raise Skip(self.tls_skip or "no certificate")
        return self.tls_cert

    def http(self, cmd: List[str]) -> Dict[str, Any]:
        if self.wrk is None:
            raise Skip("wrk not installed (apt-get install wrk)")
        server, port, _errpath = self.start_server(cmd)
        try:
            url = f"http://{HOST}:{port}/"
            secs = self.cfg.http_seconds
            if not self.cfg.quick:  # a warm-up run, not measured
                self._wrk(url, 1, server.pid)
            return self._wrk(url, secs, server.pid)
        finally:
            kill(server)

    def _wrk(self, url: str, secs: int, server_pid: int) -> Dict[str, Any]:
        assert self.wrk is not None
        cpu0 = cpu_seconds(server_pid)
        t0 = time.monotonic()
        proc = spawn([self.wrk, "-t2", "-c64", f"-d{secs}s", "--latency", url], self.client_cpus,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert self.progress is not None
        deadline = time.monotonic() + secs + 30
        usage = None
        while usage is None:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                usage = ru
                break
            self.progress.tick()
            if time.monotonic() > deadline:
                kill(proc)
                raise RuntimeError("wrk did not finish: killed")
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        cpu1 = cpu_seconds(server_pid)
        out = pipe(proc.stdout).read().decode(errors="replace")
        kill(proc)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        if proc.returncode != 0 or not m or not total:
            raise RuntimeError(f"wrk failed: {out.strip()[-200:]}")
        r: Dict[str, Any] = {"requests": int(total.group(1)), "req_per_s": float(m.group(1))}
        for pct in ("50", "75", "90", "99"):
            pm = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if pm:
                mult = {"us": 1e-3, "ms": 1.0, "s": 1e3}[pm.group(2)]
                r[f"lat_p{pct}_ms"] = float(pm.group(1)) * mult
        errors = re.search(r"Socket errors: (.*)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise RuntimeError(f"{non2xx.group(1)} non-2xx answers")
        if errors:
            r["socket_errors"] = errors.group(1).strip()
        r["server_cpu_s"] = cpu1 - cpu0
        r["server_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(r["requests"], 1)
        r["wrk_cpu_pct"] = 100.0 * (usage.ru_utime + usage.ru_stime) / elapsed
        return r

    def task(self, args: List[str], timeout: float) -> Dict[str, Any]:
        proc = spawn([sys.executable, "-m", "fastiocp.bench.tasks", *args],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.progress is not None
        self.progress.wait(proc, timeout)
        out, err = pipe(proc.stdout).read(), pipe(proc.stderr).read()
        rc = proc.returncode
        kill(proc)
        if rc != 0 or not out.strip():
            raise RuntimeError(f"failed ({rc}): {err.decode(errors='replace').strip()[-200:]}")
        result: Dict[str, Any] = json.loads(out)
        return result

    # -- files ------------------------------------------------------------------

    def make_file(self) -> None:
        """A file (256 MiB by default) of non-zero data, synced to disk, then read once so
        that it sits in the page cache."""
        d = self.cfg.directory
        fd, path = tempfile.mkstemp(prefix="fastiocp-bench-", suffix=".dat", dir=d)
        self.file_path = path
        block = os.urandom(1 << 20)
        try:
            with os.fdopen(fd, "wb") as f:
                for _ in range(self.cfg.file_mib):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise Skip(f"cannot write a {self.cfg.file_mib} MiB file in {d}: {exc}") from None
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        try:
            import mmap

            dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                os.preadv(dfd, [mmap.mmap(-1, 4096)], 0)
            finally:
                os.close(dfd)
        except (OSError, AttributeError) as exc:
            self.direct_ok = (f"O_DIRECT does not work in {d} ({exc.__class__.__name__}: {exc}); "
                              f"tmpfs cannot bypass a cache: pass --dir on a disk file system")

    def file_task(self, kind: str, direct: bool) -> Dict[str, Any]:
        if self.file_path is None:
            raise Skip("no test file")
        if direct and self.direct_ok:
            raise Skip(self.direct_ok)
        r = self.task(["file", kind, self.file_path, "1" if direct else "0",
                       str(self.cfg.file_seconds), "32"], self.cfg.file_seconds * 3 + 60)
        if r.get("bad_reads"):
            raise RuntimeError(f"{r['bad_reads']} short or failed reads")
        return self._file_figures(r)

    @staticmethod
    def _file_figures(r: Dict[str, Any]) -> Dict[str, Any]:
        r["iops"] = r["ops_per_s"]
        r["mib_per_s"] = r["iops"] * 4096 / (1 << 20)
        r["cpu_us_per_read"] = r["cpu_s"] * 1e6 / max(r["ops"], 1)
        return r

    def fio_task(self, direct: bool) -> Dict[str, Any]:
        if self.fio is None:
            raise Skip("fio not installed (apt-get install fio)")
        if self.file_path is None:
            raise Skip("no test file")
        if direct and self.direct_ok:
            raise Skip(self.direct_ok)
        secs = max(1, int(round(self.cfg.file_seconds)))
        cmd: List[str] = [self.fio, "--output-format=json", "--name=randread", f"--filename={self.file_path}",
               "--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=32",
               f"--direct={int(direct)}", "--time_based=1", f"--runtime={secs}",
               f"--size={self.cfg.file_mib}M", "--invalidate=0", "--norandommap=1",
               "--randrepeat=0", "--ramp_time=0"]
        proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.progress is not None
        self.progress.wait(proc, secs + 60)
        out = pipe(proc.stdout).read().decode(errors="replace")
        err = pipe(proc.stderr).read().decode(errors="replace")
        rc = proc.returncode
        kill(proc)
        start = out.find("{")
        if rc != 0 or start < 0:
            raise RuntimeError(f"fio failed ({rc}): {(err or out).strip()[-200:]}")
        job = json.loads(out[start:])["jobs"][0]
        rd = job["read"]
        secs_run = rd["runtime"] / 1000.0 or secs
        ops = rd["total_ios"]
        cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * secs_run
        r = {"ops": ops, "seconds": secs_run, "ops_per_s": rd["iops"], "cpu_s": cpu_s}
        return self._file_figures(r)

    # -- the plan ---------------------------------------------------------------

    def sections(self, only: List[str]) -> List[Section]:
        py = [sys.executable, "-m", "fastiocp.bench.servers"]
        out: List[Section] = []
        echo_cols = [Column("p50 µs", "lat_p50_us", "{:,.0f}"), Column("p99 µs", "lat_p99_us", "{:,.0f}"),
                     Column("server CPU µs/msg", "server_us_per_msg", "{:.2f}"),
                     Column("server CPU", "server_cpu_pct", "{:.0f}%"),
                     Column("loadgen CPU", "loadgen_cpu_pct", "{:.0f}%")]

        def echo_contenders(conns: int) -> List[Contender]:
            def py_server(name: str) -> Callable[[Runner], Dict[str, Any]]:
                return lambda r: r.echo(py + [name, "0"], conns)

            def uvloop_server(r: Runner) -> Dict[str, Any]:
                if r.uvloop:
                    raise Skip(r.uvloop)
                return r.echo(py + ["echo-uvloop", "0"], conns)

            def c_server(r: Runner) -> Dict[str, Any]:
                if r.echo_c is None:
                    raise Skip("the C io_uring echo server could not be built (see notes)")
                return r.echo([r.echo_c, "0"], conns)

            def epoll_server(r: Runner) -> Dict[str, Any]:
                # The fallback backend beside the default, in the same run
                # (env execs python: the pid measured stays the server's).
                if "epoll" not in fastiocp.available_backends():
                    raise Skip("the epoll backend is not available here")
                return r.echo(["env", "FASTIOCP_BACKEND=epoll"] + py + ["echo-fastiocp", "0"], conns)

            return [
                Contender("fastiocp, 1 thread", "fastiocp", py_server("echo-fastiocp")),
                Contender("fastiocp, 1 thread, epoll", "fastiocp", epoll_server),
                Contender("fastiocp, WorkerPool(2)", "fastiocp", py_server("echo-fastiocp-pool")),
                Contender("fastiocp, pooled multishot", "fastiocp", py_server("echo-fastiocp-multishot")),
                Contender("fastiocp loop Protocol", "fastiocp", py_server("echo-fastiocp-loop")),
                Contender("asyncio Protocol", "baseline", py_server("echo-asyncio")),
                Contender("uvloop Protocol", "baseline", uvloop_server),
                Contender("thread per connection", "baseline", py_server("echo-threads")),
                Contender("C io_uring (reference)", "reference", c_server),
            ]

        if "echo" in only:
            out.append(Section("echo", f"TCP echo, 64-byte messages, {self.cfg.connections} "
                               "connections with one message in flight each",
                               "msg/s", "msgs_per_s", echo_contenders(self.cfg.connections), echo_cols))
        if "pingpong" in only:
            out.append(Section("pingpong", "TCP ping-pong, 64-byte messages, 1 connection",
                               "msg/s", "msgs_per_s", echo_contenders(1), echo_cols))
        if "http" in only:
            def http_server(args: List[str], needs_uvloop: bool = False) -> Callable[[Runner], Dict[str, Any]]:
                def run(r: Runner) -> Dict[str, Any]:
                    if needs_uvloop and r.uvloop:
                        raise Skip(r.uvloop)
                    return r.http(args)
                return run

            ex = [sys.executable, "-m", "fastiocp.bench.http_example", "--port", "0"]
            out.append(Section(
                "http", "HTTP/1.1 keep-alive, GET / (14-byte body), wrk -t2 -c64",
                "req/s", "req_per_s",
                [Contender("fastiocp example", "fastiocp", http_server(ex)),
                 Contender("fastiocp loop Protocol", "fastiocp", http_server(py + ["http-fastiocp-loop", "0"])),
                 Contender("asyncio Protocol", "baseline", http_server(py + ["http-asyncio", "0"])),
                 Contender("uvloop Protocol", "baseline", http_server(py + ["http-uvloop", "0"], True))],
                [Column("p50 ms", "lat_p50_ms", "{:.2f}"), Column("p99 ms", "lat_p99_ms", "{:.2f}"),
                 Column("server CPU µs/req", "server_us_per_req", "{:.1f}"),
                 Column("wrk CPU", "wrk_cpu_pct", "{:.0f}%")]))
        if "frameworks" in only:
            def framework(name: str, needs_uvloop: bool = False) -> Callable[[Runner], Dict[str, Any]]:
                def run(r: Runner) -> Dict[str, Any]:
                    if needs_uvloop and r.uvloop:
                        raise Skip(r.uvloop)
                    for mod in ("uvicorn", "aiohttp"):
                        if mod in name:
                            try:
                                optional_import(mod)
                            except ImportError:
                                raise Skip(f"{mod} not installed (pip install {mod})") from None
                    return r.http(py + [name, "0"])
                return run

            for fw, what in (("uvicorn", "uvicorn (httptools when installed), plain ASGI hello world"),
                             ("aiohttp", "aiohttp web, hello-world handler")):
                out.append(Section(
                    f"http-{fw}", f"HTTP/1.1 keep-alive: {what}, wrk -t2 -c64", "req/s", "req_per_s",
                    [Contender("fastiocp loop", "fastiocp", framework(f"http-{fw}-fastiocp-loop")),
                     Contender("asyncio", "baseline", framework(f"http-{fw}-asyncio")),
                     Contender("uvloop", "baseline", framework(f"http-{fw}-uvloop", True))],
                    [Column("p50 ms", "lat_p50_ms", "{:.2f}"), Column("p99 ms", "lat_p99_ms", "{:.2f}"),
                     Column("server CPU µs/req", "server_us_per_req", "{:.1f}"),
                     Column("wrk CPU", "wrk_cpu_pct", "{:.0f}%")]))
        if "file" in only:
            file_cols = [Column("MiB/s", "mib_per_s", "{:,.0f}"),
                         Column("CPU µs/read", "cpu_us_per_read", "{:.2f}")]
            made = {"done": False}

            def setup(r: Runner) -> None:
                if not made["done"]:
                    made["done"] = True
                    r.make_file()

            def reads(kind: str, direct: bool) -> Callable[[Runner], Dict[str, Any]]:
                if kind == "fio":
                    return lambda r: r.fio_task(direct)
                return lambda r: r.file_task(kind, direct)

            for direct in (False, True):
                mib = self.cfg.file_mib
                title = (f"4 KiB random reads, {mib} MiB file in the page cache" if not direct else
                         f"4 KiB random reads, O_DIRECT (from the disk), {mib} MiB file")
                out.append(Section(
                    "file-direct" if direct else "file-cached", title, "reads/s", "iops",
                    [Contender("fastiocp, queue depth 32", "fastiocp", reads("fastiocp", direct)),
                     Contender("os.pread loop", "baseline", reads("pread", direct)),
                     Contender("ThreadPoolExecutor(8) + os.pread", "baseline", reads("threadpool", direct)),
                     Contender("fio io_uring iodepth=32 (reference)", "reference", reads("fio", direct))],
                    file_cols, setup=setup))
        if "handoff" in only:
            n = self.cfg.handoff_items

            def handoff(kind: str) -> Callable[[Runner], Dict[str, Any]]:
                def run(r: Runner) -> Dict[str, Any]:
                    res = r.task(["handoff", kind, str(n)], 120 + n / 5000)
                    res["cpu_ns_per_item"] = res["cpu_s"] * 1e9 / n
                    return res
                return run

            out.append(Section(
                "handoff", f"hand-off of {n:,} items from one thread to another", "items/s", "ops_per_s",
                [Contender("fastiocp post + get_many(256)", "fastiocp", handoff("fastiocp")),
                 Contender("queue.SimpleQueue", "baseline", handoff("simplequeue")),
                 Contender("queue.Queue", "baseline", handoff("queue")),
                 Contender("asyncio call_soon_threadsafe", "baseline", handoff("asyncio"))],
                [Column("CPU ns/item", "cpu_ns_per_item", "{:,.0f}")]))
        if "loop" in only:
            out.extend(self.loop_sections(py, echo_cols))
        if "accept" in only:
            def acceptor(name: str) -> Callable[[Runner], Dict[str, Any]]:
                return lambda r: r.accept(py + [name, "0"])
            out.append(Section(
                "accept", f"TCP accept: the C client keeps {ACCEPT_INFLIGHT} connects going, each reset "
                "once established; the server accepts and closes each",
                "conn/s", "conns_per_s",
                [Contender("fastiocp accept(multishot=True)", "fastiocp", acceptor("accept-multishot")),
                 Contender("fastiocp accept(), submitted again per connection", "baseline",
                           acceptor("accept-single"))],
                [Column("server CPU µs/conn", "server_us_per_conn", "{:.2f}"),
                 Column("server CPU", "server_cpu_pct", "{:.0f}%"),
                 Column("client CPU", "loadgen_cpu_pct", "{:.0f}%")]))
        return out

    def loop_sections(self, py: List[str], cols: List[Column]) -> List[Section]:
        """The loop section: the same server code on asyncio's loop, uvloop
        and the fastiocp loop, one table per shape and message size."""
        loops = (("asyncio", "asyncio", "baseline"), ("uvloop", "uvloop", "baseline"),
                 ("fastiocp loop", "fastiocp-loop", "fastiocp"))

        def server(name: str, conns: int, size: int, tls: bool = False) -> Callable[[Runner], Dict[str, Any]]:
            def run(r: Runner) -> Dict[str, Any]:
                if name.endswith("-uvloop") and r.uvloop:
                    raise Skip(r.uvloop)
                return r.echo(py + [name, "0"], conns, size, tls)
            return run

        def kib(size: int) -> str:
            return f"{size // 1024} KiB" if size >= 1024 else f"{size} bytes"

        out: List[Section] = []
        n = LOOP_CONNECTIONS
        shapes = (("protocol", "Protocol", "echo-{}"),
                  ("streams", "streams (StreamReader/StreamWriter)", "echo-streams-{}"),
                  ("sock", "loop.sock_recv/sock_sendall", "echo-sock-{}"))
        for shape, what, pattern in shapes:
            for size in LOOP_SIZES:
                out.append(Section(
                    f"loop-{shape}-{size // 1024}k",
                    f"asyncio loops: {what} echo, {kib(size)} messages, {n} connections",
                    "msg/s", "msgs_per_s",
                    [Contender(title, role, server(pattern.format(name), n, size))
                     for title, name, role in loops], cols))
        conns = self.cfg.connections
        out.append(Section(
            "loop-buffered", f"asyncio loops: BufferedProtocol beside Protocol echo, 64-byte messages, "
                             f"{conns} connections",
            "msg/s", "msgs_per_s",
            [Contender(f"{title} {kind}", role, server(f"echo{infix}-{name}", conns, 64))
             for title, name, role in loops
             for kind, infix in (("Protocol", ""), ("BufferedProtocol", "-buffered"))], cols))
        out.append(Section(
            "loop-tls", f"asyncio loops: TLS Protocol echo, 1 KiB messages, {n} connections, "
                        "driven by a Python client",
            "msg/s", "msgs_per_s",
            [Contender(title, role, server(f"echo-tls-{name}", n, 1024, tls=True))
             for title, name, role in loops],
            [c if c.key != "loadgen_cpu_pct" else Column("client CPU", "loadgen_cpu_pct", "{:.0f}%")
             for c in cols]))
        return out

    def run(self, sections: List[Section]) -> None:
        jobs = [(s, c, k) for s in sections for k in range(self.cfg.rounds) for c in s.contenders]
        self.progress = Progress(len(jobs))
        for s in sections:
            for k in range(self.cfg.rounds):
                for c in s.contenders:
                    self.run_one(s, c, k)
            if s.teardown:
                s.teardown(self)

    def run_one(self, s: Section, c: Contender, k: int) -> None:
        assert self.progress is not None
        rounds = f" (round {k + 1}/{self.cfg.rounds})" if self.cfg.rounds > 1 else ""
        self.progress.start(f"{s.id}: {c.name}{rounds}")
        if c.skipped or c.failed:
            self.progress.finish("skipped" if c.skipped else "failed before")
            return
        try:
            if s.setup:
                s.setup(self)
            before = cpu_clock()
            sample = c.run(self)
            sample["other_cpus"], sample["steal_cpus"] = other_load(before)
        except Skip as exc:
            c.skipped = str(exc)
            self.progress.finish(f"skipped: {exc}")
            return
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            if c.role == "reference":
                # fio or the C server failing here (io_uring blocked by
                # seccomp, an old fio) says nothing about fastiocp.
                c.skipped = f"could not run: {exc.__class__.__name__}: {exc}"
                self.progress.finish(f"skipped: {c.skipped}")
                return
            c.failed = f"{exc.__class__.__name__}: {exc}"
            self.progress.finish(f"FAILED: {c.failed}")
            return
        c.samples.append(sample)
        self.progress.finish(f"{sample[s.metric]:,.0f} {s.unit}")

    def cleanup(self) -> None:
        kill_all()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.file_path and os.path.exists(self.file_path):
            os.unlink(self.file_path)


# ---- report --------------------------------------------------------------------

def format_section(s: Section) -> str:
    best = s.best_baseline()
    best_val = s.median(best, s.metric) if best else None
    spread = any(len(c.samples) > 1 for c in s.contenders)
    head = ["contender", s.unit, f"vs {best.name}" if best else "vs best baseline"]
    if spread:
        head.insert(2, "spread")
    head += [col.title for col in s.columns]
    rows = []
    for c in s.contenders:
        if not c.samples:
            rows.append([c.name, "-", "skipped: " + c.skipped if c.skipped else "FAILED: " + str(c.failed)])
            continue
        v = s.median(c, s.metric) or 0.0
        row = [c.name, f"{v:,.0f}", f"{v / best_val:.2f}x" if best_val else "-"]
        if spread:
            vals = [x[s.metric] for x in c.samples]
            row.insert(2, f"±{50 * (max(vals) - min(vals)) / v:.0f}%" if v else "-")
        for col in s.columns:
            m = s.median(c, col.key)
            row.append(col.fmt.format(m * col.scale) if m is not None else "-")
        rows.append(row)
    full = [head] + [r for r in rows if len(r) == len(head)]
    widths = [max(len(str(r[i])) for r in full) for i in range(len(head))]
    lines = [f"== {s.title} ==",
             "  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head))]
    for r in rows:
        if len(r) != len(head):
            lines.append(f"{r[0].ljust(widths[0])}  {r[2]}")
        else:
            lines.append("  ".join(str(x).ljust(widths[i]) if i == 0 else str(x).rjust(widths[i])
                                   for i, x in enumerate(r)))
    for n in s.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def section_notes(s: Section) -> None:
    if s.id in ("echo", "pingpong") or s.id.startswith("loop-"):
        client = "the TLS client" if s.id == "loop-tls" else "the load generator"
        for c in s.contenders:
            lg = s.median(c, "loadgen_cpu_pct")
            if lg is not None and lg > 90:
                s.notes.append(f"{client} used {lg:.0f}% of a CPU against {c.name}: "
                               "that figure may be limited by the client, not the server")
    if s.id == "loop-buffered":
        ratios = []
        for c in s.contenders:
            if not c.name.endswith(" Protocol"):
                continue
            loop_name = c.name[:-len(" Protocol")]
            b = s.by_name(f"{loop_name} BufferedProtocol")
            proto_v, proto_cpu = s.median(c, s.metric), s.median(c, "server_us_per_msg")
            buf_v = s.median(b, s.metric) if b else None
            buf_cpu = s.median(b, "server_us_per_msg") if b else None
            if proto_v and buf_v:
                txt = f"{loop_name} {buf_v / proto_v:.2f}x msg/s"
                if proto_cpu and buf_cpu:
                    txt += f", {buf_cpu / proto_cpu:.2f}x server CPU per message"
                ratios.append(txt)
        if ratios:
            s.notes.append("BufferedProtocol / Protocol on the same loop: " + "; ".join(ratios))
    if s.id == "http":
        for c in s.contenders:
            errs = [x.get("socket_errors") for x in c.samples if x.get("socket_errors")]
            if errs:
                s.notes.append(f"wrk reported socket errors against {c.name}: {errs[0]}")


def ratio_to_best(s: Section, c: Contender) -> Optional[float]:
    best = s.best_baseline()
    mine = s.median(c, s.metric)
    theirs = s.median(best, s.metric) if best else None
    return mine / theirs if mine is not None and theirs else None


def section_json(s: Section) -> Dict[str, Any]:
    best = s.best_baseline()
    return {"id": s.id, "title": s.title, "unit": s.unit, "metric": s.metric,
            "best_baseline": best.name if best else None, "notes": s.notes,
            "contenders": [{"name": c.name, "role": c.role, "median": s.median(c, s.metric),
                            "ratio_to_best_baseline": ratio_to_best(s, c),
                            "skipped": c.skipped, "failed": c.failed, "samples": c.samples}
                           for c in s.contenders]}


def plot(sections: List[Section], path: str) -> str:
    try:
        matplotlib = optional_import("matplotlib")
        matplotlib.use("Agg")
        plt = optional_import("matplotlib.pyplot")
        ticker = optional_import("matplotlib.ticker")
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install matplotlib): {path} not written"
    shown = [s for s in sections if any(c.samples for c in s.contenders)]
    if not shown:
        return "--plot: nothing was measured"
    colors = {"fastiocp": "#d95f02", "baseline": "#7570b3", "reference": "#999999"}
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.0 + 1.9 * len(shown)), squeeze=False)
    for ax, s in zip(axes[:, 0], shown):
        cs = [c for c in s.contenders if c.samples]
        vals = [s.median(c, s.metric) or 0.0 for c in cs]
        best = s.best_baseline()
        best_val = s.median(best, s.metric) if best else None
        y = list(range(len(cs)))[::-1]
        ax.barh(y, vals, color=[colors[c.role] for c in cs])
        ax.set_yticks(y)
        ax.set_yticklabels([c.name for c in cs], fontsize=8)
        for yi, v in zip(y, vals):
            txt = f" {v:,.0f}" + (f"  ({v / best_val:.2f}x)" if best_val else "")
            ax.text(v, yi, txt, va="center", fontsize=7)
        ax.set_title(s.title, fontsize=9)
        ax.set_xlabel(s.unit, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlim(0, max(vals) * 1.35 if vals and max(vals) > 0 else 1)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _pos: f"{x:,.0f}"))
    fig.suptitle(f"fastiocp {fastiocp.__version__}: ratios to the best baseline of the same run "
                 "(orange: fastiocp, purple: baselines, grey: references)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"bar chart written to {path}"


def machine_info() -> Dict[str, Any]:
    backend: str
    try:
        with fastiocp.CompletionPort() as p:
            backend = p.backend
    except Exception as exc:  # noqa: BLE001
        backend = f"none ({exc})"
    info: Dict[str, Any] = {"fastiocp": fastiocp.__version__, "backend": backend,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "cpus": os.cpu_count()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    for mod in ("uvloop", "matplotlib"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


# ---- entry point -----------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short run (about a minute): one round, 1 s each")
    p.add_argument("--json", metavar="FILE", help="save every sample and the table as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw a bar chart (needs matplotlib)")
    p.add_argument("--only", metavar="IDS",
                   help=f"comma-separated sections: {','.join(SECTION_IDS)} (default: "
                        f"{','.join(DEFAULT_SECTIONS)}; loop, the asyncio loops' echo shapes "
                        "beside uvloop and asyncio, runs only when named: about a minute with "
                        "--quick, 12 minutes without)")
    p.add_argument("--rounds", type=int, default=0, help="rounds per contender (default 3; 1 with --quick)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds per measurement (overrides)")
    p.add_argument("--items", type=int, default=0, help="hand-off items (default 1,000,000; 200,000 with --quick)")
    p.add_argument("--connections", type=int, default=50, help="echo connections (default 50)")
    p.add_argument("--pin", action="store_true",
                   help="pin servers to the last CPU and load generators to the others (a quiet machine)")
    p.add_argument("--file-mib", type=int, default=256, help="size of the test file in MiB (default 256)")
    p.add_argument("--dir", help="where to put the 256 MiB test file (default: the temp dir; not tmpfs "
                                 "for O_DIRECT)")


def main(args: argparse.Namespace) -> int:
    if not sys.platform.startswith("linux"):
        print("python -m fastiocp bench runs on Linux for now (it reads /proc and drives "
              "servers with a C load generator)", file=sys.stderr)
        return 2
    only = [x.strip() for x in (args.only or ",".join(DEFAULT_SECTIONS)).split(",") if x.strip()]
    bad = [x for x in only if x not in SECTION_IDS]
    if bad:
        print(f"--only: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTION_IDS)}",
              file=sys.stderr)
        return 2
    cfg = Config.from_args(args)
    runner = Runner(cfg)
    info = machine_info()
    print(f"fastiocp {info['fastiocp']} bench{' --quick' if cfg.quick else ''}: backend {info['backend']}, "
          f"{info['implementation']} {info['python']}, {info['os']} {info['machine']}, {info['cpus']} CPUs, "
          f"{cfg.rounds} round(s)" + (f", load average {info['loadavg'][0]:.2f}" if "loadavg" in info else ""),
          flush=True)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    clock0 = cpu_clock()
    try:
        if "echo" in only or "pingpong" in only or "loop" in only or "accept" in only:
            runner.loadgen, note = build_c("loadgen")
            runner.notes.append(note)
            if "echo" in only or "pingpong" in only:
                runner.echo_c, note = build_c("echo_uring")
                runner.notes.append(note)
            if runner.loadgen is None:
                runner.notes.append("echo, ping-pong and the loop section (but its TLS echo) are skipped: "
                                    "the C load generator could not be built")
        if "http" in only and runner.wrk is None:
            runner.notes.append("http is skipped: wrk is not installed (Debian: apt-get install wrk)")
        if "file" in only and runner.fio is None:
            runner.notes.append("fio is not installed (Debian: apt-get install fio): no fio reference")
        if runner.uvloop:
            runner.notes.append(runner.uvloop)
        sections = runner.sections(only)
        try:
            runner.run(sections)
        except KeyboardInterrupt:
            print("\ninterrupted: the table shows what was measured", file=sys.stderr)
    finally:
        runner.cleanup()
        signal.signal(signal.SIGTERM, old_term)
    elapsed = time.monotonic() - started
    others, steal = other_load(clock0)
    info["other_cpus"], info["steal_cpus"] = round(others, 2), round(steal, 2)

    print()
    for s in sections:
        section_notes(s)
        print(format_section(s))
        print()
    for n in runner.notes:
        print(f"note: {n}")
    if elapsed >= 2:
        print(f"note: measured in {elapsed:.0f} s; other processes used {others:.2f} of {info['cpus']} CPUs "
              f"meanwhile" + (f", the hypervisor stole {steal:.2f}" if steal >= 0.01 else "") +
              ("; this machine was busy: the figures are indicative only" if others + steal > 0.15 else ""))
    print("note: compare ratios within one run (the 'others' column is the load the bench did not make); "
          "absolute figures vary with the machine")
    if args.json:
        doc = {"meta": dict(info, mode="quick" if cfg.quick else "full", rounds=cfg.rounds,
                            seconds=elapsed, config=cfg.__dict__),
               "sections": [section_json(s) for s in sections],
               "notes": runner.notes}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"results saved to {args.json}")
    if args.plot:
        print(plot(sections, args.plot))
    failed = [c for s in sections for c in s.contenders if c.failed]
    return 1 if failed else 0
