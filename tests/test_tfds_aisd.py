"""Tests of the AISD TFDS builder (tfds_aisd) on a small fake download."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
import tfds_aisd  # noqa: E402  (registers "aisd")
from tfds_aisd import __main__ as cli  # noqa: E402
from tfds_aisd import aisd as aisd_lib  # noqa: E402
from tfds_aisd import readers  # noqa: E402

import fake_aisd  # noqa: E402  (tests/ is on sys.path under pytest)

SPLITS = ("train", "validation", "test")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  import pydicom  # noqa: F401
  HAVE_PYDICOM = True
except ImportError:
  HAVE_PYDICOM = False
needs_pydicom = pytest.mark.skipif(not HAVE_PYDICOM,
                                   reason="pydicom not installed")


def _build(config, manual_dir, data_dir, **kwargs):
  builder = tfds_aisd.Aisd(config=config, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


def _read_all(config, data_dir):
  """split -> {case_id: example}, read the documented way."""
  out = {}
  for split in SPLITS:
    try:
      ds = tfds.data_source(f"aisd/{config}", data_dir=str(data_dir),
                            split=split, download=False)
    except (KeyError, ValueError):  # split left out (no case)
      out[split] = {}
      continue
    out[split] = {ex["case_id"].decode(): ex for ex in ds}
  return out


def _expected_split(case_ids):
  out = {s: set() for s in SPLITS}
  for c in case_ids:
    out[aisd_lib.split_of(c)].add(c)
  return out


def _assert_nothing_readable(data_dir, config="png"):
  version_dir = os.path.join(str(data_dir), "aisd", config, "1.0.0")
  assert not os.path.exists(version_dir)
  parent = os.path.dirname(version_dir)
  if os.path.isdir(parent):
    assert [p for p in os.listdir(parent) if "incomplete" in p] == []
  with pytest.raises(Exception):
    tfds.data_source(f"aisd/{config}", data_dir=str(data_dir), split="train",
                     download=False)


# -- fixtures: one fake download (unpacked, zipped), one build per variant ----


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  return fake_aisd.write_fake_aisd(
      str(tmp_path_factory.mktemp("manual_unpacked")), dicom=HAVE_PYDICOM)


@pytest.fixture(scope="module")
def fake_zipped(tmp_path_factory):
  return fake_aisd.write_fake_aisd(
      str(tmp_path_factory.mktemp("manual_zipped")), zipped=True,
      dicom=HAVE_PYDICOM)


@pytest.fixture(scope="module")
def built_png(fake, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data_png")
  _build("png", fake.root, data_dir)
  return data_dir


# -- png ------------------------------------------------------------------------


def test_feature_spec():
  for config, dtype in (("png", np.uint8), ("dicom", np.int16)):
    feats = tfds_aisd.Aisd(config=config, data_dir="/nonexistent").info.features
    assert set(feats.keys()) == {"image", "mask", "case_id", "spacing_mm",
                                 "source"}
    assert feats["image"].shape == (None, None, None)
    assert feats["image"].np_dtype == dtype
    assert feats["mask"].shape == (None, None, None)
    assert feats["mask"].np_dtype == np.uint8
    assert feats["spacing_mm"].shape == (3,)
    assert feats["spacing_mm"].np_dtype == np.float32


def test_import_registers_builder():
  assert tfds.builder_cls("aisd") is tfds_aisd.Aisd


def _check_png_dataset(fake, data_dir):
  got = _read_all("png", data_dir)
  expected = _expected_split(fake.good_png)
  for split in SPLITS:
    assert set(got[split]) == expected[split], split
  assert set(got["test"]) == {"0073410", "0072723"}
  assert set(got["validation"]) == {"0100009"}
  for split in SPLITS:
    for case_id, ex in got[split].items():
      case = fake.cases[case_id]
      assert ex["image"].dtype == np.uint8
      assert ex["mask"].dtype == np.uint8
      np.testing.assert_array_equal(ex["image"], case.image)
      np.testing.assert_array_equal(ex["mask"], case.mask)
      assert ex["source"] == b"png"
      assert ex["spacing_mm"].dtype == np.float32
      assert ex["spacing_mm"][0] == 5.0
      assert np.isnan(ex["spacing_mm"][1:]).all()


def test_png_from_unpacked_tree(fake, built_png):
  _check_png_dataset(fake, built_png)


def test_png_values_equal_the_png_files(fake, built_png):
  from PIL import Image

  ds = tfds.data_source("aisd/png", data_dir=str(built_png), split="test",
                        download=False)
  ex = ds[0]  # disable_shuffling: case id order
  case_id = ex["case_id"].decode()
  assert case_id == "0072723"
  for k in range(ex["image"].shape[0]):
    for what in ("image", "mask"):
      path = os.path.join(fake.root, what, case_id, f"{k:03d}.png")
      np.testing.assert_array_equal(ex[what][k], np.asarray(Image.open(path)))


def test_png_from_zips(fake_zipped, tmp_path):
  _build("png", fake_zipped.root, tmp_path)
  _check_png_dataset(fake_zipped, tmp_path)
  report = json.load(open(tmp_path / "aisd/png/1.0.0/skipped_cases.json"))
  assert any("image.zip (read in place)" in n for n in report["layout"])


def test_skipped_cases_reported(fake, built_png):
  path = os.path.join(str(built_png), "aisd/png/1.0.0", tfds_aisd.REPORT_FILENAME)
  report = json.load(open(path))
  assert set(report["skipped"]) == set(fake.skipped_png)
  for case_id, reason in fake.skipped_png.items():
    assert reason in report["skipped"][case_id], (case_id, report["skipped"])
  assert report["missing_test_ids"] == sorted(
      tfds_aisd.TEST_IDS - {"0073410", "0072723"})
  assert report["cases_per_split"] == {"test": 2, "train": 4, "validation": 1}


def test_report_printed_to_stderr(fake, tmp_path, capsys):
  _build("png", fake.root, tmp_path)
  err = capsys.readouterr().err
  for case_id in fake.skipped_png:
    assert case_id in err
  assert "slice count mismatch" in err


def test_split_rule():
  for case_id in tfds_aisd.TEST_IDS:
    assert tfds_aisd.split_of(case_id) == "test"
  ids = [f"{i:07d}" for i in range(200000, 205000)]
  splits = [tfds_aisd.split_of(c) for c in ids]
  for c, s in zip(ids, splits):
    h = int(hashlib.sha256(c.encode()).hexdigest(), 16)
    assert s == ("validation" if h % 10 == 0 else "train")
  frac = splits.count("validation") / len(splits)
  assert 0.08 < frac < 0.12
  assert tfds_aisd.split_of("0100009") == "validation"
  assert tfds_aisd.split_of("0100001") == "train"


# -- dicom ----------------------------------------------------------------------


def _check_dicom_dataset(fake, data_dir):
  got = _read_all("dicom", data_dir)
  expected = _expected_split(fake.good_dicom)
  for split in SPLITS:
    assert set(got[split]) == expected[split], split
  for split in SPLITS:
    for case_id, ex in got[split].items():
      case = fake.cases[case_id]
      assert ex["image"].dtype == np.int16
      np.testing.assert_array_equal(ex["image"], case.hu, err_msg=case_id)
      np.testing.assert_array_equal(ex["mask"], case.mask)
      assert ex["source"] == b"dicom"
      np.testing.assert_allclose(
          ex["spacing_mm"], (5.0,) + fake_aisd.PIXEL_SPACING, rtol=1e-6)
  report = json.load(
      open(os.path.join(str(data_dir), "aisd/dicom/1.0.0/skipped_cases.json")))
  assert set(report["skipped"]) == set(fake.skipped_dicom)
  for case_id, reason in fake.skipped_dicom.items():
    assert reason in report["skipped"][case_id], (case_id, report["skipped"])
  assert any("reversed" in n for n in report["case_notes"]["0100003"])
  assert any("InstanceNumber" in n for n in report["case_notes"]["0100002"])


@needs_pydicom
def test_dicom_hu_from_unpacked_tree(fake, tmp_path):
  _build("dicom", fake.root, tmp_path)
  _check_dicom_dataset(fake, tmp_path)


@needs_pydicom
def test_dicom_hu_from_tar_gz(fake_zipped, tmp_path):
  extract_dir = tmp_path / "extract"
  builder = tfds_aisd.Aisd(config="dicom", data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=fake_zipped.root, extract_dir=str(extract_dir)))
  _check_dicom_dataset(fake_zipped, tmp_path / "data")
  assert os.listdir(extract_dir) == []  # temporary extraction removed


def test_missing_pydicom_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "pydicom", None)
  with pytest.raises(tfds_aisd.AisdBuildError, match="pip install"):
    readers.import_pydicom()


def test_split_without_cases_is_left_out(fake, tmp_path):
  for what in ("image", "mask"):
    src = os.path.join(fake.root, what, "0073410")
    dst = tmp_path / "manual" / what / "0073410"
    dst.mkdir(parents=True)
    for f in os.listdir(src):
      (dst / f).write_bytes(open(os.path.join(src, f), "rb").read())
  _build("png", tmp_path / "manual", tmp_path / "data")
  assert len(tfds.data_source("aisd/png", data_dir=str(tmp_path / "data"),
                              split="test", download=False)) == 1
  with pytest.raises(ValueError, match="Unknown split"):
    tfds.data_source("aisd/png", data_dir=str(tmp_path / "data"),
                     split="train", download=False)


# -- failures -------------------------------------------------------------------


def test_no_case_left_fails_cleanly(fake, tmp_path):
  manual = tmp_path / "manual"
  for what in ("image", "mask"):
    for case_id in ("0226134", "0100006"):
      src = os.path.join(fake.root, what, case_id)
      dst = manual / what / case_id
      dst.mkdir(parents=True)
      for f in os.listdir(src):
        (dst / f).write_bytes(open(os.path.join(src, f), "rb").read())
  with pytest.raises(tfds_aisd.AisdBuildError, match="no usable case") as e:
    _build("png", manual, tmp_path / "data")
  assert "\n" not in str(e.value)
  _assert_nothing_readable(tmp_path / "data")


def test_missing_manual_dir_fails_cleanly(tmp_path):
  with pytest.raises(tfds_aisd.AisdBuildError, match="does not exist"):
    _build("png", tmp_path / "nope", tmp_path / "data")
  _assert_nothing_readable(tmp_path / "data")


def test_manual_dir_without_either_layout(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "readme.txt").write_text("hello")
  with pytest.raises(tfds_aisd.AisdBuildError, match="neither mask/ nor mask.zip"):
    _build("png", tmp_path / "manual", tmp_path / "data")
  (tmp_path / "manual" / "mask").mkdir()
  with pytest.raises(tfds_aisd.AisdBuildError, match="neither image/"):
    _build("png", tmp_path / "manual", tmp_path / "data")
  with pytest.raises(tfds_aisd.AisdBuildError, match="no dicom"):
    _build("dicom", tmp_path / "manual", tmp_path / "data")
  (tmp_path / "manual" / "image").mkdir()
  with pytest.raises(tfds_aisd.AisdBuildError, match="no case folders"):
    _build("png", tmp_path / "manual", tmp_path / "data")
  _assert_nothing_readable(tmp_path / "data")


def test_failure_while_writing_leaves_nothing(fake, tmp_path, monkeypatch):
  calls = []
  original = readers.read_case

  def flaky(ref):
    calls.append(ref.case_id)
    if len(calls) > 14:  # past the validation pass, some examples written
      raise RuntimeError("disk on fire")
    return original(ref)

  monkeypatch.setattr(readers, "read_case", flaky)
  with pytest.raises(RuntimeError, match="disk on fire"):
    _build("png", fake.root, tmp_path / "data")
  _assert_nothing_readable(tmp_path / "data")


def test_killed_build_is_not_taken_as_complete(fake, tmp_path):
  script = textwrap.dedent(f"""
      import os, tensorflow_datasets as tfds, tfds_aisd
      from tfds_aisd import readers
      original, calls = readers.read_case, []
      def dying(ref):
        calls.append(1)
        if len(calls) > 14:
          os._exit(9)  # like SIGKILL: no cleanup at all
        return original(ref)
      readers.read_case = dying
      tfds.disable_progress_bar()
      tfds_aisd.Aisd(config="png", data_dir={str(tmp_path / "data")!r}
                     ).download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir={fake.root!r}))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 9, proc.stderr
  config_dir = tmp_path / "data" / "aisd" / "png"
  assert [p for p in os.listdir(config_dir) if p.startswith("incomplete")]
  assert not (config_dir / "1.0.0").exists()
  with pytest.raises(Exception):
    tfds.data_source("aisd/png", data_dir=str(tmp_path / "data"),
                     split="train", download=False)


# -- duplicates -----------------------------------------------------------------


def test_case_in_two_places_is_skipped(fake, tmp_path):
  root = tmp_path / "img"
  for sub in ("a", "b"):
    d = root / sub / "0072723"
    d.mkdir(parents=True)
    (d / "000.png").write_bytes(b"x")
  layout = readers.Layout(
      image=readers.DirTree(str(root), "img"),
      mask=readers.DirTree(os.path.join(fake.root, "mask"), "mask"),
      dicom=[], notes=[], root=str(tmp_path))
  refs, skipped = readers.discover(layout, "png")
  assert "0072723" not in {r.case_id for r in refs}
  assert "found 2 times" in skipped["0072723"]


# -- CLI --------------------------------------------------------------------------


def test_cli_success(fake_zipped, tmp_path, capsys):
  rc = cli.main(["--manual_dir", fake_zipped.root, "--data_dir",
                 str(tmp_path), "--config", "png"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "train: 4 cases" in out and "test: 2 cases" in out
  assert "validation: 1 cases" in out
  for case_id in fake_zipped.skipped_png:
    assert case_id in out
  # A second run reuses the dataset.
  assert cli.main(["--manual_dir", fake_zipped.root, "--data_dir",
                   str(tmp_path)]) == 0
  assert "reusing" in capsys.readouterr().err


def test_cli_missing_manual_dir(tmp_path, capsys):
  rc = cli.main(["--manual_dir", str(tmp_path / "nope"), "--data_dir",
                 str(tmp_path / "data")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1
  assert len(err) == 1 and err[0].startswith("error: manual_dir")


def test_cli_no_cases(tmp_path, capsys):
  (tmp_path / "m" / "mask").mkdir(parents=True)
  rc = cli.main(["--manual_dir", str(tmp_path / "m"), "--data_dir",
                 str(tmp_path / "data")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1
  assert err[-1].startswith("error: manual_dir") and "image" in err[-1]


def test_cli_bad_config(tmp_path):
  with pytest.raises(SystemExit) as e:
    cli.main(["--manual_dir", str(tmp_path), "--data_dir", str(tmp_path),
              "--config", "nifti"])
  assert e.value.code == 2


def test_cli_as_module(fake, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "tfds_aisd", "--manual_dir", fake.root,
       "--data_dir", str(tmp_path)], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "skipped cases: 7" in proc.stdout
  proc = subprocess.run(
      [sys.executable, "-m", "tfds_aisd", "--manual_dir",
       str(tmp_path / "nope"), "--data_dir", str(tmp_path)], cwd=REPO,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("error:")
