#!/usr/bin/env python3
"""Check a directory of built wheels before they are published.

    python tools/check_wheels.py DIR [--expect IDENTIFIER ...] [--no-auditwheel]

Every wheel must be a CPython wheel of fastiocp with the version of the sdist
beside it (if one is there), and:
  - Linux: platform tags that are all manylinux (auditwheel repair retagged
    it; a bare linux_* tag cannot be uploaded to PyPI), and `auditwheel show`
    must agree that the wheel meets the policy its file name claims (run
    unless --no-auditwheel; auditwheel runs on any OS that has it installed);
  - Windows: win_amd64 or win_arm64.
With --expect (cibuildwheel build identifiers, e.g. cp310-manylinux_x86_64,
cp314-win_arm64, as `cibuildwheel --print-build-identifiers` prints them),
the set of wheels must match those exactly: none missing, none extra.
Exit status 0 when all is well, 1 otherwise (every problem is printed).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
from typing import List, Optional, Set, Tuple

WHEEL_RE = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")
MANYLINUX_RE = re.compile(r"^manylinux(_\d+_\d+|1|2010|2014)_(?P<arch>x86_64|aarch64|i686|ppc64le|s390x|armv7l|riscv64)$")
WINDOWS = {"win_amd64", "win_arm64", "win32"}


def identifiers(py: str, plats: List[str]) -> Set[str]:
    """The cibuildwheel identifiers a wheel answers, e.g. cp312-manylinux_x86_64."""
    out = set()
    for plat in plats:
        m = MANYLINUX_RE.match(plat)
        out.add(f"{py}-manylinux_{m.group('arch')}" if m else f"{py}-{plat}")
    return out


def auditwheel_policy(wheel: pathlib.Path) -> Tuple[Optional[str], str]:
    """(the platform tag `auditwheel show` says the wheel is consistent with, its output)."""
    exe = shutil.which("auditwheel")
    cmd = [exe, "show", str(wheel)] if exe else [sys.executable, "-m", "auditwheel", "show", str(wheel)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    text = (r.stdout + r.stderr).strip()
    flat = " ".join(text.split())  # auditwheel wraps its sentences anywhere
    m = re.search(r'consistent with the following platform tag: "([^"]+)"', flat)
    return (m.group(1) if m and r.returncode == 0 else None), text


def check(wheel: pathlib.Path, version: Optional[str], audit: bool, problems: List[str]) -> Set[str]:
    m = WHEEL_RE.match(wheel.name)
    if not m:
        problems.append(f"{wheel.name}: not a wheel file name")
        return set()
    if m.group("name") != "fastiocp":
        problems.append(f"{wheel.name}: not a fastiocp wheel")
    if version and m.group("version") != version:
        problems.append(f"{wheel.name}: version {m.group('version')}, the sdist's is {version}")
    py, abi = m.group("py"), m.group("abi")
    if not re.fullmatch(r"cp3\d+", py) or abi != py:
        problems.append(f"{wheel.name}: expected a CPython wheel with its own ABI (cp3XY-cp3XY), got {py}-{abi}")
    plats = m.group("plat").split(".")
    linux = [p for p in plats if "linux" in p]
    if linux:
        bare = [p for p in plats if not MANYLINUX_RE.match(p)]
        if bare:
            problems.append(f"{wheel.name}: platform tags {bare} are not manylinux tags "
                            "(was the wheel repaired with auditwheel?)")
        if audit:
            policy, text = auditwheel_policy(wheel)
            if policy is None:
                problems.append(f"{wheel.name}: auditwheel show failed or gave no policy:\n{text}")
            elif policy not in plats:
                problems.append(f"{wheel.name}: auditwheel says {policy}, the file name claims {plats}")
            else:
                print(f"  {wheel.name}: auditwheel: consistent with {policy}")
    elif not set(plats) <= WINDOWS:
        problems.append(f"{wheel.name}: platform {plats} is neither manylinux nor Windows")
    return identifiers(py, plats)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("--expect", nargs="*", default=None, metavar="IDENTIFIER",
                    help="cibuildwheel build identifiers that must be there, and nothing else")
    ap.add_argument("--no-auditwheel", action="store_true", help="only check the file names")
    args = ap.parse_args(argv)
    wheels = sorted(args.dir.rglob("*.whl"))
    sdists = sorted(args.dir.rglob("fastiocp-*.tar.gz"))
    version = None
    if sdists:
        version = sdists[0].name[len("fastiocp-"):-len(".tar.gz")]
    problems: List[str] = []
    if not wheels:
        problems.append(f"no wheel under {args.dir}")
    seen: dict = {}
    for w in wheels:
        for ident in check(w, version, not args.no_auditwheel, problems):
            if ident in seen:
                problems.append(f"{w.name} and {seen[ident]} are both {ident}")
            seen[ident] = w.name
    if args.expect is not None:
        expected = set(args.expect)
        missing, extra = sorted(expected - set(seen)), sorted(set(seen) - expected)
        if missing:
            problems.append(f"missing wheels: {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected wheels: {', '.join(extra)}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{len(wheels)} wheel(s){' for ' + version if version else ''}: "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
