"""False positives on a real normal head: the CT template posed at several angles.

The template (``../shared/data/ct_template/template_with_skull_2mm.nii.gz``: an
average of many normal heads, 2 mm voxels, air stored as 0) holds no infarct, so every
millilitre a model predicts on it is a false positive. It is made to look like a
clinical scan: 5 mm slices (averages of the 2 mm ones, :func:`thick_slices`), image
noise, and in-plane rotations (``ndimage.rotate`` about the centre) so that the
alignment has work to do. The prediction goes through ``predict.predict_volume`` with
the run's refinement, brain mask and component size, as ``python -m sean_jax.predict``
would.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["thick_slices", "template_volume", "posed", "mirrored_fraction",
           "false_positives"]

DEFAULT_ANGLES = (-12.0, -6.0, 0.0, 6.0, 12.0)


def thick_slices(volume, first: int, count: int, thickness: float) -> np.ndarray:
  """Slabs of ``thickness`` thin slices (fractional), averaged, from ``first`` on:
  (S, H, W) -> (count, H, W)."""
  out = []
  for k in range(count):
    lo = first + k * thickness
    hi = lo + thickness
    index = np.arange(int(math.floor(lo)), int(math.ceil(hi)))
    weight = np.minimum(index + 1, hi) - np.maximum(index, lo)
    out.append(np.tensordot(weight, volume[index], axes=1) / weight.sum())
  return np.stack(out)


def template_volume(path) -> tuple[np.ndarray, tuple]:
  """The template as 5 mm slices through the whole brain, HU (air -1000): ((S, H, W)
  float32, spacing (slice, row, col) mm)."""
  from sean_jax.data import nifti, preprocess  # pylint: disable=g-import-not-at-top
  volume = nifti.load_volume(path, expect_hu=False)
  hu, _ = preprocess.fix_hu_conventions(volume.data)
  sp = volume.spacing_mm
  thickness = 5.0 / sp[0]
  count = int((hu.shape[0] - 20) // thickness)
  return (thick_slices(hu.astype(np.float64), 20, count, thickness).astype(np.float32),
          (5.0, float(sp[1]), float(sp[2])))


def posed(hu, angle_deg: float, rng, noise_hu: float = 4.0) -> np.ndarray:
  """``hu`` rotated in-plane by ``angle_deg`` about the centre, with Gaussian noise."""
  moved = ndimage.rotate(hu, angle_deg, axes=(1, 2), reshape=False, order=1,
                         mode="constant", cval=-1000.0)
  return (moved + rng.normal(scale=noise_hu, size=moved.shape)).astype(np.float32)


def mirrored_fraction(mask, angle_deg: float) -> float | None:
  """The share of a prediction on a head posed by :func:`posed` whose mirror image, about
  the head's midline, is predicted too (to a pixel): (S, H, W) bool -> [0, 1], None
  for an empty mask. The pose is undone first; the template's midline is its centre
  column (to 1 mm, measured by mirror matching). Near 1: the false positives sit on
  structures both hemispheres share, which a comparison with the mirrored side could
  tell from an infarct; near 0: one-sided."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return None
  back = ndimage.rotate(mask.astype(np.uint8), -angle_deg, axes=(1, 2), reshape=False,
                        order=0) > 0
  if not back.any():
    return None
  mirror = ndimage.binary_dilation(back[:, :, ::-1], structure=np.ones((1, 3, 3), bool))
  return float(np.count_nonzero(back & mirror) / np.count_nonzero(back))


def false_positives(model, config, path, settings: dict, *, angles=DEFAULT_ANGLES,
                    seed: int = 0, threshold: float = 0.5) -> list[dict]:
  """Per angle: predicted ml and components after the run's postprocessing
  (``settings``: ``evaluate.postprocess_settings``), ml before it (threshold only), and
  inside the brain mask without the size filter (comparable between runs, whose size
  filters differ) its ml and :func:`mirrored_fraction`."""
  from sean_jax import metrics, predict  # pylint: disable=g-import-not-at-top
  hu, spacing = template_volume(path)
  rng = np.random.default_rng(seed)
  voxel_ml = float(np.prod(spacing)) / 1000.0
  out = []
  for angle in angles:
    volume = posed(hu, angle, rng)
    result = predict.predict_volume(model, config, volume, threshold=threshold,
                                    spacing_mm=spacing, refine=settings["refine"],
                                    brain_mask=settings["brain_mask"],
                                    min_size_ml=settings["min_size_ml"])
    out.append({"angle_deg": float(angle),
                "ml": float(np.count_nonzero(result["mask"])) * voxel_ml,
                "components": int(metrics.label_components(result["mask"])[1]),
                "ml_before_postprocessing": float(np.count_nonzero(
                    result["probabilities"] > threshold)) * voxel_ml,
                **in_brain(result, angle, threshold, voxel_ml)})
  return out


def in_brain(result: dict, angle_deg: float, threshold: float, voxel_ml: float) -> dict:
  """``predict_volume``'s thresholded probabilities inside its brain mask (all of them
  without one): ml and :func:`mirrored_fraction`."""
  found = result["probabilities"] > threshold
  if result["brain"] is not None:
    found &= result["brain"]
  return {"ml_in_brain_no_size_filter": float(np.count_nonzero(found)) * voxel_ml,
          "mirrored_fraction": mirrored_fraction(found, angle_deg)}
