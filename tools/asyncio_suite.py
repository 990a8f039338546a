#!/usr/bin/env python3
"""CPython's own asyncio test suite (test.test_asyncio) on fastiocp's loop,
compared with the stdlib loop on the same interpreter.

    python tools/asyncio_suite.py --full [-p PYTHON] [-j 2] [--json out.json]
    python tools/asyncio_suite.py --ci   [-p PYTHON]
    python tools/asyncio_suite.py -m test_streams -m test_events [--baseline]
    python tools/asyncio_suite.py --only test_events.EventLoopTests.test_foo
    tools/wine/test.sh 3.11 --python tools/asyncio_suite.py --full   # Windows

How the loop gets in (../shared/LOOP.md, "How other loops prove compatibility"):
- The mixin modules (test_events, test_sock_lowlevel, test_sendfile,
  test_buffered_proto, test_server, test_sslproto) each have one class per
  stdlib loop, each overriding create_event_loop() or new_loop(). The
  stdlib's epoll (or plain selector) class is the baseline; ours is a
  subclass of it whose hook returns fastiocp.loop.EventLoop(), so both run
  exactly the same tests (UnixEventLoopTestsMixin and SubprocessTestsMixin
  included). The other per-loop classes (poll, select, kqueue, proactor)
  are left out of both runs.
- Every other module builds its loops through the policy: ours sets
  asyncio.DefaultEventLoopPolicy._loop_factory = EventLoop (the class
  attribute, since each module's tearDownModule resets the policy).
- Modules that test the stdlib loops' internals with mocks are skipped
  (SKIP_MODULES).

On Windows (the embeddable CPython under Wine, tools/wine/test.sh --python,
with CPython's Lib/test brought in by that script) the same, with the
Windows stdlib loop as the baseline: the mixin modules' Proactor classes
(test_events.ProactorEventLoopTests, ...; the Unix-only mixins do not exist
there). Ours also replaces asyncio.ProactorEventLoop (and asyncio.EventLoop,
3.13+), the Windows default loop, which some modules construct by name
(test_subprocess's SubprocessProactorTests, test_runners) and test with
isinstance(). The add_reader/
add_writer tests of the mixin that ProactorEventLoopTests skips
("IocpEventLoop does not have add_reader()") run on ours, which has them
(WINDOWS_UNSKIP).

Each (module, loop) runs in its own subprocess; every test has a watchdog
(faulthandler.dump_traceback_later(exit=True)): a hang is recorded as
"hang" for that test and the module goes on in a new process without it.
The same happens after a crash.

--full: the baseline (stdlib loop) and ours on every module; a test that
passes on the stdlib and fails, errors, hangs or crashes on ours is a
regression; regressions are run once more alone and reported as flaky when
they pass then. Exit status 1 when a regression remains.

--ci: ours only, on CI_MODULES; exit status 1 on any failure not listed in
tools/asyncio_suite_known.txt (Windows: tools/asyncio_suite_known_windows.txt),
"<test id>  # reason", one per line; a test whose reason starts with
"skip:" is not run at all.

Test ids are normalized: "module.Class.test", with ours' class name
(Fastiocp<StdlibClass>) mapped back to the stdlib class's.

-p/--python: the interpreter to test (default: this one); fastiocp (with
fastiocp.loop) must import there. FASTIOCP_BACKEND picks the port's backend.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN_FILE = os.path.join(HERE, "asyncio_suite_known.txt")
KNOWN_FILE_WINDOWS = os.path.join(HERE, "asyncio_suite_known_windows.txt")

# Mock the stdlib loops' internals, or are Windows only.
SKIP_MODULES = {
    "test_base_events", "test_selector_events", "test_proactor_events", "test_unix_events",
    "test_windows_events", "test_windows_utils",
}
# Module -> the per-loop hook its loop classes override.
MIXIN_MODULES = {
    "test_events": "create_event_loop",
    "test_sock_lowlevel": "create_event_loop",
    "test_sendfile": "create_event_loop",
    "test_buffered_proto": "new_loop",
    "test_server": "new_loop",
    "test_sslproto": "new_loop",
}
# The stdlib class of each mixin module that is the baseline (first found).
BASELINE_CLASSES = ("EPollEventLoopTests", "BufferedProtocolSelectorTests", "SelectorStartServerTests",
                    "SelectorStartTLSTests", "SelectEventLoopTests")
# On Windows: the Windows default loop's (ProactorEventLoop) classes.
BASELINE_CLASSES_WINDOWS = ("ProactorEventLoopTests", "BufferedProtocolProactorTests",
                            "ProactorStartServerTests", "ProactorStartTLSTests")
# Tests a Windows baseline class overrides with a skip that ours runs: the
# mixin's own test instead (module -> names).
WINDOWS_UNSKIP = {
    "test_events": ("test_reader_callback", "test_reader_callback_cancel", "test_writer_callback",
                    "test_writer_callback_cancel", "test_remove_fds_after_closing"),
}
OURS_PREFIX = "Fastiocp"
# --ci: the modules that exercise the loop itself, well under 3 minutes.
CI_MODULES = ["test_events", "test_sock_lowlevel", "test_sendfile", "test_buffered_proto", "test_server",
              "test_sslproto", "test_streams", "test_subprocess", "test_ssl", "test_runners", "test_threads"]
MEMORY_LIMIT = 6 << 30  # address space of a worker
OUTCOMES_BAD = {"fail", "error", "hang", "crash"}
OUTCOMES_OK = {"pass", "xfail"}


# ============================================================================
# worker: runs one module's tests in this process, one JSON line per event
# ============================================================================

def _worker(module_name: str, mode: str, out_path: str, skip: Set[str], only: Optional[Set[str]],
            timeout: float) -> int:
    import asyncio
    import faulthandler
    import importlib
    import traceback
    import unittest

    import signal

    # A shell's background job starts with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the tests that interrupt
    # themselves (test_runners) would spin forever.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import resource

        # A runaway test (a busy loop filling a list) fails with MemoryError
        # instead of taking the machine down before its watchdog fires.
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass
    windows = sys.platform == "win32"
    if mode == "ours":
        from fastiocp.loop import EventLoop

        asyncio.DefaultEventLoopPolicy._loop_factory = EventLoop  # type: ignore[attr-defined]
        if windows:
            # The Windows default loop, constructed by name in some modules
            # (asyncio.EventLoop: its 3.13+ name).
            asyncio.ProactorEventLoop = EventLoop  # type: ignore[attr-defined,misc]
            if hasattr(asyncio, "EventLoop"):
                asyncio.EventLoop = EventLoop  # type: ignore[attr-defined,misc]
    out = open(out_path, "a", buffering=1)
    # unittest's buffer swaps sys.stderr for a StringIO during each test: the
    # watchdog writes to the real descriptor.
    real_stderr = sys.__stderr__

    def emit(**kw: Any) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()

    try:
        mod = importlib.import_module(f"test.test_asyncio.{module_name}")
    except unittest.SkipTest as exc:
        emit(event="module_skip", reason=str(exc))
        return 0
    hook = MIXIN_MODULES.get(module_name)
    classes: List[type] = []
    baseline_cls: Optional[type] = None
    if hook is not None:
        for name in BASELINE_CLASSES_WINDOWS if windows else BASELINE_CLASSES:
            c = getattr(mod, name, None)
            if isinstance(c, type) and hook in c.__dict__:
                baseline_cls = c
                break
    for name in dir(mod):
        c = getattr(mod, name)
        if not (isinstance(c, type) and issubclass(c, unittest.TestCase)):
            continue
        if hook is not None and hook in c.__dict__ and c is not baseline_cls:
            continue  # another stdlib loop's class (poll, select, proactor, ...)
        if c is baseline_cls and mode == "ours":
            def make(self: Any) -> Any:
                return EventLoop()

            ns: Dict[str, Any] = {hook: make, "__module__": c.__module__,
                                  "__qualname__": OURS_PREFIX + c.__qualname__}
            for tname in WINDOWS_UNSKIP.get(module_name, ()) if windows else ():
                # The mixin's test, not the baseline class's skip (some of
                # those skips stand for no test of the mixin's).
                base = next((b for b in c.__mro__[1:] if tname in b.__dict__), None)
                if base is not None:
                    ns[tname] = base.__dict__[tname]
            c = type(OURS_PREFIX + c.__name__, (c,), ns)
        classes.append(c)

    loader = unittest.TestLoader()
    tests: List[unittest.TestCase] = []
    for c in classes:
        for t in loader.loadTestsFromTestCase(c):
            tid = norm_id(t.id())
            if tid in skip or (only is not None and tid not in only):
                continue
            tests.append(t)
    emit(event="collected", n=len(tests))

    rank = {"pass": 0, "skip": 0, "xfail": 0, "upass": 1, "fail": 2, "error": 3}

    class Result(unittest.TestResult):
        def __init__(self) -> None:
            super().__init__()
            self.buffer = True
            self.cur: Dict[str, Any] = {}
            self.started: Dict[str, float] = {}

        def _set(self, test: Any, outcome: str, detail: str = "") -> None:
            tid = norm_id(test.id()) if hasattr(test, "id") else str(test)
            cur = self.cur.get(tid)
            if cur is None or rank.get(outcome, 0) > rank.get(cur[0], 0):
                self.cur[tid] = (outcome, detail)
            if tid not in self.started:
                # class/module fixtures: report at once
                o, d = self.cur.pop(tid)
                emit(event="result", id=tid, outcome=o, detail=d[-4000:], t=0.0)

        def startTest(self, test: Any) -> None:
            super().startTest(test)
            tid = norm_id(test.id())
            self.started[tid] = time.monotonic()
            emit(event="start", id=tid)
            faulthandler.dump_traceback_later(timeout, exit=True, file=real_stderr)

        def stopTest(self, test: Any) -> None:
            super().stopTest(test)
            faulthandler.dump_traceback_later(timeout, exit=True, file=real_stderr)  # covers class teardown too
            tid = norm_id(test.id())
            t0 = self.started.pop(tid, time.monotonic())
            o, d = self.cur.pop(tid, ("pass", ""))
            emit(event="result", id=tid, outcome=o, detail=d[-4000:], t=round(time.monotonic() - t0, 3))

        def _fmt(self, err: Any) -> str:
            return "".join(traceback.format_exception(*err))

        def addSuccess(self, test: Any) -> None:
            super().addSuccess(test)
            self._set(test, "pass")

        def addError(self, test: Any, err: Any) -> None:
            super().addError(test, err)
            self._set(test, "error", self._fmt(err))

        def addFailure(self, test: Any, err: Any) -> None:
            super().addFailure(test, err)
            self._set(test, "fail", self._fmt(err))

        def addSkip(self, test: Any, reason: str) -> None:
            super().addSkip(test, reason)
            self._set(test, "skip", reason)

        def addExpectedFailure(self, test: Any, err: Any) -> None:
            super().addExpectedFailure(test, err)
            self._set(test, "xfail")

        def addUnexpectedSuccess(self, test: Any) -> None:
            super().addUnexpectedSuccess(test)
            self._set(test, "upass")

        def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
            super().addSubTest(test, subtest, err)
            if err is not None:
                failure = issubclass(err[0], test.failureException)
                self._set(test, "fail" if failure else "error", f"{subtest}\n" + self._fmt(err))

    result = Result()
    suite = unittest.TestSuite(tests)
    faulthandler.dump_traceback_later(timeout, exit=True, file=real_stderr)
    suite.run(result)
    faulthandler.cancel_dump_traceback_later()
    emit(event="done")
    out.close()
    # Leftover non-daemon threads or atexit handlers must not hang the run.
    os._exit(0)


def norm_id(tid: str) -> str:
    """'test.test_asyncio.test_events.FastiocpEPollEventLoopTests.test_x' ->
    'test_events.EPollEventLoopTests.test_x'. Fixture errors
    ('setUpClass (test.test_asyncio.m.C)') keep their shape."""
    tid = tid.replace("test.test_asyncio.", "")
    parts = tid.split(".")
    if len(parts) >= 2 and parts[1].startswith(OURS_PREFIX):
        parts[1] = parts[1][len(OURS_PREFIX):]
    tid = ".".join(parts)
    return tid.replace("(" + OURS_PREFIX, "(").replace("." + OURS_PREFIX, ".")


# ============================================================================
# parent: one subprocess per (module, loop), restarted after a hang or crash
# ============================================================================

class ModuleRun:
    def __init__(self, module: str, mode: str) -> None:
        self.module = module
        self.mode = mode
        self.results: Dict[str, Tuple[str, str, float]] = {}
        self.seconds = 0.0
        self.note = ""


def run_module(python: str, module: str, mode: str, timeout: float, only: Optional[Iterable[str]] = None,
               env_extra: Optional[Dict[str, str]] = None, never: Iterable[str] = ()) -> ModuleRun:
    """never: test ids not to run at all (--ci's known hangs)."""
    mr = ModuleRun(module, mode)
    never = list(never)
    t0 = time.monotonic()
    env = dict(os.environ)
    env.update(env_extra or {})
    env.setdefault("PYTHONFAULTHANDLER", "1")
    with tempfile.TemporaryDirectory(prefix="asyncio-suite-") as tmp:
        out = os.path.join(tmp, "out.jsonl")
        skipf = os.path.join(tmp, "skip.txt")
        onlyf = os.path.join(tmp, "only.txt")
        if only is not None:
            with open(onlyf, "w") as f:
                f.write("\n".join(only))
        for attempt in range(200):
            with open(skipf, "w") as f:
                f.write("\n".join(list(mr.results) + never))
            if os.path.exists(out):
                os.unlink(out)
            cmd = [python, os.path.abspath(__file__), "--worker", module, "--mode", mode, "--out", out,
                   "--skip-file", skipf, "--timeout", str(timeout)]
            if only is not None:
                cmd += ["--only-file", onlyf]
            proc = subprocess.run(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout * 50 + 600)
            current = None
            finished = False
            with open(out) if os.path.exists(out) else open(os.devnull) as f:
                for line in f:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if ev["event"] == "start":
                        current = ev["id"]
                    elif ev["event"] == "result":
                        mr.results[ev["id"]] = (ev["outcome"], ev["detail"], ev["t"])
                        if ev["id"] == current:
                            current = None
                    elif ev["event"] in ("done", "module_skip"):
                        finished = True
                        if ev["event"] == "module_skip":
                            mr.note = "module skipped: " + ev.get("reason", "")
            if finished:
                break
            tail = proc.stdout.decode(errors="replace")[-6000:]
            if current is None:
                mr.note = f"worker died outside a test (rc {proc.returncode}):\n{tail}"
                mr.results[f"{module}.<module>"] = ("crash", tail, 0.0)
                break
            outcome = "hang" if "Timeout (" in tail else "crash"
            mr.results[current] = (outcome, f"rc {proc.returncode}\n{tail}", timeout)
    mr.seconds = time.monotonic() - t0
    return mr


def list_modules(python: str) -> List[str]:
    code = ("import os, test.test_asyncio as t; d = os.path.dirname(t.__file__); "
            "print('\\n'.join(sorted(f[:-3] for f in os.listdir(d) if f.startswith('test_') and f.endswith('.py'))))")
    out = subprocess.run([python, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout
    return [m for m in out.split() if m not in SKIP_MODULES]


def read_known(path: str = KNOWN_FILE) -> Dict[str, str]:
    known: Dict[str, str] = {}
    if not os.path.exists(path):
        return known
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tid, sep, reason = line.partition("#")
            if not sep or not reason.strip():
                raise SystemExit(f"{path}: every line needs '# reason': {line!r}")
            known[tid.strip()] = reason.strip()
    return known


def last_line(detail: str) -> str:
    lines = [ln.strip() for ln in detail.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("Timeout (", "rc ")):
            return ln
        if not ln.startswith(("File ", "Thread ", "Current thread")):
            return ln[:200]
    return ""


def describe_python(python: str) -> Tuple[str, str]:
    """(version and backend, sys.platform) of the interpreter to test."""
    code = ("import sys, os, fastiocp.loop as l; "
            "p = l.EventLoop(); print(sys.version.split()[0], p.backend, sys.platform); p.close()")
    r = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{python}: cannot make a fastiocp.loop.EventLoop (is fastiocp, with its loop "
                         f"package, installed for this interpreter?):\n{r.stdout}")
    info, _, platform = r.stdout.strip().rpartition(" ")
    return info, platform


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", metavar="MODULE", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("ours", "stdlib"), default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--skip-file", help=argparse.SUPPRESS)
    ap.add_argument("--only-file", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help="baseline + ours on every module; report regressions")
    ap.add_argument("--ci", action="store_true", help="ours only on the CI module list; known failures allowed")
    ap.add_argument("-m", "--module", action="append", default=[], help="run these modules only (repeatable)")
    ap.add_argument("--only", action="append", default=[], help="run these test ids only (module.Class.test)")
    ap.add_argument("--baseline", action="store_true", help="with -m/--only: also run the stdlib loop")
    ap.add_argument("-p", "--python", default=sys.executable, help="interpreter to test (fastiocp installed)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="module subprocesses at once (default 1)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-test watchdog, seconds (default 90; 30 with --ci)")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each failure's traceback")
    args = ap.parse_args(argv)

    if args.timeout is None:
        args.timeout = 30.0 if args.ci else 90.0
    if args.worker:
        skip = set(open(args.skip_file).read().split()) if args.skip_file else set()
        only = set(open(args.only_file).read().split()) if args.only_file else None
        return _worker(args.worker, args.mode, args.out, skip, only, args.timeout)

    python = args.python
    info, platform = describe_python(python)
    windows = platform == "win32"
    t_start = time.monotonic()
    only_ids: Optional[List[str]] = args.only or None
    if args.ci:
        modules = list(CI_MODULES)
        modes = ["ours"]
    elif args.full:
        modules = list_modules(python)
        modes = ["stdlib", "ours"]
    else:
        modules = args.module or sorted({t.split(".")[0] for t in args.only}) or list_modules(python)
        modes = ["stdlib", "ours"] if args.baseline else ["ours"]
    if only_ids:
        modules = [m for m in modules if any(t.split(".")[0] == m for t in only_ids)]
    print(f"== asyncio suite: Python {info} {platform} ({python}); modules: {len(modules)}; "
          f"loops: {', '.join(modes)}", flush=True)
    if os.environ.get("FASTIOCP_WINE_CPYTHON_TESTS"):
        print(f"   test package: {os.environ['FASTIOCP_WINE_CPYTHON_TESTS']}", flush=True)

    known = read_known(KNOWN_FILE_WINDOWS if windows else KNOWN_FILE) if args.ci else {}
    # Known failures whose reason starts with "skip:" (hangs on the stdlib
    # loop too, say) are not run by --ci at all: a hang costs its watchdog.
    not_run = sorted(t for t, why in known.items() if why.startswith("skip:"))
    jobs = [(m, mode) for m in modules for mode in modes]
    runs: Dict[Tuple[str, str], ModuleRun] = {}

    def one(job: Tuple[str, str]) -> ModuleRun:
        m, mode = job
        mod_only = [t for t in only_ids if t.split(".")[0] == m] if only_ids else None
        mr = run_module(python, m, mode, args.timeout, mod_only, never=not_run)
        bad = sum(1 for o, _, _ in mr.results.values() if o in OUTCOMES_BAD)
        print(f"   {m:24s} {mode:6s} {len(mr.results):4d} tests {bad:3d} bad  {mr.seconds:6.1f}s"
              + (f"  ({mr.note.splitlines()[0]})" if mr.note else ""), flush=True)
        return mr

    with ThreadPoolExecutor(max(1, args.jobs)) as ex:
        for mr in ex.map(one, jobs):
            runs[(mr.module, mr.mode)] = mr

    def merged(mode: str) -> Dict[str, Tuple[str, str, float]]:
        d: Dict[str, Tuple[str, str, float]] = {}
        for (m, md), mr in runs.items():
            if md == mode:
                d.update(mr.results)
        return d

    ours = merged("ours")
    std = merged("stdlib") if "stdlib" in modes else {}
    status = 0
    report: Dict[str, Any] = {"python": info, "ours": ours, "stdlib": std}

    if "stdlib" in modes:
        std_ok = {t for t, (o, _, _) in std.items() if o in OUTCOMES_OK}
        ours_ok = {t for t, (o, _, _) in ours.items() if o in OUTCOMES_OK}
        # A test ours skips (it needs a selector, say) is listed, not counted.
        skipped = sorted(t for t in std_ok if ours.get(t, ("",))[0] == "skip")
        regress = sorted(t for t in std_ok if t not in ours_ok and t not in skipped)
        # Once more, alone: a regression that passes then is flaky.
        flaky: List[str] = []
        if regress and args.full:
            by_mod: Dict[str, List[str]] = {}
            for t in regress:
                by_mod.setdefault(t.split(".")[0], []).append(t)
            for m, ids in by_mod.items():
                again = run_module(python, m, "ours", args.timeout, ids)
                for t in ids:
                    if again.results.get(t, ("",))[0] in OUTCOMES_OK:
                        flaky.append(t)
        real = [t for t in regress if t not in flaky]
        print(f"\n== Python {info}: tests run {len(set(std) | set(ours))}; passed on the stdlib loop "
              f"{len(std_ok)}; passed on fastiocp's {len(ours_ok & set(std))}; "
              f"regressions {len(real)}" + (f" (+{len(flaky)} flaky: passed when run again)" if flaky else ""))
        def counts(res: Dict[str, Tuple[str, str, float]]) -> str:
            n = {k: sum(1 for o, _, _ in res.values() if o in outs)
                 for k, outs in (("passed", OUTCOMES_OK), ("failed", OUTCOMES_BAD), ("skipped", {"skip"}))}
            return ", ".join(f"{v} {k}" for k, v in n.items())

        print(f"   stdlib loop: {counts(std)}; fastiocp's: {counts(ours)}; passed on fastiocp's only: "
              f"{len(ours_ok - std_ok)}")
        only_std = sorted(set(std) - set(ours))
        if only_std:
            print(f"   (ids run on the stdlib loop only: {len(only_std)}, e.g. {only_std[:3]})")
        for t in real:
            o, d, _ = ours.get(t, ("missing", "", 0))
            print(f"   REGRESSION {t}: {o}: {last_line(d)}")
            if args.verbose:
                print("      " + d.replace("\n", "\n      "))
        for t in flaky:
            o, d, _ = ours.get(t, ("missing", "", 0))
            print(f"   flaky      {t}: {o}: {last_line(d)}")
        for t in skipped:
            print(f"   skipped on ours only: {t}: {ours[t][1][:120]}")
        report.update(regressions=real, flaky=flaky, skipped_on_ours=skipped)
        status = 1 if real else 0
    else:
        bad = sorted(t for t, (o, _, _) in ours.items() if o in OUTCOMES_BAD)
        unexpected = [t for t in bad if t not in known]
        passed = sum(1 for o, _, _ in ours.values() if o in OUTCOMES_OK)
        print(f"\n== Python {info}: fastiocp's loop: {len(ours)} tests, {passed} passed, {len(bad)} failed "
              f"({len(bad) - len(unexpected)} known), "
              f"{sum(1 for o, _, _ in ours.values() if o == 'skip')} skipped"
              + (f", {len(not_run)} not run (known: skip)" if not_run else ""))
        for t in bad:
            o, d, _ = ours[t]
            tag = "known     " if t in known else "FAILURE   "
            print(f"   {tag}{t}: {o}: {last_line(d)}" + (f"  [{known[t]}]" if t in known else ""))
            if args.verbose and t not in known:
                print("      " + d.replace("\n", "\n      "))
        if args.ci:
            stale = sorted(t for t in known if t.split(".")[0] in modules and ours.get(t, ("",))[0] in OUTCOMES_OK)
            for t in stale:
                print(f"   (known failure passed: {t})")
        status = 1 if unexpected else 0
    print(f"== {time.monotonic() - t_start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
