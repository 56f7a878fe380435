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


# ------------------------------------------------------------------ HU conventions


@pytest.fixture(scope="module")
def phantom_hu():
  from sean_jax.data.phantom import PhantomConfig, generate_case
  return generate_case(3, 0, PhantomConfig(size=64, slices=6)).ct_hu.astype(np.float32)


def test_plain_hu_is_left_alone(phantom_hu):
  from sean_jax.data.preprocess import check_head_ct, fix_hu_conventions
  fixed, notes = fix_hu_conventions(phantom_hu)
  assert notes == [] and np.array_equal(fixed, phantom_hu)
  check_head_ct(fixed, "phantom")


def test_air_stored_as_zero_is_restored(phantom_hu):
  from sean_jax.data.preprocess import fix_hu_conventions
  fixed, notes = fix_hu_conventions(np.maximum(phantom_hu, 0.0))
  assert len(notes) == 1 and "air stored as 0" in notes[0]
  outside = phantom_hu < -500.0  # the phantom's air: all outside the head
  assert np.all(fixed[outside] == -1000.0)
  # Inside the head the stored values stay, but for voxels below 0 HU at the head's
  # edge (partial volume with the air), which may join the air.
  inside = ~outside
  kept = fixed[inside] == np.maximum(phantom_hu[inside], 0.0)
  joined = (fixed[inside] == -1000.0) & (phantom_hu[inside] < 0.0)
  assert np.all(kept | joined)
  # What the model sees: the windowed, z-scored volume of the true HU, but for the few
  # voxels of the head below 0 HU.
  diff = np.abs(window_and_normalize(fixed) - window_and_normalize(phantom_hu))
  assert (diff > 0.05).mean() < 0.01 and diff.max() < 0.5


def test_unsigned_offset_and_padding(phantom_hu):
  from sean_jax.data.preprocess import fix_hu_conventions
  stored = np.maximum(phantom_hu, -1024.0) + 1024.0
  fixed, notes = fix_hu_conventions(stored)
  assert len(notes) == 1 and "+1024 offset" in notes[0]
  np.testing.assert_allclose(fixed, np.maximum(phantom_hu, -1024.0), atol=1e-3)
  padded = phantom_hu.copy()
  padded[:, :3, :] = -3024.0  # outside the field of view
  fixed, notes = fix_hu_conventions(padded)
  assert len(notes) == 1 and "padding" in notes[0]
  assert fixed.min() == -1024.0 and np.array_equal(fixed[:, 3:], padded[:, 3:])


@pytest.mark.parametrize("make,message", [
    (lambda v: np.full_like(v, -1000.0), "no head"),
    (lambda v: v[:1], "1 slice"),
    (lambda v: (v - v.min()) / (v.max() - v.min()), "0..1 normalised"),
    (lambda v: np.clip(v, -10, 90) + 10 * 255 / 100, "0..255 windowed"),
    (lambda v: np.random.default_rng(0).uniform(2000, 4000, v.shape), "not a CT"),
])
def test_what_is_not_a_head_ct_is_refused(phantom_hu, make, message):
  from sean_jax.data.preprocess import check_head_ct, fix_hu_conventions
  fixed, _ = fix_hu_conventions(make(phantom_hu).astype(np.float32))
  with pytest.raises(ValueError, match=message) as info:
    check_head_ct(fixed, "scan.nii.gz")
  assert str(info.value).startswith("scan.nii.gz: ") and "\n" not in str(info.value)


def test_real_template_with_air_stored_as_zero():
  """The CQ500 head CT template stores air as 0 (and a few negative values from its
  resampling): the fix finds the air around the head and the scan passes as a head CT."""
  from pathlib import Path
  from sean_jax.data import nifti
  from sean_jax.data.preprocess import check_head_ct, fix_hu_conventions
  path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct_template"
          / "template_with_skull_2mm.nii.gz")
  if not path.exists():
    pytest.skip(f"{path} not found: the real CT template lives beside the project "
                f"(../shared/data, see its README), not in a fresh clone")
  stored = nifti.load_volume(path, expect_hu=False).data
  fixed, notes = fix_hu_conventions(stored)
  assert len(notes) == 1 and "air stored as 0" in notes[0]
  check_head_ct(fixed, path.name)
  air = fixed == -1000.0
  # Every corner of every slice is air; the brain (20-60 HU) is never moved.
  assert air[:, [0, 0, -1, -1], [0, -1, 0, -1]].all()
  brain = (stored >= 20.0) & (stored <= 60.0)
  assert not (air & brain).any() and 0.5 < air.mean() < 0.95
  with pytest.raises(ValueError, match="not a CT"):
    check_head_ct(stored, path.name)
