"""ASPECTS: the 20 regions on an aligned head CT, and the score from a lesion mask.

The Alberta Stroke Program Early CT Score counts, in the hemisphere with the infarct,
ten regions of the middle cerebral artery territory at two axial levels: at the
ganglionic level the caudate (C), lentiform nucleus (L), internal capsule (IC), insular
ribbon (I) and the cortex M1 (anterior), M2 (lateral), M3 (posterior); at the
supraganglionic level the cortex M4, M5, M6. The score is 10 minus one point per
involved region.

Regions come from a 2D NCCT atlas (Sun et al., Sci Data 2024, MIT; ``load_atlas``):
one average skull-stripped brain and its label map per level. On an *aligned* volume
(mid-sagittal plane on the centre column, ``sean_jax.models``; model orientation:
rows anterior -> posterior, columns patient right -> left, like the atlas shown
radiologically):

1. every slice's brain (``sean_jax.clinical.brain``) is matched to each atlas level by
   a scale in each axis and a shift (:func:`fit_slice`): started from the brain's
   bounding box, refined by maximising the normalised cross-correlation of the
   intensities inside the brain (ventricles, basal ganglia, outline), which needs no
   HU calibration;
2. the ganglionic level is the slice that matches the ganglionic atlas best, the
   supraganglionic level the best match of the cortical atlas 10-45 mm above it
   (:func:`find_levels`);
3. the ganglionic regions cover the slices within ``GANGLIONIC_HALF_MM`` of the
   ganglionic level, the supraganglionic ones the slices within
   ``SUPRAGANGLIONIC_HALF_MM`` of theirs and above the ganglionic slab: the several
   5 mm slices a radiologist scores at each level. Each slice gets its own fit, and
   the labels are kept inside its brain mask.

Region codes on a map (:data:`REGIONS`): 1-10 are the patient's right C, L, IC, I,
M1-M6, 11-20 the left in the same order; 0 is outside every region. A region is
involved when the lesion covers at least ``fraction`` of its voxels
(:data:`DEFAULT_FRACTION`, chosen on the phantom's validation split: docs/aspects.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from scipy import ndimage, optimize

__all__ = ["REGIONS", "AGE_GROUPS", "DEFAULT_AGE_GROUP", "DEFAULT_FRACTION",
           "GANGLIONIC_HALF_MM", "SUPRAGANGLIONIC_HALF_MM", "AtlasLevel", "Atlas",
           "load_atlas", "fit_slice", "find_levels", "map_regions", "regions_to_input",
           "involvement", "score", "score_fractions", "region_name", "regions_of_scan",
           "case_row", "predicted", "summarize", "FRACTION_CANDIDATES", "slabs"]

REGIONS = ("C", "L", "IC", "I", "M1", "M2", "M3", "M4", "M5", "M6")
AGE_GROUPS = ("10_29", "30_49", "50_69", "70_89")
DEFAULT_AGE_GROUP = "50_69"  # the age of most stroke patients
GANGLIONIC_HALF_MM = 7.5  # ganglionic regions: slices within this of the level
SUPRAGANGLIONIC_HALF_MM = 10.0
SUPRA_ABOVE_MM = (10.0, 45.0)  # where the supraganglionic level is searched
# Involved when the lesion covers this share of a region: chosen on 100 unseen phantom
# validation cases (indices 316-415) with the README demo's model, where it gave both
# the highest Pearson r and the lowest MAE of FRACTION_CANDIDATES (docs/aspects.md).
DEFAULT_FRACTION = 0.15
_WORK_MM = 2.0  # the fit's working pixel size
_SEARCH_MM = 4.0  # ... while searching the levels
# Level candidates: brain area >= this x the largest slice's (the levels lie where the
# brain is widest; lower down the skull base's soft tissue confuses the fit).
_MIN_BRAIN_FRACTION = 0.85
_ERODE_MM = 6.0  # the fit compares intensities this far inside the brain


def region_name(code: int) -> str:
  """``"R C"`` ... ``"L M6"`` for region codes 1-20."""
  code = int(code)
  if not 1 <= code <= 20:
    raise ValueError(f"region code must be 1-20, got {code}")
  return f"{'R' if code <= 10 else 'L'} {REGIONS[(code - 1) % 10]}"


# ----------------------------------------------------------------------- the atlas


@dataclasses.dataclass(frozen=True)
class AtlasLevel:
  """One atlas level in display orientation (rows anterior -> posterior, columns
  patient right -> left), midline on the centre column."""
  image: np.ndarray  # (h, w) float32 brain intensities, 0 outside
  labels: np.ndarray  # (h, w) uint8 atlas labels (1-7 ganglionic, 8-10 cortical)
  spacing_mm: tuple  # (row, col)
  brain: np.ndarray  # (h, w) bool

  @functools.cached_property
  def box(self) -> tuple[float, float, float, float]:
    """(centre row, half height, half width) px of the brain, and the midline col."""
    rows, cols = np.nonzero(self.brain)
    return ((rows.min() + rows.max()) / 2.0, (rows.max() - rows.min() + 1) / 2.0,
            (cols.max() - cols.min() + 1) / 2.0, (self.brain.shape[1] - 1) / 2.0)


@dataclasses.dataclass(frozen=True)
class Atlas:
  ganglionic: AtlasLevel
  supraganglionic: AtlasLevel
  source: str  # directory and age group


def _read_2d(path) -> tuple[np.ndarray, tuple]:
  """A 2D (or one-slice) NIfTI in display orientation: ((rows, cols) array, spacing)."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from nibabel import orientations as nio  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f"{path}: atlas file not found")
  try:
    img = nib.load(path)
    data = np.asarray(img.dataobj, np.float32)
  except Exception as e:  # nibabel raises several types for a damaged file
    raise ValueError(f"{path}: not a readable NIfTI ({type(e).__name__}: {e})") from None
  if data.ndim == 2:
    data = data[:, :, None]
  if data.ndim != 3 or sorted(data.shape)[0] != 1 or min(sorted(data.shape)[1:]) < 16:
    raise ValueError(f"{path}: expected a 2D atlas image, got shape {data.shape}")
  if not np.all(np.isfinite(data)):
    raise ValueError(f"{path}: holds NaN or infinite values")
  ornt = nio.io_orientation(img.affine)
  to_display = nio.ornt_transform(ornt, nio.axcodes2ornt(("S", "P", "L")))
  data = nio.apply_orientation(data, to_display)
  zooms = list(img.header.get_zooms()[:3]) + [1.0] * (3 - len(img.header.get_zooms()[:3]))
  spacing = np.ones(3)
  for file_axis in range(3):
    spacing[int(to_display[file_axis, 0])] = zooms[file_axis]
  return data[0], (float(spacing[1]), float(spacing[2]))


def _level(directory, kind: str, age_group: str) -> AtlasLevel:
  image_path = os.path.join(directory, f"{kind}_image_{age_group}.nii.gz")
  label_path = os.path.join(directory, f"{kind}_label_{age_group}.nii.gz")
  image, spacing = _read_2d(image_path)
  labels, label_spacing = _read_2d(label_path)
  if labels.shape != image.shape or not np.allclose(spacing, label_spacing):
    raise ValueError(f"{label_path}: grid {labels.shape} does not match its image "
                     f"{image.shape}")
  wanted = set(range(1, 8)) if kind == "subcortical" else {8, 9, 10}
  found = set(np.unique(labels).astype(int).tolist()) - {0}
  if not wanted <= found or found - wanted:
    raise ValueError(f"{label_path}: labels {sorted(found)}, expected {sorted(wanted)}")
  brain = ndimage.binary_fill_holes(image > 0)
  if brain.sum() < 100:
    raise ValueError(f"{image_path}: no brain in the atlas image")
  return AtlasLevel(image=image, labels=labels.astype(np.uint8), spacing_mm=spacing,
                    brain=brain)


def load_atlas(directory, age_group: str = DEFAULT_AGE_GROUP) -> Atlas:
  """The NCCT ASPECTS atlas in ``directory`` (``subcortical_{image,label}_<age>.nii.gz``
  and ``cortical_...``, as distributed); ``ValueError`` naming the file otherwise."""
  directory = os.fspath(directory)
  if age_group not in AGE_GROUPS:
    raise ValueError(f"age group must be one of {AGE_GROUPS}, got {age_group!r}")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: ASPECTS atlas directory not found (download: "
                     f"docs/aspects.md)")
  return Atlas(ganglionic=_level(directory, "subcortical", age_group),
               supraganglionic=_level(directory, "cortical", age_group),
               source=f"{os.path.abspath(directory)} ({age_group})")


# ------------------------------------------------------------------- the fit


@dataclasses.dataclass
class SliceFit:
  """Scan pixel (row, col) -> atlas pixel: ``atlas = a_centre + (p - s_centre - shift)
  * spacing / (scale * atlas_spacing)`` per axis (mm in between)."""
  scale: np.ndarray  # (2,) scan size / atlas size (rows, cols)
  shift_mm: np.ndarray  # (2,)
  centre_px: np.ndarray  # (2,) the scan's reference point (brain box row, midline col)
  ncc: float


def _disc_px(radius_px) -> np.ndarray:
  ry, rx = (max(float(r), 0.5) for r in radius_px)
  y, x = np.mgrid[-int(ry):int(ry) + 1, -int(rx):int(rx) + 1]
  return (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


def _robust(image, brain):
  """Intensities clipped to the brain's 2nd-98th percentiles: the fit needs no HU."""
  lo, hi = np.percentile(image[brain], [2.0, 98.0])
  return np.clip(image, lo, hi)


def _atlas_coords(fit_params, rows, cols, sp, centre, level: AtlasLevel):
  scale_r, scale_c, shift_r, shift_c = fit_params
  a_row, _, _, a_col = level.box
  ar = a_row + ((rows - centre[0]) * sp[0] - shift_r) / (scale_r * level.spacing_mm[0])
  ac = a_col + ((cols - centre[1]) * sp[1] - shift_c) / (scale_c * level.spacing_mm[1])
  return ar, ac


_SMOOTHED: dict = {}  # (id(level), work_mm) -> (level, atlas image blurred to work_mm)


def _smoothed(level: AtlasLevel, work_mm: float) -> np.ndarray:
  key = (id(level), work_mm)
  if key not in _SMOOTHED:
    if len(_SMOOTHED) > 8:
      _SMOOTHED.clear()
    sigma = [0.5 * work_mm / s for s in level.spacing_mm]
    _SMOOTHED[key] = (level, ndimage.gaussian_filter(level.image, sigma))
  return _SMOOTHED[key][1]


def fit_slice(image, brain, spacing_mm, level: AtlasLevel, *,
              work_mm: float = _WORK_MM, max_evals: int = 400) -> SliceFit:
  """Fits ``level`` to one aligned slice.

  Args:
    image: (H, W) intensities (HU or any monotone rescaling), aligned.
    brain: (H, W) bool brain mask of the slice.
    spacing_mm: (row, col) mm.
    level: the atlas level.
    work_mm: the pixel size the intensities are compared at.
    max_evals: the optimiser's budget of cost evaluations.

  Returns:
    the :class:`SliceFit` (``ncc`` -1 for a slice with too little brain).
  """
  image = np.asarray(image, np.float32)
  brain = np.asarray(brain, bool)
  sp = np.asarray(spacing_mm, np.float64)
  height, width = brain.shape
  if brain.sum() * sp.prod() < 500.0:  # < 5 cm^2: no level here
    return SliceFit(np.ones(2), np.zeros(2), np.array([(height - 1) / 2, (width - 1) / 2]),
                    -1.0)
  rows_b, cols_b = np.nonzero(brain)
  centre = np.array([(rows_b.min() + rows_b.max()) / 2.0, (width - 1) / 2.0])
  _, a_half_r, a_half_c, _ = level.box
  half_r = (rows_b.max() - rows_b.min() + 1) / 2.0 * sp[0]
  half_c = max(abs(cols_b.min() - centre[1]), abs(cols_b.max() - centre[1])) * sp[1]
  x0 = np.array([half_r / (a_half_r * level.spacing_mm[0]),
                 half_c / (a_half_c * level.spacing_mm[1]), 0.0, 0.0])
  atlas_image = _smoothed(level, work_mm)
  stride = np.maximum(1, np.round(work_mm / sp).astype(int))
  # The brain's interior: its outline (brain against air) would swamp the structure.
  inner = ndimage.binary_erosion(brain, _disc_px(_ERODE_MM / sp), border_value=0)
  region = (inner if inner.sum() > 0.2 * brain.sum() else brain)[::stride[0], ::stride[1]]
  rr, cc = np.nonzero(region)
  rows, cols = rr * stride[0], cc * stride[1]
  smooth = ndimage.gaussian_filter(_robust(image, brain), 0.5 * work_mm / sp)  # noise out
  target = smooth[rows, cols].astype(np.float64)
  target = (target - target.mean()) / max(target.std(), 1e-6)

  def cost(params):
    ar, ac = _atlas_coords(params, rows, cols, sp, centre, level)
    moving = ndimage.map_coordinates(atlas_image, [ar, ac], order=1, cval=0.0)
    sd = moving.std()
    if sd < 1e-6:
      return 1.0
    return -float(np.mean(target * (moving - moving.mean())) / sd)

  bounds = [(x0[0] * 0.8, x0[0] * 1.25), (x0[1] * 0.85, x0[1] * 1.18),
            (-12.0, 12.0), (-4.0, 4.0)]
  res = optimize.minimize(cost, x0, method="Powell", bounds=bounds,
                          options={"xtol": 1e-3, "ftol": 1e-4, "maxfev": max_evals})
  return SliceFit(np.asarray(res.x[:2]), np.asarray(res.x[2:]), centre, -float(res.fun))


def _warp_labels(fit: SliceFit, level: AtlasLevel, shape, spacing_mm) -> np.ndarray:
  rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
  params = np.concatenate([fit.scale, fit.shift_mm])
  ar, ac = _atlas_coords(params, rows, cols, np.asarray(spacing_mm, np.float64),
                         fit.centre_px, level)
  return ndimage.map_coordinates(level.labels, [ar, ac], order=0, cval=0).astype(np.uint8)


def find_levels(image, brain, spacing_mm, atlas: Atlas) -> dict:
  """The ganglionic and supraganglionic slices of an aligned (S, H, W) volume.

  Returns ``{"ganglionic": s, "supraganglionic": s or None, "ncc": {...}}``; slices
  whose brain is smaller than ``_MIN_BRAIN_FRACTION`` of the largest are not
  candidates. ``ValueError`` when no slice holds enough brain.
  """
  image = np.asarray(image, np.float32)
  brain = np.asarray(brain, bool)
  sp = np.asarray(spacing_mm, np.float64)
  area = brain.reshape(brain.shape[0], -1).sum(axis=1)
  if area.max() * sp[1] * sp[2] < 2000.0:  # < 20 cm^2
    raise ValueError("no slice holds enough brain to place the ASPECTS levels")
  candidates = np.flatnonzero(area >= _MIN_BRAIN_FRACTION * area.max())
  def ncc(s, level):  # a quick fit: the level is where the structure matches best
    return fit_slice(image[s], brain[s], sp[1:], level, work_mm=_SEARCH_MM,
                     max_evals=120).ncc

  ncc_g = {int(s): ncc(s, atlas.ganglionic) for s in candidates}
  ncc_s = {int(s): ncc(s, atlas.supraganglionic) for s in candidates}
  z = np.arange(brain.shape[0]) * sp[0]

  def above(g):
    return [s for s in ncc_s if SUPRA_ABOVE_MM[0] <= z[s] - z[g] <= SUPRA_ABOVE_MM[1]]

  # The pair that matches best together: the ganglionic pattern alone can be matched
  # by its neighbours (the two levels' slices differ most in the ventricles).
  def joint(g):
    return ncc_g[g] + max((ncc_s[s] for s in above(g)), default=0.0)

  s_g = max(ncc_g, key=joint)
  s_s = max(above(s_g), key=ncc_s.get, default=None)
  return {"ganglionic": s_g, "supraganglionic": s_s,
          "ncc": {"ganglionic": ncc_g, "supraganglionic": ncc_s}}


def slabs(z_mm, ganglionic_mm: float, supraganglionic_mm: float | None) -> dict:
  """Slices scored at each level, from the slices' heights ``z_mm`` (S,) and the two
  levels' heights (mm): ``{"ganglionic": [...], "supraganglionic": [...]}``."""
  z = np.asarray(z_mm, np.float64)
  gang = np.abs(z - ganglionic_mm) <= GANGLIONIC_HALF_MM + 1e-6
  supra = np.zeros(z.shape, bool)
  if supraganglionic_mm is not None:
    supra = ((np.abs(z - supraganglionic_mm) <= SUPRAGANGLIONIC_HALF_MM + 1e-6)
             & (z > ganglionic_mm + GANGLIONIC_HALF_MM + 1e-6))
  return {"ganglionic": np.flatnonzero(gang).tolist(),
          "supraganglionic": np.flatnonzero(supra).tolist()}


def map_regions(image, brain, spacing_mm, atlas: Atlas) -> tuple[np.ndarray, dict]:
  """The region map of an aligned (S, H, W) volume: ((S, H, W) uint8 codes 0-20, info
  with the levels, the slabs and each slice's fit)."""
  image = np.asarray(image, np.float32)
  brain = np.asarray(brain, bool)
  if image.ndim != 3 or image.shape != brain.shape:
    raise ValueError(f"image {image.shape} and brain {brain.shape} must be equal "
                     f"(S, H, W) shapes")
  sp = np.asarray(spacing_mm, np.float64)
  levels = find_levels(image, brain, sp, atlas)
  z = np.arange(image.shape[0]) * sp[0]
  s_s = levels["supraganglionic"]
  chosen = slabs(z, z[levels["ganglionic"]], None if s_s is None else z[s_s])
  out = np.zeros(image.shape, np.uint8)
  _, width = image.shape[1:]
  left = (np.arange(width) > (width - 1) / 2.0)[None, :]
  fits = {}
  for name, level in (("ganglionic", atlas.ganglionic),
                      ("supraganglionic", atlas.supraganglionic)):
    for s in chosen[name]:
      fit = fit_slice(image[s], brain[s], sp[1:], level)
      if fit.ncc <= -1.0:
        continue
      labels = _warp_labels(fit, level, image.shape[1:], sp[1:])
      labels = np.where(brain[s], labels, 0)
      out[s] = np.where((labels > 0) & left, labels + 10, labels)
      fits[s] = {"level": name, "ncc": round(fit.ncc, 4),
                 "scale": [round(float(v), 4) for v in fit.scale],
                 "shift_mm": [round(float(v), 2) for v in fit.shift_mm]}
  info = {"ganglionic_slice": levels["ganglionic"],
          "supraganglionic_slice": levels["supraganglionic"],
          "ganglionic_slices": chosen["ganglionic"],
          "supraganglionic_slices": chosen["supraganglionic"], "fits": fits,
          "atlas": atlas.source}
  return out, info


def regions_to_input(regions, alpha) -> np.ndarray:
  """A region map of the aligned volume back on the input grid (nearest neighbour):
  the inverse of ``sean_jax.clinical.report.input_grid_map``."""
  from sean_jax.clinical import report  # pylint: disable=g-import-not-at-top
  regions = np.asarray(regions, np.uint8)
  _, height, width = regions.shape
  matrix, offset = report.input_grid_map(alpha, height, width)
  inverse = np.linalg.inv(matrix)
  full = np.eye(3)
  full[1:, 1:] = inverse
  return ndimage.affine_transform(regions, full, offset=np.concatenate([[0.0], -inverse @ offset]),
                                  order=0, mode="constant", cval=0).astype(np.uint8)


# ------------------------------------------------------------------- the score


def involvement(regions, lesion) -> np.ndarray:
  """(21,) fraction of each region code's voxels (index = code; 0 unused) inside
  ``lesion``; NaN for a region absent from the map."""
  regions = np.asarray(regions)
  lesion = np.asarray(lesion) != 0
  if regions.shape != lesion.shape:
    raise ValueError(f"regions {regions.shape} and lesion {lesion.shape} differ in shape")
  size = np.bincount(regions.ravel(), minlength=21)[:21].astype(np.float64)
  hit = np.bincount(regions[lesion].ravel(), minlength=21)[:21].astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(size > 0, hit / np.maximum(size, 1), np.nan)


def score(regions, lesion, fraction: float = DEFAULT_FRACTION) -> dict:
  """ASPECTS of ``lesion`` on a region map (same grid): :func:`score_fractions` of
  :func:`involvement`."""
  return score_fractions(involvement(regions, lesion), fraction)


def score_fractions(frac, fraction: float = DEFAULT_FRACTION) -> dict:
  """ASPECTS from each region's involved fraction ((21,) by code, NaN: absent).

  The affected hemisphere is the one with more involved regions (ties: the larger
  summed involved fraction); ``side`` is ``"none"`` and the score 10 when no region is
  involved. Returns ``{"score", "side", "involved": [names], "fractions": {name:
  fraction}, "fraction_threshold", "missing": [regions absent from the map]}``.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"the involvement fraction must lie in (0, 1], got {fraction}")
  frac = np.asarray(frac, np.float64)
  hit = np.nan_to_num(frac, nan=0.0) >= fraction
  right, left = hit[1:11], hit[11:21]
  key_r = (int(right.sum()), float(np.nansum(frac[1:11])))
  key_l = (int(left.sum()), float(np.nansum(frac[11:21])))
  if not hit.any():
    side, count, codes = "none", 0, []
  elif key_l > key_r:
    side, count, codes = "left", int(left.sum()), [c for c in range(11, 21) if hit[c]]
  else:
    side, count, codes = "right", int(right.sum()), [c for c in range(1, 11) if hit[c]]
  return {"score": 10 - count, "side": side,
          "involved": [region_name(c) for c in codes],
          "fractions": {region_name(c): (None if np.isnan(frac[c]) else round(float(frac[c]), 4))
                        for c in range(1, 21)},
          "fraction_threshold": float(fraction),
          "missing": [region_name(c) for c in range(1, 21) if np.isnan(frac[c])]}


# ------------------------------------------------------------- whole scans, many cases


def regions_of_scan(image, brain, alpha, spacing_mm, atlas: Atlas) -> tuple[np.ndarray, dict]:
  """The region map of an unaligned (S, H, W) scan on its own grid.

  ``image`` (HU or any monotone rescaling) and ``brain`` (bool) are moved by the pose
  ``alpha`` (``sean_jax.clinical.report.input_grid_map``) onto the aligned grid, the
  regions are mapped there (:func:`map_regions`) and brought back (nearest neighbour).
  """
  from sean_jax.clinical import report  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.float32)
  aligned = report.aligned_on_input_grid(image, alpha, fill=float(image.min()))
  aligned_brain = report.aligned_on_input_grid(np.asarray(brain, np.float32), alpha,
                                               fill=0.0) >= 0.5
  regions, info = map_regions(aligned, aligned_brain, spacing_mm, atlas)
  return regions_to_input(regions, alpha), info


FRACTION_CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def case_row(pred_regions, pred_mask, true_regions, true_mask, truth_fraction: float) -> dict:
  """Per-case record for :func:`summarize`: the predicted involved fractions (on the
  mapped regions) and the true involvement (on the true regions)."""
  pred = involvement(pred_regions, pred_mask)
  true_frac = involvement(true_regions, true_mask)
  true = score_fractions(true_frac, truth_fraction)
  truth = np.nan_to_num(true_frac, nan=0.0) >= truth_fraction
  return {"pred_fractions": [None if np.isnan(v) else float(v) for v in pred[1:]],
          "true_involved": [bool(v) for v in truth[1:]], "true_score": true["score"],
          "true_side": true["side"]}


def predicted(row: dict, fraction: float) -> tuple[dict, np.ndarray]:
  """A :func:`case_row`'s predicted ASPECTS at ``fraction``: (:func:`score_fractions`,
  (20,) bool involved regions)."""
  frac = np.array([np.nan] + [np.nan if v is None else v for v in row["pred_fractions"]])
  return score_fractions(frac, fraction), np.nan_to_num(frac[1:], nan=0.0) >= fraction


def summarize(rows: list[dict], fraction: float = DEFAULT_FRACTION) -> dict:
  """Agreement of the predicted and true ASPECTS over cases (:func:`case_row`):
  ``aspects_pearson_r`` (None when either score is constant), ``aspects_mae``,
  ``aspects_exact`` (share of cases with the same score), and region-level
  ``aspects_region_sensitivity`` / ``aspects_region_specificity`` over all 20 regions
  of every case; plus ``aspects_by_fraction``: the same at each of
  :data:`FRACTION_CANDIDATES` (for choosing the fraction on validation data)."""
  def at(f):
    true_s, pred_s, tp, fn, tn, fp = [], [], 0, 0, 0, 0
    for row in rows:
      pred, hit = predicted(row, f)
      truth = np.asarray(row["true_involved"], bool)
      true_s.append(row["true_score"])
      pred_s.append(pred["score"])
      tp += int(np.sum(hit & truth))
      fn += int(np.sum(~hit & truth))
      tn += int(np.sum(~hit & ~truth))
      fp += int(np.sum(hit & ~truth))
    true_s, pred_s = np.asarray(true_s, float), np.asarray(pred_s, float)
    r = (None if true_s.std() == 0 or pred_s.std() == 0
         else float(np.corrcoef(true_s, pred_s)[0, 1]))
    return {"aspects_pearson_r": r, "aspects_mae": float(np.mean(np.abs(true_s - pred_s))),
            "aspects_exact": float(np.mean(true_s == pred_s)),
            "aspects_region_sensitivity": tp / (tp + fn) if tp + fn else None,
            "aspects_region_specificity": tn / (tn + fp) if tn + fp else None}
  if not rows:
    return {}
  out = at(fraction)
  out.update(aspects_fraction=float(fraction), aspects_cases=len(rows),
             aspects_by_fraction={f"{f:g}": at(f) for f in FRACTION_CANDIDATES})
  return out
