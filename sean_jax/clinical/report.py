"""The clinical report of one scan: lesion volume, per hemisphere, and the side.

Hemispheres come from the scan's own geometry: the volume is in model orientation
(``sean_jax.data.nifti``: columns run from the patient's right to the patient's left,
read from the file's affine), and the dividing plane is the estimated mid-sagittal
plane (the alignment's pose), not the image's centre column: a voxel is on the
patient's left when, moved by the aligning transform, it lands right of the centre
column. Without an aligner (``alpha`` zero) the centre column divides.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BILATERAL_FRACTION", "input_grid_map", "aligned_on_input_grid",
           "hemisphere_volumes", "side_of", "lesion_summary"]

# "bilateral" when the smaller side holds at least this share of the lesion volume;
# below it, a few voxels over the midline do not make an infarct bilateral.
BILATERAL_FRACTION = 0.2


def input_grid_map(alpha, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(2x2 matrix, offset) on (row, col) pixel coordinates of an (H, W) grid that apply
  ``alpha`` (estimated on the square model grid) to that grid: the aligned image at
  ``p`` samples the input at ``matrix @ p + offset``.

  On the model grid (n x n, centre c) ``q - c = R (p - c) + t_px``; the input grid is
  the model grid scaled by ``D = diag(W / n, H / n)`` about the centres (half-pixel
  convention), so there ``q - c' = D R D^-1 (p - c') + (tx W / 2, ty H / 2)``: rigid
  for a square input, otherwise the same map seen through the anisotropic resize.
  """
  theta, tx, ty = (float(a) for a in np.asarray(alpha, np.float64).reshape(3))
  cos, sin = math.cos(theta), math.sin(theta)
  # (row, col) order; D R D^-1 in (x, y) is [[cos, -sin W/H], [sin H/W, cos]].
  matrix = np.array([[cos, sin * height / width], [-sin * width / height, cos]])
  centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
  shift = np.array([ty * height / 2.0, tx * width / 2.0])
  return matrix, centre - matrix @ centre + shift


def aligned_on_input_grid(volume, alpha, fill=None, order: int = 1) -> np.ndarray:
  """``volume`` (S, H, W) warped by ``alpha`` on its own grid (``order`` 1 bilinear,
  0 nearest; ``fill`` outside, default the volume's minimum), as ``sampler.warp``
  does on a square grid."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  volume = np.asarray(volume, np.float32)
  _, height, width = volume.shape
  fill = float(volume.min()) if fill is None else float(fill)
  matrix2, offset2 = input_grid_map(alpha, height, width)
  matrix = np.eye(3)
  matrix[1:, 1:] = matrix2
  offset = np.concatenate([[0.0], offset2])
  return ndimage.affine_transform(volume, matrix, offset=offset, order=order,
                                  mode="grid-constant", cval=fill).astype(np.float32)


def hemisphere_volumes(mask, alpha, spacing_mm) -> tuple[float, float]:
  """(left ml, right ml) of the patient for a model-orientation (S, H, W) 0/1 ``mask``
  and the pose ``alpha`` (3,) that aligns it; ``spacing_mm`` (slice, row, col)."""
  mask = np.asarray(mask) != 0
  _, height, width = mask.shape
  voxel_ml = float(np.prod(np.asarray(spacing_mm, np.float64))) / 1000.0
  _, rows, cols = np.nonzero(mask)
  if rows.size == 0:
    return 0.0, 0.0
  matrix, offset = input_grid_map(alpha, height, width)
  aligned = np.linalg.solve(matrix, np.stack([rows, cols]).astype(np.float64)
                            - offset[:, None])
  left = int(np.count_nonzero(aligned[1] > (width - 1) / 2.0))
  return left * voxel_ml, (rows.size - left) * voxel_ml


def side_of(left_ml: float, right_ml: float) -> str:
  """``"none"``, ``"left"``, ``"right"`` or ``"bilateral"`` (see
  :data:`BILATERAL_FRACTION`)."""
  total = left_ml + right_ml
  if total <= 0.0:
    return "none"
  if min(left_ml, right_ml) >= BILATERAL_FRACTION * total:
    return "bilateral"
  return "left" if left_ml > right_ml else "right"


def lesion_summary(mask, alpha, spacing_mm) -> dict:
  """``lesion_ml``, ``lesion_ml_left``, ``lesion_ml_right`` and ``side`` of a
  model-orientation (S, H, W) mask (see :func:`hemisphere_volumes`)."""
  left, right = hemisphere_volumes(mask, alpha, spacing_mm)
  return {"lesion_ml": left + right, "lesion_ml_left": left, "lesion_ml_right": right,
          "side": side_of(left, right)}
