"""Shared pytest setup. Kept small: tests configure JAX themselves where they need to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


# Test files collected first. test_train.py starts the suite's longest subprocesses,
# and four of its tests share one reference run (made once per session, under a lock):
# first in the collection, the whole file lands in one pytest-xdist worker's first
# batch, so no worker waits on the other's reference run, and the long runs start
# early instead of among the last, small batches.
RUN_FIRST = ("test_train.py",)


def pytest_collection_modifyitems(items):
  """Moves the tests of RUN_FIRST to the front, in their own order."""
  first = lambda item: Path(str(item.fspath)).name in RUN_FIRST
  items[:] = [i for i in items if first(i)] + [i for i in items if not first(i)]


@pytest.fixture(scope="session")
def shared_tmp_path(tmp_path_factory) -> Path:
  """A temporary directory shared by the xdist workers of this session (each worker has
  its own base temp, under a common parent); the base temp itself without xdist."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def jax_cache_env(shared_tmp_path) -> dict:
  """Environment for subprocesses that run JAX: one persistent compilation cache per
  test session, shared by the workers, holding every program (not only those that
  took over a second to compile). The cache key is a hash of the program, the XLA
  flags, the devices and the jax version, and a hit loads the executable the first
  compilation produced, so a run computes exactly what it would have computed
  compiling anew; tiny training runs spend about two thirds of their time compiling."""
  cache = shared_tmp_path / "jax_compilation_cache"
  cache.mkdir(exist_ok=True)
  return {"JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def pytest_terminal_summary(terminalreporter):
  """Prints the errors that tests recorded with ``record_property("parity", ...)``
  (a list of (quantity, measured, tolerance)): one line per test, its worst entry per
  kind of error."""
  rows = []
  for outcome in ("passed", "failed"):
    for report in terminalreporter.stats.get(outcome, []):
      if report.when != "call":
        continue
      for key, value in report.user_properties:
        if key == "parity" and value:
          worst = {}
          for quantity, measured, tol in value:
            kind = quantity.split(":")[0]
            if kind not in worst or measured / tol > worst[kind][1] / worst[kind][2]:
              worst[kind] = (quantity, measured, tol)
          for quantity, measured, tol in worst.values():
            rows.append((report.nodeid.split("::")[-1], quantity, measured, tol, outcome))
  if not rows:
    return
  tr = terminalreporter
  tr.write_sep("-", "JAX vs PyTorch parity: worst measured error per test and kind")
  width = max(len(r[0]) for r in rows)
  qwidth = max(len(r[1]) for r in rows)
  for test, quantity, measured, tol, outcome in rows:
    flag = "" if outcome == "passed" else "  FAILED"
    tr.write_line(f"{test:<{width}}  {quantity:<{qwidth}}  {measured:9.2e}  "
                  f"(tol {tol:.0e}){flag}")
