"""The clinical report: lesion volume per hemisphere across the estimated midline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sean_jax.clinical import report


def test_sides_follow_the_estimated_midline_not_the_centre_column():
  """Model orientation puts the patient's left at high columns. With the head shifted
  4 px towards the left (alpha's x shift), the midline is column 15.5 + 4: a voxel at
  column 17 is right of the image centre but on the patient's right."""
  mask = np.zeros((2, 32, 32), np.uint8)
  mask[0, 10, 17] = 1  # patient's right of the shifted midline (19.5)
  mask[1, 12, 25] = mask[1, 13, 25] = 1  # patient's left
  spacing = (5.0, 0.5, 0.4)  # 1 mm^3 = 1e-3 ml per voxel
  alpha = np.array([0.0, 4 * 2 / 32, 0.0])
  left, right = report.hemisphere_volumes(mask, alpha, spacing)
  assert (left, right) == pytest.approx((2e-3, 1e-3))
  # Without the pose, the centre column divides: all three on the left.
  assert report.hemisphere_volumes(mask, np.zeros(3), spacing) == pytest.approx((3e-3, 0))


def test_rotated_midline():
  """A head rotated by 90 degrees has its midline along the rows: what decides the side
  is the row, hand-checked with the sampler's convention (the aligned image at p
  samples the input at c + R (p - c))."""
  from sean_jax.models import sampler
  mask = np.zeros((1, 16, 16), np.uint8)
  mask[0, 3, 8] = 1
  alpha = np.array([math.pi / 2, 0.0, 0.0], np.float32)
  aligned = np.asarray(sampler.warp(mask[..., None].astype(np.float32), alpha))[0, ..., 0]
  row, col = np.unravel_index(int(aligned.argmax()), aligned.shape)
  left, right = report.hemisphere_volumes(mask, alpha, (1.0, 1.0, 1.0))
  assert (left > 0) == (col > 7.5) and left + right == pytest.approx(1e-3)


@pytest.mark.parametrize("left,right,side", [
    (0.0, 0.0, "none"), (2.0, 0.0, "left"), (0.1, 3.0, "right"), (2.0, 0.6, "bilateral"),
    (2.0, 0.4, "left")])
def test_side(left, right, side):
  assert report.side_of(left, right) == side
  summary = report.lesion_summary(np.zeros((1, 4, 4)), np.zeros(3), (1, 1, 1))
  assert summary == {"lesion_ml": 0.0, "lesion_ml_left": 0.0, "lesion_ml_right": 0.0,
                     "side": "none"}
