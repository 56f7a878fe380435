"""Tests of NIfTI loading/saving in model orientation and of input validation."""

from __future__ import annotations

import gzip
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from sean_jax.data import nifti
from sean_jax.data.nifti import InputError


def _hu_volume(shape=(4, 6, 5), seed=0):
  """A model-orientation (S, H, W) HU array with every voxel distinct."""
  rng = np.random.default_rng(seed)
  v = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32)
  return v * 20.0 - 1000.0  # from -1000 HU up, past +200 HU for N >= 60 voxels


def _save(data, affine, path, dtype=None):
  img = nib.Nifti1Image(np.asarray(data), affine)
  if dtype is not None:
    img.header.set_data_dtype(dtype)
  nib.save(img, str(path))
  return str(path)


def _noncanonical_affine():
  """Axis codes (I, L, A): permuted and flipped against the model's (S, P, L).

  Voxel axis i runs superior -> inferior (5 mm), j towards the patient's left (-x in
  nibabel's RAS+ world), k towards anterior with a small oblique tilt; plus an offset.
  """
  a = np.zeros((4, 4))
  a[2, 0] = -5.0  # i: superior -> inferior, 5 mm
  a[0, 1] = -0.8  # j: towards -x = patient left (L)
  a[1, 2] = 0.7  # k: towards +y = anterior (A)
  a[0, 2] = 0.05  # a small shear / tilt
  a[:3, 3] = (40.0, -30.0, 12.0)
  a[3, 3] = 1.0
  return a


def test_model_orientation_of_a_ras_file(tmp_path):
  # nibabel's world is RAS+: +x towards the patient's right, +y anterior, +z superior.
  assert nib.aff2axcodes(np.eye(4)) == ("R", "A", "S")
  # A marker at the most superior, most anterior voxel on the patient's left side.
  shape = (5, 6, 4)  # (x, y, z) file axes
  data = np.zeros(shape, np.float32) - 1000
  # High i is towards the patient's right, so the patient's left is i = 0.
  data[0, 5, 3] = 500.0
  path = _save(data, np.diag([0.7, 0.8, 5.0, 1.0]), tmp_path / "ras.nii.gz")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    vol = nifti.load_volume(path)
  assert vol.data.shape == (4, 6, 5)  # (S, H, W)
  s, r, c = np.argwhere(vol.data == 500.0)[0]
  # Model: last slice = superior; row 0 = anterior; last column = patient's left.
  assert (s, r, c) == (3, 0, 4)
  assert vol.spacing_mm == pytest.approx((5.0, 0.8, 0.7))
  assert vol.axcodes == ("R", "A", "S")


def test_round_trip_with_a_noncanonical_affine(tmp_path):
  file_data = _hu_volume((4, 7, 6))  # file axes (i, j, k) of the affine above
  affine = _noncanonical_affine()
  assert nib.aff2axcodes(affine) == ("I", "L", "A")
  src = _save(file_data, affine, tmp_path / "src.nii.gz", np.float32)
  vol = nifti.load_volume(src)
  # i (I) -> slice axis flipped; j (L) -> columns as is; k (A) -> rows flipped.
  expected = np.transpose(file_data, (0, 2, 1))[::-1, ::-1, :]
  np.testing.assert_array_equal(vol.data, expected)
  assert vol.data.shape == (4, 6, 7)
  assert vol.spacing_mm == pytest.approx((5.0, np.hypot(0.7, 0.05), 0.8))
  np.testing.assert_array_equal(vol.to_file(vol.data), file_data)

  out = tmp_path / "out.nii.gz"
  nifti.save_like(vol.data, vol, out)
  ref, back = nib.load(src), nib.load(str(out))
  np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(ref.dataobj))
  np.testing.assert_array_equal(back.affine, ref.affine)
  assert back.shape == ref.shape and back.get_data_dtype() == ref.get_data_dtype()
  again = nifti.load_volume(out)
  np.testing.assert_array_equal(again.data, vol.data)
  np.testing.assert_array_equal(again.affine, vol.affine)
  # A mask written like the input keeps the input's grid, in uint8.
  mask = (vol.data > 0).astype(np.uint8)
  nifti.save_like(mask, vol, tmp_path / "mask.nii.gz", np.uint8)
  m = nib.load(str(tmp_path / "mask.nii.gz"))
  assert m.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(m.affine, ref.affine)
  np.testing.assert_array_equal(np.asarray(m.dataobj), (file_data > 0).astype(np.uint8))
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")]


def test_round_trip_int16_lps_file_and_4d_singleton(tmp_path):
  file_data = np.rint(_hu_volume((6, 5, 3))).astype(np.int16)
  affine = np.diag([-0.9, -0.9, 5.0, 1.0])  # LPS, the phantom's own layout
  src = _save(file_data[..., None], affine, tmp_path / "lps.nii.gz", np.int16)  # (x, y, z, 1)
  vol = nifti.load_volume(src)
  assert vol.file_shape == (6, 5, 3) and vol.file_dtype == np.int16
  np.testing.assert_array_equal(vol.data, np.transpose(file_data, (2, 1, 0)))
  out = tmp_path / "o.nii.gz"
  nifti.save_like(vol.data, vol, out)
  back = nib.load(str(out))
  np.testing.assert_array_equal(np.asarray(back.dataobj), file_data)
  assert back.get_data_dtype() == np.int16
  np.testing.assert_array_equal(back.affine, nib.load(src).affine)


def test_save_model_array_and_model_affine(tmp_path):
  model = _hu_volume((3, 8, 6))
  path = tmp_path / "m.nii.gz"
  nifti.save_model_array(model, (5.0, 0.9, 0.9), path, np.float32)
  img = nib.load(str(path))
  assert img.shape == (6, 8, 3)
  assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
  np.testing.assert_allclose(img.affine, nifti.model_affine((5.0, 0.9, 0.9), (3, 8, 6)))
  # The volume is centred on the world origin.
  centre = img.affine @ np.r_[(np.array(img.shape) - 1) / 2.0, 1.0]
  np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
  vol = nifti.load_volume(path)
  np.testing.assert_array_equal(vol.data, model)
  assert vol.spacing_mm == pytest.approx((5.0, 0.9, 0.9))


def test_save_like_rejects_wrong_shape_and_suffix(tmp_path):
  src = _save(_hu_volume((4, 5, 6)), np.eye(4), tmp_path / "a.nii.gz")
  vol = nifti.load_volume(src)
  with pytest.raises(ValueError):
    nifti.save_like(np.zeros((2, 2, 2)), vol, tmp_path / "b.nii.gz")
  with pytest.raises(ValueError):
    nifti.save_like(vol.data, vol, tmp_path / "b.png")
  assert sorted(os.listdir(tmp_path)) == ["a.nii.gz"]


# ------------------------------------------------------------------------ validation


def _raises_naming(path, func, *args, match=None):
  with pytest.raises(InputError) as info:
    func(*args)
  msg = str(info.value)
  assert str(path) in msg and "\n" not in msg, msg
  if match:
    assert match in msg, msg
  assert isinstance(info.value, ValueError)
  return msg


def test_missing_file(tmp_path):
  p = tmp_path / "nope.nii.gz"
  _raises_naming(p, nifti.load_volume, p, match="not found")


def test_corrupt_files(tmp_path):
  garbage = tmp_path / "garbage.nii.gz"
  garbage.write_bytes(b"this is not a nifti file at all" * 10)
  _raises_naming(garbage, nifti.load_volume, garbage, match="cannot read")
  # A valid gzip stream holding a truncated NIfTI.
  good = _save(_hu_volume(), np.eye(4), tmp_path / "good.nii")
  raw = open(good, "rb").read()
  trunc = tmp_path / "trunc.nii.gz"
  trunc.write_bytes(gzip.compress(raw[: len(raw) // 2]))
  _raises_naming(trunc, nifti.load_volume, trunc, match="cannot read")
  # A gzip file cut in the middle.
  cut = tmp_path / "cut.nii.gz"
  cut.write_bytes(gzip.compress(raw)[:200])
  _raises_naming(cut, nifti.load_volume, cut)
  empty = tmp_path / "empty.nii.gz"
  empty.write_bytes(b"")
  _raises_naming(empty, nifti.load_volume, empty)


def test_not_3d(tmp_path):
  p2 = _save(np.zeros((5, 5), np.float32), np.eye(4), tmp_path / "flat.nii.gz")
  _raises_naming(p2, nifti.load_volume, p2, match="3D")
  p4 = _save(np.zeros((5, 5, 4, 3), np.float32), np.eye(4), tmp_path / "four.nii.gz")
  _raises_naming(p4, nifti.load_volume, p4, match="3D")


def test_non_finite_values(tmp_path):
  data = _hu_volume()
  data[1, 2, 3] = np.nan
  data[0, 0, 0] = np.inf
  p = _save(data, np.eye(4), tmp_path / "nan.nii.gz", np.float32)
  _raises_naming(p, nifti.load_volume, p, match="2 non-finite")


def test_pair_shape_mismatch(tmp_path):
  ct = _save(_hu_volume((4, 5, 6)), np.eye(4), tmp_path / "ct.nii.gz")
  mask = _save(np.zeros((4, 5, 7), np.uint8), np.eye(4), tmp_path / "mask.nii.gz")
  msg = _raises_naming(mask, nifti.load_pair, ct, mask, match="does not match")
  assert str(ct) in msg


def test_mask_values(tmp_path):
  ct = _save(_hu_volume((4, 5, 6)), np.eye(4), tmp_path / "ct.nii.gz")
  frac = np.zeros((4, 5, 6), np.float32)
  frac[1, 1, 1] = 0.5
  p = _save(frac, np.eye(4), tmp_path / "frac.nii.gz", np.float32)
  _raises_naming(p, nifti.load_pair, ct, p, match="integer")
  neg = np.zeros((4, 5, 6), np.int16)
  neg[0, 0, 0] = -1
  p = _save(neg, np.eye(4), tmp_path / "neg.nii.gz", np.int16)
  _raises_naming(p, nifti.load_mask, p, match="non-negative")
  # AISD-style labels 0..5 are kept raw, as integers.
  labels = np.arange(4 * 5 * 6).reshape(4, 5, 6) % 6
  p = _save(labels.astype(np.uint8), np.eye(4), tmp_path / "labels.nii.gz", np.uint8)
  ct_vol, mask_vol = nifti.load_pair(ct, p)
  assert mask_vol.data.dtype == np.uint8
  np.testing.assert_array_equal(mask_vol.data, np.transpose(labels, (2, 1, 0))[:, ::-1, ::-1])
  assert ct_vol.data.shape == mask_vol.data.shape


def test_hu_plausibility_warns_but_loads(tmp_path):
  for name, data, hint in [
      ("png.nii.gz", np.linspace(0, 255, 120).reshape(4, 5, 6), "0..255"),
      ("unit.nii.gz", np.linspace(0, 1, 120).reshape(4, 5, 6), "0..1"),
      ("shifted.nii.gz", np.linspace(24, 3000, 120).reshape(4, 5, 6), ""),
  ]:
    p = _save(data.astype(np.float32), np.eye(4), tmp_path / name, np.float32)
    with pytest.warns(UserWarning) as rec:
      vol = nifti.load_volume(p)
    msgs = [str(w.message) for w in rec]
    assert any(p in m and "Hounsfield" in m and hint in m for m in msgs), msgs
    assert vol.data.shape == (6, 5, 4)
  hu = _save(_hu_volume(), np.eye(4), tmp_path / "hu.nii.gz", np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    nifti.load_volume(hu)
    nifti.load_mask(_save(np.zeros((4, 5, 6), np.uint8), np.eye(4), tmp_path / "m.nii.gz"))
