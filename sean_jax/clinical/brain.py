"""Brain and head masks of a non-contrast head CT volume in HU (NumPy/SciPy).

:func:`brain_mask` is the usual NCCT skull strip:

1. *Brain-like HU*: ``low_hu < HU < high_hu`` (default -15..100 HU: CSF 0-15 HU with a
   few HU of noise, grey/white matter 20-45 HU, an acute infarct a few HU below them,
   the falx; not air, fat, bone). It is computed on an in-plane grid of about
   ``grid_mm`` (the HU averaged over blocks of pixels, so a 0.45 mm scan is worked on at
   0.9 mm: four times fewer voxels and less noise); everything up to step 6 runs there.
2. *Break bridges*: an in-plane erosion by a disc of ``erode_mm``. The skull (hundreds
   of HU) already separates the brain from the scalp; the erosion cuts the thin
   soft-tissue bridges through the skull base, orbits and foramina. It is in-plane
   only: with 5 mm slices one voxel along z is already thicker than any such bridge.
3. *Largest 3D component* (6-connectivity) of the eroded mask.
4. *Dilate back* in-plane by the same disc, within the brain-like HU of step 1 (a
   reconstruction limited to ``erode_mm``, so a cut bridge does not grow back).
5. *Islands*: an in-plane piece of brain-like HU too thin to survive the erosion (a
   temporal lobe in the lowest slice) is added back when the mask lies directly above
   or below most of it.
6. *Fill holes* per slice (2D) and in 3D: ventricles whose CSF is noisy,
   calcifications (above ``high_hu``), the infarct itself.
7. Back on the full grid: the upsampled mask without pixels at or above ``high_hu``
   (the inner table of the skull, blurred by the coarse grid), then two pixels more
   in-plane into the edge pixels that hold brain and bone by partial volume (HU above
   ``low_hu`` and below 400 HU or 60% of the way from 30 HU to the densest pixel
   within 2 pixels, i.e. the adjacent inner table), holes filled again. So the mask
   holds no bone but may hold its partial-volume edge: a few pixels of 100-600 HU.

Measured on the phantom's test split (50 cases of 24 x 256 x 256, seed 1234): every
voxel of all 65 acute lesions inside; Dice 0.99 with the phantom's intracranial labels.
Known limit: soft tissue right under the cranial floor. Where the floor plate lies
between two slices (the phantom samples each slice on a plane; a real 5 mm slice
averages the plate into it), the tissue under it touches the brain of the slice above
with no bone between them, and nothing local tells the two apart: the mask then holds
it (phantom: median 8 ml, up to 120 ml in the lowest slices).

:func:`head_mask` is everything above ``threshold_hu`` (-300 HU: soft tissue and bone,
not air), its largest 3D component, holes filled (sinuses, mastoid cells).

Both take ``(S, H, W)`` HU arrays (or ``(H, W)`` for one slice) and return bool masks
of the same shape; a volume with no voxel in range gives an all-False mask, not an
error. They assume air is about -1000 HU: a volume storing air as 0 must be converted
to HU first.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["brain_mask", "head_mask", "fill_holes", "largest_component",
           "DEFAULT_SLICE_MM", "DEFAULT_FOV_MM"]

# Used when the spacing is unknown: 5 mm slices, and pixels that make the image a
# 230 mm field of view (a typical head CT: 0.45 mm at 512, 0.9 mm at 256).
DEFAULT_SLICE_MM = 5.0
DEFAULT_FOV_MM = 230.0

# Edge pixels below this HU always join the mask (see _rim); the edge grows by this
# many pixels (the partial volume of a blurred inner table spans about two).
_RIM_HU = 400.0
_RIM_PASSES = 2
# Largest bone fraction of an edge pixel kept. Above one half on purpose: the mask is
# used to delete predictions outside it, and an edge pixel wrongly kept costs less
# than a lesion voxel wrongly cut (the phantom labels pixels of up to ~55% bone by
# HU as intracranial: its labels are drawn before its partial-volume blur).
_RIM_BONE = 0.6

_INPLANE_4 = np.zeros((3, 3, 3), bool)
_INPLANE_4[1] = ndimage.generate_binary_structure(2, 1)
_INPLANE_8 = np.zeros((3, 3, 3), bool)
_INPLANE_8[1] = True
_CONN_6 = ndimage.generate_binary_structure(3, 1)


def _as_volume(volume_hu) -> tuple[np.ndarray, bool]:
  v = np.asarray(volume_hu)
  if v.ndim == 2:
    return v[None], True
  if v.ndim != 3:
    raise ValueError(f"expected an (S, H, W) volume (or one (H, W) slice), got shape {v.shape}")
  return v, False


def _spacing(spacing_mm, shape) -> tuple[float, float, float]:
  if spacing_mm is None:
    return DEFAULT_SLICE_MM, DEFAULT_FOV_MM / shape[1], DEFAULT_FOV_MM / shape[2]
  sp = tuple(float(s) for s in np.asarray(spacing_mm, np.float64).reshape(-1))
  if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
    raise ValueError(f"spacing_mm must be 3 positive numbers (slice, row, col), got {spacing_mm}")
  return sp


def _disc(radius_px: tuple[float, float]) -> np.ndarray:
  """(1, h, w) in-plane elliptical disc with semi-axes ``radius_px`` (rows, cols)."""
  ry, rx = (max(r, 0.0) for r in radius_px)
  ny, nx = int(math.floor(ry)), int(math.floor(rx))
  y, x = np.mgrid[-ny:ny + 1, -nx:nx + 1]
  disc = (y / max(ry, 1e-6)) ** 2 + (x / max(rx, 1e-6)) ** 2 <= 1.0
  return disc[None]


def fill_holes(mask: np.ndarray, *, per_slice: bool = True, in_3d: bool = True) -> np.ndarray:
  """Fills background regions of an (S, H, W) mask that do not reach the border.

  ``per_slice``: in each slice, regions (4-connected) not touching the slice's edge;
  ``in_3d``: then regions (6-connected) not touching any face of the volume. Done by
  labelling the background once (faster than ``ndimage.binary_fill_holes``, which
  iterates a dilation across the image).
  """
  mask = np.asarray(mask, bool)
  out = mask.copy()
  for structure, enabled in ((_INPLANE_4, per_slice), (_CONN_6, in_3d)):
    if not enabled or not out.any():
      continue
    labels, n = ndimage.label(~out, structure=structure)
    if n == 0:
      continue
    border = np.zeros(n + 1, bool)
    faces = [labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    if structure is _CONN_6:
      faces += [labels[0], labels[-1]]
    for f in faces:
      border[f] = True
    border[0] = True  # the mask itself
    out |= ~border[labels]
  return out


def largest_component(mask: np.ndarray, structure: np.ndarray = _CONN_6) -> np.ndarray:
  """The largest connected component of a bool mask (all False if the mask is empty)."""
  labels, n = ndimage.label(mask, structure=structure)
  if n == 0:
    return np.zeros(mask.shape, bool)
  sizes = np.bincount(labels.ravel(), minlength=n + 1)
  sizes[0] = 0
  return labels == int(np.argmax(sizes))


def _block_mean(v: np.ndarray, f: int) -> np.ndarray:
  """In-plane mean over f x f blocks (edge-padded), float32: (S, ceil(H/f), ceil(W/f))."""
  if f == 1:
    return v.astype(np.float32, copy=False)
  s, h, w = v.shape
  hp, wp = -h % f, -w % f
  if hp or wp:
    v = np.pad(v, ((0, 0), (0, hp), (0, wp)), mode="edge")
  # f * f strided adds: several times faster than a mean over a reshaped axis pair.
  out = np.zeros((s, (h + hp) // f, (w + wp) // f), np.float32)
  for i in range(f):
    for j in range(f):
      out += v[:, i::f, j::f]
  return out * np.float32(1.0 / (f * f))


def _dilate8(mask: np.ndarray) -> np.ndarray:
  """In-plane 3 x 3 dilation of an (S, H, W) bool mask (by shifts: ~10x faster than
  ndimage.binary_dilation on a full 512 x 512 volume)."""
  rows = mask.copy()
  rows[:, 1:] |= mask[:, :-1]
  rows[:, :-1] |= mask[:, 1:]
  out = rows.copy()
  out[:, :, 1:] |= rows[:, :, :-1]
  out[:, :, :-1] |= rows[:, :, 1:]
  return out


def _rim(v: np.ndarray, core: np.ndarray, low_hu: float) -> np.ndarray:
  """Edge pixels (8-adjacent in-plane to ``core``) that are more brain than bone.

  A pixel straddling the inner table reads ``(1 - f) * brain + f * bone``; it is
  taken when ``f < _RIM_BONE``, with brain taken as 30 HU and bone as the densest
  pixel within 2 pixels in-plane. Next to bone thinner
  than a pixel (the cranial floor cut obliquely) that densest pixel is itself diluted,
  so pixels below ``_RIM_HU`` are taken whatever their neighbours.
  """
  ring = _dilate8(core) & ~core & (v > low_hu)
  s, y, x = np.nonzero(ring)
  if s.size == 0:
    return ring
  h, w = v.shape[1:]
  local_max = np.full(s.shape, -np.inf, np.float32)
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      local_max = np.maximum(local_max, v[s, np.clip(y + dy, 0, h - 1), np.clip(x + dx, 0, w - 1)])
  keep = v[s, y, x] < np.maximum(30.0 + _RIM_BONE * (local_max - 30.0), _RIM_HU)
  out = np.zeros(v.shape, bool)
  out[s[keep], y[keep], x[keep]] = True
  return out


def _add_vertical_islands(mask: np.ndarray, cand: np.ndarray,
                          min_cover: float = 0.5) -> np.ndarray:
  """Adds in-plane components of ``cand`` lying mostly over/under ``mask``'s next slices.

  Brain that is thinner in a slice than the erosion (a temporal lobe or the cerebellum
  in the lowest slice) vanishes from the eroded core and is only joined to the rest
  through the slice above or below: such a 2D component (8-connected) of ``cand`` is
  added when at least ``min_cover`` of its pixels have mask directly above or below.
  """
  labels, n = ndimage.label(cand & ~mask, structure=_INPLANE_8)
  if n == 0 or mask.shape[0] < 2:
    return mask
  covered = np.zeros(mask.shape, bool)
  covered[:-1] |= mask[1:]
  covered[1:] |= mask[:-1]
  area = np.bincount(labels.ravel(), minlength=n + 1)
  cover = np.bincount(labels[covered].ravel(), minlength=n + 1)
  keep = cover >= min_cover * np.maximum(area, 1)
  keep[0] = False
  return mask | keep[labels]


def brain_mask(volume_hu, spacing_mm=None, *, low_hu: float = -15.0, high_hu: float = 100.0,
               erode_mm: float = 3.0, grid_mm: float = 0.9) -> np.ndarray:
  """Brain (intracranial soft tissue and CSF) mask of a head CT; see the module doc.

  Args:
    volume_hu: (S, H, W) (or (H, W)) HU, air about -1000.
    spacing_mm: (3,) (slice, row, col) mm, or None: 5 mm slices over a 230 mm field of
      view (``DEFAULT_SLICE_MM``, ``DEFAULT_FOV_MM``).
    low_hu, high_hu: the brain-like HU range (exclusive), HU.
    erode_mm: in-plane radius of the erosion that cuts bridges, mm.
    grid_mm: in-plane pixel size the mask is worked out at, mm (never finer than the
      scan's).

  Returns:
    (S, H, W) (or (H, W)) bool, True inside the brain.
  """
  v, squeeze = _as_volume(volume_hu)
  sp = _spacing(spacing_mm, v.shape)
  f = max(1, int(round(grid_mm / max(min(sp[1], sp[2]), 1e-6))))
  coarse = _block_mean(v, f)
  cand = (coarse > low_hu) & (coarse < high_hu)
  out = np.zeros(v.shape, bool)
  if cand.any():
    disc = _disc((erode_mm / (sp[1] * f), erode_mm / (sp[2] * f)))
    core = ndimage.binary_erosion(cand, structure=disc, border_value=0)
    core = largest_component(core if core.any() else cand)
    core = ndimage.binary_dilation(core, structure=disc) & cand
    core = fill_holes(_add_vertical_islands(core, cand))
    if f > 1:
      core = np.repeat(np.repeat(core, f, axis=1), f, axis=2)[:, :v.shape[1], :v.shape[2]]
    core &= v < high_hu
    for _ in range(_RIM_PASSES):
      core |= _rim(v, core, low_hu)
    out = fill_holes(core, in_3d=False)
  return out[0] if squeeze else out


def head_mask(volume_hu, *, threshold_hu: float = -300.0) -> np.ndarray:
  """Head (everything denser than air) mask: (S, H, W) (or (H, W)) HU -> same shape bool.

  Voxels above ``threshold_hu`` (HU), their largest 3D (6-connected) component, holes
  filled per slice and in 3D (air in the sinuses, mastoid cells, ear canals).
  """
  v, squeeze = _as_volume(volume_hu)
  out = fill_holes(largest_component(v > threshold_hu))
  return out[0] if squeeze else out
