"""Every ```python block of README.md runs as written.

A block runs as a script (exit status 0 within a minute) unless the HTML
comment on the line before it says otherwise:

  <!-- readme-test: server HOST:PORT echo ... -->
      a server that runs until stopped: it is started as written, a few
      clients check that it echoes, then it is killed;
  <!-- readme-test: synopsis ... -->
      a list of calls, not a program (its names stand for your own objects):
      it must compile, and every call in it must bind to the real signature
      (the same arguments accepted, the defaults shown equal to the real ones).
"""
from __future__ import annotations

import ast
import inspect
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

import fastiocp

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.skipif(not README.exists(), reason="run from a source checkout")


def params(kind: str) -> list:
    """The blocks of one kind, as pytest parameters named by their line."""
    return [pytest.param(*b, id=f"line{b[0]}") for b in blocks() if b[1].split()[0] == kind]


def blocks() -> List[Tuple[int, str, str]]:
    """(line number, directive, code) of every ```python block."""
    if not README.exists():
        return []
    lines = README.read_text(encoding="utf-8").splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            prev = lines[i - 1].strip() if i else ""
            m = re.match(r"<!--\s*readme-test:\s*(.*?)\s*-->$", prev)
            out.append((start + 1, m.group(1) if m else "run", "\n".join(lines[start:j]) + "\n"))
            i = j
        i += 1
    return out


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastiocp.__file__))
    return env


def test_readme_has_python_blocks() -> None:
    kinds = [d.split()[0] for _line, d, _code in blocks()]
    assert kinds.count("run") >= 1 and "server" in kinds and "synopsis" in kinds, kinds


@pytest.mark.parametrize("line,directive,code",
                         params("run"))
def test_block_runs(line: int, directive: str, code: str, tmp_path: pathlib.Path) -> None:
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code, encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode == 0, f"README.md line {line}:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("line,directive,code",
                         params("server"))
def test_server_block_serves(line: int, directive: str, code: str, tmp_path: pathlib.Path) -> None:
    host, port_s = directive.split()[1].rsplit(":", 1)
    address = (host, int(port_s))
    assert f'("{host}", {port_s})' in code, "the directive names the address the code listens on"
    probe = socket.socket()
    if os.name == "posix":  # as socket.create_server() does: TIME_WAIT is no conflict
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(address)
    except OSError as exc:
        pytest.skip(f"{host}:{port_s} is in use here ({exc}): the README's server cannot listen")
    finally:
        probe.close()
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        clients: List[socket.socket] = []
        while len(clients) < 3:
            assert proc.poll() is None, f"README.md line {line}: the server exited: {proc.communicate()}"
            try:
                clients.append(socket.create_connection(address, timeout=10))
            except OSError:
                assert time.monotonic() < deadline, "the server never accepted a connection"
                time.sleep(0.1)
        for round_ in range(3):
            for i, c in enumerate(clients):
                msg = b"readme %d round %d" % (i, round_)
                c.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = c.recv(100)
                    assert chunk, "the server closed the connection"
                    got += chunk
                assert got == msg
        for c in clients:
            c.close()
        assert proc.poll() is None, "the server exited after its clients left"
    finally:
        proc.kill()
        _out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


# ---- the synopsis ------------------------------------------------------------

# What the synopsis's names stand for.
INSTANCES: Dict[str, Any] = {
    "port": fastiocp.CompletionPort,
    "op": fastiocp.Completion,
    "c": fastiocp.Completion,
    "pool": fastiocp.WorkerPool,
    "f": fastiocp.File,
}


def _target(func: ast.expr) -> Tuple[Any, bool]:
    """(the callable a call node calls, whether it is an unbound method)."""
    if isinstance(func, ast.Attribute):
        base = func.value
        if isinstance(base, ast.Name) and base.id == "fastiocp":
            return getattr(fastiocp, func.attr), False
        if isinstance(base, ast.Name) and base.id in INSTANCES:
            return getattr(INSTANCES[base.id], func.attr), True
        if isinstance(base, ast.Call):  # fastiocp.WorkerPool(...).start()
            owner, _unbound = _target(base.func)
            assert inspect.isclass(owner), ast.unparse(base)
            return getattr(owner, func.attr), True
    raise AssertionError(f"the synopsis calls something this test does not know: {ast.unparse(func)}")


def _check_call(call: ast.Call) -> Optional[str]:
    """None if the call binds to the real signature; else what is wrong."""
    target, unbound = _target(call.func)
    sig = inspect.signature(target)
    args: List[Any] = [object()] if unbound else []
    args += [object() for _ in call.args]
    kwargs = {kw.arg: object() for kw in call.keywords if kw.arg}
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        return f"{ast.unparse(call)}: does not bind to {sig}: {exc}"
    for kw in call.keywords:
        if isinstance(kw.value, ast.Constant) and kw.arg in sig.parameters:
            real = sig.parameters[kw.arg].default
            if real is not inspect.Parameter.empty and real != kw.value.value:
                return f"{ast.unparse(call)}: shows {kw.arg}={kw.value.value!r}, the default is {real!r}"
    del bound
    return None


@pytest.mark.parametrize("line,directive,code",
                         params("synopsis"))
def test_synopsis_matches_the_api(line: int, directive: str, code: str) -> None:
    tree = ast.parse(code, filename=f"README.md:{line}")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert len(calls) >= 20, "the synopsis lost its calls?"
    problems = [p for p in map(_check_call, calls) if p]
    assert not problems, "\n".join(problems)
    # Every CompletionPort method and property a user calls is in it.
    public = {n for n in dir(fastiocp.CompletionPort) if not n.startswith("_")}
    shown = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "port"}
    missing = public - shown - {"backend", "closed", "pending", "concurrency", "flush"}
    assert not missing, f"CompletionPort methods missing from the README synopsis: {sorted(missing)}"
