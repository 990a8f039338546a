"""Benchmarks reuse the test suite's per-backend fixtures (tests/conftest.py)."""
from __future__ import annotations

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "_fastiocp_test_fixtures", pathlib.Path(__file__).resolve().parent.parent / "tests" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

backend = _fixtures.backend
port = _fixtures.port
