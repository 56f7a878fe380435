"""Tests of the synthetic head CT phantom and of its command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sean_jax.data.phantom import LABELS, PhantomCase, PhantomConfig, generate_case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = PhantomConfig(size=64, slices=6)
# Noise-free, drift-free, unblurred, unposed: tissue values and geometry exactly.
CLEAN = PhantomConfig(size=96, slices=8, noise_hu=(0.0, 0.0), drift_hu=0.0, blur_mm=0.0,
                      max_rotation_deg=0.0, max_shift_frac=0.0)


def _unposed(cfg):
  return dataclasses.replace(cfg, max_rotation_deg=0.0, max_shift_frac=0.0)


def test_config_defaults_and_spacing():
  cfg = PhantomConfig()
  assert (cfg.size, cfg.slices, cfg.slice_spacing_mm) == (256, 24, 5.0)
  assert cfg.pixel_spacing_mm == pytest.approx(0.9)
  assert PhantomConfig(size=512).pixel_spacing_mm == pytest.approx(0.45)
  assert PhantomConfig(size=128, pixel_spacing_mm=1.0).pixel_spacing_mm == 1.0
  # A derived spacing follows the size through dataclasses.replace; an explicit one stays.
  assert dataclasses.replace(cfg, size=128).pixel_spacing_mm == pytest.approx(1.8)
  assert dataclasses.replace(cfg, field_of_view_mm=256.0).pixel_spacing_mm == 1.0
  explicit = PhantomConfig(size=128, pixel_spacing_mm=1.0)
  assert dataclasses.replace(explicit, size=64).pixel_spacing_mm == 1.0
  assert dataclasses.replace(cfg, pixel_spacing_mm=0.5).pixel_spacing_mm == 0.5
  assert PhantomConfig() == PhantomConfig(pixel_spacing_mm=0.9)
  case = generate_case(0, 0, SMALL)
  assert isinstance(case, PhantomCase)
  assert case.case_id == "phantom_0000_00000"
  assert case.ct_hu.shape == case.mask.shape == (6, 64, 64)
  assert case.ct_hu.dtype == np.float32 and case.mask.dtype == np.uint8
  assert case.spacing_mm == (5.0, SMALL.pixel_spacing_mm, SMALL.pixel_spacing_mm)
  assert set(case.pose) == {"rotation_deg", "shift_x_px", "shift_y_px"}
  assert set(np.unique(case.mask)) <= {0, 1}


def test_deterministic_per_seed_and_index():
  a, b = generate_case(7, 3, SMALL), generate_case(7, 3, SMALL)
  np.testing.assert_array_equal(a.ct_hu, b.ct_hu)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert a.pose == b.pose
  for other in (generate_case(7, 4, SMALL), generate_case(8, 3, SMALL)):
    assert not np.array_equal(a.ct_hu, other.ct_hu)
    assert a.pose != other.pose


def test_pose_ranges_and_head_fills_the_field():
  cfg = PhantomConfig(size=64, slices=4)
  rots, shifts = [], []
  for i in range(40):
    p = generate_case(1, i, cfg).pose
    rots.append(p["rotation_deg"])
    shifts += [p["shift_x_px"], p["shift_y_px"]]
  assert max(map(abs, rots)) <= 15.0 and max(rots) > 8 and min(rots) < -8
  assert max(map(abs, shifts)) <= 0.1 * 64 + 1e-9 and max(shifts) > 3 and min(shifts) < -3
  # Unposed, at the widest level, the head's AP length is ~70-85% of the field.
  case = generate_case(0, 2, dataclasses.replace(CLEAN, slices=3, stack_jitter_mm=0.0,
                                                 stack_centre_mm=15.0))
  head = case.labels[1] > 0
  rows = np.flatnonzero(head.any(axis=1))
  assert 0.68 <= (rows.max() - rows.min() + 1) / 96 <= 0.88


def test_tissue_hu_ranges():
  hu = {k: [] for k in ("air", "soft_tissue", "bone", "csf", "grey_matter", "white_matter",
                        "deep_grey_matter")}
  from scipy import ndimage
  cfg = dataclasses.replace(CLEAN, size=256, slices=6)  # thin cortex needs 0.9 mm pixels
  for i in range(3):
    c = generate_case(4, i, cfg)
    for name in hu:
      # Interior voxels only: the boundaries carry partial volume.
      inner = ndimage.binary_erosion(c.labels == LABELS[name], np.ones((1, 3, 3), bool))
      vals = c.ct_hu[inner]
      if vals.size > 20:
        hu[name].append(float(np.median(vals)))
  lims = {"air": (-1001, -999), "soft_tissue": (20, 60), "bone": (700, 1600),
          "csf": (0, 15), "grey_matter": (35, 45), "white_matter": (22, 32),
          "deep_grey_matter": (33, 45)}
  for name, (lo, hi) in lims.items():
    assert hu[name], name
    assert all(lo <= v <= hi for v in hu[name]), (name, hu[name])
  # Grey matter is brighter than white matter in every case.
  assert all(g > w + 5 for g, w in zip(hu["grey_matter"], hu["white_matter"]))


def test_noise_and_drift_are_a_few_hu():
  cfg = dataclasses.replace(CLEAN, noise_hu=(2.5, 5.0), drift_hu=4.0, size=128)
  c = generate_case(5, 1, cfg)
  clean = generate_case(5, 1, dataclasses.replace(cfg, noise_hu=(0.0, 0.0), drift_hu=0.0))
  air = (clean.labels == LABELS["air"])
  diff = (c.ct_hu - clean.ct_hu)[air]
  assert 2.0 < diff.std() < 6.0
  assert np.ptp(diff) < 60


def test_brain_outline_shrinks_towards_vertex():
  cfg = dataclasses.replace(CLEAN, slices=24, size=64, stack_jitter_mm=0.0)
  c = generate_case(0, 1, cfg)
  intracranial = np.isin(c.labels, [LABELS[k] for k in (
      "csf", "grey_matter", "white_matter", "deep_grey_matter", "acute_infarct",
      "old_infarct", "symmetric_hypodensity")]).sum(axis=(1, 2))
  mid = intracranial[8:16].max()
  assert intracranial[-1] < 0.6 * mid  # vertex
  assert intracranial[0] < 0.8 * mid  # skull base


def test_lesions_are_unilateral_in_canonical_space():
  cfg = _unposed(PhantomConfig(size=64, slices=10, lesion_free_fraction=0.0))
  centre = (64 - 1) / 2
  n = 0
  for i in range(12):
    c = generate_case(2, i, cfg)
    if not c.has_lesion:
      continue
    n += 1
    cols = np.nonzero(c.mask)[2]
    side = c.info["lesion_side"]  # +1: patient left = high column index
    assert side in (-1.0, 1.0)
    assert np.all((cols - centre) * side > 0), (i, side, cols.min(), cols.max())
    # The lesion spans adjacent slices (a territory or a lacune, never a speck).
    slices = np.flatnonzero(c.mask.any(axis=(1, 2)))
    assert np.all(np.diff(slices) == 1)
  assert n >= 10


def test_lesions_are_hypodense_by_a_few_hu():
  cfg = dataclasses.replace(CLEAN, size=128, slices=10, lesion_free_fraction=0.0)
  drops = []
  for i in range(6):
    c = generate_case(3, i, cfg)
    if c.mask.sum() < 30:
      continue
    twin = generate_case(3, i, dataclasses.replace(cfg, lesion_free_fraction=1.0))
    m = c.mask.astype(bool)
    drops.append(float((twin.ct_hu[m] - c.ct_hu[m]).mean()))
  assert len(drops) >= 3
  assert all(0.5 < d < 8.5 for d in drops), drops


def test_share_of_lesion_free_cases():
  cfg = PhantomConfig(size=32, slices=8)
  empty = [not generate_case(11, i, cfg).has_lesion for i in range(60)]
  assert 0.1 <= np.mean(empty) <= 0.45
  none = PhantomConfig(size=32, slices=8, lesion_free_fraction=1.0)
  assert not any(generate_case(11, i, none).has_lesion for i in range(10))


def test_distractors_are_never_in_the_mask():
  base = PhantomConfig(size=64, slices=8, old_infarct_prob=1.0, calcification_prob=1.0,
                       symmetric_hypodensity_prob=1.0, max_rotation_deg=0.0,
                       max_shift_frac=0.0)
  free = dataclasses.replace(base, lesion_free_fraction=1.0)
  seen = set()
  for i in range(8):
    twin = generate_case(6, i, free)  # same anatomy and distractors, no acute lesion
    assert not twin.mask.any()
    for name in ("old_infarct", "calcification", "symmetric_hypodensity"):
      if (twin.labels == LABELS[name]).any():
        seen.add(name)
    c = generate_case(6, i, dataclasses.replace(base, lesion_free_fraction=0.0))
    for name in ("old_infarct", "calcification"):
      assert not (c.mask.astype(bool) & (twin.labels == LABELS[name])).any()
    assert not (c.mask.astype(bool) & ~np.isin(c.labels, [LABELS["acute_infarct"]])).any()
  assert seen == {"old_infarct", "calcification", "symmetric_hypodensity"}


def test_old_infarcts_are_near_csf_density():
  cfg = dataclasses.replace(CLEAN, size=128, slices=10, old_infarct_prob=1.0)
  for i in range(4):
    c = generate_case(9, i, cfg)
    old = c.ct_hu[c.labels == LABELS["old_infarct"]]
    if old.size > 10:
      assert np.median(old) < 20.0


def test_head_is_not_cut_by_the_internal_crop():
  cfg = PhantomConfig(size=64, slices=8, noise_hu=(0.0, 0.0), drift_hu=0.0)
  for i in range(10):
    c = generate_case(12, i, cfg)
    r0, r1, c0, c1 = c.info["crop"]
    lab = c.labels
    edges = [lab[:, r0, c0:c1], lab[:, r1 - 1, c0:c1], lab[:, r0:r1, c0], lab[:, r0:r1, c1 - 1]]
    for e, at_border in zip(edges, (r0 == 0, r1 == 64, c0 == 0, c1 == 64)):
      if not at_border:
        assert not e.any()


def test_slice_drift_is_recorded_around_the_volume_pose():
  cfg = PhantomConfig(size=32, slices=6, slice_drift_deg=0.5, slice_drift_px=0.3)
  c = generate_case(0, 5, cfg)
  assert len(c.slice_poses) == 6
  for key in ("rotation_deg", "shift_x_px", "shift_y_px"):
    vals = [p[key] for p in c.slice_poses]
    assert np.mean(vals) == pytest.approx(c.pose[key], abs=1e-9)
    assert np.ptp(vals) > 0
  assert generate_case(0, 5, SMALL).slice_poses is None
  # The volume pose does not depend on whether drift is on.
  assert generate_case(0, 5, PhantomConfig(size=32, slices=6)).pose == c.pose


def _asym(v):
  return float(np.abs(v - v[:, :, ::-1]).mean())


def test_pose_convention_matches_the_model_sampler():
  """warp(posed, pose_to_alpha(pose)) gives back the canonical (symmetric) head."""
  import jax.numpy as jnp
  from sean_jax.models import sampler

  cfg = PhantomConfig(size=96, slices=6, noise_hu=(0.0, 0.0), drift_hu=0.0)
  for i in range(3):
    posed = generate_case(21, i, cfg)
    canon = generate_case(21, i, _unposed(cfg))  # same anatomy, identity pose
    assert abs(posed.pose["rotation_deg"]) > 2.0 or abs(posed.pose["shift_x_px"]) > 2.0
    # Brain window, shifted so that air is 0 (the sampler pads with zeros).
    win = lambda v: np.clip(v, -10.0, 90.0) + 10.0  # noqa: E731
    p, c = win(posed.ct_hu), win(canon.ct_hu)
    alpha = sampler.pose_to_alpha(posed.pose, 96, 96)
    aligned = np.asarray(sampler.warp(jnp.asarray(p)[..., None], alpha))[..., 0]
    assert _asym(aligned) < _asym(p) / 3.0
    assert np.abs(aligned - c).mean() < 0.25 * np.abs(p - c).mean()
    # The opposite rotation does not align: the sign convention is pinned down.
    wrong = dict(posed.pose, rotation_deg=-posed.pose["rotation_deg"])
    if abs(posed.pose["rotation_deg"]) > 4.0:
      bad = np.asarray(sampler.warp(jnp.asarray(p)[..., None],
                                    sampler.pose_to_alpha(wrong, 96, 96)))[..., 0]
      assert _asym(bad) > 2.0 * _asym(aligned)
    # The mask follows the same pose.
    m = np.asarray(sampler.warp(jnp.asarray(posed.mask, jnp.float32)[..., None], alpha))[..., 0]
    if canon.mask.sum() > 20:
      inter = ((m > 0.5) & canon.mask.astype(bool)).sum()
      assert 2 * inter / ((m > 0.5).sum() + canon.mask.sum()) > 0.7


# ------------------------------------------------------------------------ command line


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             MPLBACKEND="Agg")
  return subprocess.run([sys.executable, "-m", "sean_jax.phantom", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_writes_cases(tmp_path):
  import nibabel as nib
  from sean_jax.data import nifti

  out = tmp_path / "cases"
  preview = tmp_path / "preview.png"
  r = _run_cli("--out", str(out), "--num-cases", "2", "--seed", "3", "--size", "32",
               "--slices", "5", "--start-index", "4", "--preview", str(preview))
  assert r.returncode == 0, r.stderr
  names = sorted(os.listdir(out))
  assert names == sorted(f"phantom_0003_{i:05d}{s}" for i in (4, 5)
                         for s in ("_ct.nii.gz", "_mask.nii.gz", ".json"))
  assert preview.stat().st_size > 1000
  cfg = PhantomConfig(size=32, slices=5)
  for index in (4, 5):
    case = generate_case(3, index, cfg)
    stem = out / case.case_id
    ct = nib.load(f"{stem}_ct.nii.gz")
    mask = nib.load(f"{stem}_mask.nii.gz")
    assert ct.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    assert ct.shape == mask.shape == (32, 32, 5)  # (col, row, slice)
    np.testing.assert_allclose(ct.affine, nifti.model_affine(case.spacing_mm, (5, 32, 32)),
                               atol=1e-5)
    np.testing.assert_allclose(ct.header.get_zooms(), (cfg.pixel_spacing_mm,) * 2 + (5.0,),
                               rtol=1e-6)
    assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")
    vol = nifti.load_volume(f"{stem}_ct.nii.gz")
    np.testing.assert_array_equal(vol.data, np.rint(case.ct_hu))
    m = nifti.load_mask(f"{stem}_mask.nii.gz")
    np.testing.assert_array_equal(m.data, case.mask)
    meta = json.loads((out / f"{case.case_id}.json").read_text())
    for key in ("rotation_deg", "shift_x_px", "shift_y_px"):
      assert meta[key] == pytest.approx(case.pose[key])
    assert meta["spacing_mm"] == pytest.approx(list(case.spacing_mm))
    assert (meta["seed"], meta["index"], meta["has_lesion"]) == (3, index, case.has_lesion)


@pytest.mark.parametrize("args, words", [
    (["--num-cases", "0"], "--num-cases"),
    (["--num-cases", "1", "--size", "40"], "--size"),
    (["--num-cases", "1", "--size", "16"], "--size"),
    (["--num-cases", "1", "--slices", "0"], "--slices"),
    (["--num-cases", "x"], "--num-cases"),
])
def test_cli_rejects_bad_arguments(tmp_path, args, words):
  out = tmp_path / "out"
  r = _run_cli("--out", str(out), "--seed", "0", *args)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and words in lines[0]
  assert not out.exists()


def test_cli_rejects_unwritable_out(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  r = _run_cli("--out", str(blocker / "sub"), "--num-cases", "1", "--seed", "0",
               "--size", "32", "--slices", "2")
  assert r.returncode == 2
  assert len(r.stderr.strip().splitlines()) == 1 and "--out" in r.stderr
  r = _run_cli("--out", str(blocker), "--num-cases", "1", "--seed", "0", "--size", "32",
               "--slices", "2")
  assert r.returncode == 2 and "not a directory" in r.stderr
  assert sorted(os.listdir(tmp_path)) == ["a_file"]
