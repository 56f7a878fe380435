"""Component-size post-processing of predicted infarct masks, and its choice (NumPy/SciPy).

- :func:`remove_small_components`: drops the 3D connected components (the convention of
  :func:`sean_jax.metrics.label_components`) whose physical volume is below ``min_ml``.
- :func:`confine`: keeps a prediction inside a (brain) mask.
- :func:`choose_min_size`: picks ``min_ml`` on the validation split, as nnU-Net picks
  its post-processing: the simplest threshold that helps and does not hurt. Each
  candidate is scored by the infarct-level F1 (:func:`sean_jax.metrics.detection_counts`
  summed over cases); a candidate is admissible only if the mean Dice over the cases
  with a lesion is at most ``dice_tolerance`` (default 0.005, absolute) below removing
  nothing; the best admissible score wins, ties going to the smaller size. Removing
  nothing (0 ml) is always a candidate, so the choice never makes validation worse.
- :func:`save_postprocessing` / :func:`load_postprocessing`: the choice as
  ``postprocessing.json`` in a work directory (written atomically).

Volumes are in millilitres (1 ml = 1000 mm^3); ``spacing_mm`` is (slice, row, col) mm.
The phantom's acute lesions (3D components of the test split's masks, 5 x 0.9 x 0.9 mm
voxels of 0.004 ml) are 0.012-73 ml, median 4.6 ml: lacunes and fragments 0.01-0.6 ml,
territory infarcts 10-70 ml. So the default candidates are dense below 0.2 ml, where
false-positive specks lie at full resolution, and reach 10 ml, because at a coarse model
grid (the CPU demo's 64 x 64: 3.6 mm pixels, 0.065 ml voxels) a few voxels already make
1-3 ml; the Dice guard is what keeps a threshold from deleting true lesions.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Sequence

import numpy as np

from sean_jax import metrics

__all__ = ["DEFAULT_CANDIDATES_ML", "CRITERIA", "POSTPROCESSING_FILE",
           "component_volumes_ml", "remove_small_components", "confine", "choose_min_size",
           "save_postprocessing", "load_postprocessing"]

DEFAULT_CANDIDATES_ML = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
CRITERIA = ("f1", "dice")  # infarct-level F1 (summed counts) | mean Dice of lesion cases
POSTPROCESSING_FILE = "postprocessing.json"


def _voxel_ml(spacing_mm) -> float:
  sp = np.asarray(spacing_mm, np.float64).reshape(-1)
  if sp.size != 3 or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
    raise ValueError(f"spacing_mm must be 3 positive numbers (slice, row, col), got {spacing_mm}")
  return float(np.prod(sp)) / 1000.0


def component_volumes_ml(mask, spacing_mm, connectivity: int = 26):
  """(labels (S, H, W) int32, volumes (n + 1,) ml with volumes[0] = 0) of a 3D mask."""
  labels, n = metrics.label_components(mask, connectivity)
  counts = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
  counts[0] = 0
  return labels, counts * _voxel_ml(spacing_mm)


def _keep_at_least(labels, volumes_ml, min_ml: float) -> np.ndarray:
  # A component of exactly min_ml stays: the tolerance absorbs float rounding of
  # count * voxel volume.
  keep = volumes_ml >= float(min_ml) * (1.0 - 1e-9)
  keep[0] = False
  return keep[labels].astype(np.uint8)


def remove_small_components(mask, min_ml: float, spacing_mm, connectivity: int = 26) -> np.ndarray:
  """Removes the 3D components of ``mask`` whose volume is below ``min_ml``.

  Args:
    mask: (S, H, W) bool or 0/1 (nonzero = foreground).
    min_ml: smallest volume kept, ml (0 keeps everything).
    spacing_mm: (3,) (slice, row, col) mm.
    connectivity: 6, 18 or 26, as in :func:`sean_jax.metrics.label_components`.

  Returns:
    (S, H, W) uint8 0/1.
  """
  if not (math.isfinite(float(min_ml)) and float(min_ml) >= 0):
    raise ValueError(f"min_ml must be a number >= 0, got {min_ml}")
  labels, volumes = component_volumes_ml(mask, spacing_mm, connectivity)
  return _keep_at_least(labels, volumes, min_ml)


def confine(mask, brain) -> np.ndarray:
  """``mask`` (S, H, W) without the voxels outside ``brain`` (S, H, W): uint8 0/1."""
  mask, brain = np.asarray(mask), np.asarray(brain)
  if mask.shape != brain.shape:
    raise ValueError(f"mask shape {mask.shape} != brain mask shape {brain.shape}")
  return ((mask != 0) & (brain != 0)).astype(np.uint8)


def choose_min_size(cases: Sequence, candidates_ml: Sequence[float] = DEFAULT_CANDIDATES_ML,
                    *, connectivity: int = 26, criterion: str = "f1",
                    dice_tolerance: float = 0.005) -> tuple[float, list[dict]]:
  """Chooses the component-size threshold on validation cases (see the module doc).

  Args:
    cases: sequence of ``(prediction, reference, spacing_mm)``: (S, H, W) binary masks
      and (3,) mm; one entry per validation case.
    candidates_ml: thresholds to try, ml (0 is added if missing).
    connectivity: 6, 18 or 26, for the components removed and for the detection counts.
    criterion: ``"f1"`` (infarct-level F1 of the summed counts) or ``"dice"`` (mean
      Dice over the cases with a lesion) -- the score maximised.
    dice_tolerance: largest admissible drop of the mean Dice over lesion cases below
      removing nothing (absolute, Dice in [0, 1]).

  Returns:
    ``(best_min_ml, table)``: table has one dict per candidate (ascending) with
    ``min_ml``, ``f1``, ``precision``, ``recall``, the summed counts, ``mean_dice``
    (over lesion cases; None when there are none), ``mean_dice_all`` (all cases),
    ``removed`` (components removed over all cases), ``admissible`` and ``chosen``.
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
  if not dice_tolerance >= 0:
    raise ValueError(f"dice_tolerance must be >= 0, got {dice_tolerance}")
  cands = sorted({0.0} | {float(c) for c in candidates_ml})
  if any(not (math.isfinite(c) and c >= 0) for c in cands):
    raise ValueError(f"candidates_ml must be numbers >= 0, got {candidates_ml}")
  if not cases:
    raise ValueError("choose_min_size needs at least one case")
  prepared = []
  for pred, ref, spacing in cases:
    labels, volumes = component_volumes_ml(pred, spacing, connectivity)
    ref = np.asarray(ref) != 0
    if ref.shape != labels.shape:
      raise ValueError(f"prediction shape {labels.shape} != reference shape {ref.shape}")
    prepared.append((labels, volumes, ref))

  table = []
  for c in cands:
    counts, dices, dices_all, removed = metrics.DetectionCounts(), [], [], 0
    for labels, volumes, ref in prepared:
      kept = _keep_at_least(labels, volumes, c)
      removed += int(np.count_nonzero(volumes[1:] < c * (1.0 - 1e-9)))
      counts = counts + metrics.detection_counts(kept, ref, connectivity=connectivity)
      d = metrics.dice(kept, ref)
      dices_all.append(d)
      if ref.any():
        dices.append(d)
    row = {"min_ml": c, **metrics.detection_scores(counts), **counts.as_dict(),
           "mean_dice": float(np.mean(dices)) if dices else None,
           "mean_dice_all": float(np.mean(dices_all)), "removed": removed}
    table.append(row)

  base = table[0]["mean_dice"]  # candidate 0: nothing removed
  best = None
  for row in table:
    row["admissible"] = base is None or row["mean_dice"] >= base - dice_tolerance - 1e-12
    score = row["f1"] if criterion == "f1" else row["mean_dice"]
    row["chosen"] = False
    if score is None:  # criterion "dice" without lesion cases: nothing to gain
      score = 0.0
    # Strictly better only: a tie keeps the smaller (earlier) threshold.
    if row["admissible"] and (best is None or score > best[0] + 1e-12):
      best = (score, row)
  best[1]["chosen"] = True
  return best[1]["min_ml"], table


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def save_postprocessing(workdir, params: dict) -> str:
  """Writes ``params`` as ``workdir/postprocessing.json`` atomically; returns the path.

  ``params`` must hold ``min_ml`` (ml, >= 0); by convention also ``candidates`` (the
  table of :func:`choose_min_size`), ``criterion``, ``dice_tolerance``, ``split`` and
  ``step`` (the checkpoint step the predictions came from).
  """
  _check_params(params, "params")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.fspath(workdir), POSTPROCESSING_FILE)
  fd, tmp = tempfile.mkstemp(prefix=".postprocessing.", suffix=".tmp", dir=os.fspath(workdir))
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(params, f, indent=1, sort_keys=True, default=_json_default)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def _check_params(params, where: str) -> None:
  if not isinstance(params, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(params).__name__}")
  m = params.get("min_ml")
  if isinstance(m, bool) or not isinstance(m, (int, float, np.integer, np.floating)) or not (
      math.isfinite(float(m)) and float(m) >= 0):
    raise ValueError(f"{where}: 'min_ml' must be a number >= 0, got {m!r}")


def load_postprocessing(workdir) -> dict | None:
  """The dict saved by :func:`save_postprocessing`, or None when there is no file.

  Raises ValueError (one line, naming the file) for a file that is not valid JSON or
  lacks a valid ``min_ml``.
  """
  path = os.path.join(os.fspath(workdir), POSTPROCESSING_FILE)
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    params = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  _check_params(params, path)
  return params
