"""Reads one DICOM CT series from a directory into a :class:`nifti.Volume`.

:func:`load_series` returns the same :class:`~sean_jax.data.nifti.Volume` that
:func:`nifti.load_volume` returns for a NIfTI file: the data in model orientation
``(S, H, W)`` (axis codes ``("S", "P", "L")``) as float32 Hounsfield units, plus a file
layout and affine, so :func:`nifti.save_like` writes outputs (masks, probabilities) as
NIfTI files on the series' own grid.

File layout and affine
----------------------
The file array is ``(columns, rows, slices)`` with the rows flipped (stored bottom-up,
as dcm2niix stores them) and the slices in ascending order along the slice normal
``n = row cosines x column cosines`` (``ImageOrientationPatient``). The affine maps a
voxel index to its patient position in NIfTI's RAS+ world: the DICOM LPS position of
pixel ``(row r, column c)`` of slice ``k``,
``ImagePositionPatient_k + c * dc * row_cosines + r * dr * column_cosines`` with
``PixelSpacing = (dr, dc)``, with x and y negated. For a standard axial series
(``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]``) that is
``diag(-dc, dr, dz)``, axis codes ``("L", "A", "S")``.

What is read and what is refused
--------------------------------
* Every regular file directly in the directory is tried (any names, any order);
  subdirectories are not searched. Files that are not DICOM (no ``DICM`` preamble:
  README, .DS_Store, ...) and DICOM objects without a SeriesInstanceUID (DICOMDIR) are
  skipped with a note in ``Volume.source["notes"]``. A DICOM file that cannot be parsed
  is an error naming it.
* Series without images (no Rows/Columns: dose reports, presentation states) are
  ignored. Several image series: an error listing their UIDs, unless ``series_uid``
  picks one.
* The series must be CT (``Modality``; a missing Modality only warns), single-frame
  (enhanced/multi-frame objects are refused), one sample per pixel, with the same rows,
  columns, pixel spacing and orientation on every slice.
* Slices are ordered by position along the slice normal, never by file name or
  InstanceNumber. Their spacing comes from the positions (not SliceThickness) and must
  be uniform within 5% (a missing slice or a repeated position is an error). A single
  slice has no spacing from positions: SliceThickness is used, else
  SpacingBetweenSlices, else 1 mm, and ``Volume.source["slice_spacing_from"]`` says
  which.
* Gantry tilt (slice origins that step off the slice normal, so the voxel grid is
  sheared) is refused, not resampled: the error names the tilt angle; convert such a
  series with dcm2niix, which corrects the tilt, and pass the NIfTI file. Origins
  within half a pixel of the normal line are treated as untilted jitter.
* Intensities: the modality LUT (RescaleSlope/RescaleIntercept) gives HU. Scanner
  padding (e.g. PixelPaddingValue -2000 -> -3024 HU outside the field of view) is kept
  as it is; ``preprocess.fix_hu_conventions`` handles it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations as nio
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom

from sean_jax.data import nifti
from sean_jax.data.nifti import InputError

try:
  from pydicom.pixels import apply_modality_lut  # pydicom >= 3
except ImportError:  # pragma: no cover - pydicom 2.x
  from pydicom.pixel_data_handlers.util import apply_modality_lut

__all__ = ["SeriesInfo", "find_series", "is_dicom_dir", "load_series", "series_affine",
           "SPACING_RTOL", "TILT_TOLERANCE_PX"]

# Relative deviation of a slice step from the median step that is still jitter.
SPACING_RTOL = 0.05
# Largest drift of a slice origin off the slice normal, in (smallest) pixels, that is
# still jitter; more is gantry tilt.
TILT_TOLERANCE_PX = 0.5

_MULTIFRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _one_line(text) -> str:
  return " ".join(str(text).split())


@dataclasses.dataclass
class SeriesInfo:
  """One series found in a directory (from the file headers only)."""

  uid: str  # SeriesInstanceUID
  description: str  # SeriesDescription ("" when absent)
  modality: str  # Modality ("" when absent)
  files: list  # paths of its files, sorted by name
  is_image: bool  # whether its objects carry an image (Rows and Columns)

  def describe(self) -> str:
    desc = f"'{self.description}', " if self.description else ""
    return f"{self.uid} ({desc}{self.modality or 'no modality'}, {len(self.files)} files)"


def _read_header(path):
  """The dataset without pixel data, or None when ``path`` is not a DICOM file."""
  try:
    return pydicom.dcmread(path, stop_before_pixels=True)
  except InvalidDicomError:
    return None
  except Exception as e:  # truncated or corrupt header
    raise InputError(f"{path}: cannot read DICOM header "
                     f"({type(e).__name__}: {_one_line(e)[:200]})") from None


def _regular_files(directory):
  names = sorted(os.listdir(directory))
  return [os.path.join(directory, n) for n in names
          if os.path.isfile(os.path.join(directory, n))]


def _check_dir(directory) -> str:
  directory = os.fspath(directory)
  if not os.path.exists(directory):
    raise InputError(f"{directory}: DICOM directory not found")
  if not os.path.isdir(directory):
    raise InputError(f"{directory}: not a directory (a DICOM series is read from a folder)")
  return directory


def _scan(directory):
  """Headers of every file in ``directory`` -> ({uid: SeriesInfo}, notes)."""
  series, notes, not_dicom = {}, [], []
  for path in _regular_files(directory):
    ds = _read_header(path)
    if ds is None:
      not_dicom.append(os.path.basename(path))
      continue
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
      notes.append(f"skipped {os.path.basename(path)}: DICOM object without a "
                   "SeriesInstanceUID (e.g. DICOMDIR)")
      continue
    info = series.get(uid)
    if info is None:
      info = series[uid] = SeriesInfo(
          uid=uid, description=str(ds.get("SeriesDescription", "") or ""),
          modality=str(ds.get("Modality", "") or ""), files=[], is_image=False)
    info.files.append(path)
    info.is_image = info.is_image or ("Rows" in ds and "Columns" in ds)
  if not_dicom:
    shown = ", ".join(not_dicom[:5]) + (", ..." if len(not_dicom) > 5 else "")
    notes.append(f"skipped {len(not_dicom)} non-DICOM files ({shown})")
  return series, notes


def find_series(directory) -> dict:
  """The DICOM series in ``directory``: ``{SeriesInstanceUID: SeriesInfo}``.

  Reads the headers only (``stop_before_pixels``). Non-DICOM files are skipped; a
  DICOM file whose header cannot be parsed raises :class:`InputError` naming it.
  """
  return _scan(_check_dir(directory))[0]


def is_dicom_dir(directory) -> bool:
  """Whether ``directory`` is a folder holding at least one DICOM file (``DICM`` magic).

  Cheap (reads 132 bytes per file until one matches) and never raises: the caller uses
  it to choose between a NIfTI input and :func:`load_series`.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return False
  try:
    files = _regular_files(directory)
  except OSError:
    return False
  for path in files:
    try:
      if is_dicom(path):
        return True
    except OSError:
      continue
  return False


def _pick(directory, series, series_uid, notes):
  listing = "; ".join(s.describe() for s in series.values())
  if series_uid is not None:
    info = series.get(str(series_uid))
    if info is None:
      raise InputError(f"{directory}: no DICOM series {series_uid} (found: "
                       f"{listing or 'none'})")
    if not info.is_image:
      raise InputError(f"{directory}: series {info.describe()} holds no images")
    return info
  images = {u: s for u, s in series.items() if s.is_image}
  if not images:
    raise InputError(f"{directory}: no DICOM image series (found: {listing or 'no DICOM files'};"
                     " subfolders are not searched)")
  if len(images) > 1:
    raise InputError(f"{directory}: {len(images)} DICOM image series, choose one by "
                     f"SeriesInstanceUID: " + "; ".join(s.describe() for s in images.values()))
  for s in series.values():
    if not s.is_image:
      notes.append(f"ignored series {s.describe()}: no images")
  return next(iter(images.values()))


def _floats(ds, name, n, path):
  value = ds.get(name)
  try:
    out = np.array([float(v) for v in value], np.float64)
  except (TypeError, ValueError):
    out = None
  if out is None or out.shape != (n,) or not np.all(np.isfinite(out)):
    raise InputError(f"{path}: missing or invalid {name} ({value!r}); not a "
                     "cross-sectional CT image (e.g. a localizer or screen capture)?")
  return out


def _read_slice(path):
  """One file -> (dataset, HU (rows, cols) float32, geometry dict)."""
  try:
    ds = pydicom.dcmread(path)
  except Exception as e:
    raise InputError(f"{path}: cannot read DICOM file "
                     f"({type(e).__name__}: {_one_line(e)[:200]})") from None
  sop = str(ds.get("SOPClassUID", ""))
  frames = ds.get("NumberOfFrames")
  if sop in _MULTIFRAME_SOP_CLASSES or (frames is not None and int(frames) > 1):
    kind = _MULTIFRAME_SOP_CLASSES.get(sop, "multi-frame")
    raise InputError(f"{path}: {kind} object ({frames or '?'} frames) is not supported; "
                     "convert it with dcm2niix and pass the NIfTI file")
  if not any(t in ds for t in _PIXEL_TAGS):
    raise InputError(f"{path}: DICOM object has no pixel data")
  if int(ds.get("SamplesPerPixel", 1)) != 1:
    raise InputError(f"{path}: {ds.SamplesPerPixel} samples per pixel "
                     f"({ds.get('PhotometricInterpretation', '?')}); a CT slice has one")
  geom = {
      "iop": _floats(ds, "ImageOrientationPatient", 6, path),
      "ipp": _floats(ds, "ImagePositionPatient", 3, path),
      "spacing": _floats(ds, "PixelSpacing", 2, path),
      "shape": (int(ds.Rows), int(ds.Columns)),
  }
  try:
    stored = ds.pixel_array
  except Exception as e:
    raise InputError(f"{path}: cannot decode pixel data (transfer syntax "
                     f"{ds.file_meta.get('TransferSyntaxUID', '?')}: "
                     f"{type(e).__name__}: {_one_line(e)[:200]})") from None
  if stored.shape != geom["shape"]:
    raise InputError(f"{path}: pixel array of shape {stored.shape}, expected one "
                     f"{geom['shape'][0]} x {geom['shape'][1]} frame")
  # float32 holds every integer HU exactly; float64 slices of a 300-slice series would
  # take 600 MB.
  hu = np.asarray(apply_modality_lut(stored, ds), np.float32)
  return ds, hu, geom


def series_affine(iop, first_position, pixel_spacing, slice_spacing, rows) -> np.ndarray:
  """The RAS+ affine of the ``(columns, rows flipped, slices)`` file array.

  Args:
    iop: (6,) ImageOrientationPatient: row cosines (direction of increasing column
      index), then column cosines (direction of increasing row index), LPS.
    first_position: (3,) ImagePositionPatient of the first slice (LPS mm): the centre of
      its pixel (row 0, column 0).
    pixel_spacing: (2,) PixelSpacing: (between rows, between columns) in mm.
    slice_spacing: step between slices along the normal ``row x col cosines`` (mm).
    rows: number of rows (the file's second axis is stored bottom-up).

  Returns:
    (4, 4) float64 affine: voxel (i, j, k) -> RAS+ mm.
  """
  iop = np.asarray(iop, np.float64)
  row_cos, col_cos = iop[:3], iop[3:]
  normal = np.cross(row_cos, col_cos)
  dr, dc = (float(v) for v in pixel_spacing)
  lps = np.eye(4)
  lps[:3, 0] = row_cos * dc
  lps[:3, 1] = -col_cos * dr  # row index rows-1-j
  lps[:3, 2] = normal * float(slice_spacing)
  lps[:3, 3] = np.asarray(first_position, np.float64) + (rows - 1) * dr * col_cos
  return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _check_same(directory, first, geom, path):
  ref_path, ref = first
  for key, label, tol in (("shape", "rows x columns", 0), ("spacing", "PixelSpacing", 1e-4),
                          ("iop", "ImageOrientationPatient", 1e-4)):
    a, b = np.asarray(ref[key], np.float64), np.asarray(geom[key], np.float64)
    if not np.allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(a).max()))):
      raise InputError(f"{directory}: {label} differs between slices "
                       f"({os.path.basename(ref_path)}: {np.round(a, 5).tolist()}, "
                       f"{os.path.basename(path)}: {np.round(b, 5).tolist()})")


def _slice_geometry(directory, uid, paths, geoms, pixel_spacing):
  """Orders the slices along the normal and checks spacing and tilt.

  Returns:
    (order (N,) int indices into ``paths``, slice spacing in mm or None for one slice)
  """
  iop = geoms[0]["iop"]
  row_cos, col_cos = iop[:3], iop[3:]
  if (abs(np.linalg.norm(row_cos) - 1) > 1e-3 or abs(np.linalg.norm(col_cos) - 1) > 1e-3
      or abs(float(row_cos @ col_cos)) > 1e-3):
    raise InputError(f"{directory}: ImageOrientationPatient {iop.tolist()} is not two "
                     "orthogonal unit vectors")
  normal = np.cross(row_cos, col_cos)
  ipp = np.stack([g["ipp"] for g in geoms])  # (N, 3)
  along = ipp @ normal
  order = np.argsort(along, kind="stable")
  if len(paths) == 1:
    return order, None
  ipp, along = ipp[order], along[order]
  steps = np.diff(along)
  median = float(np.median(steps))
  dup = np.flatnonzero(steps <= max(1e-3, 0.01 * abs(median)))
  if dup.size:
    a, b = (os.path.basename(paths[order[i]]) for i in (dup[0], dup[0] + 1))
    raise InputError(f"{directory}: {dup.size} slices of series {uid} repeat the position "
                     f"of another (e.g. {a} and {b} at {along[dup[0]]:.2f}"
                     " mm along the normal); several acquisitions or reconstructions under "
                     "one SeriesInstanceUID are not supported")
  bad = np.flatnonzero(np.abs(steps - median) > max(SPACING_RTOL * median, 0.02))
  if bad.size:
    i = int(bad[np.argmax(np.abs(steps[bad] - median))])
    after = os.path.basename(paths[order[i]])
    hint = " (missing slices?)" if steps[i] > 1.5 * median else ""
    raise InputError(f"{directory}: slice spacing of series {uid} is not uniform: median "
                     f"{median:.3f} mm, but {steps[i]:.3f} mm after {after}{hint}")
  disp = ipp - ipp[0]
  perp = disp - np.outer(disp @ normal, normal)
  drift = float(np.linalg.norm(perp, axis=1).max())
  if drift > TILT_TOLERANCE_PX * float(min(pixel_spacing)):
    angle = math.degrees(math.atan2(float(np.linalg.norm(perp[-1])), float(along[-1] - along[0])))
    raise InputError(f"{directory}: gantry tilt of {angle:.1f} degrees in series {uid} (slice "
                     f"origins drift {drift:.2f} mm off the slice normal); tilted series are "
                     "not resampled: convert with dcm2niix (which corrects the tilt) and pass "
                     "the NIfTI file")
  return order, float((along[-1] - along[0]) / (len(along) - 1))


def load_series(directory, series_uid: str | None = None) -> nifti.Volume:
  """Reads the CT series in ``directory`` into model orientation.

  Args:
    directory: a folder holding one DICOM CT series (any file names and order; other
      series without images and non-DICOM files are skipped).
    series_uid: the SeriesInstanceUID to read when the folder holds several image
      series.

  Returns:
    A :class:`nifti.Volume`: ``data`` (S, H, W) float32 HU in model orientation,
    ``affine`` (4, 4) of the ``(columns, rows, slices)`` file layout (module docstring),
    ``path`` the directory, ``header`` a fresh NIfTI-1 header with that affine as sform
    and qform, ``file_dtype`` int16 when every HU value is an integer in int16's range
    (else float32), ``source`` a dict with the series UID, description, number of
    slices, where the slice spacing came from and notes on skipped files.

  Raises:
    InputError: a one-line message naming the directory or file (module docstring
      lists what is refused).
  """
  directory = _check_dir(directory)
  series, notes = _scan(directory)
  info = _pick(directory, series, series_uid, notes)
  if info.modality.upper() != "CT":
    if info.modality:
      raise InputError(f"{directory}: series {info.uid} is {info.modality}, not CT; the "
                       "model reads non-contrast head CT")
    warnings.warn(f"{directory}: series {info.uid} has no Modality; reading it as CT",
                  UserWarning, stacklevel=2)

  slices = [_read_slice(p) for p in info.files]
  first = (info.files[0], slices[0][2])
  for path, (_, _, geom) in zip(info.files, slices):
    _check_same(directory, first, geom, path)
  geoms = [g for _, _, g in slices]
  pixel_spacing = geoms[0]["spacing"]
  order, spacing = _slice_geometry(directory, info.uid, info.files, geoms, pixel_spacing)
  spacing_from = "positions"
  if spacing is None:
    ds0 = slices[0][0]
    spacing, spacing_from = 1.0, "default 1 mm"
    for tag in ("SliceThickness", "SpacingBetweenSlices"):
      value = ds0.get(tag)
      if value is not None and float(value) > 0:
        spacing, spacing_from = float(value), tag
        break
    notes.append(f"one slice: slice spacing {spacing:g} mm from {spacing_from}")

  hu = np.stack([slices[i][1] for i in order])  # (slices, rows, cols)
  rows = hu.shape[1]
  file_array = np.transpose(hu[:, ::-1, :], (2, 1, 0))  # (cols, rows bottom-up, slices)
  affine = series_affine(geoms[0]["iop"], geoms[order[0]]["ipp"], pixel_spacing, spacing, rows)

  if np.all(hu == np.round(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
    file_dtype = np.dtype(np.int16)
  else:
    file_dtype = np.dtype(np.float32)
  header = nib.Nifti1Header()
  header.set_data_shape(file_array.shape)
  header.set_data_dtype(file_dtype)
  header.set_xyzt_units("mm", "sec")
  header.set_sform(affine, code=1)  # scanner coordinates
  header.set_qform(affine, code=1)

  # Reorientation exactly as nifti.load_volume does it.
  ornt = nio.io_orientation(affine)
  tr = nio.ornt_transform(ornt, nio.axcodes2ornt(nifti.MODEL_AXCODES))
  vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  spacing_mm = [0.0, 0.0, 0.0]
  for i in range(3):
    spacing_mm[int(tr[i, 0])] = float(vox[i])
  data = nio.apply_orientation(file_array, tr)
  source = {
      "format": "dicom", "directory": directory, "series_uid": info.uid,
      "series_description": info.description, "modality": info.modality,
      "slices": len(info.files), "slice_spacing_from": spacing_from, "notes": notes,
  }
  return nifti.Volume(data=np.ascontiguousarray(data), path=directory, affine=affine,
                      file_shape=tuple(int(s) for s in file_array.shape), ornt=ornt,
                      spacing_mm=tuple(spacing_mm), header=header, file_dtype=file_dtype,
                      source=source)
