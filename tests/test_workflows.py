"""The GitHub workflows and the cibuildwheel configuration are valid, and say
what the release needs: each workflow against GitHub's workflow JSON schema
(check-jsonschema's vendored copy: no network), pyproject's
[tool.cibuildwheel] against cibuildwheel's own schema, and
``cibuildwheel --print-build-identifiers`` for every runner of wheels.yml
giving exactly CPython 3.10-3.14 on that runner's architecture.

Needs check-jsonschema and cibuildwheel (marked ``packaging``; .ci/run
installs them and sets FASTIOCP_REQUIRE_PACKAGING_TOOLS=1, which turns a
missing tool into a failure instead of a skip):

    python -m pip install check-jsonschema cibuildwheel
    python -m pytest -m packaging tests/test_workflows.py
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
PYTHONS = ["cp310", "cp311", "cp312", "cp313", "cp314"]
LINUX_FREE_THREADED = ["cp314t"]  # no free-threaded Windows wheel yet
# wheels.yml's runners: (cibuildwheel platform, arch) -> identifier suffix
SUFFIX = {("linux", "x86_64"): "manylinux_x86_64", ("linux", "aarch64"): "manylinux_aarch64",
          ("windows", "AMD64"): "win_amd64", ("windows", "ARM64"): "win_arm64"}

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(not WORKFLOWS.is_dir() or not (ROOT / "pyproject.toml").exists(),
                       reason="needs a source checkout (.github/workflows, pyproject.toml)"),
    pytest.mark.skipif(sys.platform == "win32", reason="the checks run on the Linux CI"),
]


def require(module: str, pip_name: str) -> Any:
    """The module, or a skip (a failure under FASTIOCP_REQUIRE_PACKAGING_TOOLS=1)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("FASTIOCP_REQUIRE_PACKAGING_TOOLS"):
            pytest.fail(f"{pip_name} is not installed (FASTIOCP_REQUIRE_PACKAGING_TOOLS is set)")
        pytest.skip(f"pip install {pip_name}")


def load_yaml(path: pathlib.Path) -> Any:
    require("check_jsonschema", "check-jsonschema")
    from ruamel.yaml import YAML  # check-jsonschema's YAML parser

    return YAML(typ="safe").load(path.read_text())


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = require("tomli", "tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(cmd: list, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


def test_workflows_match_github_schema() -> None:
    require("check_jsonschema", "check-jsonschema")
    files = sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))
    assert files
    r = _run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
              *files], cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cibuildwheel_config_matches_its_schema() -> None:
    require("cibuildwheel", "cibuildwheel")
    jsonschema = require("jsonschema", "jsonschema")
    import cibuildwheel

    schema_path = pathlib.Path(cibuildwheel.__file__).parent / "resources" / "cibuildwheel.schema.json"
    schema = json.loads(schema_path.read_text())
    config = pyproject()["tool"]["cibuildwheel"]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def wheels_matrix() -> list:
    doc = load_yaml(WORKFLOWS / "wheels.yml")
    return doc["jobs"]["wheels"]["strategy"]["matrix"]["include"]


def test_one_native_runner_per_architecture() -> None:
    pairs = [(m["platform"], m["arch"]) for m in wheels_matrix()]
    assert sorted(pairs) == sorted(SUFFIX), pairs
    for m in wheels_matrix():
        arm = m["arch"] in ("aarch64", "ARM64")
        assert ("arm" in m["runner"]) == arm, f"{m}: an ARM wheel on an ARM runner, x86 on x86"
        assert m["runner"].startswith("ubuntu" if m["platform"] == "linux" else "windows"), m


@pytest.mark.parametrize("platform,arch", sorted(SUFFIX))
def test_build_identifiers(platform: str, arch: str) -> None:
    require("cibuildwheel", "cibuildwheel")
    r = _run([sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", "--platform", platform,
              "--archs", arch], cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    pythons = PYTHONS + (LINUX_FREE_THREADED if platform == "linux" else [])
    assert r.stdout.split() == [f"{py}-{SUFFIX[platform, arch]}" for py in pythons]


def test_release_pipeline_shape() -> None:
    doc = load_yaml(WORKFLOWS / "wheels.yml")
    jobs = doc["jobs"]
    # The expected set checked before publishing is the same list of Pythons.
    assert doc["env"]["PYTHONS"].split() == PYTHONS
    assert doc["env"]["PYTHONS_LINUX_FREE_THREADED"].split() == LINUX_FREE_THREADED
    # Wheels are built from the sdist job's artifact, never from the checkout.
    assert jobs["wheels"]["needs"] == "sdist"
    cibw = [s for s in jobs["wheels"]["steps"] if str(s.get("uses", "")).startswith("pypa/cibuildwheel@")]
    assert len(cibw) == 1 and cibw[0]["with"]["package-dir"] == "${{ steps.sdist.outputs.path }}"
    assert not any(str(s.get("uses", "")).startswith("actions/checkout") for s in jobs["wheels"]["steps"])
    # Publishing: trusted publishing on release tags, after the set was checked.
    pub = jobs["publish"]
    assert pub["needs"] == "check"
    assert "refs/tags/v" in pub["if"]
    assert pub["permissions"] == {"id-token": "write"}
    assert any(str(s.get("uses", "")).startswith("pypa/gh-action-pypi-publish@") for s in pub["steps"])
    # Linux wheels: io_uring reachable in the test container and required,
    # and the suite again with epoll forced.
    linux = pyproject()["tool"]["cibuildwheel"]["linux"]
    assert "seccomp=unconfined" in linux["container-engine"]["create-args"]
    tests = " && ".join(linux["test-command"])
    assert "FASTIOCP_BACKEND=io_uring python -m fastiocp info" in tests
    assert "FASTIOCP_BACKEND=epoll python -m pytest" in tests


def test_check_wheels_script(tmp_path: pathlib.Path) -> None:
    """tools/check_wheels.py (the release set check of wheels.yml) on file names."""
    script = ROOT / "tools" / "check_wheels.py"
    (tmp_path / "fastiocp-1.2.0.tar.gz").write_bytes(b"")
    good = ["fastiocp-1.2.0-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            "fastiocp-1.2.0-cp314-cp314-win_arm64.whl"]
    for name in good:
        (tmp_path / name).write_bytes(b"")
    expect = ["--expect", "cp310-manylinux_x86_64", "cp314-win_arm64"]
    r = _run([sys.executable, script, tmp_path, "--no-auditwheel", *expect])
    assert r.returncode == 0, r.stdout + r.stderr
    # A wheel auditwheel never retagged, a wrong version, and one missing.
    (tmp_path / "fastiocp-1.2.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    (tmp_path / "fastiocp-1.1.0-cp313-cp313-win_amd64.whl").write_bytes(b"")
    r = _run([sys.executable, script, tmp_path, "--no-auditwheel", *expect, "cp311-manylinux_aarch64"])
    assert r.returncode == 1
    for what in ("not manylinux tags", "version 1.1.0", "missing wheels: cp311-manylinux_aarch64",
                 "unexpected wheels: cp312-linux_x86_64, cp313-win_amd64"):
        assert what in r.stderr, r.stderr
