"""NIfTI input/output in the model's orientation, with validation.

The model works on ``(S, H, W)`` arrays: axis 0 the axial slices from inferior to
superior, axis 1 the rows from anterior to posterior, axis 2 the columns from the
patient's right to the patient's left (radiological display). In NIfTI axis codes
(``nibabel.aff2axcodes``, RAS+ world) the model's axes are ``("S", "P", "L")``.

:func:`load_volume` reorients any NIfTI file to that layout (a permutation and flips of
the voxel axes only: no resampling) and keeps what it needs to undo it;
:func:`save_like` writes a model-orientation array back in the input file's own axis
order, shape and affine, so ``load -> save_like -> load`` is exact. Writes are atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import warnings

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

__all__ = ["InputError", "Volume", "MODEL_AXCODES", "load_volume", "load_mask", "load_pair",
           "save_like", "save_model_array", "model_affine", "atomic_output"]

MODEL_AXCODES = ("S", "P", "L")
_MODEL_ORNT = nio.axcodes2ornt(MODEL_AXCODES)


class InputError(ValueError):
  """An input file that cannot be used; the one-line message names the file."""


@dataclasses.dataclass
class Volume:
  """A volume in model orientation plus what maps it back to its file."""

  data: np.ndarray  # (S, H, W), float32 for images, raw integer labels for masks
  path: str
  affine: np.ndarray  # (4, 4) affine of the file (voxel -> RAS+ mm)
  file_shape: tuple  # 3D shape of the file's array (after squeezing a trailing 1)
  ornt: np.ndarray  # nibabel orientation of the file's axes
  spacing_mm: tuple  # voxel size along (S, H, W)
  header: nib.Nifti1Header
  file_dtype: np.dtype  # on-disk data type
  # Where the data came from when it was not a NIfTI file (e.g. the DICOM series UID and
  # description, see sean_jax.data.dicom); empty for NIfTI files.
  source: dict = dataclasses.field(default_factory=dict)

  @property
  def axcodes(self) -> tuple:
    return tuple(nio.ornt2axcodes(self.ornt))

  def to_model(self, file_array: np.ndarray) -> np.ndarray:
    """File axis order -> model (S, H, W)."""
    return _to_model(file_array, self.ornt)

  def to_file(self, model_array: np.ndarray) -> np.ndarray:
    """Model (S, H, W) -> the file's axis order and shape."""
    back = nio.ornt_transform(_MODEL_ORNT, self.ornt)
    out = nio.apply_orientation(np.asarray(model_array), back)
    if out.shape != tuple(self.file_shape):
      raise ValueError(f"array of model shape {np.shape(model_array)} does not fit "
                       f"{self.path} (file shape {self.file_shape})")
    return out


def _one_line(text) -> str:
  return " ".join(str(text).split())


def _to_model(file_array, ornt):
  return nio.apply_orientation(file_array, nio.ornt_transform(ornt, _MODEL_ORNT))


def _read(path, what):
  path = os.fspath(path)
  if not os.path.exists(path):
    raise InputError(f"{path}: {what} file not found")
  if not os.path.isfile(path):
    raise InputError(f"{path}: {what} path is not a file")
  try:
    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
      raise InputError(f"{path}: {what} is a {type(img).__name__}, not a NIfTI image")
    raw = np.asanyarray(img.dataobj)
  except InputError:
    raise
  except Exception as e:  # corrupt, truncated, not an image at all
    raise InputError(f"{path}: cannot read {what} as NIfTI "
                     f"({type(e).__name__}: {_one_line(e)[:200]})") from None
  shape = raw.shape
  if raw.ndim == 4 and shape[3] == 1:
    raw = raw[..., 0]
  elif raw.ndim == 5 and shape[3:] == (1, 1):
    raw = raw[..., 0, 0]
  if raw.ndim != 3:
    raise InputError(f"{path}: {what} must be a 3D volume, got shape {shape}")
  if min(raw.shape) < 1:
    raise InputError(f"{path}: {what} is empty, shape {shape}")
  affine = np.asarray(img.affine, np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise InputError(f"{path}: {what} has an invalid (singular or non-finite) affine")
  return img, raw, affine


def load_volume(path, *, expect_hu: bool = True, what: str = "image") -> Volume:
  """Loads a 3D NIfTI image into model orientation (float32, scaled values).

  Raises :class:`InputError` for a missing, unreadable or non-3D file or non-finite
  values; warns (``UserWarning``) when ``expect_hu`` and the values do not look like
  Hounsfield units.
  """
  img, raw, affine = _read(path, what)
  path = os.fspath(path)
  data = np.asarray(raw, np.float32)
  if not np.all(np.isfinite(data)):
    n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    raise InputError(f"{path}: {what} has {n} non-finite (NaN/inf) values")
  ornt = nio.io_orientation(affine)
  vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  tr = nio.ornt_transform(ornt, _MODEL_ORNT)
  spacing = [0.0, 0.0, 0.0]
  for i in range(3):
    spacing[int(tr[i, 0])] = float(vox[i])
  vol = Volume(data=_to_model(data, ornt), path=path, affine=affine,
               file_shape=tuple(int(s) for s in raw.shape), ornt=ornt,
               spacing_mm=tuple(spacing), header=img.header.copy(),
               file_dtype=np.dtype(img.get_data_dtype()))
  if expect_hu:
    lo, hi = float(data.min()), float(data.max())
    if hi < 200.0 or lo > -200.0:
      hint = ""
      if lo >= 0.0 and hi <= 1.0:
        hint = " (looks like a 0..1 normalised image)"
      elif lo >= 0.0 and hi <= 255.0:
        hint = " (looks like a 0..255 windowed image, e.g. PNG-derived)"
      warnings.warn(f"{path}: values {lo:g}..{hi:g} do not look like Hounsfield units{hint}; "
                    "the HU window and z-scoring assume HU", UserWarning, stacklevel=2)
  return vol


def load_mask(path, what: str = "mask") -> Volume:
  """Loads a label mask (model orientation, raw integer labels, e.g. AISD's 0..5).

  Raises :class:`InputError` when values are not non-negative integers.
  """
  vol = load_volume(path, expect_hu=False, what=what)
  d = vol.data
  if not np.all(d == np.round(d)) or d.min() < 0:
    bad = d[(d != np.round(d)) | (d < 0)]
    raise InputError(f"{vol.path}: {what} must hold non-negative integer labels "
                     f"(0/1 or label codes), found e.g. {float(bad.flat[0]):g}")
  top = float(d.max())
  dtype = np.uint8 if top <= 255 else (np.int16 if top <= 32767 else np.int32)
  vol.data = d.astype(dtype)
  return vol


def load_pair(ct_path, mask_path):
  """Loads an image and its mask; both in model orientation, shapes checked."""
  ct = load_volume(ct_path)
  mask = load_mask(mask_path)
  if ct.data.shape != mask.data.shape:
    raise InputError(f"{mask.path}: mask shape {mask.file_shape} does not match image "
                     f"{ct.path} shape {ct.file_shape}")
  # Both arrays were reoriented on their own affines; a large disagreement between the
  # two affines means they do not describe the same grid.
  centre_ct = ct.affine @ np.r_[(np.asarray(ct.file_shape) - 1) / 2.0, 1.0]
  centre_mk = mask.affine @ np.r_[(np.asarray(mask.file_shape) - 1) / 2.0, 1.0]
  if (not np.allclose(ct.spacing_mm, mask.spacing_mm, rtol=1e-3, atol=1e-3)
      or np.linalg.norm(centre_ct[:3] - centre_mk[:3]) > max(ct.spacing_mm)):
    warnings.warn(f"{mask.path}: affine differs from image {ct.path} (spacing "
                  f"{mask.spacing_mm} vs {ct.spacing_mm}); using voxel correspondence",
                  UserWarning, stacklevel=2)
  return ct, mask


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_output(path, suffix: str = ""):
  """Yields a temporary path beside ``path``; renames it onto ``path`` on success.

  Nothing half-written is ever left under ``path``'s name: on an exception the
  temporary file is removed. ``suffix`` keeps the extension that writers look at
  (e.g. ``.nii.gz`` so nibabel compresses).
  """
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def _atomic_save(img, path):
  path = os.fspath(path)
  suffix = ".nii.gz" if path.endswith(".nii.gz") else (".nii" if path.endswith(".nii") else None)
  if suffix is None:
    raise ValueError(f"{path}: output must end in .nii or .nii.gz")
  with atomic_output(path, suffix) as tmp:
    nib.save(img, tmp)


def _cast(array, dtype):
  dtype = np.dtype(dtype)
  a = np.asarray(array)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    if not np.issubdtype(a.dtype, np.integer):
      a = np.rint(a)
    a = np.clip(a, info.min, info.max)
  return a.astype(dtype)


def save_like(array, reference: Volume, path, dtype=None) -> None:
  """Writes a model-orientation (S, H, W) array in ``reference``'s file layout.

  The file gets the reference's axis order, shape, affine (sform/qform) and header;
  ``dtype`` (default: the reference's on-disk type) sets the stored type, with no
  scaling (slope 1, intercept 0): integer types are rounded and clipped.
  """
  dtype = reference.file_dtype if dtype is None else np.dtype(dtype)
  data = _cast(reference.to_file(array), dtype)
  header = reference.header.copy()
  header.set_data_dtype(dtype)
  img = nib.Nifti1Image(data, reference.affine, header=header)
  img.header.set_slope_inter(1.0, 0.0)
  sform_code = int(reference.header["sform_code"]) or 1
  qform_code = int(reference.header["qform_code"]) or 1
  img.set_sform(reference.affine, code=sform_code)
  img.set_qform(reference.affine, code=qform_code)
  _atomic_save(img, path)


def model_affine(spacing_mm, shape) -> np.ndarray:
  """Affine of a file that stores a model array as (col, row, slice), centred at 0.

  Axis codes ("L", "P", "S"): columns towards the patient's left, rows towards
  posterior, slices towards superior (the DICOM LPS patient frame).
  """
  s_sl, s_row, s_col = (float(v) for v in spacing_mm)
  n_sl, n_row, n_col = shape
  a = np.diag([-s_col, -s_row, s_sl, 1.0])
  centre = np.array([(n_col - 1) / 2.0, (n_row - 1) / 2.0, (n_sl - 1) / 2.0, 1.0])
  a[:3, 3] = -(a @ centre)[:3]
  return a


def save_model_array(array, spacing_mm, path, dtype=None) -> None:
  """Writes a model-orientation (S, H, W) array with :func:`model_affine` (atomic)."""
  array = np.asarray(array)
  if array.ndim != 3:
    raise ValueError(f"{path}: expected an (S, H, W) array, got shape {array.shape}")
  dtype = array.dtype if dtype is None else np.dtype(dtype)
  data = _cast(np.transpose(array, (2, 1, 0)), dtype)
  affine = model_affine(spacing_mm, array.shape)
  img = nib.Nifti1Image(data, affine)
  img.header.set_data_dtype(dtype)
  img.header.set_xyzt_units("mm", "sec")
  img.header.set_slope_inter(1.0, 0.0)
  img.set_sform(affine, code=1)
  img.set_qform(affine, code=1)
  _atomic_save(img, path)
