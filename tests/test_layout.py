"""The package's layout rules (docs/ARCHITECTURE.md, "What each room may
include or import") on the Python side: the core package is the library
only. The C side's rules are in test_csrc_lint.py."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import fastiocp

PKG = pathlib.Path(fastiocp.__file__).resolve().parent


def test_importing_fastiocp_loads_no_bench_and_no_optional_dependency():
    code = ("import sys, fastiocp\n"
            "print(sorted(m for m in sys.modules if m.startswith('fastiocp.bench') "
            "or m.split('.')[0] in ('uvloop', 'matplotlib')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a module of the
    package's root (a relative import of level 1 is from fastiocp)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "fastiocp" + (f".{base}" if base else "")
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_core_modules_never_import_the_bench():
    """Only __main__.py hands the `bench` command to fastiocp.bench."""
    offenders = []
    for path in sorted(PKG.glob("*.py")):
        if path.name == "__main__.py":
            continue
        for line, name in _imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            if name == "fastiocp.bench" or name.startswith("fastiocp.bench."):
                offenders.append(f"{path.name}:{line} imports {name}")
    assert offenders == []



def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages a wheel holds: a subpackage missing
    there works in an editable install and is absent from the wheel (as
    fastiocp.loop once was)."""
    import re

    pyproject = PKG.parent.parent / "pyproject.toml"
    if not pyproject.exists():
        import pytest

        pytest.skip("an installed fastiocp: no pyproject.toml beside it")
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*)\]$", pyproject.read_text(),
                                                       re.M).group(1)))
    found = {".".join(("fastiocp",) + d.relative_to(PKG).parts).rstrip(".")
             for d in [PKG, *PKG.rglob("*")] if (d / "__init__.py").is_file() and "csrc" not in d.parts}
    assert found == listed, f"pyproject.toml packages {sorted(listed)} != the tree's {sorted(found)}"
