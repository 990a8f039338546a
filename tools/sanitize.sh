#!/usr/bin/env bash
# Build fastiocp with AddressSanitizer + UndefinedBehaviorSanitizer and run
# the test suite under it (Linux).
#
#   tools/sanitize.sh [--leaks] [PYTEST ARGS...]     default ARGS: tests
#
# The sanitizer build (setup.py's FASTIOCP_SANITIZE=1) goes out of tree, into
# $FASTIOCP_SANITIZE_DIR (default: a new directory under /tmp), next to a copy
# of the src/fastiocp/ tree; pytest runs with that copy first on PYTHONPATH, so an
# installed or in-place normal build is neither used nor touched. The
# interpreter is not instrumented: libasan is preloaded (LD_PRELOAD). Child
# interpreters started by the tests inherit all of it.
#
# Python objects: by default CPython keeps its own allocator (pymalloc), so
# ASan watches fastiocp's C allocations and Python's large blocks only. With
# FASTIOCP_SANITIZE_PYTHONMALLOC=malloc every Python object is a malloc block
# ASan watches (a key or buffer freed under fastiocp is caught at once); the
# tests that measure RSS growth then fail (ASan's quarantine holds freed
# memory): deselect them (-k "not no_growth"). --leaks implies it.
#
# ASan reports go to files (log_path), one per process, so that a report from
# a child process or from inside pytest's output capture is never lost; they
# are counted and printed at the end. UBSan, linked beside ASan, ignores
# log_path and writes to stderr: pytest runs with --capture=sys so that the
# main process's reports reach the console (a child's is in its test's
# failure message), and the distinct "runtime error:" lines of the whole
# output are counted with the ASan reports.
#
#   default   ASan (detect_leaks=0: CPython itself leaks at exit) and UBSan
#             (halt_on_error). Exit status: pytest's; 1 if pytest passed but
#             a sanitizer report was written (by a child, say).
#   --leaks   LeakSanitizer too, PYTHONMALLOC=malloc: at each process's exit,
#             the leak records (direct and indirect) whose allocation stack
#             passes through fastiocp's code (csrc/) are counted; CPython's
#             own are ignored. Default ARGS then: a focused subset (every
#             API path, the soak's short form, fault injection; the slow
#             unwinder LSan needs through an interpreter built without frame
#             pointers makes the whole suite take too long):
#               tests/test_port.py tests/test_sockets.py tests/test_files.py
#               tests/test_invariants.py tests/test_workers.py
#               tests/reliability/test_soak.py tests/reliability/test_faults.py
#               tests/reliability/test_bugs.py -m "not known_bug"
#               -k "not no_growth and not interpreter_shutdown"
#             (the interpreter-shutdown tests exit on purpose with daemon
#             threads in the middle of port calls: what only their Python
#             frames reference, which live in mmap'd memory LSan does not
#             scan, would look leaked). Exit status 1 if any such definite
#             ("Direct") leak was found or pytest failed.
#
# Environment: PYTHON (default python3), CC (default gcc: where libasan is
# found), FASTIOCP_SANITIZE_DIR, FASTIOCP_SANITIZE_KEEP=1 (keep the build).
set -uo pipefail

prog=${0##*/}
log() { printf '[%s] %s\n' "$prog" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$prog" "$*" >&2; exit 2; }

LEAKS=0
if [[ ${1:-} == --leaks ]]; then
    LEAKS=1
    shift
    (($#)) || set -- tests/test_port.py tests/test_sockets.py tests/test_files.py \
        tests/test_invariants.py tests/test_workers.py tests/reliability/test_soak.py \
        tests/reliability/test_faults.py tests/reliability/test_bugs.py \
        -m "not known_bug" -k "not no_growth and not interpreter_shutdown"
fi
(($#)) || set -- tests
PYMALLOC=${FASTIOCP_SANITIZE_PYTHONMALLOC:-pymalloc}
((LEAKS)) && PYMALLOC=malloc

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || die "cannot cd to $REPO"
PY=${PYTHON:-python3}
CC=${CC:-gcc}
# A free-threaded CPython (3.13t) has no pymalloc: its objects come from
# mimalloc, which ASan does not see into (the extension's own malloc()s it
# does).
if [[ $PYMALLOC == pymalloc ]] &&
   [[ $("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("Py_GIL_DISABLED") or 0)' 2>/dev/null) == 1 ]]; then
    PYMALLOC=mimalloc
fi
[[ $(uname -s) == Linux ]] || die "the sanitizer build is for Linux"

OUT=${FASTIOCP_SANITIZE_DIR:-$(mktemp -d /tmp/fastiocp-sanitize.XXXXXX)}
mkdir -p "$OUT"
LIB=$OUT/lib
REPORTS=$OUT/reports
rm -rf "$LIB" "$REPORTS"
mkdir -p "$LIB/fastiocp" "$REPORTS"
cleanup() { [[ -n ${FASTIOCP_SANITIZE_KEEP:-} || -n ${FASTIOCP_SANITIZE_DIR:-} ]] || rm -rf "$OUT"; }
SECONDS=0

# --------------------------------------------------------------------- build
LIBASAN=$("$CC" -print-file-name=libasan.so)
[[ $LIBASAN == /* && -e $LIBASAN ]] || die "libasan.so not found by $CC (install gcc's libasan, e.g. Debian libasan8)"
# pyproject.toml's SPDX license fields need setuptools >= 77 (build-system.requires);
# setup.py runs here outside pip's build isolation, so this environment needs it.
if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    log "installing setuptools>=77 into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install -q 'setuptools>=77' || die "setuptools>=77 is missing"
fi
log "building the ASan+UBSan variant in $OUT"
if ! FASTIOCP_SANITIZE=1 "$PY" setup.py -q build_ext --force --build-lib "$LIB" --build-temp "$OUT/tmp" \
        >"$OUT/build.log" 2>&1; then
    cat "$OUT/build.log" >&2
    die "build failed"
fi
# The whole package tree (subpackages such as fastiocp.bench, stubs, package
# data), without the host's build products.
"$PY" - src/fastiocp "$LIB/fastiocp" <<'EOF' || die "copying src/fastiocp failed"
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True, ignore=shutil.ignore_patterns(
    "__pycache__", "*.so", "*.pyd", "*.o", "*.pyc"))
EOF
ls "$LIB"/fastiocp/_fastiocp*.so >/dev/null 2>&1 || die "no extension module was built"
BUILD_SECONDS=$SECONDS

# ----------------------------------------------------------------------- run
if ((LEAKS)); then
    # exitcode=0: CPython's own leaks at exit must not fail every process;
    # the filter below decides. The slow unwinder gives whole stacks through
    # an interpreter built without frame pointers.
    ASAN=detect_leaks=1
    export LSAN_OPTIONS="exitcode=0:fast_unwind_on_malloc=0:malloc_context_size=40:report_objects=0:log_path=$REPORTS/lsan"
else
    ASAN=detect_leaks=0
fi
export ASAN_OPTIONS="$ASAN:allocator_may_return_null=1:halt_on_error=1:abort_on_error=0:strict_init_order=1:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
export LD_PRELOAD=$LIBASAN${LD_PRELOAD:+:$LD_PRELOAD}
export PYTHONMALLOC=$PYMALLOC
export PYTHONPATH=$LIB${PYTHONPATH:+:$PYTHONPATH}
export PYTHONFAULTHANDLER=1

log "pytest -p no:cacheprovider --capture=sys $* (ASan+UBSan$( ((LEAKS)) && echo ' +LSan'), PYTHONMALLOC=$PYMALLOC)"
"$PY" -m pytest -p no:cacheprovider --capture=sys "$@" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
unset LD_PRELOAD
RUN_SECONDS=$((SECONDS - BUILD_SECONDS))

# ------------------------------------------------------------------- reports
shopt -s nullglob
reports=()
for f in "$REPORTS"/asan.* "$REPORTS"/ubsan.*; do
    # Errors only: not the warnings of allocator_may_return_null (a hostile
    # test asks for 2**62 bytes on purpose), and not leak records (with
    # --leaks LSan writes through ASan's log: the filter below judges them).
    grep -qE 'ERROR: AddressSanitizer|runtime error:' "$f" && reports+=("$f")
done
for f in "${reports[@]}"; do
    echo "==== $f" >&2
    head -n 60 "$f" >&2
done
ubsan=$(grep -oE '[^ ]+:[0-9]+:[0-9]+: runtime error: .*' "$OUT/pytest.log" | sort -u)
nubsan=$(grep -c . <<<"$ubsan")
if ((nubsan)); then
    echo "==== UBSan (distinct reports in the output)" >&2
    echo "$ubsan" >&2
fi
echo "sanitizer reports: ASan ${#reports[@]}, UBSan $nubsan (build ${BUILD_SECONDS}s, tests ${RUN_SECONDS}s)" >&2
((nubsan)) && reports+=("ubsan")

leak_status=0
if ((LEAKS)); then
    "$PY" - "$REPORTS" <<'EOF'
import glob, re, sys
# A leak record: "Direct leak of N byte(s) in M object(s) allocated from:"
# followed by stack frames; it is fastiocp's if a frame is in its sources.
records = {"Direct": [], "Indirect": []}
total = {"Direct": 0, "Indirect": 0}
files = sorted(glob.glob(sys.argv[1] + "/lsan.*") + glob.glob(sys.argv[1] + "/asan.*"))
for path in files:
    text = open(path, errors="replace").read()
    for block in re.split(r"\n(?=(?:Direct|Indirect) leak of )", text):
        m = re.match(r"(Direct|Indirect) leak of (\d+) byte", block)
        if not m:
            continue
        total[m.group(1)] += 1
        frames = [line for line in block.splitlines() if re.match(r"\s+#\d+ ", line)]
        if any("csrc/" in f or "_fastiocp" in f for f in frames):
            records[m.group(1)].append((path, block.strip()))
for kind in ("Direct", "Indirect"):
    for path, block in records[kind][:10]:
        print(f"==== {path}\n{block[:3000]}", file=sys.stderr)
print(f"leak records: {total['Direct']} direct, {total['Indirect']} indirect in {len(files)} process logs; "
      f"through fastiocp: {len(records['Direct'])} direct (definite), {len(records['Indirect'])} indirect",
      file=sys.stderr)
sys.exit(1 if records["Direct"] else 0)
EOF
    leak_status=$?
fi

cleanup
if ((status == 0 && ${#reports[@]} > 0)); then
    status=1
fi
if ((status == 0 && leak_status != 0)); then
    status=1
fi
echo "sanitize: exit status $status, total ${SECONDS}s" >&2
exit $status
