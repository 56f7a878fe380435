"""Segments acute infarcts on NCCT volumes with a trained workdir.

    python -m sean_jax.predict --workdir DIR --input scan.nii.gz --output mask.nii.gz
        [--transform pose.json] [--aligned aligned.nii.gz] [--report report.json]
        [--probabilities probs.nii.gz] [--overlay overlay.png]
        [--checkpoint latest|best] [--threshold 0.5] [--batch-size 8]
        [--[no-]refine] [--[no-]brain-mask] [--min-size-ml ML]
        [--aspects-atlas DIR [--aspects-age 50_69] [--aspects-fraction 0.15]
         [--regions regions.nii.gz]]

    python -m sean_jax.predict --workdir DIR --input DICOM_DIR [--series UID] --output mask.nii.gz ...

    python -m sean_jax.predict --workdir DIR --input IN_DIR --output OUT_DIR
        [--transform] [--aligned] [--probabilities] [--overlay] [--report] ...

Pipeline, per volume (docs/evaluation.md has the details):

1. read into model orientation (S, H, W): a NIfTI file with ``sean_jax.data.nifti``, or
   a folder holding one DICOM CT series with ``sean_jax.data.dicom.load_series``
   (slices ordered along the slice normal, rescale slope/intercept applied, gantry tilt
   refused; ``--series UID`` picks one of several);
2. ``preprocess.fix_hu_conventions`` (scanner padding, +1024 storage, air stored as 0:
   fixed, with a note) and ``preprocess.check_head_ct`` (no head, too few slices,
   values that are not CT: refused);
3. ``preprocess.window_and_normalize`` with the run's ``config.data.hu_window``, and,
   if (H, W) is not the model's ``config.data.image_size`` squared, an in-plane resize
   (linear, antialiased: the resize the model was trained with);
4. ``segment_volume``: alignment net, then (``--refine``, default the run's
   ``config.align.refine``) the symmetry refinement of the pose, segmentation, back to
   the unaligned grid;
5. the probabilities are resized back to (H, W) the same way; the mask is
   ``probability > threshold``, kept inside the brain mask (``--brain-mask``, default
   the run's ``config.postprocess.brain_mask``; ``sean_jax.clinical.brain``), and its
   components below ``--min-size-ml`` (default: the workdir's ``postprocessing.json``,
   chosen on the validation split at the end of training; else 0) removed;
6. outputs in the input's own shape, axis order and affine (``nifti.save_like``; for
   DICOM the affine dcm2niix would give): mask uint8 0/1, probabilities float32.

``--transform``: JSON with the estimated pose under the phantom's ground-truth keys
(``rotation_deg``, ``shift_x_px``, ``shift_y_px``: ``sampler.alpha_to_pose`` with the
input's in-plane size, so pixels are input pixels), plus ``alpha`` and context.
``--aligned``: the input (HU) moved by the estimated transform, on the *input* grid
(bilinear, air outside), saved with the input's header: the mid-sagittal plane lies on
the centre column of the model orientation (patient left-right axis). Integer inputs are
stored as int16, others as float32. ``--overlay``: PNG of up to 6 slices in the HU
window with the predicted outline (red), the estimated midline (cyan, dashed) and the
patient's R and L. ``--report``: JSON with ``lesion_ml``, ``lesion_ml_left``,
``lesion_ml_right`` (the patient's sides, across the estimated mid-sagittal plane),
``side`` (left, right, bilateral or none: ``sean_jax.clinical.report``), the number of
components, the brain volume, the pose, the postprocessing, the input (path, DICOM
series, shape, axis codes, spacing, HU fixes) and the model. ``--aspects-atlas DIR``
(the NCCT ASPECTS atlas, docs/aspects.md): the 20 ASPECTS regions are mapped onto the
aligned input (``sean_jax.clinical.aspects``) and the report gets ``aspects`` (score,
side, each region's involved fraction, the involved regions, the levels' slices);
``--regions`` writes the region map (uint8, 1-10 the patient's right C, L, IC, I,
M1-M6, 11-20 the left) on the input grid, and the overlay shows the regions.

With ``--input`` a folder of NIfTI files, every ``*.nii``/``*.nii.gz`` in it is
segmented (files whose name ends in ``_mask``, ``_probabilities`` or ``_aligned`` are
skipped) and ``--output`` is an existing folder receiving ``<name>_mask.nii.gz`` and, for
the switches given, ``<name>_pose.json``, ``<name>_aligned.nii.gz``,
``<name>_probabilities.nii.gz``, ``<name>_overlay.png``, ``<name>_report.json``
(``<name>``: the file name without ``.nii[.gz]``). A folder holding DICOM files is one
series (one volume), not a folder of volumes.

All outputs of a volume are written to temporary files beside their destinations and
renamed once all are written; on any error the temporary files are removed, so no
partial output is left. Errors: one line on stderr naming the file, exit 1 (a folder
goes on with the other volumes and exits 1 at the end); bad arguments: exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

from sean_jax import evaluate, metrics
from sean_jax.clinical import report

__all__ = ["predict_volume", "aligned_on_input_grid", "main"]

OUTPUT_KINDS = ("transform", "aligned", "probabilities", "overlay", "report", "regions")
_SUFFIX = {"mask": "_mask.nii.gz", "transform": "_pose.json",
           "aligned": "_aligned.nii.gz", "probabilities": "_probabilities.nii.gz",
           "overlay": "_overlay.png", "report": "_report.json",
           "regions": "_regions.nii.gz"}
_SKIP_STEMS = ("_mask", "_probabilities", "_aligned", "_regions")
POSE_CONVENTION = ("sean_jax.models.sampler.warp(ct, pose_to_alpha(pose)) aligns the head "
                   "(mid-sagittal plane on the centre column); pixels of the input grid "
                   "in model orientation (slice, row, col)")


class CliError(Exception):
  """A one-line error for the user (exit code 1)."""


def _one_line(text) -> str:
  return " ".join(str(text).split())


# ------------------------------------------------------------------------ compute


def predict_volume(model, config, volume_hu, *, threshold: float = 0.5,
                   batch_size: int = 8, spacing_mm=None, refine: bool = False,
                   brain_mask: bool = False, min_size_ml: float = 0.0) -> dict:
  """Runs the model on one (S, H, W) volume in HU (model orientation, HU conventions
  already fixed: ``preprocess.fix_hu_conventions``).

  ``refine``: symmetry refinement of the pose; ``brain_mask``: the mask is kept inside
  ``sean_jax.clinical.brain.brain_mask`` of the volume; ``min_size_ml``: components
  below it are removed (``spacing_mm`` (slice, row, col) needed).
  Returns ``{"probabilities": (S, H, W) float32 on the input grid, "mask": uint8 0/1
  (postprocessed), "brain": (S, H, W) bool or None, "alpha": (3,) float64 (zeros
  without an aligner), "model_size": int, "resized": bool}``. ``model`` must be in eval
  mode.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sean_jax.clinical import brain as brain_lib  # pylint: disable=g-import-not-at-top
  from sean_jax.clinical import postprocess  # pylint: disable=g-import-not-at-top
  from sean_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sean_jax.models.sean import segment_volume  # pylint: disable=g-import-not-at-top

  volume_hu = np.asarray(volume_hu, np.float32)
  if volume_hu.ndim != 3:
    raise ValueError(f"expected an (S, H, W) volume, got shape {volume_hu.shape}")
  _, height, width = volume_hu.shape
  size = int(config.data.image_size)
  image = preprocess.window_and_normalize(volume_hu, tuple(config.data.hu_window))
  resized = (height, width) != (size, size)
  if resized:
    image = preprocess.resize_volume(image, (size, size))
  weights = preprocess.brain_slice_weights(image)
  probs, alpha = segment_volume(model, jnp.asarray(image), jnp.asarray(weights),
                                batch_size=batch_size, refine=refine)
  probs = np.asarray(probs, np.float32)
  if resized:
    probs = preprocess.resize_volume(probs, (height, width))
  probs = np.clip(probs, 0.0, 1.0)
  mask = probs > threshold
  brain = None
  if brain_mask:
    brain = brain_lib.brain_mask(volume_hu, spacing_mm)
    mask &= brain
  if min_size_ml > 0:
    if spacing_mm is None:
      raise ValueError("a minimum component size in ml needs the voxel spacing")
    mask = postprocess.remove_small_components(mask, min_size_ml, spacing_mm) != 0
  return {"probabilities": probs, "mask": mask.astype(np.uint8), "brain": brain,
          "alpha": np.asarray(alpha, np.float64), "model_size": size,
          "resized": resized}


aligned_on_input_grid = report.aligned_on_input_grid


def _midline(alpha, height: int, width: int):
  """Two (x, y) input-grid points of the estimated mid-sagittal line (the input points
  the aligned image's centre column comes from)."""
  matrix, offset = report.input_grid_map(alpha, height, width)
  cx = (width - 1) / 2.0
  pts = [matrix @ np.array([y, cx]) + offset for y in (-0.5, height - 0.5)]
  return [p[1] for p in pts], [p[0] for p in pts]


def _pick_slices(mask, n: int = 6) -> list[int]:
  s = mask.shape[0]
  picks = sorted(set(np.linspace(0, s - 1, min(n, s)).round().astype(int).tolist()))
  area = mask.reshape(s, -1).sum(axis=1)
  if area.max() > 0:
    best = int(area.argmax())
    if best not in picks:
      picks[int(np.argmin([abs(p - best) for p in picks]))] = best
  return sorted(set(picks))


def save_overlay(path, volume_hu, mask, alpha, window, title: str,
                 show_midline: bool, regions=None) -> None:
  """PNG of up to 6 slices: the lesion outline (red), the midline, R/L, and the ASPECTS
  regions (colours) when ``regions`` (S, H, W) is given (then the two levels' slices
  are among those shown)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  picks = _pick_slices(mask)
  if regions is not None:
    scored = np.flatnonzero(regions.reshape(regions.shape[0], -1).max(axis=1))
    if scored.size:
      lesion = [p for p in picks if mask[p].any()][:2]
      picks = sorted(set(lesion) | set(np.linspace(scored[0], scored[-1], min(
          6 - len(lesion), scored.size)).round().astype(int).tolist()))
  _, height, width = volume_hu.shape
  fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 2.9), squeeze=False,
                           facecolor="black")
  for ax, s in zip(axes[0], picks):
    ax.imshow(volume_hu[s], cmap="gray", vmin=window[0], vmax=window[1],
              interpolation="nearest")
    if regions is not None and regions[s].any():
      ax.imshow(np.ma.masked_equal(regions[s], 0), cmap="tab20", vmin=0.5, vmax=20.5,
                alpha=0.35, interpolation="nearest")
    if mask[s].any():
      ax.contour(mask[s], levels=[0.5], colors="red", linewidths=0.8)
    if show_midline:
      xs, ys = _midline(alpha, height, width)
      ax.plot(xs, ys, "--", color="cyan", linewidth=0.6)
      ax.set_xlim(-0.5, width - 0.5)
      ax.set_ylim(height - 0.5, -0.5)
    # Model orientation: column 0 is the patient's right (radiological display).
    for x, label in ((0.02, "R"), (0.98, "L")):
      ax.text(x, 0.5, label, transform=ax.transAxes, color="yellow", fontsize=9,
              ha="left" if label == "R" else "right", va="center")
    ax.set_title(f"slice {s}", color="white", fontsize=8)
    ax.set_axis_off()
  fig.suptitle(title, color="white", fontsize=8)
  try:
    fig.savefig(path, dpi=100, facecolor="black")
  finally:
    plt.close(fig)


# ------------------------------------------------------------------------ outputs


class _Outputs:
  """Temporary files beside each destination, renamed together by :meth:`commit`."""

  def __init__(self):
    self._pending: list[tuple[str, str]] = []

  def temp(self, final, suffix: str) -> str:
    final = os.fspath(final)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(final)),
                               prefix=".tmp_predict_", suffix=suffix)
    os.close(fd)
    self._pending.append((tmp, final))
    return tmp

  def commit(self) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for tmp, final in self._pending:
      os.chmod(tmp, 0o666 & ~umask)
      os.replace(tmp, final)
    self._pending = []

  def rollback(self) -> None:
    for tmp, _ in self._pending:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    self._pending = []


def _nifti_suffix(path) -> str:
  return ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"


def write_outputs(paths: dict, vol, result: dict, config, *, meta: dict) -> None:
  """Writes every output named in ``paths`` (kind -> path) all-or-nothing."""
  from sean_jax.data import nifti  # pylint: disable=g-import-not-at-top
  from sean_jax.models.sampler import alpha_to_pose  # pylint: disable=g-import-not-at-top
  _, height, width = vol.data.shape
  alpha = result["alpha"]
  outputs = _Outputs()
  try:
    nifti.save_like(result["mask"], vol, outputs.temp(paths["mask"],
                                                      _nifti_suffix(paths["mask"])),
                    dtype=np.uint8)
    if paths.get("probabilities"):
      p = paths["probabilities"]
      nifti.save_like(result["probabilities"], vol, outputs.temp(p, _nifti_suffix(p)),
                      dtype=np.float32)
    if paths.get("aligned"):
      p = paths["aligned"]
      dtype = np.int16 if np.issubdtype(vol.file_dtype, np.integer) else np.float32
      aligned = aligned_on_input_grid(vol.data, alpha)
      nifti.save_like(aligned, vol, outputs.temp(p, _nifti_suffix(p)), dtype=dtype)
    if paths.get("transform"):
      pose = alpha_to_pose(alpha, height, width)
      pose.update({"alpha": [float(a) for a in alpha],
                   "aligner": meta["aligner"], "input": os.path.abspath(vol.path),
                   "shape": list(vol.data.shape), "spacing_mm": list(vol.spacing_mm),
                   "model_image_size": int(result["model_size"]),
                   "workdir": meta["workdir"], "checkpoint_step": meta["step"],
                   "variant": meta["variant"], "pose_convention": POSE_CONVENTION})
      with open(outputs.temp(paths["transform"], ".json"), "w") as f:
        json.dump(pose, f, indent=1, allow_nan=False)
        f.write("\n")
    if paths.get("regions"):
      p = paths["regions"]
      nifti.save_like(result["regions"], vol, outputs.temp(p, _nifti_suffix(p)),
                      dtype=np.uint8)
    if paths.get("report"):
      with open(outputs.temp(paths["report"], ".json"), "w") as f:
        json.dump(build_report(vol, result, meta), f, indent=1, allow_nan=False)
        f.write("\n")
    if paths.get("overlay"):
      save_overlay(outputs.temp(paths["overlay"], ".png"), vol.data, result["mask"],
                   alpha, tuple(config.data.hu_window),
                   f"{os.path.basename(vol.path)}: predicted infarct (red)"
                   + ", patient's right R / left L"
                   + (", estimated midline (cyan)" if meta["aligner"] else "")
                   + (f", ASPECTS {result['aspects']['score']} (regions in colour)"
                      if result.get("aspects") else ""),
                   show_midline=meta["aligner"], regions=result.get("regions"))
    outputs.commit()
  except BaseException:
    outputs.rollback()
    raise


def _summary(vol, result: dict) -> dict:
  """Lesion ml in all and per hemisphere, side (``report.lesion_summary``) and the
  number of components of the postprocessed mask: for the printed line and the report."""
  out = report.lesion_summary(result["mask"], result["alpha"], vol.spacing_mm)
  out["num_components"] = int(metrics.label_components(result["mask"])[1])
  return out


def add_aspects(result: dict, vol, atlas, fraction: float) -> None:
  """Maps the ASPECTS regions onto the input (``sean_jax.clinical.aspects``) and scores
  the postprocessed mask: ``result["regions"]`` (S, H, W) uint8 and
  ``result["aspects"]`` (the report's object)."""
  from sean_jax.clinical import aspects  # pylint: disable=g-import-not-at-top
  from sean_jax.clinical import brain as brain_lib  # pylint: disable=g-import-not-at-top
  brain = result.get("brain")
  if brain is None:
    brain = brain_lib.brain_mask(vol.data, vol.spacing_mm)
  regions, info = aspects.regions_of_scan(vol.data, brain, result["alpha"],
                                          vol.spacing_mm, atlas)
  result["regions"] = regions
  result["aspects"] = dict(aspects.score(regions, result["mask"], fraction),
                           ganglionic_slices=info["ganglionic_slices"],
                           supraganglionic_slices=info["supraganglionic_slices"],
                           atlas=info["atlas"],
                           note="research tool, not a medical device: docs/aspects.md")


def build_report(vol, result: dict, meta: dict) -> dict:
  """The ``--report`` JSON of one volume: ``result["summary"]`` (``_summary``), the
  pose, the postprocessing, and where the input and the model came from."""
  from sean_jax.models.sampler import alpha_to_pose  # pylint: disable=g-import-not-at-top
  _, height, width = vol.data.shape
  out = dict(result["summary"])
  if result.get("brain") is not None:
    out["brain_ml"] = float(np.count_nonzero(result["brain"])
                            * np.prod(vol.spacing_mm) / 1000.0)
  pose = alpha_to_pose(result["alpha"], height, width)
  out["pose"] = dict(pose, alpha=[float(a) for a in result["alpha"]],
                     estimated=bool(meta["aligner"]), convention=POSE_CONVENTION)
  source = dict(vol.source or {})
  out["input"] = {"path": os.path.abspath(vol.path),
                  "kind": "dicom" if source else "nifti", **source,
                  "shape": list(vol.data.shape), "axcodes": list(vol.axcodes),
                  "spacing_mm": [float(v) for v in vol.spacing_mm],
                  "hu_notes": list(meta.get("hu_notes", []))}
  out["model"] = {"workdir": meta["workdir"], "checkpoint_step": meta["step"],
                  "variant": meta["variant"],
                  "model_image_size": int(result["model_size"])}
  out["postprocessing"] = dict(meta["postprocessing"], threshold=meta["threshold"])
  if result.get("aspects") is not None:
    out["aspects"] = result["aspects"]
  return out


# ---------------------------------------------------------------------------- CLI


class _ArgumentParser(argparse.ArgumentParser):

  def error(self, message):  # one line, exit code 2
    self.exit(2, f"{self.prog}: error: {message}\n")


def _parse(argv):
  p = _ArgumentParser(prog="python -m sean_jax.predict",
                      description="Segment acute infarcts on NCCT volumes: NIfTI "
                                  "files or a DICOM series.")
  p.add_argument("--workdir", required=True, help="training workdir")
  p.add_argument("--input", required=True,
                 help="a .nii/.nii.gz volume, a folder of them, or a folder holding a "
                      "DICOM CT series")
  p.add_argument("--series", default=None,
                 help="SeriesInstanceUID to read when the DICOM folder holds several")
  p.add_argument("--output", required=True,
                 help="mask .nii/.nii.gz (or, for a folder input, an existing folder)")
  p.add_argument("--transform", nargs="?", const=True, default=None,
                 help="pose JSON (a switch for a folder input)")
  p.add_argument("--aligned", nargs="?", const=True, default=None,
                 help="aligned volume .nii.gz in HU (a switch for a folder input)")
  p.add_argument("--probabilities", nargs="?", const=True, default=None,
                 help="float32 probabilities .nii.gz (a switch for a folder input)")
  p.add_argument("--overlay", nargs="?", const=True, default=None,
                 help="PNG of a few slices with the outline (a switch for a folder input)")
  p.add_argument("--report", nargs="?", const=True, default=None,
                 help="JSON report: lesion ml per hemisphere, side, pose, input, and "
                      "ASPECTS with --aspects-atlas (a switch for a folder input)")
  p.add_argument("--regions", nargs="?", const=True, default=None,
                 help="uint8 .nii.gz of the 20 ASPECTS regions (1-10 the patient's "
                      "right C, L, IC, I, M1-M6, 11-20 the left); needs --aspects-atlas "
                      "(a switch for a folder input)")
  evaluate.add_postprocessing_flags(p)
  evaluate.add_aspects_flags(p)
  p.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
  p.add_argument("--threshold", type=float, default=0.5)
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)
  if not 0.0 <= args.threshold < 1.0:
    p.error(f"--threshold must lie in [0, 1), got {args.threshold}")
  if args.batch_size < 1:
    p.error("--batch-size must be >= 1")
  evaluate.check_postprocessing_flags(p, args)
  if args.regions and args.aspects_atlas is None:
    p.error("--regions needs --aspects-atlas DIR (the NCCT ASPECTS atlas)")
  evaluate.check_aspects_flags(p, args)
  from sean_jax.data import dicom  # pylint: disable=g-import-not-at-top
  args.dicom = dicom.is_dicom_dir(args.input)
  args.folder = os.path.isdir(args.input) and not args.dicom
  if args.series is not None and not args.dicom:
    p.error("--series picks a series of a DICOM folder --input")
  for kind in OUTPUT_KINDS:
    value = getattr(args, kind)
    if args.folder and isinstance(value, str):
      p.error(f"with a folder --input, --{kind} is a switch (no path): files are named "
              f"<name>{_SUFFIX[kind]} in --output")
    if not args.folder and value is True:
      p.error(f"--{kind} needs a file path")
  if not args.folder:
    wanted = {"output": (".nii", ".nii.gz"), "aligned": (".nii", ".nii.gz"),
              "regions": (".nii", ".nii.gz"),
              "probabilities": (".nii", ".nii.gz"), "transform": (".json",),
              "overlay": (".png",), "report": (".json",)}
    for kind, suffixes in wanted.items():
      value = getattr(args, kind)
      if isinstance(value, str) and not value.lower().endswith(suffixes):
        p.error(f"--{kind} {value!r} must end in {' or '.join(suffixes)}")
  return args


def _stem(path) -> str:
  name = os.path.basename(path)
  for suffix in (".nii.gz", ".nii"):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def _jobs(args) -> list[tuple[str, dict]]:
  """(input path, {kind: output path}) per volume; checks paths before any work."""
  if not os.path.exists(args.input):
    raise CliError(f"{args.input}: input not found")
  if args.folder:
    out = args.output
    if not os.path.isdir(out):
      raise CliError(f"{out}: output folder not found" if not os.path.exists(out)
                     else f"{out}: --output must be a folder for a folder --input")
    names = sorted(f for f in os.listdir(args.input)
                   if f.lower().endswith((".nii", ".nii.gz"))
                   and os.path.isfile(os.path.join(args.input, f))
                   and not _stem(f).endswith(_SKIP_STEMS))
    if not names:
      raise CliError(f"{args.input}: no .nii/.nii.gz volumes in the folder")
    jobs = []
    for name in names:
      stem = _stem(name)
      paths = {"mask": os.path.join(out, stem + _SUFFIX["mask"])}
      for kind in OUTPUT_KINDS:
        if getattr(args, kind):
          paths[kind] = os.path.join(out, stem + _SUFFIX[kind])
      jobs.append((os.path.join(args.input, name), paths))
  else:
    paths = {"mask": args.output}
    paths.update({k: getattr(args, k) for k in OUTPUT_KINDS if getattr(args, k)})
    jobs = [(args.input, paths)]
  inputs = {os.path.realpath(path) for path, _ in jobs}
  seen = set()
  for _, paths in jobs:
    for kind, path in paths.items():
      parent = os.path.dirname(os.path.abspath(path))
      if not os.path.isdir(parent):
        raise CliError(f"{path}: output directory {parent} not found")
      if os.path.isdir(path):
        raise CliError(f"{path}: --{'output' if kind == 'mask' else kind} is a "
                       f"directory, expected a file path")
      real = os.path.realpath(path)
      if real in inputs:
        raise CliError(f"{path}: output would overwrite an input")
      if real in seen:
        raise CliError(f"{path}: named for two outputs")
      seen.add(real)
  return jobs


def _load(path, series_uid=None):
  """The input volume (NIfTI file or DICOM series) with its HU conventions fixed and
  checked as a head CT: (volume, notes). Warnings and notes print as one line each."""
  # pylint: disable=g-import-not-at-top
  from sean_jax.data import dicom, nifti, preprocess
  # pylint: enable=g-import-not-at-top
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if os.path.isdir(path):
      vol = dicom.load_series(path, series_uid)
    else:
      vol = nifti.load_volume(path, expect_hu=False)
  for w in caught:
    print(f"warning: {_one_line(w.message)}", file=sys.stderr)
  vol.data, notes = preprocess.fix_hu_conventions(vol.data)
  for note in notes:
    print(f"note: {path}: {note}", file=sys.stderr)
  preprocess.check_head_ct(vol.data, path)
  return vol, notes


def run(args) -> int:
  # pylint: disable=g-import-not-at-top
  from sean_jax.data import nifti
  from sean_jax.models.sampler import alpha_to_pose
  # pylint: enable=g-import-not-at-top
  jobs = _jobs(args)
  try:
    model, config, step = evaluate.load_workdir_model(args.workdir, args.checkpoint)
    settings = evaluate.postprocess_settings(args.workdir, config, refine=args.refine,
                                             brain_mask=args.brain_mask,
                                             min_size_ml=args.min_size_ml)
    atlas = evaluate.load_aspects_atlas(args)
  except evaluate.CliError as e:
    raise CliError(str(e)) from None
  evaluate.warn_if_not_hu_model(config)
  meta = {"aligner": model.aligner is not None, "step": int(step),
          "workdir": os.path.abspath(args.workdir), "variant": str(config.variant),
          "postprocessing": settings, "threshold": float(args.threshold)}
  failures = 0
  for path, paths in jobs:
    start = time.perf_counter()
    try:
      vol, meta["hu_notes"] = _load(path, args.series)
      result = predict_volume(model, config, vol.data, threshold=args.threshold,
                              batch_size=args.batch_size, spacing_mm=vol.spacing_mm,
                              refine=settings["refine"] and meta["aligner"],
                              brain_mask=settings["brain_mask"],
                              min_size_ml=settings["min_size_ml"])
      result["summary"] = _summary(vol, result)
      if atlas is not None:
        add_aspects(result, vol, atlas, args.aspects_fraction)
      write_outputs(paths, vol, result, config, meta=meta)
    except (nifti.InputError, ValueError, OSError) as e:
      message = _one_line(e)
      if path not in message:
        message = f"{path}: {message}"
      print(f"error: {message}", file=sys.stderr)
      failures += 1
      if not args.folder:
        return 1
      continue
    summary = result["summary"]
    pose = ""
    if meta["aligner"]:
      pp = alpha_to_pose(result["alpha"], *vol.data.shape[1:])
      pose = (f", pose {pp['rotation_deg']:+.1f} deg, x {pp['shift_x_px']:+.1f} px, "
              f"y {pp['shift_y_px']:+.1f} px")
    print(f"{path}: {result['mask'].shape} {'/'.join(vol.axcodes)}, "
          f"{summary['lesion_ml']:.2f} ml predicted in {summary['num_components']} "
          f"component(s) "
          f"(left {summary['lesion_ml_left']:.2f}, right "
          f"{summary['lesion_ml_right']:.2f}: {summary['side']}){pose}"
          + (f", ASPECTS {result['aspects']['score']} ({result['aspects']['side']})"
             if atlas is not None else "") + "; wrote "
          f"{', '.join(paths.values())} ({time.perf_counter() - start:.1f} s)",
          flush=True)
  if failures:
    print(f"error: {failures} of {len(jobs)} volumes failed", file=sys.stderr)
    return 1
  return 0


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    with evaluate.interruptible():
      return run(args)
  except CliError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except evaluate.Interrupted as e:
    return evaluate.interrupted_exit(
        e, "the volume in progress has no output (its files are renamed into place "
           "only when all are written); finished volumes are kept")


if __name__ == "__main__":
  sys.exit(main())
