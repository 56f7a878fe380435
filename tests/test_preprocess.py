"""Tests of HU windowing, per-case z-scoring and the slice weights."""

from __future__ import annotations

import numpy as np
import pytest

from sean_jax.data.preprocess import DEFAULT_WINDOW, brain_slice_weights, window_and_normalize


def test_default_window_is_level_40_width_100():
  assert DEFAULT_WINDOW == (-10.0, 90.0)


def test_window_and_normalize_hand_computed():
  v = np.array([[[-1000.0, 0.0, 40.0, 200.0]]])
  # Clip to [-10, 90]: [-10, 0, 40, 90]; mean 30; std sqrt((1600+900+100+3600)/4).
  std = np.sqrt(1550.0)
  expected = (np.array([-10.0, 0.0, 40.0, 90.0]) - 30.0) / std
  out = window_and_normalize(v)
  assert out.dtype == np.float32 and out.shape == v.shape
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(out[0, 0], [-1.01600, -0.76200, 0.25400, 1.52400], atol=1e-5)
  # The paper's literal [40, 100]: [40, 40, 40, 100]; mean 55; std sqrt(675).
  lit = window_and_normalize(v, window=(40.0, 100.0))
  np.testing.assert_allclose(lit[0, 0], np.array([-15.0, -15.0, -15.0, 45.0]) / np.sqrt(675.0),
                             rtol=1e-6)
  assert out.mean() == pytest.approx(0.0, abs=1e-6) and out.std() == pytest.approx(1.0)


def test_window_constant_and_bad_window():
  out = window_and_normalize(np.full((2, 3, 3), -1000.0))
  assert out.dtype == np.float32 and not out.any()
  out = window_and_normalize(np.full((2, 3, 3), 37.0))  # constant inside the window
  assert np.all(out == 0.0)
  with pytest.raises(ValueError):
    window_and_normalize(np.zeros((1, 2, 2)), window=(90.0, -10.0))


def test_brain_slice_weights():
  v = np.full((5, 10, 10), -1000.0)
  v[1, :2, :2] = 30.0  # 4% of the slice: not enough
  v[2, :2, :3] = 30.0  # 6%
  v[3] = 30.0
  v[4, 5:, :] = 1500.0  # bone only still counts as head in view
  w = brain_slice_weights(window_and_normalize(v))
  assert w.dtype == np.float32 and w.shape == (5,)
  np.testing.assert_array_equal(w, [0, 0, 1, 1, 1])
  np.testing.assert_array_equal(brain_slice_weights(window_and_normalize(v)[..., None]), w)
  assert not brain_slice_weights(np.zeros((3, 4, 4))).any()


def test_default_window_keeps_the_lesion_contrast_that_40_100_erases():
  """Lesion vs mirrored (contralateral) tissue, in z-score units, on phantom cases."""
  from sean_jax.data.phantom import LABELS, PhantomConfig, generate_case

  cfg = PhantomConfig(size=128, slices=8, lesion_free_fraction=0.0, max_rotation_deg=0.0,
                      max_shift_frac=0.0)
  tissue = [LABELS[k] for k in ("grey_matter", "white_matter", "deep_grey_matter",
                                "symmetric_hypodensity")]
  ours, literal = [], []
  for i in range(6):
    c = generate_case(0, i, cfg)
    m = c.mask.astype(bool)
    contra = m[:, :, ::-1] & ~m & np.isin(c.labels, tissue)
    if m.sum() < 30 or contra.sum() < 30:
      continue
    for window, out in ((DEFAULT_WINDOW, ours), ((40.0, 100.0), literal)):
      z = window_and_normalize(c.ct_hu, window)
      out.append(z[contra].mean() - z[m].mean())
  assert len(ours) >= 3
  assert np.mean(ours) > 0.05  # hypodense lesions stay darker than the other side
  assert np.mean(ours) > 5 * abs(np.mean(literal))
