"""The sdist is complete: built with ``python -m build --sdist`` from this
checkout, it carries every source of every platform, and a wheel built FROM
it in a fresh virtual environment installs, imports and runs (its own tests
included, from the unpacked sdist).

Slow (under a minute with a warm pip cache: a C build in a fresh venv) and
needs PyPI (build isolation fetches setuptools); marked ``packaging``. It
runs from a source checkout where ``build`` (and, for the cibuildwheel
check, ``cibuildwheel``) is installed, and skips otherwise:

    python -m pip install build cibuildwheel && python -m pytest -m packaging tests/test_packaging.py

.ci/run does that after check-manifest, with FASTIOCP_REQUIRE_PACKAGING_TOOLS=1
(a missing tool fails instead of skipping).
"""
from __future__ import annotations

import importlib
import os
import pathlib
import runpy
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

from conftest import UNDER_ASAN

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(not (ROOT / "pyproject.toml").exists() or not (ROOT / "setup.py").exists(),
                       reason="needs a source checkout (pyproject.toml, setup.py)"),
    pytest.mark.skipif(sys.platform == "win32" and bool(os.environ.get("FASTIOCP_UNDER_WINE")),
                       reason="the embeddable CPython under Wine has no venv or pip"),
    pytest.mark.skipif(UNDER_ASAN,
                       reason="tools/sanitize.sh checks the extension, not the packaging"),
    pytest.mark.timeout(900),
]


def require(module: str, pip_name: str) -> None:
    """Skip without the tool, or fail under FASTIOCP_REQUIRE_PACKAGING_TOOLS=1
    (.ci/run sets it: there a missing tool must not pass as a skip)."""
    try:
        found = importlib.import_module(module)
        # a build/ directory in the checkout imports as a namespace package
        if getattr(found, "__file__", None) is None:
            raise ImportError(module)
    except ImportError:
        if os.environ.get("FASTIOCP_REQUIRE_PACKAGING_TOOLS"):
            pytest.fail(f"{pip_name} is not installed (FASTIOCP_REQUIRE_PACKAGING_TOOLS is set)")
        pytest.skip(f"pip install {pip_name}")


def _run(cmd: list, cwd: pathlib.Path, env: dict | None = None, timeout: float = 600) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=str(cwd), capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _clean_env() -> dict:
    """No PYTHONPATH (the checkout's src/ must not shadow the install), no
    forced backend."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "FASTIOCP_BACKEND", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(var, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _setup_spec() -> dict:
    """setup.py's per-platform SOURCES and INCLUDE_DIRS (read without running setup())."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="fastiocp_sources")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    require("build", "build")
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", out, ROOT], cwd=out, env=_clean_env())
    found = list(out.glob("fastiocp-*.tar.gz"))
    assert len(found) == 1, found
    return found[0]


def _sdist_names(path: pathlib.Path) -> set:
    with tarfile.open(path) as tf:
        names = tf.getnames()
    top = names[0].split("/")[0]
    return {n[len(top) + 1:] for n in names if n.startswith(top + "/")}


def test_sdist_holds_every_platform_source(sdist: pathlib.Path) -> None:
    names = _sdist_names(sdist)
    spec = _setup_spec()
    # Every C source of every platform (not only this one's), and every header
    # in the include directories.
    for platform, sources in spec["SOURCES"].items():
        for src in sources:
            assert src in names, f"{src} ({platform}) missing from the sdist"
    for platform, dirs in spec["INCLUDE_DIRS"].items():
        for d in dirs:
            for header in (ROOT / d).rglob("*.h"):
                rel = header.relative_to(ROOT).as_posix()
                assert rel in names, f"header {rel} missing from the sdist"
    for required in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
                     "src/fastiocp/py.typed", "src/fastiocp/__init__.pyi", "src/fastiocp/_fastiocp.pyi",
                     "src/fastiocp/bench/__init__.py", "src/fastiocp/bench/csrc/loadgen.c",
                     "src/fastiocp/bench/csrc/echo_uring.c",
                     "tests/conftest.py", "benchmarks/conftest.py", "examples/echo_server.py",
                     "docs/BENCHMARKS.md", "tools/wine/test.sh", "tools/wine/pyconfig.h",
                     "tools/sanitize.sh"):
        assert required in names, f"{required} missing from the sdist"
    # Every file of the package tree in the checkout (modules, stubs, data).
    for f in (ROOT / "src" / "fastiocp").rglob("*"):
        if f.is_file() and f.suffix not in (".so", ".pyd", ".pyc", ".o") and "__pycache__" not in f.parts:
            rel = f.relative_to(ROOT).as_posix()
            assert rel in names, f"{rel} missing from the sdist"
    built = [n for n in names if n.endswith((".so", ".pyd", ".pyc", ".o", ".dll"))]
    assert not built, f"build products in the sdist: {built}"


def test_sdist_carries_the_cibuildwheel_config(sdist: pathlib.Path) -> None:
    """wheels.yml hands cibuildwheel the sdist, not the checkout: the sdist's
    pyproject.toml must select the same builds."""
    require("cibuildwheel", "cibuildwheel")
    for platform, arch in (("linux", "x86_64"), ("windows", "ARM64")):
        cmd = [sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", "--platform", platform,
               "--archs", arch]
        from_checkout = _run(cmd, cwd=ROOT).split()
        from_sdist = _run(cmd + [sdist], cwd=sdist.parent).split()
        assert from_sdist == from_checkout and from_sdist, (from_sdist, from_checkout)


def test_wheel_from_sdist_in_fresh_venv(sdist: pathlib.Path, tmp_path: pathlib.Path) -> None:
    import venv  # not in every CPython (the Windows embeddable one has none)

    env = _clean_env()
    vdir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(vdir)
    py = vdir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    wheels = tmp_path / "wheels"
    # The wheel is built from the sdist alone (pip unpacks it and builds it in
    # an isolated environment), never from the checkout.
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", wheels, sdist], cwd=tmp_path,
         env=env)
    (wheel,) = wheels.glob("fastiocp-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
    for required in ("fastiocp/__init__.py", "fastiocp/py.typed", "fastiocp/__init__.pyi",
                     "fastiocp/_fastiocp.pyi", "fastiocp/bench/runner.py",
                     "fastiocp/bench/csrc/loadgen.c", "fastiocp/bench/csrc/echo_uring.c",
                     "fastiocp/loop/__init__.py", "fastiocp/loop/_loop.py"):
        assert required in wnames, f"{required} missing from {wheel.name}"
    assert any(n.startswith("fastiocp/_fastiocp.") for n in wnames), "no extension module in the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wnames), "no LICENSE in the wheel"
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in wnames), \
        "the wheel must hold the package only"

    _run([py, "-m", "pip", "install", "-q", "--no-deps", wheel], cwd=tmp_path, env=env)
    # Run from a directory that holds no fastiocp: the installed one is used.
    out = _run([py, "-c", textwrap.dedent("""
        import sys, fastiocp
        print(fastiocp.__file__)
        with fastiocp.CompletionPort() as port:
            port.post(key="k", context="c", nbytes=3)
            c = port.get(timeout=10)
            assert (c.key, c.context, c.nbytes) == ("k", "c", 3), c
            print("backend", port.backend)

        async def main():
            return 42
        assert fastiocp.run(main()) == 42  # the asyncio loop is installed too
        """)], cwd=tmp_path, env=env)
    assert str(vdir) in out.splitlines()[0], out
    version = _run([py, "-m", "fastiocp", "--version"], cwd=tmp_path, env=env)
    assert version.startswith("fastiocp "), version
    _run([py, "-m", "fastiocp", "info"], cwd=tmp_path, env=env)

    # The sdist's own tests run against the installed wheel.
    src = tmp_path / "src"
    with tarfile.open(sdist) as tf:
        if sys.version_info >= (3, 12):
            tf.extractall(src, filter="data")
        else:
            tf.extractall(src)
    (unpacked,) = src.iterdir()
    _run([py, "-m", "pip", "install", "-q", f"{wheel}[test]"], cwd=tmp_path, env=env)
    _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cli.py", "tests/test_port.py"],
         cwd=unpacked, env=env)
