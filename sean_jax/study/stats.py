"""Paired differences between two rows over the same test cases, with bootstrap CIs.

Each row (a variant) has several seeds; each seed scored every test case. A per-case
value is averaged over a row's seeds first (the seeds are the model's randomness, the
cases the data's), then the difference B - A per case is resampled with replacement
over cases (``n_boot`` times) for a percentile 95% interval. For ratios of summed counts
(lesion recall, precision, F1) the cases are resampled and the ratio recomputed. A
difference is called real when its interval excludes 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["per_case", "paired_difference"]


def per_case(runs: list[dict], key: str) -> dict:
  """``{case_id: mean over runs of row[key]}`` from eval.json ``cases`` lists."""
  values: dict = {}
  for run in runs:
    for row in run["cases"]:
      values.setdefault(row["case_id"], []).append(float(row[key]))
  return {k: float(np.mean(v)) for k, v in values.items()}


def _ratio_stat(rows: np.ndarray, stat: str) -> float:
  tp_ref, fn_ref, tp_pred, fp_pred = rows.sum(axis=0)
  recall = tp_ref / (tp_ref + fn_ref) if tp_ref + fn_ref else 1.0
  precision = tp_pred / (tp_pred + fp_pred) if tp_pred + fp_pred else 1.0
  if stat == "recall":
    return recall
  if stat == "precision":
    return precision
  return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _counts(runs: list[dict]) -> dict:
  """{case_id: mean over runs of (tp_ref, fn_ref, tp_pred, fp_pred)}."""
  out: dict = {}
  for run in runs:
    for row in run["cases"]:
      out.setdefault(row["case_id"], []).append(
          [row["tp_ref"], row["fn_ref"], row["tp_pred"], row["fp_pred"]])
  return {k: np.mean(v, axis=0) for k, v in out.items()}


def paired_difference(runs_a: list[dict], runs_b: list[dict], stat: str, *,
                      n_boot: int = 10000, seed: int = 0) -> dict:
  """B - A for ``stat``: a per-case key of eval.json rows (``dice``, ``pred_voxels``,
  ``fp_pred``...: the mean over cases) or ``recall``/``precision``/``f1`` (from summed
  counts). Returns ``{"diff", "ci95": [lo, hi], "cases", "real"}``."""
  rng = np.random.default_rng(seed)
  if stat in ("recall", "precision", "f1"):
    a, b = _counts(runs_a), _counts(runs_b)
    ids = sorted(set(a) & set(b))
    if not ids:
      raise ValueError("the two rows share no test case")
    ca, cb = np.stack([a[i] for i in ids]), np.stack([b[i] for i in ids])
    diff = _ratio_stat(cb, stat) - _ratio_stat(ca, stat)
    boot = np.empty(n_boot)
    for k in range(n_boot):
      pick = rng.integers(0, len(ids), len(ids))
      boot[k] = _ratio_stat(cb[pick], stat) - _ratio_stat(ca[pick], stat)
  else:
    a, b = per_case(runs_a, stat), per_case(runs_b, stat)
    ids = sorted(set(a) & set(b))
    if not ids:
      raise ValueError("the two rows share no test case")
    d = np.array([b[i] - a[i] for i in ids])
    diff = float(d.mean())
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
  lo, hi = np.percentile(boot, [2.5, 97.5])
  return {"diff": float(diff), "ci95": [float(lo), float(hi)], "cases": len(ids),
          "real": bool(lo > 0 or hi < 0)}
