"""python -m sean_jax.predict: outputs on the input's grid, pose JSON, aligned volume,
folders, and every bad input giving exit != 0, one line on stderr and no output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import helpers  # tests/ is on sys.path under pytest
from sean_jax import predict
from sean_jax.data import nifti

REPO = Path(__file__).resolve().parent.parent
ALPHA = (0.12, 0.06, -0.04)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return helpers.make_tiny_workdir(tmp_path_factory.mktemp("predict"), alpha=ALPHA)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  """A phantom case as the phantom CLI writes it (32x32x4, int16 HU), plus the same
  volume under a non-canonical affine and at a size that needs resampling."""
  from sean_jax import phantom as phantom_cli
  d = tmp_path_factory.mktemp("scans")
  case = helpers.tiny_phantom_case(1, seed=5)
  phantom_cli.write_case(case, str(d), 5, 1)
  canonical = d / f"{case.case_id}_ct.nii.gz"
  vol = nifti.load_volume(canonical)
  # Same model-orientation array, stored with permuted/flipped axes and an oblique
  # affine: file axes (row, slice, col) reversed where the affine flips them.
  affine = helpers.oblique_affine()
  ornt = nib.orientations.io_orientation(affine)
  model_ornt = nib.orientations.axcodes2ornt(nifti.MODEL_AXCODES)
  back = nib.orientations.ornt_transform(model_ornt, ornt)
  oblique = helpers.write_nifti(d / "oblique.nii.gz",
                                nib.orientations.apply_orientation(vol.data, back),
                                affine)
  # 40 x 48 in-plane: the model (32) needs a resize both ways.
  big = np.zeros((48, 40, 4), np.float32) - 1000.0
  big[8:40, 4:36] = np.transpose(vol.data, (2, 1, 0))
  odd = helpers.write_nifti(d / "odd_size.nii.gz", big)
  return {"dir": d, "case": case, "canonical": canonical, "oblique": oblique,
          "odd": odd}


def error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.strip()
          and not line.startswith(("warning:", "note:"))]


def run_predict(capsys, *args):
  code = predict.main([str(a) for a in args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_all_outputs(workdir, scans, tmp_path, capsys):
  from sean_jax.models import sampler
  out = {k: tmp_path / n for k, n in (("mask", "m.nii.gz"), ("pose", "pose.json"),
                                     ("aligned", "al.nii.gz"), ("probs", "p.nii"),
                                     ("overlay", "o.png"), ("report", "r.json"))}
  # The pose the aligner was set to, and the raw threshold: no refinement, no brain mask
  # (both are tested below).
  code, stdout, err = run_predict(
      capsys, "--workdir", workdir, "--input", scans["canonical"], "--output",
      out["mask"], "--transform", out["pose"], "--aligned", out["aligned"],
      "--probabilities", out["probs"], "--overlay", out["overlay"], "--report",
      out["report"], "--no-refine", "--no-brain-mask")
  assert code == 0, err
  src = nib.load(str(scans["canonical"]))
  for key in ("mask", "aligned", "probs"):
    img = nib.load(str(out[key]))
    assert img.shape == src.shape
    np.testing.assert_array_equal(img.affine, src.affine)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(src.affine)
  mask = np.asarray(nib.load(str(out["mask"])).dataobj)
  probs = np.asarray(nib.load(str(out["probs"])).dataobj)
  assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
  assert probs.dtype == np.float32 and probs.min() >= 0 and probs.max() <= 1
  np.testing.assert_array_equal(mask, (probs > 0.5).astype(np.uint8))
  # Pose: the phantom's ground-truth keys, the value the aligner was set to.
  pose = json.loads(out["pose"].read_text())
  truth = json.loads((scans["dir"] / f"{scans['case'].case_id}.json").read_text())
  for key in ("rotation_deg", "shift_x_px", "shift_y_px"):
    assert key in truth and key in pose
  want = sampler.alpha_to_pose(ALPHA, 32, 32)
  for key, value in want.items():
    assert pose[key] == pytest.approx(value, abs=1e-4)
  assert pose["alpha"] == pytest.approx(list(ALPHA), abs=1e-6)
  # Aligned: the input moved by the sampler's warp, on the input grid (int16 HU).
  hu = nifti.load_volume(scans["canonical"]).data
  aligned = nifti.load_volume(out["aligned"], expect_hu=False).data
  lo = hu.min()
  ref = np.asarray(sampler.warp(np.asarray(hu - lo)[..., None],
                                np.asarray(ALPHA, np.float32)))[..., 0] + lo
  assert np.abs(aligned - ref).max() <= 0.51 + 1e-3 * np.abs(ref).max()
  assert out["overlay"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Report: volumes from the mask and the voxel size, sides across the set pose.
  rep = json.loads(out["report"].read_text())
  vol = nifti.load_volume(scans["canonical"])
  voxel_ml = float(np.prod(vol.spacing_mm)) / 1000.0
  assert rep["lesion_ml"] == pytest.approx(mask.sum() * voxel_ml)
  assert rep["lesion_ml_left"] + rep["lesion_ml_right"] == pytest.approx(rep["lesion_ml"])
  assert rep["side"] in ("left", "right", "bilateral", "none")
  assert rep["pose"]["alpha"] == pytest.approx(list(ALPHA), abs=1e-6)
  assert rep["input"]["path"] == str(scans["canonical"].resolve())
  assert rep["input"]["kind"] == "nifti" and rep["model"]["checkpoint_step"] >= 0
  assert rep["postprocessing"]["refine"] is False
  assert "wrote" in stdout
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_mask_agrees_with_evaluate(workdir, scans, tmp_path, capsys):
  """predict and evaluate see the same preprocessing: the same mask."""
  from sean_jax import checkpointing, evaluate
  from sean_jax.data import sources
  out = tmp_path / "m.nii.gz"
  assert run_predict(capsys, "--workdir", workdir, "--input", scans["canonical"],
                     "--output", out)[0] == 0
  model, config, _ = checkpointing.load_model(workdir)
  source = sources.NiftiCaseSource(scans["dir"], image_size=32,
                                    window=tuple(config.data.hu_window))
  index = source.case_ids.index(scans["case"].case_id)
  source = sources.NiftiCaseSource(scans["dir"], image_size=32,
                                    window=tuple(config.data.hu_window), brain_mask=True)
  settings = evaluate.postprocess_settings(workdir, config)
  assert settings["refine"] and settings["brain_mask"]  # the defaults
  pred, _, _, _ = evaluate.segment_case(model, source[index], refine=True,
                                        brain_mask=True)
  np.testing.assert_array_equal(nifti.load_mask(out).data, pred)


def test_non_canonical_affine(workdir, scans, tmp_path, capsys):
  a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
  pa, pb = tmp_path / "a.json", tmp_path / "b.json"
  assert run_predict(capsys, "--workdir", workdir, "--input", scans["oblique"],
                     "--output", a, "--transform", pa)[0] == 0
  assert run_predict(capsys, "--workdir", workdir, "--input", scans["canonical"],
                     "--output", b, "--transform", pb)[0] == 0
  src = nib.load(str(scans["oblique"]))
  img = nib.load(str(a))
  assert img.shape == src.shape
  np.testing.assert_allclose(img.affine, src.affine)
  assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(src.affine)
  assert nib.aff2axcodes(img.affine) != nib.aff2axcodes(nib.load(str(b)).affine)
  # The same anatomy in model orientation gives the same mask and pose.
  np.testing.assert_array_equal(nifti.load_mask(a).data, nifti.load_mask(b).data)
  assert json.loads(pa.read_text())["rotation_deg"] == pytest.approx(
      json.loads(pb.read_text())["rotation_deg"])


def test_resampled_input(workdir, scans, tmp_path, capsys):
  m, p, al = tmp_path / "m.nii.gz", tmp_path / "p.nii.gz", tmp_path / "al.nii.gz"
  pose = tmp_path / "pose.json"
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", scans["odd"],
                             "--output", m, "--probabilities", p, "--aligned", al,
                             "--transform", pose, "--no-refine")
  assert code == 0, err
  src = nib.load(str(scans["odd"]))
  for path in (m, p, al):
    img = nib.load(str(path))
    assert img.shape == src.shape == (48, 40, 4)
    np.testing.assert_array_equal(img.affine, src.affine)
  # Pixels of the input grid: (H, W) = (40, 48) in model orientation.
  got = json.loads(pose.read_text())
  assert got["shape"] == [4, 40, 48]
  assert got["shift_x_px"] == pytest.approx(ALPHA[1] * 48 / 2, abs=1e-4)
  assert got["shift_y_px"] == pytest.approx(ALPHA[2] * 40 / 2, abs=1e-4)


def test_aligned_on_input_grid_matches_sampler():
  from sean_jax.models import sampler
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(2, 24, 24)).astype(np.float32)
  alpha = np.array([0.3, 0.1, -0.2])
  got = predict.aligned_on_input_grid(volume, alpha, fill=0.0)
  want = np.asarray(sampler.warp(volume[..., None], alpha.astype(np.float32)))[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_aligned_pose_makes_phantom_symmetric():
  """The phantom's true pose, applied by the aligned-volume path on the input grid,
  centres the head on the middle column (checked on the skull, not on noise)."""
  from sean_jax.models import sampler
  case = helpers.tiny_phantom_case(2, size=64, slices=3, seed=11)
  alpha = np.asarray(sampler.pose_to_alpha(case.pose, 64, 64))
  skull = (case.ct_hu > 300).astype(np.float32)
  def asym(v):
    return float(np.abs(v - v[:, :, ::-1]).mean())
  aligned = predict.aligned_on_input_grid(skull, alpha, fill=0.0)
  assert asym(aligned) < 0.5 * asym(skull), (asym(aligned), asym(skull))


def test_folder(workdir, scans, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  code, stdout, err = run_predict(capsys, "--workdir", workdir, "--input", scans["dir"],
                                  "--output", out, "--transform", "--overlay")
  assert code == 0, err
  stems = ["odd_size", "oblique", f"{scans['case'].case_id}_ct"]  # *_mask.nii.gz skipped
  want = sorted(f"{s}{suffix}" for s in stems
                for suffix in ("_mask.nii.gz", "_pose.json", "_overlay.png"))
  assert sorted(os.listdir(out)) == want
  assert stdout.count("wrote") == 3


@pytest.mark.parametrize("what", ["not_a_volume", "two_d", "four_d", "truncated",
                                  "missing", "nan", "no_checkpoint", "no_output_dir",
                                  "corrupt_config"])
def test_bad_inputs(what, workdir, scans, tmp_path, capsys):
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  inp = tmp_path / "scan.nii.gz"
  wd = workdir
  output = out_dir / "mask.nii.gz"
  name = str(inp)
  if what == "not_a_volume":
    inp.write_text("this is not a NIfTI file\n")
  elif what == "two_d":
    helpers.write_nifti(inp, np.zeros((32, 32), np.int16) - 1000 + 1200 * (
        np.arange(32)[:, None] > 16))
  elif what == "four_d":
    helpers.write_nifti(inp, np.zeros((32, 32, 4, 2)))
  elif what == "truncated":
    data = scans["canonical"].read_bytes()
    inp.write_bytes(data[:len(data) // 2])
  elif what == "missing":
    pass
  elif what == "nan":
    v = np.zeros((32, 32, 4), np.float32); v[0, 0, 0] = np.nan
    helpers.write_nifti(inp, v, dtype=np.float32)
  else:
    inp.write_bytes(scans["canonical"].read_bytes())
    if what == "no_checkpoint":
      wd = tmp_path / "wd"
      wd.mkdir()
      (wd / "config.json").write_text((workdir / "config.json").read_text())
      name = str(wd / "checkpoints")
    elif what == "corrupt_config":
      wd = tmp_path / "wd"
      wd.mkdir()
      (wd / "config.json").write_text("{")
      name = str(wd / "config.json")
    elif what == "no_output_dir":
      output = tmp_path / "nowhere" / "mask.nii.gz"
      name = str(tmp_path / "nowhere")
  code, _, err = run_predict(capsys, "--workdir", wd, "--input", inp, "--output",
                             output, "--probabilities", out_dir / "p.nii.gz")
  assert code != 0
  lines = error_lines(err)
  assert len(lines) == 1 and name in lines[0], err
  assert os.listdir(out_dir) == []


@pytest.mark.parametrize("what,message", [
    ("unit", "not a CT"), ("air", "no head"), ("one_slice", "1 slice")])
def test_what_is_not_a_head_ct_is_refused(what, message, workdir, scans, tmp_path,
                                          capsys):
  """A volume of air got 89 ml of "infarct", a single slice 7 ml, a 0..1 image was
  read as HU: each is now one error line naming the file, and no output."""
  hu = nifti.load_volume(scans["canonical"]).data
  data = {"unit": np.random.default_rng(0).random((32, 32, 4)),
          "air": np.full((32, 32, 4), -1000.0),
          "one_slice": np.transpose(hu, (2, 1, 0))[..., :1]}[what]
  inp = helpers.write_nifti(tmp_path / f"{what}.nii.gz", data, dtype=np.float32)
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", inp, "--output",
                             tmp_path / "m.nii.gz")
  lines = error_lines(err)
  assert code == 1 and len(lines) == 1 and str(inp) in lines[0] and message in lines[0]
  assert not (tmp_path / "m.nii.gz").exists()


def test_air_stored_as_zero_is_fixed_and_confined(workdir, scans, tmp_path, capsys):
  """Air stored as 0 gets a note and the same prediction as the true HU; every
  predicted voxel lies in the brain mask."""
  from sean_jax.clinical import brain
  src = nib.load(str(scans["canonical"]))
  clipped = helpers.write_nifti(tmp_path / "clipped.nii.gz",
                                np.maximum(np.asarray(src.dataobj), 0), src.affine,
                                dtype=np.int16)
  a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", clipped,
                             "--output", a, "--threshold", "0.2")
  assert code == 0, err
  notes = [line for line in err.splitlines() if line.startswith("note:")]
  assert len(notes) == 1 and "air stored as 0" in notes[0] and str(clipped) in notes[0]
  assert run_predict(capsys, "--workdir", workdir, "--input", scans["canonical"],
                     "--output", b, "--threshold", "0.2")[0] == 0
  got, ref = nifti.load_mask(a).data, nifti.load_mask(b).data
  assert np.mean(got != ref) < 0.01
  vol = nifti.load_volume(scans["canonical"])
  inside = brain.brain_mask(vol.data, vol.spacing_mm)
  assert inside.any() and not (ref.astype(bool) & ~inside).any()


def test_real_dicom_slice_is_refused_as_too_few_slices(workdir, tmp_path, capsys):
  """A real head CT slice (pydicom-data's 693_UNCR.dcm) reads as a series of one slice,
  which the model cannot read: one error line naming the folder, no output."""
  import shutil
  series = tmp_path / "series"
  series.mkdir()
  shutil.copy(helpers.pydicom_data_file("693_UNCR.dcm"), series / "IM0001")
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", series,
                             "--output", tmp_path / "m.nii.gz")
  lines = error_lines(err)
  assert code == 1 and len(lines) == 1 and str(series) in lines[0], err
  assert "1 slice" in lines[0] and not (tmp_path / "m.nii.gz").exists()
  assert "scanner padding" in err  # its -3024 outside the field of view


def test_dicom_series(workdir, scans, tmp_path, capsys):
  """A DICOM series of the phantom volume: outputs on the series grid, and the same
  mask as the NIfTI file of the same anatomy; --series picks one of two."""
  import pydicom  # noqa: F401  (the test extra has it; predict depends on it)
  vol = nifti.load_volume(scans["canonical"])
  series = tmp_path / "series"
  uid = helpers.write_dicom_series(series, vol.data, vol.spacing_mm)
  out, rep = tmp_path / "m.nii.gz", tmp_path / "r.json"
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", series,
                             "--output", out, "--report", rep)
  assert code == 0, err
  img = nib.load(str(out))
  assert img.shape == (32, 32, 4) and nib.aff2axcodes(img.affine) == ("L", "A", "S")
  ref = tmp_path / "ref.nii.gz"
  assert run_predict(capsys, "--workdir", workdir, "--input", scans["canonical"],
                     "--output", ref)[0] == 0
  np.testing.assert_array_equal(nifti.load_mask(out).data, nifti.load_mask(ref).data)
  report = json.loads(rep.read_text())
  assert report["input"]["kind"] == "dicom" and uid in json.dumps(report["input"])
  helpers.write_dicom_series(series, vol.data, vol.spacing_mm, name="second")
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", series,
                             "--output", tmp_path / "x.nii.gz")
  assert code == 1 and uid in err and len(error_lines(err)) == 1
  assert run_predict(capsys, "--workdir", workdir, "--input", series, "--series", uid,
                     "--output", tmp_path / "x.nii.gz")[0] == 0


def test_failure_while_writing_leaves_nothing(workdir, scans, tmp_path, capsys,
                                             monkeypatch):
  def broken(*args, **kwargs):
    raise OSError("disk full (simulated)")
  monkeypatch.setattr(predict, "save_overlay", broken)
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", scans["canonical"],
                             "--output", tmp_path / "m.nii.gz", "--probabilities",
                             tmp_path / "p.nii.gz", "--overlay", tmp_path / "o.png")
  assert code == 1 and "disk full" in err
  assert os.listdir(tmp_path) == []


def test_usage_errors(workdir, scans, tmp_path):
  for args in (["--output", tmp_path / "m.png"],
               ["--output", tmp_path / "m.nii.gz", "--overlay", tmp_path / "o.jpg"],
               ["--output", tmp_path / "m.nii.gz", "--transform"],
               ["--output", tmp_path / "m.nii.gz", "--threshold", "2"]):
    with pytest.raises(SystemExit) as e:
      predict.main([str(a) for a in ["--workdir", workdir, "--input",
                                     scans["canonical"], *args]])
    assert e.value.code == 2
  with pytest.raises(SystemExit) as e:  # a folder input takes switches only
    predict.main([str(a) for a in ["--workdir", workdir, "--input", scans["dir"],
                                   "--output", tmp_path, "--aligned", tmp_path / "a.nii"]])
  assert e.value.code == 2


def test_output_must_not_overwrite_input(workdir, scans, capsys):
  code, _, err = run_predict(capsys, "--workdir", workdir, "--input", scans["canonical"],
                             "--output", scans["canonical"])
  assert code == 1 and len(error_lines(err)) == 1


def test_subprocess(workdir, scans, tmp_path):
  """The real command: success, and a bad input's exit code and single stderr line."""
  out = tmp_path / "m.nii.gz"
  r = subprocess.run([sys.executable, "-m", "sean_jax.predict", "--workdir",
                      str(workdir), "--input", str(scans["canonical"]), "--output",
                      str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert nib.load(str(out)).shape == nib.load(str(scans["canonical"])).shape
  bad = tmp_path / "bad.nii.gz"
  bad.write_text("nope")
  r = subprocess.run([sys.executable, "-m", "sean_jax.predict", "--workdir",
                      str(workdir), "--input", str(bad), "--output",
                      str(tmp_path / "x.nii.gz")], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 1
  lines = error_lines(r.stderr)
  assert len(lines) == 1 and str(bad) in lines[0], r.stderr
  assert not (tmp_path / "x.nii.gz").exists()


def test_png_trained_model_warns(scans, tmp_path, capsys):
  config = helpers.tiny_config("unet")
  config.data.source, config.data.aisd_config = "aisd", "png"
  wd = helpers.make_tiny_workdir(tmp_path, config=config, name="png_run")
  code, _, err = run_predict(capsys, "--workdir", wd, "--input", scans["canonical"],
                             "--output", tmp_path / "m.nii.gz")
  assert code == 0 and not error_lines(err)
  assert any("AISD PNG" in line for line in err.splitlines())
