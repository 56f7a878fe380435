"""Where a volume is cleaned: every step from raw intensities and labels to the arrays
the models see, for the phantom, AISD, NIfTI files and DICOM series alike.

1. HU conventions (:func:`fix_hu_conventions`): scanner padding below -1024 HU, unsigned
   storage with a +1024 offset, air stored as 0 (HU clipped at 0, as many exported scans
   and the CQ500 template are) are detected and undone, each with a one-line note.
2. Is it a head CT (:func:`check_head_ct`): too few slices, no head (all air), values
   that are not CT at all are refused with a one-line ``ValueError``.
3. Labels (:func:`map_labels`): raw label codes -> 0/1.
4. Intensities: :func:`window_and_normalize` for HU; :func:`zscore` for AISD's PNG images
   (0..255 of an undocumented window, not HU).
5. Size (:func:`resize_volume`): in-plane resize to the model's ``image_size`` (linear
   with antialiasing, the convention of ``jax.image.resize(..., "linear")``).

:func:`prepare_case` runs them in that order for a case source
(``sean_jax.data.sources``); ``sean_jax.predict`` runs the same steps on a scan.

The paper clips to "[40, 100] HU" and z-scores per case. Read literally as a range,
[40, 100] would clip away white matter (22-32 HU), most grey matter (35-45 HU) and every
hypodense infarct; we read it as window level 40 / width 100, i.e. [-10, 90] HU, and
keep the window a parameter (docs/phantom.md, "Preprocessing", has the numbers).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "DEFAULT_WINDOW", "INTENSITY_MODES", "MIN_SLICES", "fix_hu_conventions",
    "check_head_ct", "window_and_normalize", "zscore", "resize_volume", "as_size",
    "map_labels", "check_case", "prepare_case", "brain_slice_weights",
]

DEFAULT_WINDOW = (-10.0, 90.0)  # level 40, width 100
INTENSITY_MODES = ("hu", "zscore")
# Fewer slices than a slab (2T+1 = 3) is not a head CT the model can read.
MIN_SLICES = 3
AIR_HU = -1000.0


# ------------------------------------------------------------------ HU conventions


def _tissue_mode(volume: np.ndarray, above: float) -> float:
  """The most common value (10 HU bins) of the voxels above ``above`` (the air): in a
  head CT the brain and soft tissue, about 20-60 HU in true HU."""
  v = volume[volume > above]
  if v.size == 0:
    return float("nan")
  v = v[v < np.percentile(v, 99.0) + 1.0]
  start, stop = float(v.min()), float(v.max())
  bins = max(int((stop - start) // 10.0) + 1, 1)
  counts, edges = np.histogram(v, bins=bins, range=(start, start + 10.0 * bins))
  k = int(counts.argmax())
  return float(edges[k] + edges[k + 1]) / 2.0


def _outside_air(volume: np.ndarray, level: float) -> np.ndarray:
  """(S, H, W) bool: voxels <= ``level`` connected (in-plane) to the slice border."""
  low = volume <= level
  border = np.zeros_like(low)
  border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = ndimage.generate_binary_structure(2, 1)  # in-plane only
  labels, _ = ndimage.label(low, structure)
  keep = np.unique(labels[border & low])
  return np.isin(labels, keep[keep > 0])


def fix_hu_conventions(volume) -> tuple[np.ndarray, list[str]]:
  """Undoes storage conventions that are not plain HU; returns (HU volume, notes).

  volume: (S, H, W) intensities as stored (after any DICOM rescale slope/intercept or
  NIfTI scaling). Each fix adds a one-line note:
  - values below -1024 (scanner padding outside the field of view, e.g. -2000 or
    -3024) are raised to -1024;
  - no negative value and the soft tissue near 1000-1150: unsigned storage with a +1024
    offset; 1024 is subtracted;
  - nothing below -200 HU, over 5% of the voxels exactly 0, the soft tissue near
    0-100 HU and bone above 300 HU: air stored as 0 (HU clipped at 0, or resampled
    from such a scan, which leaves a few small negative values); the voxels <= 0
    connected in-plane to the slice border (the air around the head) are set to
    -1000 HU. Air inside the head (sinuses) stays at 0.
  Anything else is returned unchanged (``check_head_ct`` decides whether it is CT).
  Returns float32 (S, H, W).
  """
  v = np.array(volume, np.float32)
  notes = []
  lo = float(v.min()) if v.size else 0.0
  if lo < -1024.0 - 0.5:
    n = int((v < -1024.0).sum())
    v = np.maximum(v, -1024.0)
    notes.append(f"{n} voxels below -1024 HU (scanner padding, min {lo:g}) set to -1024")
    lo = -1024.0
  if lo >= 0.0:
    # Unsigned storage: the air is a noisy band just above 0 (or exactly at it).
    mode = _tissue_mode(v, lo + 200.0)
    if 900.0 <= mode <= 1150.0:
      v -= 1024.0
      notes.append(f"no negative values and soft tissue at {mode:.0f}: unsigned storage "
                   f"with a +1024 offset; subtracted 1024")
      return v, notes
  zeros = float((v == 0.0).mean())
  if lo > -200.0 and zeros > 0.05 and float(v.max()) >= 300.0:  # bone: not 0..255
    mode = _tissue_mode(v, 5.0)
    if -20.0 <= mode <= 100.0:
      air = _outside_air(v, 0.0)
      v[air] = AIR_HU
      notes.append(f"no air below -200 HU, {100 * zeros:.0f}% of the voxels exactly 0 and "
                   f"soft tissue at {mode:.0f} HU: air stored as 0 (HU clipped); the "
                   f"{100.0 * air.mean():.0f}% of the voxels <= 0 around the head set to "
                   f"-1000 HU")
  return v, notes


def check_head_ct(volume_hu, name: str = "volume") -> None:
  """Raises a one-line ``ValueError`` naming ``name`` when ``volume_hu`` (S, H, W),
  after :func:`fix_hu_conventions`, is not a head CT the model can read: fewer than
  :data:`MIN_SLICES` slices, no head (no voxel of soft tissue or bone), or values that
  are not CT (no air below -500 HU, or less than 200 HU from the lowest to the highest
  value)."""
  v = np.asarray(volume_hu)
  if v.ndim != 3:
    raise ValueError(f"{name}: expected a 3D volume, got shape {v.shape}")
  if v.shape[0] < MIN_SLICES:
    raise ValueError(f"{name}: {v.shape[0]} slice(s); a head CT needs at least "
                     f"{MIN_SLICES} axial slices (the model reads 2T+1 adjacent slices)")
  lo, hi = float(v.min()), float(v.max())
  if hi <= -300.0:
    raise ValueError(f"{name}: no head in the volume (every voxel is air, "
                     f"{lo:g}..{hi:g} HU)")
  hint = ""
  if lo >= 0.0 and hi <= 1.0:
    hint = " (looks like a 0..1 normalised image)"
  elif lo >= 0.0 and hi <= 255.0:
    hint = " (looks like a 0..255 windowed image, e.g. from PNG)"
  if hi - lo < 200.0 or lo > -500.0:
    raise ValueError(f"{name}: values {lo:g}..{hi:g} are not a CT in Hounsfield units"
                     f"{hint}: a head CT holds air (about -1000 HU) and soft tissue "
                     f"(0-100 HU)")
  tissue = float(((v >= -100.0) & (v <= 100.0)).mean())
  if tissue < 0.005:
    raise ValueError(f"{name}: no head in the volume ({100 * tissue:.2f}% of the "
                     f"voxels are soft tissue, -100..100 HU)")


# ------------------------------------------------------------------- intensities


def window_and_normalize(volume_hu, window=DEFAULT_WINDOW) -> np.ndarray:
  """Clips to the HU ``window`` (lo, hi), then z-scores over the whole volume.

  Mean and standard deviation are taken over every voxel of the clipped volume (one
  pair per case). A constant volume (std 0) maps to zeros. Returns float32 of the
  input's shape.
  """
  lo, hi = float(window[0]), float(window[1])
  if not hi > lo:
    raise ValueError(f"window must be (lo, hi) with hi > lo, got {window}")
  v = np.clip(np.asarray(volume_hu, np.float64), lo, hi)
  mean = v.mean()
  std = v.std()
  if not std > 1e-6 * max(hi - lo, 1.0):
    return np.zeros(v.shape, np.float32)
  return ((v - mean) / std).astype(np.float32)


def map_labels(mask, lesion_labels: Sequence[int] | None, case_id: str = "?") -> np.ndarray:
  """Raw labels -> uint8 0/1. ``None``: the mask must already hold only 0 and 1."""
  mask = np.asarray(mask)
  if lesion_labels is None:
    if mask.size and (mask.min() < 0 or mask.max() > 1):
      extra = sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]
      raise ValueError(f"case {case_id}: mask holds labels {extra} besides 0/1; "
                       f"pass lesion_labels to map raw labels")
    return mask.astype(np.uint8)
  return np.isin(mask, np.asarray(tuple(lesion_labels))).astype(np.uint8)


def zscore(volume) -> np.ndarray:
  """Per-case z-score over every voxel, no clip (for intensities that are not HU).

  Same statistics as :func:`window_and_normalize` without its HU window; a
  constant volume maps to zeros. Returns float32.
  """
  v = np.asarray(volume, np.float64)
  mean, std = v.mean(), v.std()
  if not std > 1e-6 * max(float(np.abs(v).max()), 1.0):
    return np.zeros(v.shape, np.float32)
  return ((v - mean) / std).astype(np.float32)


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of linear interpolation with antialiasing (half-pixel
  centres; the triangle kernel widened by the downsampling factor), rows sum to 1."""
  scale = n_in / n_out
  centres = (np.arange(n_out) + 0.5) * scale - 0.5
  width = max(scale, 1.0)
  w = 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / width
  w = np.maximum(w, 0.0)
  return w / w.sum(axis=1, keepdims=True)


def resize_volume(volume, size: tuple[int, int]) -> np.ndarray:
  """In-plane resize of (S, H, W) to (S, *size): separable linear, antialiased."""
  v = np.asarray(volume, np.float32)
  h, w = v.shape[1:]
  out_h, out_w = size
  if (h, w) == (out_h, out_w):
    return v
  wy = _resize_weights(h, out_h).astype(np.float32)
  wx = _resize_weights(w, out_w).astype(np.float32)
  return np.einsum("yh,shw,xw->syx", wy, v, wx, optimize=True).astype(np.float32)


def as_size(image_size) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, (int, np.integer)):
    image_size = (int(image_size), int(image_size))
  size = tuple(int(s) for s in image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
  return size


def check_case(case: dict, index: int | None = None) -> None:
  """Raises a one-line ``ValueError`` naming the case and field if ``case`` is unusable."""
  cid = f"{case.get('case_id', '?')}" + ("" if index is None else f" (index {index})")
  image, mask = case.get("image"), case.get("mask")
  if image is None or mask is None:
    raise ValueError(f"case {cid}: missing field {'image' if image is None else 'mask'}")
  image, mask = np.asarray(image), np.asarray(mask)
  if image.ndim != 3:
    raise ValueError(f"case {cid}: image must be (S, H, W), got shape {image.shape}")
  if image.shape[0] == 0 or min(image.shape) == 0:
    raise ValueError(f"case {cid}: image has 0 slices or pixels, shape {image.shape}")
  if mask.shape != image.shape:
    raise ValueError(f"case {cid}: mask shape {mask.shape} != image shape {image.shape}")
  finite = np.isfinite(image)
  if not finite.all():
    raise ValueError(f"case {cid}: image has {int(finite.size - finite.sum())} "
                     f"non-finite (NaN/inf) values")
  pose = case.get("pose")
  if pose is not None and np.shape(pose) != (3,):
    raise ValueError(f"case {cid}: pose must have shape (3,), got {np.shape(pose)}")


def prepare_case(case_id: str, image, mask, *, intensity: str, window=None,
                 lesion_labels: Sequence[int] | None = None, image_size=None,
                 pose=None, spacing_mm=None, brain_mask: bool = False) -> dict:
  """Raw case -> the pipeline's case dict (see the module doc for each step).

  Args:
    case_id: for messages and the output.
    image: (S, H, W) raw intensities: HU for ``intensity="hu"``, anything else for
      ``"zscore"``.
    mask: (S, H, W) raw labels.
    intensity: ``"hu"`` (``fix_hu_conventions``, with a warning per fix, then clip to
      ``window`` and z-score: ``window_and_normalize``) or
      ``"zscore"`` (z-score, no clip).
    window: HU window for ``"hu"``; ``None``: :data:`DEFAULT_WINDOW`.
    lesion_labels: raw labels counted as lesion; ``None``: the mask must be 0/1.
    image_size: int or (H, W) to resize in-plane to; ``None``: keep. The mask is
      resized the same way as 0/1 floats and thresholded at 0.5; in-plane spacing
      scales, the pose (normalised units) does not change.
    pose: (3,) alpha in the sampler's convention (size independent), or None -> NaN.
    spacing_mm: (slice, row, col) of the raw grid, or None -> NaN.
    brain_mask: add ``"brain"``, (S, H, W) uint8 0/1, the brain mask of the HU image
      (``sean_jax.clinical.brain.brain_mask``), resized like the mask; for evaluation.
      Only for ``intensity="hu"`` (an image that is not HU has none).
  """
  if intensity not in INTENSITY_MODES:
    raise ValueError(f"case {case_id}: intensity must be one of {INTENSITY_MODES}, "
                     f"got {intensity!r}")
  image = np.asarray(image)
  check_case({"case_id": case_id, "image": image, "mask": mask})
  mask = map_labels(mask, lesion_labels, case_id)
  brain = None
  if intensity == "hu":
    image, notes = fix_hu_conventions(image)
    for note in notes:
      warnings.warn(f"case {case_id}: {note}", UserWarning, stacklevel=2)
    if brain_mask:
      from sean_jax.clinical import brain as brain_lib  # pylint: disable=g-import-not-at-top
      brain = brain_lib.brain_mask(image, None if spacing_mm is None else
                                   np.asarray(spacing_mm, np.float64).reshape(3))
    kwargs = {} if window is None else {"window": tuple(window)}
    image = window_and_normalize(image, **kwargs)
  else:
    image = zscore(image)
  spacing = (np.full(3, np.nan, np.float32) if spacing_mm is None
             else np.asarray(spacing_mm, np.float32).reshape(3).copy())
  size = as_size(image_size)
  if size is not None and size != image.shape[1:]:
    spacing[1] *= image.shape[1] / size[0]
    spacing[2] *= image.shape[2] / size[1]
    image = resize_volume(image, size)
    mask = (resize_volume(mask.astype(np.float32), size) >= 0.5).astype(np.uint8)
    if brain is not None:
      brain = resize_volume(brain.astype(np.float32), size) >= 0.5
  pose = (np.full(3, np.nan, np.float32) if pose is None
          else np.asarray(pose, np.float32).reshape(3))
  case = {"case_id": str(case_id), "image": np.ascontiguousarray(image, np.float32),
          "mask": np.ascontiguousarray(mask, np.uint8), "pose": pose,
          "spacing_mm": spacing}
  if brain is not None:
    case["brain"] = np.ascontiguousarray(brain, np.uint8)
  return case


def brain_slice_weights(volume_preprocessed, min_fraction: float = 0.05) -> np.ndarray:
  """(S,) float32 in {0, 1}: 1 for slices with a meaningful amount of head in view.

  A slice counts when more than ``min_fraction`` of its pixels lie above the volume's
  minimum (after windowing, air sits at the minimum). Used to choose the slices whose
  alignment estimates are aggregated. ``volume_preprocessed`` is (S, H, W) or
  (S, H, W, 1).
  """
  v = np.asarray(volume_preprocessed, np.float32)
  if v.ndim == 4 and v.shape[-1] == 1:
    v = v[..., 0]
  if v.ndim != 3:
    raise ValueError(f"expected an (S, H, W) volume, got shape {v.shape}")
  vmin, vmax = float(v.min()), float(v.max())
  tol = 1e-4 * max(vmax - vmin, 1e-6)
  frac = (v > vmin + tol).reshape(v.shape[0], -1).mean(axis=1)
  return (frac > min_fraction).astype(np.float32)
