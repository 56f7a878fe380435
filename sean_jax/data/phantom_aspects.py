"""The phantom's true ASPECTS regions, from its analytic anatomy.

Each phantom case is built from shapes in canonical millimetres (``phantom.py``): the
caudate heads, lentiform nuclei and thalami are ellipsoids whose centres the case draws
(``bg_shift``, ventricle size). The 20 ASPECTS regions follow from them, independently
of the atlas that ``sean_jax.clinical.aspects`` maps onto a scan:

- levels: ganglionic at the lentiform nuclei's centre height ``Z_g``, supraganglionic
  at ``Z_g + 20`` mm (the bodies of the lateral ventricles); regions cover the slices
  that ``aspects.slabs`` would score around those two heights;
- C, L: the caudate and lentiform ellipsoids; IC: the tissue within 7 mm medial of the
  lentiform that is neither caudate, lentiform nor thalamus; I: the insular cortex,
  deeper than the cortical regions and lateral of the lentiform (9-21 mm from its
  centre) over its front-to-back extent;
- M1-M3 (ganglionic) and M4-M6 (supraganglionic): the brain within ``CORTEX_DEPTH_MM``
  of the brain's outline in the slice, in sectors of the angle from the front about
  the head's centre: 25-60 (M1/M4), 60-110 (M2/M5), 110-145 (M3/M6) degrees, the
  sectors the NCCT atlas's regions occupy;

all kept to brain tissue (not CSF, falx or outside the skull). Codes as in
``aspects``: 1-10 the patient's right, 11-20 the left.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from sean_jax.clinical import aspects
from sean_jax.data import phantom

__all__ = ["true_regions", "true_score", "SUPRA_ABOVE_MM", "CORTEX_DEPTH_MM",
           "TRUTH_FRACTION"]

SUPRA_ABOVE_MM = 20.0
CORTEX_DEPTH_MM = 22.0
# A region is truly involved when the true infarct covers this share of it: the
# radiologist's "visible early ischaemic change in the region", without the fringe of a
# neighbouring region's infarct.
TRUTH_FRACTION = 0.1
_SECTORS = ((25.0, 60.0), (60.0, 110.0), (110.0, 145.0))
_TISSUE = tuple(phantom.LABELS[k] for k in (
    "grey_matter", "white_matter", "deep_grey_matter", "acute_infarct", "old_infarct",
    "calcification", "symmetric_hypodensity"))


def _canonical_xy(case: phantom.PhantomCase, shape):
  """(S or 1, H, W) canonical X, Y mm of every pixel, from the case's pose(s)."""
  num_slices, height, width = shape
  poses = case.slice_poses or [case.pose]
  angle = np.radians([p["rotation_deg"] for p in poses])[:, None, None]
  tx = np.array([p["shift_x_px"] for p in poses])[:, None, None]
  ty = np.array([p["shift_y_px"] for p in poses])[:, None, None]
  c = (width - 1) / 2.0
  dx = np.arange(width)[None, None, :] - c - tx
  dy = np.arange(height)[None, :, None] - c - ty
  sp = case.spacing_mm[1]
  x = (np.cos(angle) * dx + np.sin(angle) * dy) * sp
  y = (-np.sin(angle) * dx + np.cos(angle) * dy) * sp
  return x, y


def true_regions(case: phantom.PhantomCase, seed: int, index: int,
                 config: phantom.PhantomConfig = phantom.PhantomConfig()) -> np.ndarray:
  """(S, H, W) uint8 region codes 0-20 of ``generate_case(seed, index, config)``."""
  if case.labels is None:
    raise ValueError(f"case {case.case_id}: no tissue labels")
  anatomy = phantom._draw_anatomy(np.random.default_rng([seed, index, 1]),  # pylint: disable=protected-access
                                  config.asymmetry)
  shape = case.labels.shape
  X, Y = _canonical_xy(case, shape)
  z = np.asarray(case.info["z_mm"], np.float64)
  Z = z[:, None, None]
  bx, by, bz = anatomy["bg_shift"]
  vs = anatomy["vent"]
  tissue = np.isin(case.labels, _TISSUE)
  intracranial = np.stack([ndimage.binary_fill_holes(s >= phantom.LABELS["csf"])
                           for s in case.labels])
  sp = case.spacing_mm[1]
  depth = np.stack([ndimage.distance_transform_edt(s) * sp for s in intracranial])
  side = np.where(X > 0, 10, 0).astype(np.uint8)  # X > 0: the patient's left
  ax = np.abs(X)
  out = np.zeros(shape, np.uint8)
  chosen = aspects.slabs(z, bz, bz + SUPRA_ABOVE_MM)
  gang, supra = (np.isin(np.arange(len(z)), chosen[k])
                 for k in ("ganglionic", "supraganglionic"))

  def ellipsoid(centre, semi, yaw):  # signed distance on both sides (mirrored)
    return phantom._ellipsoid_distance(ax, Y, Z, centre, semi, yaw)  # pylint: disable=protected-access

  # The phantom's deep nuclei (phantom.generate_case), on the |X| side: yaw mirrors.
  caudate = ellipsoid((14.0 + 0.2 * vs, -12.0 + by, 8.0 + bz), (4.5, 8.0, 9.0), -10.0)
  lentiform = ellipsoid((23.0 + bx, -2.0 + by, bz), (6.5, 14.0, 10.0), 18.0)
  thalamus = ellipsoid((9.0, 12.0 + by, 1.0 + bz), (7.0, 10.0, 9.0), 8.0)
  lx = 23.0 + bx
  in_c, in_l, in_t = caudate > 0, lentiform > 0, thalamus > 0
  in_ic = (~in_c & ~in_l & ~in_t & (lentiform > -7.0) & (ax < lx) & (ax > 5.0))
  cortex = depth <= CORTEX_DEPTH_MM
  in_i = (~cortex & (ax >= lx + 9.0) & (ax <= lx + 21.0) & (Y >= -28.0 + by)
          & (Y <= 14.0 + by))
  phi = np.degrees(np.arctan2(ax, -Y))
  g = gang[:, None, None] & tissue
  for code, region in ((1, in_c), (2, in_l), (3, in_ic), (4, in_i)):
    out[g & region & (out == 0)] = code
  for k, (lo, hi) in enumerate(_SECTORS):
    sector = cortex & (phi >= lo) & (phi < hi)
    out[g & sector & (out == 0)] = 5 + k
    out[supra[:, None, None] & tissue & sector & (out == 0)] = 8 + k
  return np.where(out > 0, out + side, 0).astype(np.uint8)


def true_score(regions, mask) -> dict:
  """The true ASPECTS of a phantom case: ``aspects.score`` at ``TRUTH_FRACTION``."""
  return aspects.score(regions, mask, fraction=TRUTH_FRACTION)
