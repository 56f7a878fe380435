"""Writes synthetic head CT phantom cases as NIfTI, with pose/spacing JSON.

    python -m sean_jax.phantom --out DIR --num-cases N --seed S [--size 256]
        [--slices 24] [--start-index 0] [--preview FILE.png]

Per case: ``DIR/<case_id>_ct.nii.gz`` (HU, int16), ``DIR/<case_id>_mask.nii.gz``
(uint8 0/1, acute infarct) and ``DIR/<case_id>.json`` (pose, spacing, seed, index,
has_lesion). Files are written atomically. Bad arguments: one line on stderr, exit 2,
nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


class _ArgumentParser(argparse.ArgumentParser):

  def error(self, message):  # one line, exit code 2
    self.exit(2, f"{self.prog}: error: {message}\n")


def _parse(argv):
  p = _ArgumentParser(prog="python -m sean_jax.phantom",
                      description="Write synthetic NCCT phantom cases as NIfTI.")
  p.add_argument("--out", required=True, help="output directory (created if missing)")
  p.add_argument("--num-cases", type=int, required=True)
  p.add_argument("--seed", type=int, required=True)
  p.add_argument("--size", type=int, default=256, help="H = W, a multiple of 16, >= 32")
  p.add_argument("--slices", type=int, default=24)
  p.add_argument("--start-index", type=int, default=0)
  p.add_argument("--preview", default=None, help="PNG montage of a few cases")
  args = p.parse_args(argv)
  problems = []
  if args.num_cases < 1:
    problems.append(f"--num-cases must be >= 1, got {args.num_cases}")
  if args.size < 32 or args.size % 16:
    problems.append(f"--size must be a multiple of 16 and >= 32, got {args.size}")
  if args.slices < 1:
    problems.append(f"--slices must be >= 1, got {args.slices}")
  if args.seed < 0 or args.start_index < 0:
    problems.append("--seed and --start-index must be >= 0")
  if args.preview is not None and not args.preview.lower().endswith(".png"):
    problems.append(f"--preview must name a .png file, got {args.preview!r}")
  if problems:
    p.error("; ".join(problems))
  for path, what in ((args.out, "--out"),) + (
      ((os.path.dirname(os.path.abspath(args.preview)), "--preview directory"),)
      if args.preview else ()):
    problem = _unwritable(path)
    if problem:
      p.error(f"{what} {path!r} {problem}")
  return args


def _unwritable(path):
  """Why ``path`` cannot be (created and) written as a directory, or None."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      return "exists and is not a directory"
    return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"cannot be created: {parent!r} is not a directory"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"cannot be created: {parent!r} is not writable"
  return None


def _atomic_json(obj, path):
  from sean_jax.data.nifti import atomic_output
  with atomic_output(path, ".json") as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
      f.write("\n")


def write_case(case, out_dir, seed, index):
  """Writes one :class:`PhantomCase` as NIfTI + JSON (atomic)."""
  from sean_jax.data import nifti
  spacing = tuple(float(s) for s in case.spacing_mm)
  ct = np.clip(np.rint(case.ct_hu), -32768, 32767).astype(np.int16)
  nifti.save_model_array(ct, spacing, os.path.join(out_dir, f"{case.case_id}_ct.nii.gz"))
  nifti.save_model_array(case.mask.astype(np.uint8), spacing,
                         os.path.join(out_dir, f"{case.case_id}_mask.nii.gz"))
  meta = dict(case.pose)
  meta.update({"spacing_mm": list(spacing), "seed": int(seed), "index": int(index),
               "has_lesion": bool(case.has_lesion), "case_id": case.case_id,
               "shape": list(case.ct_hu.shape),
               "orientation": "model arrays (slice, row, col): slices inferior->superior, "
                              "rows anterior->posterior, cols patient right->left; NIfTI "
                              "file axes (col, row, slice), axis codes L, P, S",
               "pose_convention": "sean_jax.models.sampler.warp(ct, pose_to_alpha(pose)) "
                                  "aligns the head (mid-sagittal plane on the centre column)"})
  if case.slice_poses is not None:
    meta["slice_poses"] = case.slice_poses
  _atomic_json(meta, os.path.join(out_dir, f"{case.case_id}.json"))


def save_preview(cases, path, n_slices=5):
  """PNG montage: cases (rows) x slices (cols), brain window W80 L40, lesion in red."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = len(cases)
  fig, axes = plt.subplots(rows, n_slices, figsize=(2.2 * n_slices, 2.3 * rows),
                           squeeze=False, facecolor="black")
  for r, case in enumerate(cases):
    s_total = case.ct_hu.shape[0]
    lesion_slices = np.flatnonzero(case.mask.reshape(s_total, -1).any(axis=1))
    picks = np.linspace(0.12 * (s_total - 1), 0.9 * (s_total - 1), n_slices).round().astype(int)
    if lesion_slices.size:  # make sure the lesion is shown
      mid = lesion_slices[len(lesion_slices) // 2]
      picks[np.argmin(np.abs(picks - mid))] = mid
    for c, s in enumerate(picks):
      ax = axes[r, c]
      ax.imshow(case.ct_hu[s], cmap="gray", vmin=0.0, vmax=80.0, interpolation="nearest")
      if case.mask[s].any():
        ax.contour(case.mask[s], levels=[0.5], colors="red", linewidths=0.6)
      ax.set_axis_off()
      label = f"{case.case_id[8:]} s{s}"
      if c == 0:
        label += f"  rot {case.pose['rotation_deg']:+.0f}°"
      ax.set_title(label, color="white", fontsize=7, pad=2)
  fig.subplots_adjust(left=0.005, right=0.995, top=0.96, bottom=0.005, wspace=0.02, hspace=0.12)
  from sean_jax.data.nifti import atomic_output
  try:
    with atomic_output(path, ".png") as tmp:
      fig.savefig(tmp, dpi=90, facecolor="black")
  finally:
    plt.close(fig)


def main(argv=None):
  args = _parse(sys.argv[1:] if argv is None else argv)
  from sean_jax.data.phantom import PhantomConfig, generate_case

  config = PhantomConfig(size=args.size, slices=args.slices)
  os.makedirs(args.out, exist_ok=True)
  preview_cases = []
  t0 = time.perf_counter()
  n_lesion = 0
  for i in range(args.num_cases):
    index = args.start_index + i
    case = generate_case(args.seed, index, config)
    write_case(case, args.out, args.seed, index)
    n_lesion += case.has_lesion
    if args.preview and len(preview_cases) < 4:
      preview_cases.append(case)
  dt = time.perf_counter() - t0
  if args.preview:
    save_preview(preview_cases, args.preview)
  print(f"wrote {args.num_cases} cases ({n_lesion} with a lesion) to {args.out} "
        f"in {dt:.1f} s ({args.num_cases / dt:.2f} cases/s incl. NIfTI writing)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
