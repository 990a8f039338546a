"""The type stubs say what the API takes (no mypy needed here; .ci/run also
runs ``python -m mypy.stubtest fastiocp`` against the built module):
buffers typed as buffers, writable where the operation writes, and stubs
that import nothing a plain install lacks."""
from __future__ import annotations

import ast
import pathlib

import pytest

import fastiocp

PKG = pathlib.Path(fastiocp.__file__).resolve().parent
STUB = PKG / "_fastiocp.pyi"

pytestmark = pytest.mark.skipif(not STUB.exists(), reason="stubs not installed")


def _methods() -> dict:
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    (port,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CompletionPort"]
    return {f.name: f for f in port.body if isinstance(f, ast.FunctionDef)}


def _annotation(func: ast.FunctionDef, arg: str) -> str:
    for a in func.args.args:
        if a.arg == arg:
            assert a.annotation is not None, f"{func.name}({arg}) has no annotation"
            return ast.unparse(a.annotation)
    raise AssertionError(f"{func.name} has no parameter {arg}")


@pytest.mark.parametrize("method", ["read", "recv", "recvfrom"])
def test_operations_that_write_take_a_writable_buffer_or_a_size(method: str) -> None:
    # recv also takes a BufferPool (pooled receives).
    expected = "Union[_WritableBuffer, int, BufferPool]" if method == "recv" else "Union[_WritableBuffer, int]"
    assert _annotation(_methods()[method], "buffer") == expected


@pytest.mark.parametrize("method", ["write", "send", "sendto"])
def test_operations_that_read_take_any_buffer(method: str) -> None:
    assert _annotation(_methods()[method], "data") == "_ReadableBuffer"


def test_buffer_aliases_are_pep688_buffers() -> None:
    text = STUB.read_text(encoding="utf-8")
    assert "from typing_extensions import Buffer" in text
    assert "_ReadableBuffer: TypeAlias = Buffer" in text and "_WritableBuffer: TypeAlias = Buffer" in text


def test_every_runtime_method_has_a_stub() -> None:
    stubbed = set(_methods())
    runtime = {n for n in dir(fastiocp.CompletionPort) if not n.startswith("_")}
    props = {"backend", "closed", "pending", "concurrency"}
    assert runtime - props <= stubbed, sorted(runtime - props - stubbed)


def test_stubs_import_only_what_every_install_has() -> None:
    """Type checkers ship typing_extensions; nothing else from outside the
    standard library (no bench extras) may appear in a stub."""
    allowed = {"sys", "os", "typing", "typing_extensions", "collections.abc"}
    for stub in PKG.rglob("*.pyi"):
        tree = ast.parse(stub.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]
            else:
                continue
            assert set(names) <= allowed, f"{stub.name} imports {names}"
