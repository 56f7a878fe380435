"""ASPECTS: the score by hand, the atlas's mapping under known transforms, on the real
CT template's anatomy, the phantom's true regions, and evaluate/predict wiring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import helpers  # tests/ is on sys.path under pytest
from sean_jax.clinical import aspects, report

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ATLAS = SHARED / "aspects_atlas"
TEMPLATE = SHARED / "ct_template" / "template_with_skull_2mm.nii.gz"


def real_atlas():
  if not ATLAS.is_dir():
    pytest.skip(f"../shared/data/aspects_atlas not found: {ATLAS} (the NCCT ASPECTS "
                f"atlas lives outside the repository; docs/aspects.md says where to get it)")
  return aspects.load_atlas(ATLAS)


@pytest.fixture(scope="module")
def phantom_atlas(tmp_path_factory):
  return aspects.load_atlas(helpers.write_phantom_atlas(tmp_path_factory.mktemp("atlas")))


# ------------------------------------------------------------------------- score


def test_score_by_hand():
  regions = np.zeros((2, 4, 20), np.uint8)
  regions[0, :, :10] = np.arange(1, 11)  # the right side's ten regions, 4 voxels each
  regions[1, :, 10:] = np.arange(11, 21)  # the left's
  lesion = np.zeros(regions.shape, bool)
  lesion[1, :2, 10] = True  # L C: 2 of 4 voxels
  lesion[1, :1, 14] = True  # L M1: 1 of 4
  lesion[0, :1, 2] = True  # R IC: 1 of 4
  out = aspects.score(regions, lesion, fraction=0.25)
  assert out["side"] == "left" and out["score"] == 8
  assert out["involved"] == ["L C", "L M1"]
  assert out["fractions"]["L C"] == 0.5 and out["fractions"]["R IC"] == 0.25
  assert out["missing"] == []
  # Above 0.25 only L C counts: still the left (1 region vs 0 on the right at 0.5).
  assert aspects.score(regions, lesion, fraction=0.5)["score"] == 9
  # A tie of counts goes to the larger summed fraction; nothing involved: 10, none.
  lesion[0, :2, 2] = True  # R IC 2/4: one region each side, right sum 0.5 < left 0.75
  assert aspects.score(regions, lesion, fraction=0.5)["side"] == "left"
  none = aspects.score(regions, np.zeros_like(lesion))
  assert none == dict(none, score=10, side="none", involved=[])
  with pytest.raises(ValueError, match="fraction"):
    aspects.score(regions, lesion, fraction=0.0)
  assert aspects.score(regions[:1], lesion[:1])["missing"][0] == "L C"


def test_summarize_by_hand():
  rows = []
  for true_score, hits in ((10, []), (8, [4, 5]), (9, [6])):
    truth = [c in hits for c in range(1, 21)]
    pred = [0.3 if c in hits else 0.0 for c in range(1, 21)]
    rows.append({"pred_fractions": pred, "true_involved": truth,
                 "true_score": true_score})
  rows[2]["pred_fractions"][6] = 0.05  # R M3 just touched: involved only below 0.05
  out = aspects.summarize(rows, fraction=0.1)
  assert out["aspects_mae"] == 0.0 and out["aspects_pearson_r"] == pytest.approx(1.0)
  assert out["aspects_region_sensitivity"] == 1.0
  assert out["aspects_region_specificity"] == 1.0
  low = out["aspects_by_fraction"]["0.05"]
  assert low["aspects_mae"] == pytest.approx(1 / 3)
  assert low["aspects_region_specificity"] == pytest.approx(56 / 57)


# -------------------------------------------------------------- atlas and mapping


def test_load_atlas_errors(tmp_path, phantom_atlas):
  with pytest.raises(ValueError, match="not found"):
    aspects.load_atlas(tmp_path / "nope")
  d = helpers.write_phantom_atlas(tmp_path / "a", size=96)
  (d / "cortical_label_50_69.nii.gz").unlink()
  with pytest.raises(ValueError, match="cortical_label_50_69.nii.gz: atlas file not found"):
    aspects.load_atlas(d)
  (d / "cortical_label_50_69.nii.gz").write_bytes(b"not a nifti")
  with pytest.raises(ValueError, match="cortical_label_50_69.nii.gz: not a readable NIfTI"):
    aspects.load_atlas(d)
  with pytest.raises(ValueError, match="age group"):
    aspects.load_atlas(d, "90_99")


def warp_level(level, height, width, spacing, scale, shift_mm, centre):
  """A scan slice made from an atlas level under a known scale and shift."""
  rows, cols = np.mgrid[0:height, 0:width]
  ar, ac = aspects._atlas_coords(np.r_[scale, shift_mm], rows, cols, np.asarray(spacing),
                                 np.asarray(centre), level)
  image = ndimage.map_coordinates(level.image, [ar, ac], order=1)
  labels = ndimage.map_coordinates(level.labels, [ar, ac], order=0)
  brain = ndimage.map_coordinates(level.brain.astype(np.float32), [ar, ac], order=1) > 0.5
  return image, labels, brain


@pytest.mark.parametrize("which", ["phantom", "real"])
def test_fit_recovers_a_known_scale_and_shift(which, phantom_atlas):
  atlas = phantom_atlas if which == "phantom" else real_atlas()
  rng = np.random.default_rng(3)
  for level in (atlas.ganglionic, atlas.supraganglionic):
    scale = rng.uniform(0.9, 1.12, size=2)
    image, labels, brain = warp_level(level, 128, 128, (1.6, 1.6), scale,
                                      rng.uniform(-4, 4, size=2), (60.0, 63.5))
    image = image + rng.normal(0, 3.0, image.shape)
    fit = aspects.fit_slice(image, brain, (1.6, 1.6), level)
    got = aspects._warp_labels(fit, level, image.shape, (1.6, 1.6))
    for code in np.unique(labels)[1:]:
      a, b = got == code, labels == code
      dice = 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())
      assert dice > 0.8, (which, int(code), dice)


def test_regions_come_back_to_the_input_grid():
  rng = np.random.default_rng(0)
  aligned = np.zeros((2, 60, 70), np.uint8)
  aligned[:, 20:40, 10:30] = 3
  aligned[:, 20:40, 40:60] = 13
  alpha = np.array([math.radians(8.0), 0.1, -0.05])
  back = aspects.regions_to_input(aligned, alpha)
  # The input pixels of a region, moved by alpha, land on that region.
  again = report.aligned_on_input_grid(back.astype(np.float32), alpha, fill=0.0, order=0)
  inner = ndimage.binary_erosion(aligned > 0, np.ones((1, 3, 3)), iterations=2)
  assert np.mean(again[inner] == aligned[inner]) > 0.97
  assert set(np.unique(back)) == {0, 3, 13}
  del rng


def test_real_template_levels_and_anatomy():
  """The real atlas on the real CT template (thick 5 mm slices): the ganglionic level
  is the basal ganglia's, caudate, lentiform and insula land on those structures
  (points read off the template by eye), and the deep grey matter the atlas calls C
  and L is denser than what it calls the internal capsule."""
  atlas = real_atlas()
  if not TEMPLATE.exists():
    pytest.skip(f"../shared/data/ct_template not found: {TEMPLATE}")
  from sean_jax.clinical import brain as brain_lib  # pylint: disable=g-import-not-at-top
  from sean_jax.study import normal_head  # pylint: disable=g-import-not-at-top
  hu, spacing = normal_head.template_volume(TEMPLATE)  # 5 mm slices from 2 mm slice 20
  brain = brain_lib.brain_mask(hu, spacing)
  regions, info = aspects.regions_of_scan(hu, brain, np.zeros(3), spacing, atlas)
  # Thick slice 17 (2 mm slices 62.5-65) shows the basal ganglia and thalami.
  assert abs(info["ganglionic_slice"] - 17) <= 1, info
  assert info["supraganglionic_slice"] is not None
  assert min(info["supraganglionic_slices"]) > max(info["ganglionic_slices"])
  points = {1: (50, 58), 11: (50, 70), 2: (58, 53), 12: (58, 76), 4: (58, 45),
            14: (58, 84)}  # (row, col) of the caudate heads, lentiform, insula
  for code, (row, col) in points.items():
    assert regions[17, row, col] == code, (code, regions[17, row, col])
  level = regions[17]
  mean = {k: hu[17][(level == k) | (level == k + 10)].mean() for k in (1, 2, 3)}
  assert mean[2] > mean[3] + 2.0 and mean[1] > mean[3] + 1.0, mean


# ------------------------------------------------------------------------ phantom


def test_phantom_true_regions_follow_its_anatomy():
  from sean_jax.data import phantom, phantom_aspects  # pylint: disable=g-import-not-at-top
  from sean_jax.models.sampler import pose_to_alpha  # pylint: disable=g-import-not-at-top
  config = phantom.PhantomConfig(size=128, slices=12)
  case = phantom.generate_case(3, 7, config)
  regions = phantom_aspects.true_regions(case, 3, 7, config)
  assert set(np.unique(regions)) == set(range(21))
  # Only brain tissue, and the caudate and lentiform on the deep grey matter.
  labels = case.labels
  assert not np.any(regions[np.isin(labels, [0, 1, 2, phantom.LABELS["csf"]])])
  deep = labels == phantom.LABELS["deep_grey_matter"]
  for code in (1, 2, 11, 12):
    assert deep[regions == code].mean() > 0.8, code
  # Moved by the true pose, the right's regions lie left of the image's centre column
  # (model orientation: columns from the patient's right to the left).
  aligned = report.aligned_on_input_grid(regions.astype(np.float32),
                                         pose_to_alpha(case.pose, 128, 128), fill=0.0,
                                         order=0)
  cols = np.nonzero(aligned)[2]
  right = (aligned[aligned > 0] <= 10)
  assert np.all(cols[right] < 63.5) and np.all(cols[~right] > 63.5)
  # The levels: ganglionic regions lie below the supraganglionic ones.
  z_of = lambda codes: np.nonzero(np.isin(regions, codes))[0]
  assert z_of([1, 2, 3, 4, 5, 6, 7]).max() < z_of([8, 9, 10]).min()
  # The true score counts what the true infarct covers.
  truth = phantom_aspects.true_score(regions, case.mask)
  assert truth == aspects.score(regions, case.mask, phantom_aspects.TRUTH_FRACTION)


def test_phantom_atlas_maps_back_onto_a_posed_phantom(phantom_atlas):
  """The atlas made from one phantom head, mapped onto another posed head with the
  true pose, covers that head's true regions."""
  from sean_jax.clinical import brain as brain_lib  # pylint: disable=g-import-not-at-top
  from sean_jax.data import phantom, phantom_aspects  # pylint: disable=g-import-not-at-top
  from sean_jax.models.sampler import pose_to_alpha  # pylint: disable=g-import-not-at-top
  config = phantom.PhantomConfig(size=128, slices=12)
  case = phantom.generate_case(1, 4, config)
  truth = phantom_aspects.true_regions(case, 1, 4, config)
  brain = brain_lib.brain_mask(case.ct_hu, case.spacing_mm)
  mapped, info = aspects.regions_of_scan(case.ct_hu, brain,
                                         pose_to_alpha(case.pose, 128, 128),
                                         case.spacing_mm, phantom_atlas)
  # The levels within a slice (5 mm) of the truth; the regions overlap accordingly.
  true_gang = set(np.nonzero(np.isin(truth, [1, 2, 3, 4, 5, 6, 7]))[0].tolist())
  assert len(true_gang & set(info["ganglionic_slices"])) >= 2, (true_gang, info)
  for codes, least in (((8, 9, 10), 0.6), ((18, 19, 20), 0.6), ((5, 6, 7), 0.4)):
    a, b = np.isin(mapped, codes), np.isin(truth, codes)
    assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) > least, codes


# ---------------------------------------------------------------- evaluate, predict


def test_evaluate_reports_aspects_on_a_phantom_split(tmp_path, phantom_atlas, capsys):
  from sean_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config()  # the model on 32 x 32: coarse, but enough here
  config.data.phantom_size = 96
  config.data.phantom_slices = 12
  workdir = helpers.make_tiny_workdir(tmp_path, config=config)
  atlas_dir = helpers.write_phantom_atlas(tmp_path / "atlas", size=96)
  out = tmp_path / "e.json"
  code = evaluate.main(["--workdir", str(workdir), "--aspects-atlas", str(atlas_dir),
                        "--output", str(out), "--no-refine"])
  text = capsys.readouterr().out
  assert code == 0, text
  result = json.loads(out.read_text())
  m = result["metrics"]
  assert m["aspects_cases"] == 2 and 0 <= m["aspects_mae"] <= 10
  assert set(m["aspects_by_fraction"]) == {f"{f:g}" for f in aspects.FRACTION_CANDIDATES}
  for row in result["cases"]:
    assert len(row["aspects"]["pred_fractions"]) == 20
    assert 0 <= row["aspects"]["true_score"] <= 10
  assert "ASPECTS over 2 cases" in text
  del phantom_atlas
  # The true regions exist only on the phantom: a folder of NIfTI is refused.
  code = evaluate.main(["--workdir", str(workdir), "--aspects-atlas", str(atlas_dir),
                        "--data", str(tmp_path)])
  assert code == 1
  assert "phantom" in capsys.readouterr().err


def test_predict_writes_regions_and_the_aspects_report(tmp_path, capsys):
  from sean_jax import phantom as phantom_cli  # pylint: disable=g-import-not-at-top
  from sean_jax import predict  # pylint: disable=g-import-not-at-top
  from sean_jax.data import nifti, phantom  # pylint: disable=g-import-not-at-top
  workdir = helpers.make_tiny_workdir(tmp_path)
  atlas_dir = helpers.write_phantom_atlas(tmp_path / "atlas", size=96)
  case = phantom.generate_case(2, 3, phantom.PhantomConfig(size=96, slices=12))
  phantom_cli.write_case(case, str(tmp_path), 2, 3)
  scan = tmp_path / f"{case.case_id}_ct.nii.gz"
  out = {k: tmp_path / n for k, n in (("mask", "m.nii.gz"), ("regions", "r.nii.gz"),
                                       ("report", "r.json"), ("overlay", "o.png"))}
  code = predict.main(["--workdir", str(workdir), "--input", str(scan), "--output",
                       str(out["mask"]), "--regions", str(out["regions"]), "--report",
                       str(out["report"]), "--overlay", str(out["overlay"]),
                       "--aspects-atlas", str(atlas_dir)])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert "ASPECTS" in captured.out
  regions = nifti.load_mask(out["regions"]).data
  assert regions.shape == case.ct_hu.shape and regions.max() <= 20
  assert set(np.unique(regions)) >= {1, 2, 5, 8, 11, 12, 15, 18}
  rep = json.loads(out["report"].read_text())["aspects"]
  assert 0 <= rep["score"] <= 10 and rep["side"] in ("left", "right", "none")
  assert len(rep["fractions"]) == 20 and rep["ganglionic_slices"]
  mask = nifti.load_mask(out["mask"]).data
  assert rep == dict(rep, **aspects.score(regions, mask, rep["fraction_threshold"]))
  assert out["overlay"].stat().st_size > 0
  # Bad arguments: --regions without an atlas (exit 2), an atlas that is not there (1).
  with pytest.raises(SystemExit) as e:
    predict.main(["--workdir", str(workdir), "--input", str(scan), "--output",
                  str(tmp_path / "x.nii.gz"), "--regions", str(tmp_path / "y.nii.gz")])
  assert e.value.code == 2
  code = predict.main(["--workdir", str(workdir), "--input", str(scan), "--output",
                       str(tmp_path / "x.nii.gz"), "--aspects-atlas",
                       str(tmp_path / "missing")])
  err = capsys.readouterr().err
  assert code == 1 and "missing: ASPECTS atlas directory not found" in err
  assert not (tmp_path / "x.nii.gz").exists()
