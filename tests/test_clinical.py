"""sean_jax.clinical: brain/head masks against phantom truth and hand-made geometry;
component-size post-processing against scipy-computed sizes and hand-made cases."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from sean_jax import metrics
from sean_jax.clinical import brain, postprocess
from sean_jax.data.phantom import LABELS, PhantomConfig, generate_case

# Labels of the phantom's intracranial content (everything inside the inner table).
INTRACRANIAL = [v for k, v in LABELS.items() if k not in ("air", "soft_tissue", "bone")]


def dice(a, b):
  return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# ---------------------------------------------------------------- hand-made heads


def shells(shape=(9, 64, 64), spacing=(5.0, 2.0, 2.0), brain_r=40.0, skull=(40.0, 48.0),
           scalp=(48.0, 54.0), skull_hu=1000.0):
  """A sphere of 30 HU (the brain, radius mm) in a skull shell in a scalp shell in air.

  Returns (volume HU, brain truth bool); radii in mm about the volume's centre.
  """
  s, h, w = shape
  z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing)],
                        indexing="ij")
  r = np.sqrt(x * x + y * y + z * z)
  v = np.full(shape, -1000.0, np.float32)
  v[(r >= scalp[0]) & (r < scalp[1])] = 40.0
  v[(r >= skull[0]) & (r < skull[1])] = skull_hu
  truth = r < brain_r
  v[truth] = 30.0
  return v, truth


def test_sphere_in_skull_in_scalp():
  rng = np.random.default_rng(0)
  v, truth = shells()
  v = v + rng.normal(0.0, 4.0, v.shape).astype(np.float32)
  # A hypodense "infarct" and a CSF "ventricle" inside, a calcification: all brain.
  v[4, 28:34, 20:26] = 18.0
  v[4, 30:36, 36:42] = 5.0
  v[5, 32, 32] = 300.0
  m = brain.brain_mask(v, (5.0, 2.0, 2.0))
  assert m.dtype == bool and m.shape == v.shape
  assert dice(m, truth) > 0.95
  # Within one voxel: nothing beyond the truth dilated once, all of it eroded once.
  assert not (m & ~ndimage.binary_dilation(truth)).any()
  assert not (ndimage.binary_erosion(truth) & ~m).any()
  calc = np.zeros(v.shape, bool)
  calc[5, 32, 32] = True
  assert not (m & (v > 300) & ~calc).any()
  assert m[4, 28:34, 20:26].all() and m[4, 30:36, 36:42].all() and m[5, 32, 32]


def test_skull_stripped_brain_is_the_brain():
  v, truth = shells(skull_hu=-1000.0, scalp=(0.0, 0.0))  # no skull, no scalp
  m = brain.brain_mask(v, (5.0, 2.0, 2.0))
  assert dice(m, truth) > 0.99


def test_thin_bridge_to_the_scalp_is_cut():
  v, truth = shells()
  # A 2 mm (one pixel) soft-tissue channel through the skull in one slice (a foramen).
  v[4, 32, 52:58] = 35.0
  m = brain.brain_mask(v, (5.0, 2.0, 2.0))
  scalp = (v == 40.0)
  assert not (m & scalp).any()
  assert dice(m, truth) > 0.95


def test_bridge_needs_the_erosion():
  # The same channel without the erosion joins the scalp to the brain: the test above
  # relies on the erosion, not on the channel being too thin to threshold.
  v, _ = shells()
  v[4, 32, 52:58] = 35.0
  m = brain.brain_mask(v, (5.0, 2.0, 2.0), erode_mm=0.0)
  assert (m & (v == 40.0)).any()


def test_thin_lowest_slice_is_kept():
  # Under the brain, a lowest slice holding a 4 mm square (thinner than the erosion):
  # it is brain (a temporal lobe low in the middle fossa).
  v, truth = shells(shape=(9, 64, 64))
  v[:2] = -1000.0
  truth[:2] = False
  disc = np.zeros(v.shape, bool)
  disc[1, 31:33, 20:22] = True
  v[disc] = 32.0
  truth |= disc
  m = brain.brain_mask(v, (5.0, 2.0, 2.0))
  assert m[disc].all()
  # Not so a disc with nothing above or below: a speck of soft tissue apart.
  v2 = v.copy()
  v2[1, 31:33, 45:47] = 32.0
  v2[2, 30:34, 44:48] = -1000.0
  m2 = brain.brain_mask(v2, (5.0, 2.0, 2.0))
  assert m2[disc].all() and not m2[1, 31:33, 45:47].any()


def test_all_air_and_degenerate_inputs():
  air = np.full((4, 32, 32), -1000.0, np.float32)
  assert not brain.brain_mask(air, (5.0, 1.0, 1.0)).any()
  assert not brain.brain_mask(air, None).any()
  assert not brain.head_mask(air).any()
  # One slice, as (1, H, W) and as (H, W).
  v, truth = shells(shape=(1, 64, 64))
  m1 = brain.brain_mask(v, (5.0, 2.0, 2.0))
  assert m1.shape == (1, 64, 64) and dice(m1, truth) > 0.95
  m2 = brain.brain_mask(v[0], (5.0, 2.0, 2.0))
  assert m2.shape == (64, 64) and np.array_equal(m2, m1[0])
  with pytest.raises(ValueError, match="spacing_mm"):
    brain.brain_mask(v, (5.0, 0.0, 1.0))
  with pytest.raises(ValueError, match="volume"):
    brain.brain_mask(np.zeros((2, 2, 2, 2)))


def test_head_mask_shells():
  v, _ = shells()
  sinus = np.zeros(v.shape, bool)
  sinus[4, 30:34, 30:34] = True
  v[sinus] = -1000.0  # air inside the head: filled
  h = brain.head_mask(v)
  z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d
                          for n, d in zip(v.shape, (5.0, 2.0, 2.0))], indexing="ij")
  head = np.sqrt(x * x + y * y + z * z) < 54.0
  assert np.array_equal(h, head)


def test_dilate8_matches_scipy():
  m = np.random.default_rng(4).random((3, 17, 19)) < 0.1
  m[0, 0, 0] = m[2, -1, -1] = True  # the edges
  np.testing.assert_array_equal(brain._dilate8(m),
                                ndimage.binary_dilation(m, np.ones((1, 3, 3), bool)))


def test_block_mean_matches_reshape():
  v = np.random.default_rng(6).normal(0.0, 100.0, (2, 9, 11)).astype(np.float32)
  for f in (1, 2, 3):
    padded = np.pad(v, ((0, 0), (0, -9 % f), (0, -11 % f)), mode="edge")
    expect = padded.reshape(2, padded.shape[1] // f, f, padded.shape[2] // f, f).mean(axis=(2, 4))
    np.testing.assert_allclose(brain._block_mean(v, f), expect, atol=1e-3)


def test_fill_holes_matches_scipy():
  rng = np.random.default_rng(3)
  m = rng.random((5, 24, 24)) < 0.55
  per_slice = np.stack([ndimage.binary_fill_holes(s) for s in m])
  assert np.array_equal(brain.fill_holes(m, in_3d=False), per_slice)
  assert np.array_equal(brain.fill_holes(m, per_slice=False),
                        ndimage.binary_fill_holes(m, ndimage.generate_binary_structure(3, 1)))


# ------------------------------------------------------------------- the phantom


@pytest.fixture(scope="module")
def phantom_cases():
  cfg = PhantomConfig(size=96, slices=8)
  return [generate_case(7, i, cfg) for i in range(6)]


def test_brain_mask_on_phantom(phantom_cases):
  lesions = 0
  for case in phantom_cases:
    m = brain.brain_mask(case.ct_hu, case.spacing_mm)
    lab = case.labels
    truth = np.isin(lab, INTRACRANIAL)
    mask = case.mask.astype(bool)
    lesions += int(mask.any())
    assert not (mask & ~m).any(), case.case_id  # every lesion voxel
    assert not (m & (lab == LABELS["air"])).any(), case.case_id
    scalp = lab == LABELS["soft_tissue"]
    assert np.count_nonzero(m & scalp) <= 0.01 * np.count_nonzero(scalp), case.case_id
    skull = (lab == LABELS["bone"]) & (case.ct_hu > 300)
    assert np.count_nonzero(m & skull) <= 0.01 * np.count_nonzero(m), case.case_id
    assert dice(m, truth) > 0.9, case.case_id
  assert lesions >= 3  # the check saw lesions


def test_head_mask_on_phantom(phantom_cases):
  for case in phantom_cases:
    h = brain.head_mask(case.ct_hu)
    assert dice(h, case.labels != LABELS["air"]) > 0.98
    assert brain.brain_mask(case.ct_hu, case.spacing_mm)[~h].sum() == 0


# ------------------------------------------------------------ post-processing


def test_remove_small_components_against_scipy():
  rng = np.random.default_rng(1)
  m = (rng.random((6, 20, 20)) < 0.12).astype(np.uint8)
  m[1:4, 2:8, 2:9] = 1  # one big blob
  spacing = (3.0, 0.5, 0.7)  # 1.05 mm^3 = 0.00105 ml a voxel
  for connectivity, rank in ((6, 1), (18, 2), (26, 3)):
    lab, n = ndimage.label(m, ndimage.generate_binary_structure(3, rank))
    sizes_ml = np.array([np.sum(lab == i) for i in range(1, n + 1)]) * 3.0 * 0.5 * 0.7 / 1000
    for min_ml in (0.0, 0.002, 0.0021, 0.005, 0.2):
      expect = np.isin(lab, 1 + np.flatnonzero(sizes_ml >= min_ml - 1e-12)).astype(np.uint8)
      got = postprocess.remove_small_components(m, min_ml, spacing, connectivity)
      assert got.dtype == np.uint8
      np.testing.assert_array_equal(got, expect)
  # A component of exactly two voxels (0.0021 ml) stays at 0.0021 ml, goes at 0.00211.
  two = np.zeros((3, 4, 4), bool)
  two[1, 1, 1:3] = True
  assert postprocess.remove_small_components(two, 0.0021, spacing).sum() == 2
  assert postprocess.remove_small_components(two, 0.00211, spacing).sum() == 0


def test_confine():
  m = np.array([[[1, 0, 1, 1]]], np.uint8)
  b = np.array([[[True, True, False, True]]])
  np.testing.assert_array_equal(postprocess.confine(m, b), [[[1, 0, 0, 1]]])
  with pytest.raises(ValueError):
    postprocess.confine(m, b[..., :2])


def _blob(shape, centre, r):
  z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
  return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= r * r


SP = (2.0, 1.0, 1.0)  # 0.002 ml a voxel
SHAPE = (10, 32, 32)


def test_choose_min_size_removes_specks():
  # Large true lesions (~0.5 ml), found; false-positive specks of 1-2 voxels (<= 0.004 ml).
  rng = np.random.default_rng(2)
  cases = []
  for k in range(4):
    ref = _blob(SHAPE, (5, 16, 16), 4)
    pred = ref.copy()
    for _ in range(3):
      z, y, x = rng.integers(0, 10), rng.integers(0, 6), rng.integers(0, 31)
      pred[z, y, x:x + 1 + (k % 2)] = True
    cases.append((pred, ref, SP))
  best, table = postprocess.choose_min_size(cases, (0.001, 0.005, 0.01, 0.1, 1.0))
  assert best == 0.005  # the smallest that removes every speck
  rows = {r["min_ml"]: r for r in table}
  assert rows[0.0]["fp_pred"] == 12 and rows[0.0]["f1"] < 1
  assert rows[0.005]["fp_pred"] == 0 and rows[0.005]["f1"] == 1 and rows[0.005]["chosen"]
  assert rows[0.01]["f1"] == 1 and not rows[0.01]["chosen"]  # a tie: the smaller wins
  assert rows[1.0]["recall"] == 0 and rows[1.0]["mean_dice"] == 0
  assert [r["min_ml"] for r in table] == [0.0, 0.001, 0.005, 0.01, 0.1, 1.0]


def test_choose_min_size_keeps_small_true_lesions():
  # Specks (1 voxel, 0.002 ml) and true small lesions (7 voxels, 0.014 ml) predicted
  # exactly: 0.005 removes the specks only; 0.02 also removes lesions (F1 and Dice fall).
  cases = []
  for k in range(3):
    ref = np.zeros(SHAPE, bool)
    ref[5, 10, 10:17] = True  # 7 voxels in a row
    pred = ref.copy()
    pred[2, 25, 3 + 5 * k] = True
    cases.append((pred, ref, SP))
  best, table = postprocess.choose_min_size(cases, (0.005, 0.02))
  assert best == 0.005
  # Removing 3-voxel components would drop every false positive and one of two true
  # lesions: F1 rises (0.4 -> 0.67) but the mean Dice of lesion cases halves: refused.
  big = _blob(SHAPE, (5, 16, 16), 3)
  small = np.zeros(SHAPE, bool)
  small[5, 10, 10:13] = True
  specks = np.zeros(SHAPE, bool)
  for k in range(6):
    specks[2, 4 + 4 * k, 3:6] = True
  cases = [(big, big, SP), (small, small, SP), (specks, np.zeros(SHAPE, bool), SP)]
  best, table = postprocess.choose_min_size(cases, (0.01,))
  rows = {r["min_ml"]: r for r in table}
  assert rows[0.0]["f1"] == pytest.approx(0.4)
  assert rows[0.01]["f1"] == pytest.approx(2 / 3) and not rows[0.01]["admissible"]
  assert rows[0.01]["mean_dice"] == pytest.approx(0.5)
  assert best == 0.0
  assert postprocess.choose_min_size(cases, (0.01,), dice_tolerance=0.6)[0] == 0.01
  # A Dice drop within the tolerance is accepted: the lesion's tail is predicted as a
  # 1-voxel piece apart from the rest (still found through the rest).
  ref = _blob(SHAPE, (5, 16, 16), 3.6)
  ref[5, 16, 19:23] = True
  pred = _blob(SHAPE, (5, 16, 16), 3.6)
  pred[5, 16, 22] = True
  speck = np.zeros(SHAPE, bool)
  speck[0, 31, 31] = True
  cases = [(pred, ref, SP), (speck, np.zeros(SHAPE, bool), SP)] * 2
  best, table = postprocess.choose_min_size(cases, (0.003,), dice_tolerance=0.01)
  assert table[1]["f1"] == 1 and table[0]["f1"] < 1
  assert 0 < table[0]["mean_dice"] - table[1]["mean_dice"] < 0.01
  assert best == 0.003
  best, _ = postprocess.choose_min_size(cases, (0.003,), dice_tolerance=0.0)
  assert best == 0.0


def test_choose_min_size_counts_match_metrics():
  rng = np.random.default_rng(5)
  cases = [((rng.random(SHAPE) < 0.02), _blob(SHAPE, (5, 10, 20), 3), SP) for _ in range(3)]
  _, table = postprocess.choose_min_size(cases, (0.004,), connectivity=6, criterion="dice")
  for row in table:
    total = metrics.DetectionCounts()
    for pred, ref, sp in cases:
      kept = postprocess.remove_small_components(pred, row["min_ml"], sp, connectivity=6)
      total = total + metrics.detection_counts(kept, ref, connectivity=6)
    assert row["fp_pred"] == total.fp_pred and row["tp_ref"] == total.tp_ref
  with pytest.raises(ValueError, match="criterion"):
    postprocess.choose_min_size(cases, criterion="auc")


def test_postprocessing_json_round_trip(tmp_path):
  assert postprocess.load_postprocessing(tmp_path) is None
  _, table = postprocess.choose_min_size(
      [(_blob(SHAPE, (5, 16, 16), 2), _blob(SHAPE, (5, 16, 16), 2), SP)], (0.01,))
  params = {"min_ml": np.float64(0.01), "candidates": table, "criterion": "f1",
            "dice_tolerance": 0.005, "split": "validation", "step": np.int64(1200)}
  path = postprocess.save_postprocessing(tmp_path, params)
  assert path == os.path.join(tmp_path, "postprocessing.json")
  back = postprocess.load_postprocessing(tmp_path)
  assert back["min_ml"] == 0.01 and back["step"] == 1200 and back["split"] == "validation"
  assert back["candidates"] == json.loads(json.dumps(table))
  assert [p.name for p in tmp_path.iterdir()] == ["postprocessing.json"]  # no temp left
  (tmp_path / "postprocessing.json").write_text('{"min_ml": 0.1,')
  with pytest.raises(ValueError, match="postprocessing.json") as e:
    postprocess.load_postprocessing(tmp_path)
  assert "\n" not in str(e.value)
  (tmp_path / "postprocessing.json").write_text('{"min_ml": -1}')
  with pytest.raises(ValueError, match="postprocessing.json.*min_ml"):
    postprocess.load_postprocessing(tmp_path)
  with pytest.raises(ValueError, match="min_ml"):
    postprocess.save_postprocessing(tmp_path, {"split": "validation"})
