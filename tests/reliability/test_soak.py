"""The soak test's short form (issue 6, item 2): tools/soak.py in a fresh
interpreter, per backend, with a small operation count. The long form is
`python3 tools/soak.py --ops 1000000` (docs/RELIABILITY.md).

Size: FASTIOCP_SOAK_OPS (default 40,000 per backend; 6,000 under Wine).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from relutil import TOOLS, child_env, env_int

pytestmark = pytest.mark.reliability

OPS = env_int("FASTIOCP_SOAK_OPS", 40_000, wine=6_000)
SOAK = os.path.join(TOOLS, "soak.py")


@pytest.mark.skipif(not os.path.exists(SOAK), reason="tools/soak.py is not in this checkout")
def test_soak_short_form(backend):
    """Mixed operations of every kind: every one completes exactly once with
    the right data; after the warm-up, descriptors do not grow at all and
    Python blocks, C heap and RSS stay within the tool's bounds."""
    try:
        r = subprocess.run([sys.executable, SOAK, "--ops", str(OPS), "--backend", backend, "--json"],
                           capture_output=True, text=True, timeout=max(120, OPS / 200), env=child_env())
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"soak hung\n{exc.stdout}\n{exc.stderr}")
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    res = json.loads(lines[-1])
    assert res["problems"] == [], res["problems"]
    assert r.returncode == 0, r.stderr
    assert res["ops"] >= OPS and res["pending_at_end"] == 0
    first, last = res["samples"][0], res["samples"][-1]
    assert last["fds"] == first["fds"]
    assert len(res["samples"]) >= 5
    print(f"\nsoak {backend}: {res['ops']} ops in {res['seconds']:.1f}s; after warm-up RSS "
          f"{(last['rss'] - first['rss']) / 1024:+.0f} KiB, Python blocks {last['blocks'] - first['blocks']:+d}")
