#!/usr/bin/env bash
# Build a free-threaded CPython 3.13 (3.13t, PEP 703) once, into a cache
# outside the clone, and reuse it on every later call.
#
#   tools/build_313t.sh                 build if needed; the last line on
#                                       stdout is the path of python3.13t
#   tools/build_313t.sh --venv DIR      the same, then a fresh venv in DIR
#                                       (removed first if it exists; pip
#                                       upgraded); the last line on stdout
#                                       is DIR/bin/python
#   tools/build_313t.sh --rebuild       throw the cached build away first
#   tools/build_313t.sh --check         print the path if the cache holds a
#                                       good build, else exit 3; builds nothing
#
# Environment:
#   FASTIOCP_313T_CACHE   the cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/fastiocp-313t)
#   FASTIOCP_313T_MIRROR  the Debian mirror for the source package (default:
#                         the first http(s) Debian mirror in this machine's apt
#                         sources, else http://deb.debian.org/debian)
#   FASTIOCP_313T_SUITE   the Debian suite whose python3.13 to build (default trixie)
#   FASTIOCP_313T_JOBS    make -j (default: nproc)
#
# Where the source comes from: Debian 12 has no 3.13t package, but Debian
# trixie's source package python3.13 is fetched with `apt-get source` through
# a private sources list and private list directory (this machine's apt
# configuration is neither read for it nor changed; apt checks the tarball
# against the signed Sources index). Only the upstream tarball (the .orig) is
# built, without Debian's patches: a plain `./configure --disable-gil
# --prefix=CACHE/python && make && make install`. About 2-3 minutes on 2 cores,
# plus the .pyc compilation of the install.
#
# Cache layout (CACHE):
#   python/          the install prefix; python/bin/python3.13t
#   stamp            written last, after the checks passed: "recipe=... version=..."
#                    (no stamp, or another recipe: the build is redone)
#   build.log        configure/make output of the last build
#   .lock            flock(1): concurrent callers wait for one build
#
# Build dependencies (ssl, ctypes, sqlite3, zlib, bz2, lzma, readline, uuid,
# dbm, curses, decimal, venv + ensurepip) are apt-get installed when missing
# (root, or sudo without a password). After the build the script checks that
# the interpreter is free-threaded, that `PYTHON_GIL=0` keeps the GIL off, and
# that each of those modules imports; it fails with the name of what is missing.
set -euo pipefail

RECIPE=1   # bump when the configure line or the checks change: forces a rebuild

die() { echo "build_313t: error: $*" >&2; exit 1; }
say() { echo "build_313t: $*" >&2; }

MODE=build
VENV=
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) [ $# -ge 2 ] || die "--venv needs a directory"; VENV=$2; shift 2 ;;
        --venv=*) VENV=${1#--venv=}; shift ;;
        --rebuild) MODE=rebuild; shift ;;
        --check) MODE=check; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[ "$(uname -s)" = Linux ] || die "Linux only"
HOME=${HOME:-$(cd ~ && pwd)}
CACHE=${FASTIOCP_313T_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fastiocp-313t}
SUITE=${FASTIOCP_313T_SUITE:-trixie}
JOBS=${FASTIOCP_313T_JOBS:-$(nproc 2>/dev/null || echo 2)}
PREFIX=$CACHE/python
PY=$PREFIX/bin/python3.13t
STAMP=$CACHE/stamp
LOG=$CACHE/build.log
CONFIGURE_ARGS=(--disable-gil "--prefix=$PREFIX" --with-ensurepip=install)
# Modules that must import for the test suite, venv and pip to work.
REQUIRED_MODULES="ssl _ssl hashlib ctypes _ctypes sqlite3 zlib bz2 lzma readline \
_uuid _decimal _curses dbm.gnu _dbm _gdbm pyexpat _bz2 _lzma select socket \
venv ensurepip multiprocessing _multiprocessing _posixshmem asyncio _asyncio"

# A build is good when the stamp is of this recipe and the interpreter is a
# free-threaded 3.13 that keeps the GIL off under PYTHON_GIL=0.
is_good() {
    [ -f "$STAMP" ] && [ -x "$PY" ] || return 1
    grep -q "^recipe=$RECIPE " "$STAMP" || return 1
    PYTHON_GIL=0 "$PY" -c '
import sys, sysconfig
assert sys.version_info[:2] == (3, 13), sys.version
assert sysconfig.get_config_var("Py_GIL_DISABLED") == 1
assert not sys._is_gil_enabled()
' >/dev/null 2>&1
}

# Prints the mirror: the env override, or the first Debian (not -security)
# mirror in this machine's apt sources (deb822 URIs: or one-line deb ...).
debian_mirror() {
    if [ -n "${FASTIOCP_313T_MIRROR:-}" ]; then echo "$FASTIOCP_313T_MIRROR"; return; fi
    local m
    m=$( { cat /etc/apt/sources.list 2>/dev/null
           cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null; } |
         grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v -- '-security' |
         head -n1 | tr -d ' ' ) || true
    echo "${m:-http://deb.debian.org/debian}"
}

install_build_deps() {
    local pkgs=(build-essential pkg-config xz-utils ca-certificates
                libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev
                libsqlite3-dev libreadline-dev uuid-dev libncurses-dev
                libgdbm-dev libgdbm-compat-dev libexpat1-dev)
    # (no libmpdec-dev in Debian 12: _decimal then uses the bundled mpdecimal)
    local missing=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null && sudo -n true 2>/dev/null ||
            die "missing build packages (${missing[*]}) and not root: apt-get install them first"
        sudo="sudo -n"
    fi
    say "installing build packages: ${missing[*]}"
    local out
    out=$(mktemp)
    { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive \
          $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$out" 2>&1 ||
        { tail -n 20 "$out" >&2; rm -f "$out"; die "apt-get install ${missing[*]} failed"; }
    rm -f "$out"
}

# Downloads the python3.13 source package of $SUITE into $1 and prints the
# path of its upstream tarball (the Debian version goes to $1/VERSION).
fetch_source() {
    local dir=$1 mirror apt
    mirror=$(debian_mirror)
    mkdir -p "$dir/lists/partial" "$dir/src"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $SUITE main" \
        > "$dir/sources.list"
    [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] ||
        die "/usr/share/keyrings/debian-archive-keyring.gpg is missing (package debian-archive-keyring)"
    apt=(apt-get -q -o "Dir::Etc::sourcelist=$dir/sources.list" -o Dir::Etc::sourceparts=-
         -o "Dir::State::Lists=$dir/lists" -o APT::Get::List-Cleanup=0
         -o APT::Sandbox::User=root)
    say "fetching the $SUITE source package python3.13 from $mirror"
    "${apt[@]}" update >>"$LOG" 2>&1 ||
        { tail -n 20 "$LOG" >&2; die "apt-get update of the private $SUITE sources list failed"; }
    (cd "$dir/src" && "${apt[@]}" source --download-only python3.13) >>"$LOG" 2>&1 ||
        { tail -n 20 "$LOG" >&2; die "apt-get source python3.13 ($SUITE, $mirror) failed"; }
    local dsc orig
    dsc=$(ls "$dir"/src/python3.13_*.dsc 2>/dev/null | head -n1)
    orig=$(ls "$dir"/src/python3.13_*.orig.tar.* 2>/dev/null | grep -v '\.asc$' | head -n1)
    [ -n "$dsc" ] && [ -n "$orig" ] || die "apt-get source gave no .dsc/.orig tarball in $dir/src"
    sed -n 's/^Version: //p' "$dsc" > "$dir/VERSION"
    echo "$orig"
}

do_build() {
    install_build_deps
    local work orig version
    work=$(mktemp -d "$CACHE/work.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    : > "$LOG"
    orig=$(fetch_source "$work")
    version=$(cat "$work/VERSION")
    say "building CPython $version with --disable-gil (make -j$JOBS; log: $LOG)"
    tar -xf "$orig" -C "$work" || die "cannot unpack $orig"
    local srcdir
    srcdir=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'Python-3.13*' | head -n1)
    [ -n "$srcdir" ] || die "no Python-3.13* directory in $orig"
    rm -rf "$PREFIX" "$STAMP"
    local t0=$SECONDS
    (
        cd "$srcdir"
        ./configure "${CONFIGURE_ARGS[@]}"
        make -j"$JOBS"
        make install
    ) >>"$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; die "the build failed (whole log: $LOG)"; }
    say "built and installed in $((SECONDS - t0)) s"
    # Optional modules that configure/make could not build are listed in the
    # log; the import check below is what decides.
    grep -A3 -E 'necessary bits to build these optional modules were not found|Failed to build these modules|Following modules built successfully but were removed' "$LOG" >&2 || true
    local bad
    bad=$(PYTHON_GIL=0 "$PY" - $REQUIRED_MODULES <<'EOF'
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name} ({type(e).__name__}: {e})")
print("; ".join(bad))
EOF
) || die "$PY does not run"
    [ -z "$bad" ] || die "modules missing from the build: $bad (see $LOG; a -dev package?)"
    PYTHON_GIL=0 "$PY" -c 'import sys; assert not sys._is_gil_enabled()' ||
        die "$PY is not free-threaded (sys._is_gil_enabled() is True under PYTHON_GIL=0)"
    "$PY" -m pip --version >/dev/null || die "pip is missing from $PREFIX (ensurepip)"
    echo "recipe=$RECIPE version=$version configure=${CONFIGURE_ARGS[*]} built=$(date -u +%FT%TZ)" > "$STAMP"
    rm -rf "$work"
    trap - EXIT
}

mkdir -p "$CACHE" || die "cannot create the cache $CACHE"
if [ "$MODE" = check ]; then
    is_good || { say "no good build in $CACHE"; exit 3; }
else
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        say "another build holds $CACHE/.lock; waiting"
        flock 9
    fi
    [ "$MODE" = rebuild ] && rm -f "$STAMP"
    if is_good; then
        say "reusing $PY ($(sed -n 's/.*version=\([^ ]*\).*/\1/p' "$STAMP"))"
    else
        do_build
        is_good || die "the new build in $PREFIX fails its own check"
    fi
    flock -u 9
fi

if [ -n "$VENV" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" || die "python3.13t -m venv $VENV failed"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2 || die "pip upgrade in $VENV failed"
    echo "$VENV/bin/python"
else
    echo "$PY"
fi
