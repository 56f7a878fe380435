"""Evaluates a trained model on a test set, as in the paper's Table 1 (DESIGN.md §7).

    python -m sean_jax.evaluate --workdir DIR [--split test|validation]
        [--checkpoint latest|best] [--data DIR_OF_NIFTI] [--config FILE.py[:ARG]]
        [--threshold 0.5] [--connectivity 26] [--overlap any|fraction|iou]
        [--min-overlap 0.5] [--max-cases N] [--output FILE.json]
        [--[no-]refine] [--[no-]brain-mask] [--min-size-ml ML] [--choose-postprocessing]
        [--aspects-atlas DIR [--aspects-age 50_69] [--aspects-fraction 0.15]]

The model and its config come from the workdir (``checkpointing.load_model``). The cases
come from the run's config: the phantom's test (or validation) cases, or the AISD TFDS
split; ``--data`` evaluates a folder of ``<id>_ct.nii.gz`` + ``<id>_mask.nii.gz`` (+
``<id>.json`` pose) instead, as ``python -m sean_jax.phantom`` writes them. ``--config``
replaces the run's data settings (the model settings must be the checkpoint's).

Every case goes through the pipeline's preprocessing (HU fixes, window, z-score,
in-plane resize to ``config.data.image_size``), ``segment_volume`` (alignment with the
brain slices of ``preprocess.brain_slice_weights``, then the symmetry refinement of the
pose unless ``--no-refine``), ``probability > threshold``, and the postprocessing that
predict applies too: kept inside the brain mask (``--no-brain-mask`` to skip) and
components below the workdir's ``postprocessing.json`` size removed (``--min-size-ml``
overrides it; ``--choose-postprocessing`` chooses it on the validation split first).
Metrics are computed on that model grid (see ``sean_jax.metrics`` and
docs/evaluation.md).

``--aspects-atlas DIR`` (phantom splits only): ASPECTS from the mapped atlas regions
and the prediction against the phantom's true regions (``sean_jax.data.phantom_aspects``):
Pearson r, MAE, region sensitivity and specificity (docs/aspects.md).

Results go to ``DIR/eval.json`` (test split), ``DIR/eval_validation.json`` or
``DIR/eval_<data folder name>.json``, written atomically, unless ``--output`` says
otherwise; a table in the paper's format is printed. Errors (missing workdir or
checkpoint, corrupt config, missing data): one line on stderr naming the path, exit 1;
bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import contextlib
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sean_jax import metrics

__all__ = ["evaluate_cases", "summarize", "format_table", "load_eval", "main"]

SPLITS = ("test", "validation")


# --------------------------------------------------------------------- evaluation


def _cases_of(cases):
  """Iterates a case source (``len`` + ``[]``) or any iterable of case dicts."""
  if hasattr(cases, "__len__") and hasattr(cases, "__getitem__") and not isinstance(
      cases, (list, tuple, dict)):
    return (cases[i] for i in range(len(cases)))
  return iter(cases)


def _finite_pose(pose):
  if pose is None:
    return None
  pose = np.asarray(pose, np.float64).reshape(-1)
  return pose if pose.shape == (3,) and np.all(np.isfinite(pose)) else None


def segment_case(model, case: dict, *, threshold: float = 0.5, refine: bool = False,
                 brain_mask: bool = False, batch_size: int = 8):
  """Segments one pipeline case: (prediction (S, H, W) bool, probabilities (S, H, W)
  float32, alpha (3,), seconds).

  ``refine``: symmetry refinement of the pose after the alignment net
  (``sean_jax.models.refine``); ``brain_mask``: the prediction is kept inside the case's
  ``"brain"`` (``sources.case_source(..., brain_mask=True)``), when it has one.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sean_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sean_jax.models.sean import segment_volume  # pylint: disable=g-import-not-at-top

  case_id = str(case.get("case_id", "?"))
  image = np.asarray(case["image"], np.float32)
  if image.ndim != 3 or np.shape(case["mask"]) != image.shape:
    raise ValueError(f"case {case_id}: image {image.shape} / mask "
                     f"{np.shape(case['mask'])} must be equal (S, H, W) shapes")
  start = time.perf_counter()
  weights = preprocess.brain_slice_weights(image)
  probs, alpha = segment_volume(model, jnp.asarray(image), jnp.asarray(weights),
                                batch_size=batch_size, refine=refine)
  probs = np.asarray(probs, np.float32)
  alpha = np.asarray(alpha, np.float64)
  seconds = time.perf_counter() - start
  pred = probs > threshold
  if brain_mask and case.get("brain") is not None:
    pred &= np.asarray(case["brain"]) != 0
  return pred, probs, alpha, seconds


def _case_spacing(case: dict) -> np.ndarray:
  spacing = np.asarray(case.get("spacing_mm", [np.nan] * 3), np.float64).reshape(-1)
  if spacing.shape != (3,) or not np.all(np.isfinite(spacing)):
    raise ValueError(f"case {case.get('case_id', '?')}: voxel spacing unknown "
                     f"({spacing.tolist()}); a component size in ml needs it")
  return spacing


def evaluate_case(model, case: dict, *, threshold: float = 0.5, connectivity: int = 26,
                  overlap: str = "any", min_overlap: float = 0.5,
                  batch_size: int = 8, refine: bool = False, brain_mask: bool = False,
                  min_size_ml: float = 0.0, segmented: list | None = None,
                  atlas=None) -> tuple[dict, np.ndarray, np.ndarray]:
  """One case: (row of metrics, probabilities (S, H, W), alpha (3,)).

  ``case`` is a pipeline case dict (``image`` preprocessed (S, H, W), ``mask`` 0/1,
  optional ``pose`` alpha or NaN, ``spacing_mm``, ``brain``). ``model`` must be in eval
  mode. The prediction is postprocessed as predict does it: ``refine`` and
  ``brain_mask`` as in :func:`segment_case`, then components smaller than
  ``min_size_ml`` are removed (``sean_jax.clinical.postprocess``). ``segmented``: a
  list that receives (prediction before the size filter, reference, spacing_mm), for
  :func:`postprocessing_from` without segmenting again.
  """
  from sean_jax.clinical import postprocess  # pylint: disable=g-import-not-at-top

  case_id = str(case.get("case_id", "?"))
  pred, probs, alpha, seconds = segment_case(model, case, threshold=threshold,
                                             refine=refine, brain_mask=brain_mask,
                                             batch_size=batch_size)
  image = np.asarray(case["image"])
  ref = np.asarray(case["mask"]) != 0
  if segmented is not None:
    segmented.append((pred, ref, _case_spacing(case)))
  if min_size_ml > 0:
    pred = postprocess.remove_small_components(pred, min_size_ml, _case_spacing(case),
                                               connectivity=connectivity) != 0
  counts = metrics.detection_counts(pred, ref, connectivity=connectivity,
                                    overlap=overlap, min_overlap=min_overlap)
  inter = int(np.count_nonzero(pred & ref))
  row = {"case_id": case_id, "dice": metrics.dice(pred, ref),
         "has_lesion": bool(ref.any()), "ref_voxels": int(ref.sum()),
         "pred_voxels": int(pred.sum()), "intersection": inter, **counts.as_dict(),
         "seconds": seconds, "alpha": [float(a) for a in alpha],
         "rot_err_deg": None, "shift_err_px": None, "shift_err_mm": None}
  if atlas is not None and case.get("aspects_regions") is not None \
      and case.get("brain") is not None:
    from sean_jax.clinical import aspects  # pylint: disable=g-import-not-at-top
    from sean_jax.data import phantom_aspects  # pylint: disable=g-import-not-at-top
    regions, info = aspects.regions_of_scan(image, np.asarray(case["brain"]) != 0, alpha,
                                            _case_spacing(case), atlas)
    row["aspects"] = aspects.case_row(regions, pred, case["aspects_regions"], ref,
                                      phantom_aspects.TRUTH_FRACTION)
    row["aspects"]["levels"] = [info["ganglionic_slice"], info["supraganglionic_slice"]]
  true_alpha = _finite_pose(case.get("pose"))
  if true_alpha is not None and model.aligner is not None:
    height, width = image.shape[1:]
    rot, shift = metrics.alignment_error(alpha, true_alpha, height, width)
    row.update(rot_err_deg=rot, shift_err_px=shift)
    spacing = np.asarray(case.get("spacing_mm", [np.nan] * 3), np.float64).reshape(-1)
    if spacing.shape == (3,) and np.isfinite(spacing[2]):
      row["shift_err_mm"] = shift * float(spacing[2])
  return row, probs, alpha


def evaluate_cases(model, cases, *, threshold: float = 0.5, connectivity: int = 26,
                   overlap: str = "any", min_overlap: float = 0.5, batch_size: int = 8,
                   max_cases: int | None = None, progress=None, refine: bool = False,
                   brain_mask: bool = False, min_size_ml: float = 0.0,
                   segmented: list | None = None, atlas=None,
                   aspects_fraction: float | None = None) -> dict:
  """Segments every case and scores it; returns aggregates plus per-case ``"cases"``.

  Args:
    model: a ``Sean``. Evaluated on a copy in eval mode (the caller's mode is kept).
    cases: a case source (``len`` and ``[i]``) or an iterable of pipeline case dicts.
    threshold: a voxel is lesion where its probability is ``> threshold``.
    connectivity, overlap, min_overlap: infarct-level rules (``sean_jax.metrics``).
    batch_size: slabs per forward pass.
    max_cases: stop after this many cases.
    progress: optional ``progress(row)`` called after each case.
    refine, brain_mask, min_size_ml, segmented: the postprocessing
      (:func:`evaluate_case`).
    atlas, aspects_fraction: ASPECTS against the cases' true regions
      (:func:`evaluate_case`), summarised with ``aspects.summarize`` at that
      involvement fraction (default ``aspects.DEFAULT_FRACTION``).

  Returns:
    :func:`summarize` of the rows, with ``"cases"`` (the rows) added.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  metrics.detection_counts(np.zeros((1, 1, 1), bool), np.zeros((1, 1, 1), bool),
                           connectivity=connectivity, overlap=overlap,
                           min_overlap=min_overlap)  # validates the options early
  model = nnx.clone(model)
  model.eval()
  rows = []
  for case in _cases_of(cases):
    if max_cases is not None and len(rows) >= max_cases:
      break
    row, _, _ = evaluate_case(model, case, threshold=threshold,
                              connectivity=connectivity, overlap=overlap,
                              min_overlap=min_overlap, batch_size=batch_size,
                              refine=refine, brain_mask=brain_mask,
                              min_size_ml=min_size_ml, segmented=segmented,
                              atlas=atlas)
    rows.append(row)
    if progress is not None:
      progress(row)
  result = summarize(rows)
  result.update(threshold=float(threshold), connectivity=int(connectivity),
                overlap=overlap, min_overlap=float(min_overlap) if overlap != "any"
                else None, refine=bool(refine), brain_mask=bool(brain_mask),
                min_size_ml=float(min_size_ml))
  aspects_rows = [r["aspects"] for r in rows if "aspects" in r]
  if aspects_rows:
    from sean_jax.clinical import aspects  # pylint: disable=g-import-not-at-top
    result.update(aspects.summarize(aspects_rows, aspects.DEFAULT_FRACTION
                                    if aspects_fraction is None else aspects_fraction))
  result["cases"] = rows
  return result


def choose_postprocessing(model, cases, *, threshold: float = 0.5,
                          connectivity: int = 26, batch_size: int = 8,
                          refine: bool = False, brain_mask: bool = False) -> dict:
  """The smallest component size to keep, chosen on ``cases`` (the validation split)
  with ``sean_jax.clinical.postprocess.choose_min_size``, as nnU-Net chooses its
  postprocessing; returns what ``postprocess.save_postprocessing`` stores."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.clone(model)
  model.eval()
  segmented = []
  for case in _cases_of(cases):
    pred, _, _, _ = segment_case(model, case, threshold=threshold, refine=refine,
                                 brain_mask=brain_mask, batch_size=batch_size)
    segmented.append((pred, np.asarray(case["mask"]) != 0, _case_spacing(case)))
  return postprocessing_from(segmented, threshold=threshold, connectivity=connectivity,
                             refine=refine, brain_mask=brain_mask)


def postprocessing_from(segmented: list, *, threshold: float = 0.5,
                        connectivity: int = 26, refine: bool = False,
                        brain_mask: bool = False) -> dict:
  """:func:`choose_postprocessing` from validation cases already segmented with those
  settings: ``segmented`` holds (prediction, reference, spacing_mm) per case."""
  from sean_jax.clinical import postprocess  # pylint: disable=g-import-not-at-top
  if not segmented:
    raise ValueError("no cases to choose the postprocessing on")
  best, table = postprocess.choose_min_size(segmented, connectivity=connectivity)
  return {"min_ml": float(best), "candidates": table, "threshold": float(threshold),
          "connectivity": int(connectivity), "refine": bool(refine),
          "brain_mask": bool(brain_mask), "num_cases": len(segmented)}


def postprocess_settings(workdir, config, *, refine=None, brain_mask=None,
                         min_size_ml=None) -> dict:
  """What evaluate and predict do after the model, from the run's config and the
  workdir's ``postprocessing.json`` unless given: ``{"refine", "brain_mask",
  "min_size_ml", "min_size_from"}``. Raises ``CliError`` for a corrupt file."""
  from sean_jax.clinical import postprocess  # pylint: disable=g-import-not-at-top
  align = config.get("align") or {}
  post = config.get("postprocess") or {}
  settings = {"refine": bool(align.get("refine", True)) if refine is None else refine,
              "brain_mask": bool(post.get("brain_mask", True)) if brain_mask is None
              else brain_mask}
  if min_size_ml is not None:
    settings.update(min_size_ml=float(min_size_ml), min_size_from="--min-size-ml")
    return settings
  try:
    chosen = postprocess.load_postprocessing(workdir)
  except ValueError as e:
    raise CliError(_one_line(e)) from None
  if chosen is None:
    settings.update(min_size_ml=0.0, min_size_from="none chosen (no postprocessing.json)")
  else:
    settings.update(min_size_ml=float(chosen["min_ml"]),
                    min_size_from=f"postprocessing.json (validation split, step "
                                  f"{chosen.get('step', '?')})")
  return settings


def _mean(values):
  values = [float(v) for v in values if v is not None]
  return float(np.mean(values)) if values else None


def summarize(rows: list[dict]) -> dict:
  """Aggregates per-case rows (e.g. gathered from several hosts).

  ``dice_case_mean``: mean of the per-case Dice over all cases (the paper's Dice);
  ``dice_case_mean_lesion_cases``: the same over cases with a reference lesion (None if
  none); ``dice_global``: Dice of all voxels pooled; ``lesion_precision/recall/f1``: from
  the summed infarct-level counts; ``rot_err_deg``, ``shift_err_px``, ``shift_err_mm``:
  means over cases with a known pose (None when no case has one, or the model does not
  align); ``seconds_per_case``: median wall time of ``segment_volume`` per case (the
  first case includes compilation).
  """
  if not rows:
    raise ValueError("no cases to evaluate")
  counts = sum((metrics.DetectionCounts(r["tp_ref"], r["fn_ref"], r["tp_pred"],
                                        r["fp_pred"]) for r in rows),
               metrics.DetectionCounts())
  scores = metrics.detection_scores(counts)
  gd = metrics.GlobalDice(sum(r["intersection"] for r in rows),
                          sum(r["ref_voxels"] + r["pred_voxels"] for r in rows))
  lesion_rows = [r for r in rows if r["has_lesion"]]
  posed = [r for r in rows if r.get("rot_err_deg") is not None]
  return {
      "num_cases": len(rows),
      "num_lesion_cases": len(lesion_rows),
      "dice_case_mean": _mean(r["dice"] for r in rows),
      "dice_case_std": float(np.std([r["dice"] for r in rows])),
      "dice_case_mean_lesion_cases": _mean(r["dice"] for r in lesion_rows),
      "dice_global": gd.value(),
      "lesion_precision": scores["precision"],
      "lesion_recall": scores["recall"],
      "lesion_f1": scores["f1"],
      **{k: int(v) for k, v in counts.as_dict().items()},
      "num_posed_cases": len(posed),
      "rot_err_deg": _mean(r["rot_err_deg"] for r in posed),
      "shift_err_px": _mean(r["shift_err_px"] for r in posed),
      "shift_err_mm": _mean(r.get("shift_err_mm") for r in posed),
      "seconds_per_case": float(np.median([r["seconds"] for r in rows])),
  }


# ------------------------------------------------------------------------ output


def _fmt(value, digits=4):
  return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
      else f"{value:.{digits}f}"


def format_table(result: dict, name: str | None = None) -> str:
  """The paper's Table 1 columns (Dice, F1, Recall, Precision) and the alignment error."""
  name = name or result.get("variant") or "model"
  m = result.get("metrics", result)
  lines = ["| Method | Dice | F1 | Recall | Precision |",
           "| --- | --- | --- | --- | --- |",
           f"| {name} | {_fmt(m['dice_case_mean'])} | {_fmt(m['lesion_f1'])} | "
           f"{_fmt(m['lesion_recall'])} | {_fmt(m['lesion_precision'])} |", ""]
  lines.append(f"Dice: mean of per-case 3D Dice over {m['num_cases']} cases; over the "
               f"{m['num_lesion_cases']} cases with a lesion "
               f"{_fmt(m['dice_case_mean_lesion_cases'])}; global (all voxels pooled) "
               f"{_fmt(m['dice_global'])}.")
  lines.append(f"Infarct level ({m.get('connectivity', 26)}-connected, overlap "
               f"{m.get('overlap', 'any')}): {m['tp_ref']} of {m['tp_ref'] + m['fn_ref']}"
               f" lesions found; {m['fp_pred']} of {m['tp_pred'] + m['fp_pred']} "
               f"predicted components false positive.")
  if m.get("rot_err_deg") is not None:
    mm = "" if m.get("shift_err_mm") is None else f" ({m['shift_err_mm']:.2f} mm)"
    lines.append(f"Alignment error over {m['num_posed_cases']} cases with a known pose: "
                 f"|dθ| {m['rot_err_deg']:.2f} deg, |dx| {m['shift_err_px']:.2f} px{mm}.")
  else:
    lines.append("Alignment error: n/a (no known pose, or the model does not align).")
  if m.get("aspects_cases"):
    r = m["aspects_pearson_r"]
    lines.append(f"ASPECTS over {m['aspects_cases']} cases (involved at "
                 f"{m['aspects_fraction']:g} of a region): Pearson r "
                 f"{_fmt(r, 3)}, mean absolute error {m['aspects_mae']:.2f}, same score "
                 f"{m['aspects_exact']:.0%}; regions: sensitivity "
                 f"{_fmt(m['aspects_region_sensitivity'], 3)}, specificity "
                 f"{_fmt(m['aspects_region_specificity'], 3)}.")
  lines.append(f"Time: {m['seconds_per_case']:.2f} s per case (median).")
  return "\n".join(lines)


def load_eval(path) -> dict:
  """Reads an ``eval.json`` (a file, or a workdir holding ``eval.json``)."""
  path = Path(path)
  if path.is_dir():
    path = path / "eval.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file; run python -m sean_jax.evaluate "
                            f"--workdir {path.parent} first")
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: corrupt eval JSON ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
    raise ValueError(f"{path}: not an eval.json of sean_jax.evaluate (no 'metrics')")
  data["_path"] = str(path)
  return data


def write_json_atomic(obj, path) -> None:
  from sean_jax.data.nifti import atomic_output  # pylint: disable=g-import-not-at-top
  with atomic_output(path, ".json") as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, allow_nan=False)
      f.write("\n")


# --------------------------------------------------------------------------- CLI


class _ArgumentParser(argparse.ArgumentParser):

  def error(self, message):  # one line, exit code 2
    self.exit(2, f"{self.prog}: error: {message}\n")


class CliError(Exception):
  """A one-line error for the user (exit code 1)."""


def _one_line(text) -> str:
  return " ".join(str(text).split())


def add_postprocessing_flags(p: argparse.ArgumentParser) -> None:
  """The flags that override the postprocessing (``postprocess_settings``), the same in
  evaluate and predict."""
  p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                 help="symmetry refinement of the pose (default: the run's "
                      "config.align.refine)")
  p.add_argument("--brain-mask", action=argparse.BooleanOptionalAction, default=None,
                 help="keep predictions inside the brain (default: the run's "
                      "config.postprocess.brain_mask)")
  p.add_argument("--min-size-ml", type=float, default=None,
                 help="remove predicted components below this size (default: the "
                      "workdir's postprocessing.json, else 0)")


def add_aspects_flags(p: argparse.ArgumentParser) -> None:
  """The ASPECTS flags of evaluate and predict."""
  from sean_jax.clinical import aspects  # pylint: disable=g-import-not-at-top
  p.add_argument("--aspects-atlas", default=None, metavar="DIR",
                 help="the NCCT ASPECTS atlas folder (docs/aspects.md): adds ASPECTS")
  p.add_argument("--aspects-age", choices=aspects.AGE_GROUPS,
                 default=aspects.DEFAULT_AGE_GROUP, help="the atlas's age group")
  p.add_argument("--aspects-fraction", type=float, default=aspects.DEFAULT_FRACTION,
                 help="a region is involved when the lesion covers this share of it")


def check_aspects_flags(p: argparse.ArgumentParser, args) -> None:
  if not 0.0 < args.aspects_fraction <= 1.0:
    p.error(f"--aspects-fraction must lie in (0, 1], got {args.aspects_fraction}")


def load_aspects_atlas(args):
  """The atlas of ``--aspects-atlas`` (None without it); ``CliError`` if unusable."""
  if args.aspects_atlas is None:
    return None
  from sean_jax.clinical import aspects  # pylint: disable=g-import-not-at-top
  try:
    return aspects.load_atlas(args.aspects_atlas, args.aspects_age)
  except ValueError as e:
    raise CliError(_one_line(e)) from None


def check_postprocessing_flags(p: argparse.ArgumentParser, args) -> None:
  if args.min_size_ml is not None and not args.min_size_ml >= 0.0:
    p.error(f"--min-size-ml must be >= 0, got {args.min_size_ml}")


def _parse(argv):
  p = _ArgumentParser(prog="python -m sean_jax.evaluate",
                      description="Evaluate a trained workdir (Dice, infarct-level F1, "
                                  "recall, precision, alignment error).")
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", choices=SPLITS, default=None,
                 help="the run's test (default) or validation cases")
  p.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
  p.add_argument("--data", default=None,
                 help="folder of <id>_ct.nii.gz + <id>_mask.nii.gz (+ <id>.json) to "
                      "evaluate instead of the config's split")
  p.add_argument("--lesion-labels", default=None,
                 help="with --data: mask labels counted as lesion, e.g. 1,2,3,5 "
                      "(default: masks must be 0/1)")
  p.add_argument("--config", default=None,
                 help="FILE.py[:ARG] whose data settings replace the run's")
  p.add_argument("--threshold", type=float, default=0.5)
  p.add_argument("--connectivity", type=int, choices=metrics.CONNECTIVITIES, default=26)
  p.add_argument("--overlap", choices=metrics.OVERLAP_RULES, default="any")
  p.add_argument("--min-overlap", type=float, default=0.5)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-cases", type=int, default=None)
  p.add_argument("--output", default=None, help="JSON file to write (default: see doc)")
  add_postprocessing_flags(p)
  p.add_argument("--choose-postprocessing", action="store_true",
                 help="choose the component size on the validation split, write "
                      "postprocessing.json to the workdir, then evaluate with it")
  add_aspects_flags(p)
  args = p.parse_args(argv)
  check_postprocessing_flags(p, args)
  check_aspects_flags(p, args)
  if args.choose_postprocessing:
    if args.data is not None or args.split not in (None, "validation"):
      p.error("--choose-postprocessing chooses on the validation split: use it with "
              "--split validation (or no --split)")
    if args.min_size_ml is not None:
      p.error("give --choose-postprocessing or --min-size-ml, not both")
    args.split = "validation"
  if args.data is not None and args.split is not None:
    p.error("give --split or --data, not both")
  if args.lesion_labels is not None and args.data is None:
    p.error("--lesion-labels only applies with --data")
  if args.lesion_labels is not None:
    try:
      args.lesion_labels = tuple(int(v) for v in args.lesion_labels.split(","))
    except ValueError:
      p.error(f"--lesion-labels must be integers separated by commas, got "
              f"{args.lesion_labels!r}")
  if not 0.0 <= args.threshold < 1.0:
    p.error(f"--threshold must lie in [0, 1), got {args.threshold}")
  if args.overlap != "any" and not 0.0 < args.min_overlap <= 1.0:
    p.error(f"--min-overlap must lie in (0, 1], got {args.min_overlap}")
  if args.batch_size < 1 or (args.max_cases is not None and args.max_cases < 1):
    p.error("--batch-size and --max-cases must be >= 1")
  args.split = args.split or ("test" if args.data is None else None)
  return args


def load_config_file(spec: str):
  """``FILE.py[:ARG]`` -> ``get_config(ARG)`` of that file (ml_collections style)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise CliError(f"{path}: config file not found")
  try:
    module_spec = importlib.util.spec_from_file_location("_eval_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise CliError(f"{path}: cannot load config ({type(e).__name__}: "
                   f"{_one_line(e)[:300]})") from None


def override_data(config, spec):
  """The run's config with the data settings of the config file ``spec``."""
  from sean_jax import checkpointing  # pylint: disable=g-import-not-at-top
  other = load_config_file(spec)
  if checkpointing.model_options(other) != checkpointing.model_options(config):
    raise CliError(f"{spec.partition(':')[0]}: its model settings differ from the "
                   f"checkpoint's ({checkpointing.model_options(config)}); --config may "
                   f"change the data settings only")
  config = config.copy_and_resolve_references()
  config.data = other.data
  return config


def load_workdir_model(workdir, which: str):
  """``load_model`` with one-line errors naming the path."""
  from sean_jax import checkpointing  # pylint: disable=g-import-not-at-top
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise CliError(f"{workdir}: workdir not found" if not workdir.exists()
                   else f"{workdir}: workdir is not a directory")
  try:
    return checkpointing.load_model(workdir, which)
  except (FileNotFoundError, ValueError) as e:
    message = _one_line(e)
    if str(workdir) not in message:
      message = f"{workdir}: {message}"
    raise CliError(message) from None
  except Exception as e:  # pylint: disable=broad-except
    # A config.json with missing fields, or a checkpoint orbax cannot read.
    raise CliError(f"{workdir}: cannot load the model ({type(e).__name__}: "
                   f"{_one_line(e)[:300]})") from None


def warn_if_not_hu_model(config) -> None:
  """NIfTI input is read as HU; a model trained on AISD's PNG intensities never saw HU."""
  if config.data.get("source") == "aisd" and config.data.get("aisd_config") == "png":
    print("warning: this model was trained on AISD PNG intensities (0..255 of an "
          "undocumented window, z-scored, no HU window); NIfTI input is read as HU and "
          "windowed with data.hu_window, so it is out of the training distribution",
          file=sys.stderr)


def _source(config, args, brain_mask: bool, aspects: bool = False):
  from sean_jax.data import sources  # pylint: disable=g-import-not-at-top
  if aspects and (args.data is not None or config.data.source != "phantom"):
    raise CliError("--aspects-atlas scores ASPECTS against the phantom's true regions: "
                   "use it on a phantom split (predict --aspects-atlas scores a scan)")
  try:
    if args.data is not None:
      return sources.NiftiCaseSource(args.data, lesion_labels=args.lesion_labels,
                                      image_size=config.data.image_size,
                                      window=tuple(config.data.hu_window),
                                      brain_mask=brain_mask)
    return sources.case_source(config, args.split, brain_mask=brain_mask or aspects,
                               aspects=aspects)
  except (FileNotFoundError, ValueError) as e:
    raise CliError(_one_line(e)) from None


def _first(source, num: int):
  return (source[i] for i in range(num))


def _default_output(args) -> Path:
  workdir = Path(args.workdir)
  if args.data is not None:
    name = Path(os.path.abspath(args.data)).name or "data"
    return workdir / f"eval_{name}.json"
  return workdir / ("eval.json" if args.split == "test" else f"eval_{args.split}.json")


def _one_line_warnings(message, category, filename, lineno, line=None):
  del filename, lineno, line
  return f"warning: {_one_line(message)} ({category.__name__})\n"


def run(args) -> int:
  model, config, step = load_workdir_model(args.workdir, args.checkpoint)
  checkpoint = args.checkpoint
  if checkpoint == "best" and not (Path(args.workdir) / "checkpoints_best").is_dir():
    checkpoint = "latest (no best checkpoint)"
  if args.config is not None:
    config = override_data(config, args.config)
  settings = postprocess_settings(args.workdir, config, refine=args.refine,
                                  brain_mask=args.brain_mask,
                                  min_size_ml=args.min_size_ml)
  atlas = load_aspects_atlas(args)
  source = _source(config, args, settings["brain_mask"], aspects=atlas is not None)
  output = Path(args.output) if args.output else _default_output(args)
  if not output.parent.is_dir():
    raise CliError(f"{output.parent}: output directory not found")
  what = f"--data {args.data}" if args.data else f"{args.split} split"
  if args.data is not None:
    warn_if_not_hu_model(config)
  num = len(source) if args.max_cases is None else min(len(source), args.max_cases)
  if args.choose_postprocessing:
    from sean_jax.clinical import postprocess  # pylint: disable=g-import-not-at-top
    print(f"choosing the postprocessing on {what}: {num} cases", flush=True)
    try:
      chosen = choose_postprocessing(model, _first(source, num), threshold=args.threshold,
                                     connectivity=args.connectivity,
                                     batch_size=args.batch_size,
                                     refine=settings["refine"],
                                     brain_mask=settings["brain_mask"])
      chosen.update(step=int(step), checkpoint=checkpoint, split="validation")
      path = postprocess.save_postprocessing(args.workdir, chosen)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise CliError(_one_line(e)) from None
    print(f"chose min component size {chosen['min_ml']:g} ml; wrote {path}")
    settings.update(min_size_ml=chosen["min_ml"],
                    min_size_from=f"postprocessing.json (validation split, step {step})")
  print(f"evaluating {args.workdir} ({config.variant}, step {step}, {checkpoint}) on "
        f"{what}: {num} cases; refine {'on' if settings['refine'] else 'off'}, brain "
        f"mask {'on' if settings['brain_mask'] else 'off'}, min component "
        f"{settings['min_size_ml']:g} ml ({settings['min_size_from']})", flush=True)

  def progress(row):
    extra = "" if row["rot_err_deg"] is None else \
        f", |dθ| {row['rot_err_deg']:.1f} deg, |dx| {row['shift_err_px']:.1f} px"
    if "aspects" in row:
      from sean_jax.clinical import aspects  # pylint: disable=g-import-not-at-top
      pred = aspects.predicted(row["aspects"], args.aspects_fraction)[0]["score"]
      extra += f", ASPECTS {pred} (true {row['aspects']['true_score']})"
    print(f"  {row['case_id']}: dice {row['dice']:.4f}, lesions found "
          f"{row['tp_ref']}/{row['tp_ref'] + row['fn_ref']}, false positives "
          f"{row['fp_pred']}{extra} ({row['seconds']:.1f} s)", flush=True)

  try:
    result = evaluate_cases(model, source, threshold=args.threshold,
                            connectivity=args.connectivity, overlap=args.overlap,
                            min_overlap=args.min_overlap, batch_size=args.batch_size,
                            max_cases=args.max_cases, progress=progress,
                            refine=settings["refine"],
                            brain_mask=settings["brain_mask"],
                            min_size_ml=settings["min_size_ml"], atlas=atlas,
                            aspects_fraction=args.aspects_fraction)
  except (FileNotFoundError, ValueError) as e:
    raise CliError(_one_line(e)) from None
  rows = result.pop("cases")
  report = {
      "variant": str(config.variant), "workdir": os.path.abspath(args.workdir),
      "split": args.split, "data": None if args.data is None else
      os.path.abspath(args.data), "data_source": "nifti" if args.data else
      str(config.data.source), "checkpoint": checkpoint, "step": int(step),
      "image_size": int(config.data.image_size), "postprocessing": settings,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "metrics": result, "cases": rows}
  write_json_atomic(report, output)
  print()
  print(format_table(report, name=str(config.variant)))
  print(f"\nwrote {output}")
  return 0


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; carries the exit code (128 + the signal)."""


@contextlib.contextmanager
def interruptible():
  """SIGTERM and SIGINT raise :class:`Interrupted` inside the block (in the main
  thread), so a command stops between writes with one line instead of dying silently;
  outside the main thread (e.g. under a test runner's worker) it does nothing."""
  def handler(signum, _):
    raise Interrupted(signal.Signals(signum).name)
  try:
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM,
                                                              signal.SIGINT)}
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def interrupted_exit(e: Interrupted, what: str) -> int:
  """Prints the one line for an interrupted command; returns 128 + the signal."""
  name = str(e) or "SIGINT"
  print(f"error: interrupted by {name}; {what}", file=sys.stderr)
  return 128 + int(getattr(signal, name, signal.SIGINT))


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  previous, warnings.formatwarning = warnings.formatwarning, _one_line_warnings
  try:
    with interruptible():
      return run(args)
  except CliError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Interrupted as e:
    return interrupted_exit(e, "nothing was written (results are written whole at "
                               "the end)")
  finally:
    warnings.formatwarning = previous


if __name__ == "__main__":
  sys.exit(main())
