"""Source checks on csrc/ (after msgspec's test_cpylint.py): the GIL-release
boundary stays obvious."""
from __future__ import annotations

import pathlib
import re

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
# The CPython binding, one file per concern, and the asyncio loop's C fast
# path beside it: the only code that may include Python.h. The backends
# (csrc/fiocp.h, common.c, unix/, win/) never do.
BINDING = CSRC / "binding"
LOOP = CSRC / "loop"

pytestmark = pytest.mark.skipif(not CSRC.is_dir(), reason="run from a source checkout")


def c_files():
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".c", ".h"))


def in_binding(path: pathlib.Path) -> bool:
    return BINDING in path.parents or LOOP in path.parents


def binding_files():
    return [p for p in c_files() if in_binding(p)]


def test_the_binding_is_there():
    names = {p.name for p in binding_files()}
    assert {"binding.h", "module.c", "port.c", "completion.c"} <= names, names


def test_only_the_binding_includes_python_h():
    offenders = [p.relative_to(CSRC).as_posix() for p in c_files()
                 if not in_binding(p) and re.search(r'#\s*include\s*[<"]Python\.h', p.read_text())]
    assert not offenders


def test_no_python_api_in_backends():
    offenders = [p.relative_to(CSRC).as_posix() for p in c_files()
                 if not in_binding(p) and re.search(r"\bPy[A-Z_]\w*", p.read_text())]
    assert not offenders


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def test_allow_threads_blocks_pair_and_hold_no_python_calls():
    blocks = []
    for path in binding_files():
        text = _strip_comments(path.read_text())
        found = re.findall(r"Py_BEGIN_ALLOW_THREADS(.*?)Py_END_ALLOW_THREADS", text, re.S)
        assert text.count("Py_BEGIN_ALLOW_THREADS") == text.count("Py_END_ALLOW_THREADS") == len(found), path
        blocks += found
    assert blocks
    for body in blocks:
        assert "Py_BEGIN_ALLOW_THREADS" not in body
        assert not re.search(r"\bPy[A-Z_]\w*", body), body
        # One backend (or OS) call per block.
        assert body.count(";") == 1, body
