"""Source checks on csrc/ (after msgspec's test_cpylint.py): the GIL-release
boundary stays obvious."""
from __future__ import annotations

import pathlib
import re

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
BINDING = "_fastiocp.c"

pytestmark = pytest.mark.skipif(not CSRC.is_dir(), reason="run from a source checkout")


def c_files():
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".c", ".h"))


def test_only_the_binding_includes_python_h():
    offenders = [p.name for p in c_files()
                 if p.name != BINDING and re.search(r'#\s*include\s*[<"]Python\.h', p.read_text())]
    assert not offenders


def test_no_python_api_in_backends():
    offenders = [p.name for p in c_files()
                 if p.name != BINDING and re.search(r"\bPy[A-Z_]\w*", p.read_text())]
    assert not offenders


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def test_allow_threads_blocks_pair_and_hold_no_python_calls():
    text = _strip_comments((CSRC / BINDING).read_text())
    blocks = re.findall(r"Py_BEGIN_ALLOW_THREADS(.*?)Py_END_ALLOW_THREADS", text, re.S)
    assert text.count("Py_BEGIN_ALLOW_THREADS") == text.count("Py_END_ALLOW_THREADS") == len(blocks)
    assert blocks
    for body in blocks:
        assert "Py_BEGIN_ALLOW_THREADS" not in body
        assert not re.search(r"\bPy[A-Z_]\w*", body), body
        # One backend (or OS) call per block.
        assert body.count(";") == 1, body
