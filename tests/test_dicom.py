"""Tests of reading a DICOM CT series (sean_jax.data.dicom).

The series are written here with pydicom from small integer volumes whose every voxel is
distinct, so each voxel the reader returns can be traced back to the pixel and the
``ImagePositionPatient`` it was written with: the truths are the positions written into
the files, not the reader's own geometry code.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import helpers  # tests/ is on sys.path under pytest

from sean_jax.data import dicom, nifti
from sean_jax.data.nifti import InputError

_INTERCEPT = -1024.0


def _stored_volume(shape=(6, 12, 10), seed=0):
  """(slices, rows, cols) uint16 stored values, all distinct; HU = stored - 1024."""
  rng = np.random.default_rng(seed)
  return (rng.permutation(int(np.prod(shape))).reshape(shape) * 3 + 24).astype(np.uint16)


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _write_series(directory, stored, row_cos, col_cos, *, pixel_spacing=(0.8, 0.7),
                  step=None, origin=(-50.0, -40.0, 10.0), series_uid=None, modality="CT",
                  description="head 5 mm", seed=0, skip=(), mutate=None):
  """Writes ``stored`` (slices, rows, cols) as single-frame CT files, shuffled names.

  Slice k gets ImagePositionPatient ``origin + k * step`` (default: 5 mm along the
  normal). Returns (series UID, (slices, 3) positions written, LPS).
  """
  os.makedirs(directory, exist_ok=True)
  row_cos, col_cos = _unit(row_cos), _unit(col_cos)
  normal = np.cross(row_cos, col_cos)
  step = 5.0 * normal if step is None else np.asarray(step, np.float64)
  series_uid = series_uid or generate_uid()
  study_uid = generate_uid()
  n = stored.shape[0]
  positions = np.asarray(origin, np.float64) + np.arange(n)[:, None] * step
  rng = np.random.default_rng(seed + 100)
  names = rng.permutation(n)  # file names unrelated to the slice order
  instance = rng.permutation(n) + 1  # and so are the InstanceNumbers
  for k in rng.permutation(n):  # written in a random order
    if k in skip:
      continue
    ds = helpers.ct_slice_dataset(series_uid, *stored.shape[1:], study_uid=study_uid,
                                  modality=modality)
    ds.SeriesDescription = description
    ds.InstanceNumber = int(instance[k])
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.r_[row_cos, col_cos]]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.SliceThickness = "5"
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = f"{_INTERCEPT:g}"
    ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
    if mutate is not None:
      mutate(k, ds)
    helpers.save_dicom(ds, os.path.join(directory, f"IM{names[k]:04d}"))
  return series_uid, positions


def _check_geometry(vol, stored, positions, row_cos, col_cos, pixel_spacing=(0.8, 0.7)):
  """Every file voxel: its value identifies the written pixel (k, r, c); the affine must
  map the voxel index to that pixel's written LPS position with x and y negated."""
  row_cos, col_cos = _unit(row_cos), _unit(col_cos)
  dr, dc = pixel_spacing
  file_array = vol.to_file(vol.data)
  assert file_array.shape == tuple(vol.file_shape)
  ijk = np.indices(file_array.shape).reshape(3, -1).T
  values = file_array.reshape(-1) - _INTERCEPT
  where = {int(v): idx for idx, v in enumerate(stored.reshape(-1))}
  krc = np.array(np.unravel_index([where[int(round(v))] for v in values], stored.shape)).T
  lps = (positions[krc[:, 0]] + krc[:, 2:3] * dc * row_cos[None]
         + krc[:, 1:2] * dr * col_cos[None])
  ras = lps * np.array([-1.0, -1.0, 1.0])
  mapped = (vol.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
  np.testing.assert_allclose(mapped, ras, atol=1e-3)


_AXIAL = ((1, 0, 0), (0, 1, 0))


def test_axial_standard_reads_in_model_orientation(tmp_path):
  stored = _stored_volume()
  _, pos = _write_series(tmp_path, stored, *_AXIAL)
  vol = dicom.load_series(tmp_path)
  # Standard axial: rows anterior -> posterior, columns right -> left, ascending z
  # superior: already the model's (S, P, L).
  assert vol.data.dtype == np.float32
  np.testing.assert_array_equal(vol.data, stored.astype(np.float32) + _INTERCEPT)
  assert vol.spacing_mm == pytest.approx((5.0, 0.8, 0.7))
  assert vol.axcodes == ("L", "A", "S")  # the file layout: rows stored bottom-up
  np.testing.assert_allclose(np.diag(vol.affine)[:3], [-0.7, 0.8, 5.0])
  assert vol.file_dtype == np.int16
  assert vol.path == os.fspath(tmp_path)
  assert vol.source["series_description"] == "head 5 mm"
  assert vol.source["slice_spacing_from"] == "positions"
  _check_geometry(vol, stored, pos, *_AXIAL)


def test_axial_flipped_axes_and_descending_positions(tmp_path):
  stored = _stored_volume(seed=1)
  row_cos, col_cos = (-1, 0, 0), (0, -1, 0)  # normal still +z
  _, pos = _write_series(tmp_path, stored, row_cos, col_cos, step=(0, 0, -5.0))
  vol = dicom.load_series(tmp_path)
  # Slice 0 written highest, rows run posterior -> anterior, columns left -> right.
  expected = stored[::-1, ::-1, ::-1].astype(np.float32) + _INTERCEPT
  np.testing.assert_array_equal(vol.data, expected)
  _check_geometry(vol, stored, pos, row_cos, col_cos)


def test_sagittal_series(tmp_path):
  stored = _stored_volume(shape=(5, 12, 10), seed=2)
  row_cos, col_cos = (0, 1, 0), (0, 0, -1)  # columns posterior, rows inferior
  # Slices written from the patient's right to left (+x in LPS); the normal is -x.
  _, pos = _write_series(tmp_path, stored, row_cos, col_cos, step=(4.0, 0, 0))
  vol = dicom.load_series(tmp_path)
  # model[s, h, w] = pixel (slice w, row rows-1-s, column h).
  expected = np.transpose(stored, (1, 2, 0))[::-1].astype(np.float32) + _INTERCEPT
  np.testing.assert_array_equal(vol.data, expected)
  assert vol.spacing_mm == pytest.approx((0.8, 0.7, 4.0))
  _check_geometry(vol, stored, pos, row_cos, col_cos)


def test_oblique_in_plane_rotation(tmp_path):
  stored = _stored_volume(seed=3)
  t = math.radians(20.0)
  row_cos, col_cos = (math.cos(t), math.sin(t), 0), (-math.sin(t), math.cos(t), 0)
  _, pos = _write_series(tmp_path, stored, row_cos, col_cos)
  vol = dicom.load_series(tmp_path)
  # Nearest axes as in the standard axial case (no resampling).
  np.testing.assert_array_equal(vol.data, stored.astype(np.float32) + _INTERCEPT)
  _check_geometry(vol, stored, pos, row_cos, col_cos)


def test_fractional_rescale_slope_keeps_float(tmp_path):
  stored = _stored_volume(seed=17)

  def half(k, ds):
    ds.RescaleSlope = "0.5"
    ds.RescaleIntercept = "-1000"
  _write_series(tmp_path, stored, *_AXIAL, mutate=half)
  vol = dicom.load_series(tmp_path)
  np.testing.assert_array_equal(vol.data, stored.astype(np.float32) * 0.5 - 1000.0)
  assert vol.file_dtype == np.float32  # half-HU values would not survive int16


def test_save_like_round_trip(tmp_path):
  stored = _stored_volume(seed=4)
  row_cos, col_cos = (0, 1, 0), (0, 0, -1)
  _write_series(tmp_path / "dcm", stored, row_cos, col_cos, step=(4.0, 0, 0))
  vol = dicom.load_series(tmp_path / "dcm")
  out = tmp_path / "ct.nii.gz"
  nifti.save_like(vol.data, vol, out)
  img = nib.load(str(out))
  np.testing.assert_allclose(img.affine, vol.affine, atol=1e-4)
  assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
  assert img.get_data_dtype() == np.int16
  back = nifti.load_volume(out)
  np.testing.assert_array_equal(back.data, vol.data)
  # A mask in model orientation lands on the same voxels.
  mask = (vol.data > np.median(vol.data)).astype(np.uint8)
  nifti.save_like(mask, vol, tmp_path / "mask.nii.gz", dtype=np.uint8)
  np.testing.assert_array_equal(nifti.load_mask(tmp_path / "mask.nii.gz").data, mask)


def test_stray_files_are_skipped_and_is_dicom_dir(tmp_path):
  stored = _stored_volume(seed=5)
  assert not dicom.is_dicom_dir(tmp_path)
  _write_series(tmp_path, stored, *_AXIAL)
  (tmp_path / "README").write_text("exported by a PACS\n")
  (tmp_path / ".DS_Store").write_bytes(os.urandom(300))
  os.makedirs(tmp_path / "sub")
  assert dicom.is_dicom_dir(tmp_path)
  assert not dicom.is_dicom_dir(tmp_path / "README")
  vol = dicom.load_series(tmp_path)
  np.testing.assert_array_equal(vol.data, stored.astype(np.float32) + _INTERCEPT)
  assert any("non-DICOM" in n for n in vol.source["notes"])


def test_several_series_error_and_pick(tmp_path):
  a, b = _stored_volume(seed=6), _stored_volume(shape=(4, 12, 10), seed=7)
  uid_a, _ = _write_series(tmp_path, a, *_AXIAL, description="plain", seed=1)
  uid_b, _ = _write_series(tmp_path / "x", b, *_AXIAL, description="bone", seed=2)
  for name in os.listdir(tmp_path / "x"):
    shutil.move(tmp_path / "x" / name, tmp_path / f"b_{name}")
  os.rmdir(tmp_path / "x")
  found = dicom.find_series(tmp_path)
  assert set(found) == {uid_a, uid_b}
  assert len(found[uid_a].files) == 6 and found[uid_b].description == "bone"
  with pytest.raises(InputError) as e:
    dicom.load_series(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and os.fspath(tmp_path) in msg
  assert uid_a in msg and uid_b in msg and "'plain'" in msg and "6 files" in msg
  vol = dicom.load_series(tmp_path, series_uid=uid_b)
  np.testing.assert_array_equal(vol.data, b.astype(np.float32) + _INTERCEPT)
  assert vol.source["series_uid"] == uid_b
  with pytest.raises(InputError, match="no DICOM series 1.2.3.4"):
    dicom.load_series(tmp_path, series_uid="1.2.3.4")


def test_missing_slice_is_an_error(tmp_path):
  _write_series(tmp_path, _stored_volume(seed=8), *_AXIAL, skip=(3,))
  with pytest.raises(InputError, match=r"not uniform.*10\.000 mm.*missing slices") as e:
    dicom.load_series(tmp_path)
  assert os.fspath(tmp_path) in str(e.value)


def test_repeated_position_is_an_error(tmp_path):
  def same_place(k, ds):
    if k == 4:
      ds.ImagePositionPatient = [f"{v:.4f}" for v in (-50.0, -40.0, 25.0)]  # slice 3's
  _write_series(tmp_path, _stored_volume(seed=9), *_AXIAL, mutate=same_place)
  with pytest.raises(InputError, match="repeat the position"):
    dicom.load_series(tmp_path)


def test_positional_jitter_is_tolerated(tmp_path):
  jitter = np.random.default_rng(0).uniform(-0.05, 0.05, size=(6, 3))
  stored = _stored_volume(seed=10)

  def jittered(k, ds):
    p = np.array([-50.0, -40.0, 10.0 + 5.0 * k]) + jitter[k]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in p]
  _write_series(tmp_path, stored, *_AXIAL, mutate=jittered)
  vol = dicom.load_series(tmp_path)
  np.testing.assert_array_equal(vol.data, stored.astype(np.float32) + _INTERCEPT)
  assert vol.spacing_mm[0] == pytest.approx(5.0, abs=0.05)


def test_gantry_tilt_is_refused_with_its_angle(tmp_path):
  tilt = math.radians(15.0)
  step = (0.0, 5.0 * math.tan(tilt), 5.0)  # origins move posteriorly slice by slice
  _write_series(tmp_path, _stored_volume(seed=11), *_AXIAL, step=step)
  with pytest.raises(InputError, match=r"gantry tilt of 15\.0 degrees") as e:
    dicom.load_series(tmp_path)
  assert os.fspath(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_not_ct_is_refused_missing_modality_warns(tmp_path):
  _write_series(tmp_path / "mr", _stored_volume(seed=12), *_AXIAL, modality="MR")
  with pytest.raises(InputError, match="is MR, not CT"):
    dicom.load_series(tmp_path / "mr")
  _write_series(tmp_path / "none", _stored_volume(seed=12), *_AXIAL, modality=None)
  with pytest.warns(UserWarning, match="no Modality"):
    dicom.load_series(tmp_path / "none")


def test_multiframe_inconsistent_and_broken_files_are_refused(tmp_path):
  def multiframe(k, ds):
    ds.NumberOfFrames = 2
  _write_series(tmp_path / "mf", _stored_volume(seed=13), *_AXIAL, mutate=multiframe)
  with pytest.raises(InputError, match="multi-frame"):
    dicom.load_series(tmp_path / "mf")

  def rotated(k, ds):
    if k == 2:
      ds.ImageOrientationPatient = ["0", "1", "0", "-1", "0", "0"]
  _write_series(tmp_path / "iop", _stored_volume(seed=14), *_AXIAL, mutate=rotated)
  with pytest.raises(InputError, match="ImageOrientationPatient differs"):
    dicom.load_series(tmp_path / "iop")

  def no_pixels(k, ds):
    if k == 1:
      del ds.PixelData
  _write_series(tmp_path / "np", _stored_volume(seed=15), *_AXIAL, mutate=no_pixels)
  with pytest.raises(InputError, match="no pixel data"):
    dicom.load_series(tmp_path / "np")

  _write_series(tmp_path / "cut", _stored_volume(seed=16), *_AXIAL)
  victim = sorted(os.listdir(tmp_path / "cut"))[2]
  path = tmp_path / "cut" / victim
  path.write_bytes(path.read_bytes()[:-100])  # pixel data cut short
  with pytest.raises(InputError, match=victim):
    dicom.load_series(tmp_path / "cut")

  with pytest.raises(InputError, match="not found"):
    dicom.load_series(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="no DICOM image series"):
    dicom.load_series(tmp_path / "empty")


def test_real_ct_slice(tmp_path):
  src = helpers.pydicom_data_file("693_UNCR.dcm")
  shutil.copy(src, tmp_path / "slice")
  ds = pydicom.dcmread(src)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    vol = dicom.load_series(tmp_path)
  assert vol.data.shape == (1, 512, 512)
  assert vol.spacing_mm == pytest.approx((5.0, 0.478516, 0.478516))  # SliceThickness 5
  assert vol.source["slice_spacing_from"] == "SliceThickness"
  hu = vol.data[0]
  # Outside the scan field: padding -2000 stored -> -3024 HU, kept as is.
  assert hu.min() == pytest.approx(int(ds.PixelPaddingValue) - 1024)
  inside = hu[hu > -1500]
  air = inside[inside < -500]
  assert abs(float(np.median(air)) + 1000.0) < 50.0
  # The most common 10 HU bin of the tissue is brain.
  tissue = inside[(inside > -100) & (inside < 100)]
  counts, edges = np.histogram(tissue, bins=np.arange(-100, 101, 10))
  assert 15.0 <= edges[np.argmax(counts)] <= 50.0
  # The first voxel of the file (column 0, last row) sits where the DICOM says.
  ipp = np.array([float(v) for v in ds.ImagePositionPatient])
  corner = ipp + np.array([0.0, 511 * 0.478516, 0.0])
  np.testing.assert_allclose(vol.affine[:3, 3], corner * [-1, -1, 1], atol=1e-3)
