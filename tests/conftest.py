"""Shared pytest setup. Kept small: tests configure JAX themselves where they need to."""

from __future__ import annotations


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
