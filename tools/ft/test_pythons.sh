#!/usr/bin/env bash
# Run the test suite on other CPythons, each in a fresh venv, from a copy of
# the tree (so no build product lands in the clone).
#
#   tools/ft/test_pythons.sh [VERSION...]     default: 3.10 3.12 3.13 3.13t
#
# VERSION is a minor version found under pyenv (3.10 means the newest
# $(pyenv root)/versions/3.10.*, or python3.10 on PATH), or 3.13t: the
# free-threaded CPython that tools/build_313t.sh builds once into its cache
# (about 3.5 minutes the first time on 2 cores, then reused).
#
# Each version: a venv, `pip install '.[test]'`, `python -m fastiocp info`,
# then `python -m pytest -q -p no:cacheprovider tests [-m MARK]`. A failing
# version does not stop the others; the exit status is 1 if any failed, and
# a summary with each version's time is printed at the end.
#
# Environment:
#   FASTIOCP_PYTHONS_MARK      pytest -m expression for the GIL builds (default:
#                              none, the whole suite; e.g. "not reliability")
#   FASTIOCP_313T_MARK         the same for 3.13t (default: none, the whole suite)
#   FASTIOCP_PYTHONS_WORK      where the venvs and the tree copy go (default: a
#                              new directory under ${TMPDIR:-/tmp}, removed at the end)
#   FASTIOCP_CI_REQUIRE_NOGIL  1: on 3.13t, require free threading: a plain
#                              `import fastiocp` (PYTHON_GIL unset, its
#                              RuntimeWarning an error) must leave
#                              sys._is_gil_enabled() False, and the suite runs
#                              with PYTHON_GIL=0 and must end with the GIL still
#                              off. Turn it on once the extension declares
#                              Py_MOD_GIL_NOT_USED.
#   FASTIOCP_313T_PYTHON_GIL   without the switch above: PYTHON_GIL for the 3.13t
#                              suite (default unset: the interpreter turns the GIL
#                              back on when it imports an extension that has not
#                              declared Py_MOD_GIL_NOT_USED, with a RuntimeWarning;
#                              0 forces free threading whatever the extension says)
# Test dependencies on 3.13t: hypothesis<6.140 (pure Python; newer ones need a
# Rust build that cannot fetch its crates here) is installed before '.[test]'.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.10 3.12 3.13 3.13t)
MARK=${FASTIOCP_PYTHONS_MARK:-}
MARK_313T=${FASTIOCP_313T_MARK:-}
REQUIRE_NOGIL=${FASTIOCP_CI_REQUIRE_NOGIL:-0}

say() { echo "== other CPythons: $*"; }

# The interpreter of a GIL build: newest pyenv versions/X.Y.*, else pythonX.Y.
find_python() {
    local v=$1 root cand
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    cand=$(ls -d "$root"/versions/"$v".[0-9]* 2>/dev/null | grep -E "/$v\.[0-9]+$" |
           sort -V | tail -n1)
    if [ -n "$cand" ] && [ -x "$cand/bin/python$v" ]; then echo "$cand/bin/python$v"; return 0; fi
    command -v "python$v" 2>/dev/null
}

WORK=${FASTIOCP_PYTHONS_WORK:-}
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastiocp-pythons.XXXXXX") || exit 1
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
# The tree as git sees it (tracked files and untracked ones not ignored, with
# their working-tree contents): no build/, *.so or caches of the clone.
SRC=$WORK/src
rm -rf "$SRC"; mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
        (cd "$ROOT" && xargs -0 tar -cf - --ignore-failed-read 2>/dev/null) | tar -xf - -C "$SRC"
else
    tar -C "$ROOT" --exclude=build --exclude='*.so' --exclude=__pycache__ -cf - . | tar -xf - -C "$SRC"
fi
[ -f "$SRC/pyproject.toml" ] || { echo "cannot copy the tree to $SRC" >&2; exit 1; }

RESULTS=()
FAILED=0
record() {  # version, status, seconds, detail
    RESULTS+=("$(printf '%-6s %-5s %4ss  %s' "$1" "$2" "$3" "$4")")
    [ "$2" = ok ] || FAILED=1
}

# pytest's closing line (counts) from a log, for the summary.
closing_line() { grep -E '(passed|failed|error|no tests ran)' "$1" | tail -n1 | tr -d '=' | sed 's/^ *//; s/ *$//'; }

run_one() {
    local v=$1 py venv log t0 mark gil_env=() pyargs=()
    t0=$SECONDS
    if [ "$v" = 3.13t ]; then
        say "$v: the free-threaded build (tools/build_313t.sh)"
        py=$("$ROOT/tools/build_313t.sh" | tail -n1) && [ -x "$py" ] ||
            { record "$v" FAIL $((SECONDS - t0)) "tools/build_313t.sh failed"; return; }
        say "$v: interpreter ready after $((SECONDS - t0)) s: $py"
        mark=$MARK_313T
    else
        py=$(find_python "$v") ||
            { record "$v" FAIL 0 "no python$v under $(pyenv root 2>/dev/null || echo ~/.pyenv)/versions nor on PATH"; return; }
        mark=$MARK
    fi
    venv=$WORK/venv-$v
    log=$WORK/pytest-$v.log
    say "$v: fresh venv ($("$py" -c 'import sys; print(sys.version.split()[0])'), $py)"
    rm -rf "$venv"
    "$py" -m venv "$venv" || { record "$v" FAIL $((SECONDS - t0)) "venv failed"; return; }
    local vpy=$venv/bin/python
    "$vpy" -m pip install -q --upgrade pip || { record "$v" FAIL $((SECONDS - t0)) "pip upgrade failed"; return; }
    if [ "$v" = 3.13t ]; then
        "$vpy" -m pip install -q 'hypothesis<6.140' ||
            { record "$v" FAIL $((SECONDS - t0)) "pip install hypothesis<6.140 failed"; return; }
    fi
    (cd "$SRC" && "$vpy" -m pip install -q '.[test]') ||
        { record "$v" FAIL $((SECONDS - t0)) "pip install .[test] failed"; return; }
    rm -rf "$SRC/build" "$SRC"/src/*.egg-info
    "$vpy" -m fastiocp info || { record "$v" FAIL $((SECONDS - t0)) "python -m fastiocp info failed"; return; }

    local detail=
    if [ "$v" = 3.13t ]; then
        local state
        state=$(cd "$WORK" && env -u PYTHON_GIL "$vpy" -W ignore::RuntimeWarning -c \
            'import sys, fastiocp; print("off" if not sys._is_gil_enabled() else "on")')
        say "$v: after a plain 'import fastiocp' (PYTHON_GIL unset) the GIL is $state"
        detail="GIL after import: $state;"
        if [ "$REQUIRE_NOGIL" = 1 ]; then
            (cd "$WORK" && env -u PYTHON_GIL "$vpy" -W error::RuntimeWarning -c '
import sys
import fastiocp
assert not sys._is_gil_enabled(), "importing fastiocp turned the GIL back on"
print("GIL off after import: ok")') ||
                { record "$v" FAIL $((SECONDS - t0)) "FASTIOCP_CI_REQUIRE_NOGIL=1: importing fastiocp turned the GIL on"; return; }
            gil_env=(PYTHON_GIL=0)
        elif [ -n "${FASTIOCP_313T_PYTHON_GIL:-}" ]; then
            gil_env=(PYTHON_GIL="$FASTIOCP_313T_PYTHON_GIL")
        fi
        detail="$detail suite run with ${gil_env[*]:-PYTHON_GIL unset};"
    fi

    pyargs=(-q -p no:cacheprovider tests)
    [ -n "$mark" ] && pyargs+=(-m "$mark")
    say "$v: python -m pytest ${pyargs[*]} ${gil_env[*]}"
    local ts=$SECONDS rc runner=(-m pytest)
    if [ "$v" = 3.13t ] && [ "$REQUIRE_NOGIL" = 1 ]; then
        # pytest in-process, then: is the GIL still off at the end of the run?
        runner=(-c '
import sys
import pytest
rc = int(pytest.main(sys.argv[1:]))
if sys._is_gil_enabled():
    print("FASTIOCP_CI_REQUIRE_NOGIL=1: the GIL was on at the end of the run", file=sys.stderr)
    rc = rc or 1
sys.exit(rc)')
    fi
    (cd "$SRC" && env -u PYTHON_GIL "${gil_env[@]}" "$vpy" "${runner[@]}" "${pyargs[@]}") 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    detail="$detail pytest $((SECONDS - ts)) s: $(closing_line "$log")"
    if [ "$rc" = 0 ]; then record "$v" ok $((SECONDS - t0)) "$detail"
    else record "$v" FAIL $((SECONDS - t0)) "$detail (exit $rc)"; fi
}

for v in "${VERSIONS[@]}"; do
    run_one "$v"
done

say "summary (version, result, total time incl. venv/install/build, detail)"
printf '  %s\n' "${RESULTS[@]}"
exit $FAILED
