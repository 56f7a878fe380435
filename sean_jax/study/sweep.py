"""Scores at many probability thresholds from one segmentation per case.

For each case the model's probabilities are computed once (with the run's refinement
and brain mask: ``sean_jax.evaluate.segment_case``) and thresholded at every value of
``thresholds``; the component-size filter (``min_size_ml``) follows, as in evaluate.
Per case and threshold: reference lesions found / missed, predicted components that
touch a lesion / do not, predicted ml, and the voxel counts for Dice; for a phantom case
also how many voxels of each distractor (``DISTRACTORS``: hypodensities that are not
acute infarcts, among them the bilateral ones that a comparison with the mirrored side
should not flag) were predicted as lesion.
"""

from __future__ import annotations

import numpy as np

from sean_jax import metrics

__all__ = ["DEFAULT_THRESHOLDS", "DISTRACTORS", "sweep_case", "sweep_cases", "curve",
           "recall_at_fp", "distractor_counts", "distractors_flagged"]

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
DISTRACTORS = ("symmetric_hypodensity", "old_infarct", "calcification")


def sweep_case(probs, ref, brain, spacing_mm, thresholds=DEFAULT_THRESHOLDS,
               min_size_ml: float = 0.0, distractors: dict | None = None) -> list[dict]:
  """One case: a row per threshold (``probs``, ``ref``, ``brain``: (S, H, W);
  ``distractors``: ``{name: (S, H, W) bool}``, counted in ``row["distractors"]`` as
  ``{name: {"voxels", "flagged"}}``)."""
  from sean_jax.clinical import postprocess  # pylint: disable=g-import-not-at-top
  probs = np.asarray(probs, np.float32)
  ref = np.asarray(ref) != 0
  voxel_ml = float(np.prod(np.asarray(spacing_mm, np.float64))) / 1000.0
  # Each distractor's voxels are counted once, not at every threshold.
  counted = None if distractors is None else {
      name: (np.asarray(where, bool), int(np.count_nonzero(where)))
      for name, where in distractors.items()}
  rows = []
  for t in thresholds:
    pred = probs > t
    if brain is not None:
      pred &= np.asarray(brain) != 0
    if min_size_ml > 0:
      pred = postprocess.remove_small_components(pred, min_size_ml, spacing_mm) != 0
    counts = metrics.detection_counts(pred, ref)
    rows.append({"threshold": float(t), **counts.as_dict(),
                 "pred_ml": float(np.count_nonzero(pred)) * voxel_ml,
                 "fp_ml": float(np.count_nonzero(pred & ~ref)) * voxel_ml,
                 "intersection": int(np.count_nonzero(pred & ref)),
                 "pred_voxels": int(np.count_nonzero(pred)),
                 "ref_voxels": int(np.count_nonzero(ref)),
                 "dice": metrics.dice(pred, ref)})
    if counted is not None:
      rows[-1]["distractors"] = {
          name: {"voxels": voxels, "flagged": int(np.count_nonzero(pred & where))}
          for name, (where, voxels) in counted.items()}
  return rows


def sweep_cases(model, cases, *, thresholds=DEFAULT_THRESHOLDS, refine: bool = True,
                brain_mask: bool = True, min_size_ml: float = 0.0) -> list[dict]:
  """Every case of a source: ``[{"case_id", "has_lesion", "rows": sweep_case(...)}]``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sean_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sean_jax.data.phantom import LABELS  # pylint: disable=g-import-not-at-top
  model = nnx.clone(model)
  model.eval()
  out = []
  for i in range(len(cases)):
    case = cases[i]
    _, probs, _, _ = evaluate.segment_case(model, case, threshold=0.0, refine=refine,
                                           brain_mask=False)
    brain = case.get("brain") if brain_mask else None
    ref = np.asarray(case["mask"]) != 0
    distractors = None
    if "tissue_labels" in case:
      distractors = {name: np.asarray(case["tissue_labels"]) == LABELS[name]
                     for name in DISTRACTORS}
    out.append({"case_id": case["case_id"], "has_lesion": bool(ref.any()),
                "rows": sweep_case(probs, ref, brain, case["spacing_mm"], thresholds,
                                   min_size_ml, distractors)})
  return out


def distractor_counts(cases: list[dict], name: str, threshold: float = 0.5) -> list:
  """``[(case_id, {"voxels", "flagged"})]`` of the cases that have distractor ``name``,
  at ``threshold``."""
  out = []
  for case in cases:
    row = next(r for r in case["rows"] if r["threshold"] == threshold)
    counts = row.get("distractors", {}).get(name, {"voxels": 0})
    if counts["voxels"]:
      out.append((case["case_id"], counts))
  return out


def distractors_flagged(cases: list[dict], threshold: float = 0.5) -> dict:
  """Per distractor over the cases that have one, at ``threshold``: ``{name: {"cases",
  "cases_flagged" (any voxel predicted), "voxel_share" (predicted / all, pooled)}}``."""
  out = {}
  for name in DISTRACTORS:
    rows = [counts for _, counts in distractor_counts(cases, name, threshold)]
    out[name] = {"cases": len(rows),
                 "cases_flagged": sum(r["flagged"] > 0 for r in rows),
                 "voxel_share": (metrics.safe_ratio(sum(r["flagged"] for r in rows),
                                                    sum(r["voxels"] for r in rows))
                                 if rows else None)}
  return out


def curve(cases: list[dict]) -> list[dict]:
  """Per threshold over a set of cases: lesion recall, false-positive components per
  case, false-positive ml per lesion-free case, precision, case-mean Dice."""
  out = []
  for k in range(len(cases[0]["rows"])):
    rows = [c["rows"][k] for c in cases]
    free = [c["rows"][k] for c in cases if not c["has_lesion"]]
    found = sum(r["tp_ref"] for r in rows)
    lesions = found + sum(r["fn_ref"] for r in rows)
    tp_pred = sum(r["tp_pred"] for r in rows)
    fp = sum(r["fp_pred"] for r in rows)
    out.append({"threshold": rows[0]["threshold"],
                "recall": metrics.safe_ratio(found, lesions),
                "precision": metrics.safe_ratio(tp_pred, tp_pred + fp),
                "fp_per_case": fp / len(rows),
                "fp_ml_per_case": float(np.mean([r["fp_ml"] for r in rows])),
                "fp_ml_lesion_free": (float(np.mean([r["pred_ml"] for r in free]))
                                      if free else None),
                "dice": float(np.mean([r["dice"] for r in rows]))})
  return out


def recall_at_fp(points: list[dict], fp_per_case: float) -> float | None:
  """Lesion recall at ``fp_per_case`` false-positive components per case, linearly
  interpolated along the curve (None when the curve never has that few or that many)."""
  pts = sorted((p["fp_per_case"], p["recall"]) for p in points)
  xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
  if fp_per_case < xs.min() or fp_per_case > xs.max():
    return None
  # Several thresholds can share an FP count: keep the best recall at each.
  ux = np.unique(xs)
  uy = np.array([ys[xs == x].max() for x in ux])
  return float(np.interp(fp_per_case, ux, uy))
