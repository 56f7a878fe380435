"""Writes a small fake AISD download (PNG slices, masks, CT DICOMs).

Layout as documented in docs/aisd.md::

    image/<case_id>/000.png ...     (or image.zip holding image/<case_id>/...)
    mask/<case_id>/000.png ...      (or mask.zip)
    dicom-0/<case_id>/CT/*.dcm      (or dicom-0.tar.gz; also a DWI/ series)
    dicom-1/<case_id>/CT/*.dcm

Cases (32x32 slices unless said otherwise):

===========  =====================================================  =========
case         what                                                   split
===========  =====================================================  =========
0073410      good; DICOM slices named in shuffled order             test
0072723      good                                                   test
0100001      good; DICOM positions descending in file order         train
0100002      good; DICOM without ImagePositionPatient (InstanceNo.) train
0100003      good; signed pixels, slope 2; PNG/mask slices run      train
             from head to feet (DICOM sorted ascending must be
             reversed to match)
0100009      good                                                   validation
0226134      16-vs-26 defect in small: 3 image/CT slices, 5 masks   (skipped)
0073366      empty image folder and empty CT folder                 (skipped)
0100004      image PNG 001.png truncated (png: skip; dicom: fine)   train
0100005      image PNG slices of two sizes (png: skip; dicom: fine) train
0100006      mask holds label 7                                     (skipped)
0100007      no mask folder                                         (skipped)
0100008      mask only: no image folder, no DICOM                   (skipped)
0100011      one DICOM file is garbage (dicom: skip; png: fine)     train
===========  =====================================================  =========
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tarfile
import zipfile

import numpy as np

SIZE = 32
PIXEL_SPACING = (0.5, 0.45)  # (row, col) mm
SLICE_MM = 5.0
PNG_WINDOW = (0.0, 80.0)  # HU window of the fake PNG images


@dataclasses.dataclass
class FakeCase:
  case_id: str
  image: np.ndarray  # (S, H, W) uint8, what the PNGs hold (slice order 000..)
  mask: np.ndarray  # (S, H, W) uint8
  hu: np.ndarray  # (S, H, W) int16, slice k matches image[k] / mask[k]


@dataclasses.dataclass
class FakeAisd:
  root: str
  cases: dict[str, FakeCase]
  good_png: set[str]
  good_dicom: set[str]
  skipped_png: dict[str, str]  # case -> substring of the expected reason
  skipped_dicom: dict[str, str]


GOOD_BOTH = {"0073410", "0072723", "0100001", "0100002", "0100003", "0100009"}
GOOD_PNG = GOOD_BOTH | {"0100011"}
GOOD_DICOM = GOOD_BOTH | {"0100004", "0100005"}
SKIPPED_PNG = {
    "0226134": "slice count mismatch: 3 image slices, 5 mask slices",
    "0073366": "empty image folder",
    "0100004": "unreadable image PNG",
    "0100005": "image slices differ in size",
    "0100006": "mask labels outside 0-5",
    "0100007": "no mask folder",
    "0100008": "no image folder",
}
SKIPPED_DICOM = {
    "0226134": "slice count mismatch: 3 CT DICOM slices, 5 mask slices",
    "0073366": "empty CT folder",
    "0100006": "mask labels outside 0-5",
    "0100007": "no mask folder",
    "0100008": "no CT DICOM folder",
    "0100011": "unreadable DICOM",
}


def _png_bytes(arr: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def _window(hu: np.ndarray) -> np.ndarray:
  lo, hi = PNG_WINDOW
  return np.round(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _make_case(rng, case_id: str, n: int, even_hu: bool = False) -> FakeCase:
  hu = rng.normal(40, 30, size=(n, SIZE, SIZE))
  hu[:, :3, :] = -1000  # air
  hu[:, :, -2:] = 1200  # bone
  hu = np.round(hu).astype(np.int16)
  if even_hu:
    hu = (hu // 2 * 2).astype(np.int16)
  mask = np.zeros((n, SIZE, SIZE), np.uint8)
  for k in range(n):
    label = rng.integers(1, 6)
    r, c = rng.integers(4, SIZE - 8, size=2)
    mask[k, r:r + 5, c:c + 4] = label
  return FakeCase(case_id, _window(hu), mask, hu)


def _dicom_bytes(hu_slice, *, z, instance, signed, slope, intercept,
                 series_uid, with_ipp=True) -> bytes:
  import pydicom  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path)

  ds = helpers.ct_slice_dataset(series_uid, *hu_slice.shape, signed=signed)
  ds.InstanceNumber = instance
  if with_ipp:
    ds.ImagePositionPatient = [-8.0, -7.2, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  ds.PixelSpacing = list(PIXEL_SPACING)
  ds.SliceThickness = SLICE_MM
  ds.RescaleSlope = slope
  ds.RescaleIntercept = intercept
  stored = (hu_slice.astype(np.float64) - intercept) / slope
  assert np.all(stored == np.round(stored))
  ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
  buf = io.BytesIO()
  if int(pydicom.__version__.split(".")[0]) >= 3:
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
  else:  # pydicom 2.x
    ds.is_little_endian, ds.is_implicit_VR = True, False
    pydicom.dcmwrite(buf, ds, write_like_original=False)
  return buf.getvalue()


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def write_fake_aisd(root: str, *, zipped: bool = False, dicom: bool = True,
                    seed: int = 0) -> FakeAisd:
  """Writes the fake download into ``root`` (created) and returns the truth."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  n_slices = {"0073410": 4, "0072723": 3, "0100001": 5, "0100002": 3,
              "0100003": 4, "0100009": 3, "0226134": 5, "0073366": 3,
              "0100004": 3, "0100005": 3, "0100006": 3, "0100007": 3,
              "0100008": 3, "0100011": 3}
  cases = {cid: _make_case(rng, cid, n, even_hu=cid == "0100003")
           for cid, n in n_slices.items()}
  cases["0100006"].mask[1, 0, 0] = 7

  img_dir = os.path.join(root, "image")
  msk_dir = os.path.join(root, "mask")
  for cid, case in cases.items():
    n_img = 3 if cid == "0226134" else case.image.shape[0]
    if cid == "0073366":
      os.makedirs(os.path.join(img_dir, cid), exist_ok=True)
    elif cid != "0100008":
      for k in range(n_img):
        data = _png_bytes(case.image[k])
        if cid == "0100004" and k == 1:
          data = data[: len(data) // 2]
        if cid == "0100005" and k == 2:
          data = _png_bytes(case.image[k][:, :30])
        _write(os.path.join(img_dir, cid, f"{k:03d}.png"), data)
    if cid != "0100007":
      for k in range(case.mask.shape[0]):
        _write(os.path.join(msk_dir, cid, f"{k:03d}.png"),
               _png_bytes(case.mask[k]))
  # Junk a real download may hold; must be ignored.
  _write(os.path.join(img_dir, ".DS_Store"), b"junk")
  _write(os.path.join(msk_dir, "0072723", "Thumbs.db"), b"junk")

  if dicom:
    from pydicom.uid import generate_uid  # pylint: disable=g-import-not-at-top

    for i, (cid, case) in enumerate(sorted(cases.items())):
      if cid == "0100008":
        continue
      part = os.path.join(root, f"dicom-{i % 2}", cid)
      ct = os.path.join(part, "CT")
      _write(os.path.join(part, "DWI", "IM0001.dcm"), b"not read")
      if cid == "0073366":
        os.makedirs(ct, exist_ok=True)
        continue
      hu = case.hu[:3] if cid == "0226134" else case.hu
      n = hu.shape[0]
      uid = generate_uid()
      signed, slope, intercept = (True, 2.0, 0.0) if cid == "0100003" else (
          False, 1.0, -1024.0)
      for k in range(n):
        # Slice k of the PNGs lies at z = 5 k (feet to head), except 0100003
        # whose PNGs run head to feet; file names never follow the order.
        z = SLICE_MM * (n - 1 - k if cid == "0100003" else k) + 100.0
        instance = k + 1
        name = {"0073410": f"{(k * 7) % 10}_{k}.dcm",
                "0100001": f"IM{n - k:04d}.dcm"}.get(cid, f"CT{k:03d}.dcm")
        data = _dicom_bytes(hu[k], z=z, instance=instance, signed=signed,
                            slope=slope, intercept=intercept, series_uid=uid,
                            with_ipp=cid != "0100002")
        if cid == "0100011" and k == 1:
          data = b"this is not a DICOM file"
        _write(os.path.join(ct, name), data)

  if zipped:
    for name, folder in (("image", img_dir), ("mask", msk_dir)):
      with zipfile.ZipFile(os.path.join(root, name + ".zip"), "w") as zf:
        for dirpath, dirnames, filenames in os.walk(folder):
          rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
          if not filenames and not dirnames:
            zf.writestr(rel + "/", b"")  # explicit entry for an empty folder
          for f in sorted(filenames):
            zf.write(os.path.join(dirpath, f), f"{rel}/{f}")
      shutil.rmtree(folder)
    for part in sorted(os.listdir(root)):
      full = os.path.join(root, part)
      if part.startswith("dicom-") and os.path.isdir(full):
        with tarfile.open(full + ".tar.gz", "w:gz") as tf:
          tf.add(full, arcname=part)
        shutil.rmtree(full)

  return FakeAisd(
      root=root, cases=cases,
      good_png=set(GOOD_PNG), good_dicom=set(GOOD_DICOM) if dicom else set(),
      skipped_png=dict(SKIPPED_PNG),
      skipped_dicom=dict(SKIPPED_DICOM) if dicom else {})
