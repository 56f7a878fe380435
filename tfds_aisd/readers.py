"""Reading AISD cases from a manual download directory (no TensorFlow).

The manual directory may hold the archives as downloaded (``image.zip``,
``mask.zip``, ``dicom-N.tar.gz``) or their unpacked folders (``image/``,
``mask/``, ``dicom-N/``). Where both the folder and the archive of the same
name exist, the folder wins.

* Zip archives are read in place with :mod:`zipfile` (random access is cheap).
* Tar archives (``dicom-N.tar.gz``) are streamed once and only their ``CT``
  series are extracted to a temporary directory (deleted afterwards): random
  access into a gzip stream would decompress it again for every file.

A *case* is a directory directly holding slice files:

* PNG trees: ``<anything>/<case_id>/<slice>.png``; the case id is the name of
  the folder that holds the PNGs. A leaf folder without PNGs is an empty case.
* DICOM trees: ``<anything>/<case_id>/CT/*.dcm`` (other series such as DWI are
  ignored). A ``CT`` folder without DICOM files is an empty case.

Every defect of a case raises :class:`CaseError` with a human readable reason;
the builder skips such cases and reports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

NUM_LABELS = 6  # raw mask labels 0..5
PNG_SLICE_SPACING_MM = 5.0  # AISD: 5 mm slices; the PNGs carry no spacing


class AisdBuildError(ValueError):
  """Bad manual directory or nothing to build (one-line message)."""


class CaseError(Exception):
  """A defect of one case; the case is skipped with ``str(error)`` as reason."""


# ----------------------------------------------------------------------------
# File trees: a folder, a zip, or an extracted tar, seen as relative posix paths.


def _ignored(relpath: str) -> bool:
  parts = relpath.split("/")
  return any(p.startswith(".") or p == "__MACOSX" for p in parts)


class Tree:
  """Read-only view of a folder or archive as relative posix paths."""

  label: str  # for messages, e.g. "mask.zip"

  def files(self) -> list[str]:
    raise NotImplementedError

  def dirs(self) -> set[str]:
    """Every directory (explicit or implied by a file), '' excluded."""
    raise NotImplementedError

  def read_bytes(self, relpath: str) -> bytes:
    raise NotImplementedError

  def local_path(self, relpath: str) -> str | None:
    """A path on disk, where the tree is a folder; else None."""
    return None

  def describe(self, relpath: str) -> str:
    return f"{self.label}:{relpath}"


def _implied_dirs(paths: Sequence[str]) -> set[str]:
  out = set()
  for p in paths:
    d = posixpath.dirname(p)
    while d:
      out.add(d)
      d = posixpath.dirname(d)
  return out


class DirTree(Tree):

  def __init__(self, root: str, label: str | None = None):
    self.root = root
    self.label = label or os.path.basename(os.path.normpath(root))
    files, dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
      rel = os.path.relpath(dirpath, root)
      rel = "" if rel == "." else rel.replace(os.sep, "/")
      if rel and _ignored(rel):
        dirnames[:] = []
        continue
      if rel:
        dirs.add(rel)
      for f in filenames:
        p = posixpath.join(rel, f) if rel else f
        if not _ignored(p):
          files.append(p)
    self._files = sorted(files)
    self._dirs = dirs

  def files(self):
    return self._files

  def dirs(self):
    return self._dirs

  def read_bytes(self, relpath):
    with open(self.local_path(relpath), "rb") as f:
      return f.read()

  def local_path(self, relpath):
    return os.path.join(self.root, *relpath.split("/"))

  def describe(self, relpath):
    return f"{self.label}/{relpath}"


class ZipTree(Tree):

  def __init__(self, path: str):
    self.label = os.path.basename(path)
    try:
      self._zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise AisdBuildError(f"cannot open {path}: {e}") from e
    self._names: dict[str, zipfile.ZipInfo] = {}
    dirs = set()
    for info in self._zf.infolist():
      name = info.filename.replace("\\", "/").strip("/")
      if not name or _ignored(name):
        continue
      if info.is_dir():
        dirs.add(name)
      else:
        self._names[name] = info
    files = list(self._names)
    self._files = sorted(files)
    self._dirs = dirs | _implied_dirs(files)

  def files(self):
    return self._files

  def dirs(self):
    return self._dirs

  def read_bytes(self, relpath):
    return self._zf.read(self._names[relpath])

  def close(self):
    self._zf.close()


def _extract_ct_from_tar(path: str, dest: str) -> None:
  """Streams a tar once, extracting only members inside a ``CT`` folder."""
  try:
    with tarfile.open(path, "r:*") as tf:
      for member in tf:
        name = member.name.replace("\\", "/").strip("/")
        parts = name.split("/")
        in_ct = "CT" in parts[:-1] or (member.isdir() and parts[-1] == "CT")
        if _ignored(name) or not in_ct:
          continue
        if not (member.isfile() or member.isdir()):
          continue
        tf.extract(member, dest, filter="data")
  except (tarfile.TarError, OSError, EOFError) as e:
    raise AisdBuildError(f"cannot read {path}: {e}") from e


# ----------------------------------------------------------------------------
# Manual directory layout.


@dataclasses.dataclass
class Layout:
  """The trees found in a manual directory."""

  image: Tree | None
  mask: Tree | None
  dicom: list[Tree]
  notes: list[str]  # which folder/archive was used for what
  root: str = ""  # the manual dir


_TAR_RE = re.compile(r"^(dicom[^/]*?)(\.tar\.gz|\.tgz|\.tar)$", re.IGNORECASE)
_ZIP_RE = re.compile(r"^(dicom[^/]*?)\.zip$", re.IGNORECASE)


@contextlib.contextmanager
def open_layout(manual_dir: str, *, want_dicom: bool,
                extract_dir: str | None = None) -> Iterator[Layout]:
  """Finds image/mask/dicom trees in ``manual_dir``; closes them on exit."""
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise AisdBuildError(
        f"manual_dir {manual_dir!r} does not exist or is not a directory")
  entries = sorted(os.listdir(manual_dir))
  notes: list[str] = []
  with contextlib.ExitStack() as stack:

    def pick(stem: str) -> Tree | None:
      d = os.path.join(manual_dir, stem)
      z = os.path.join(manual_dir, stem + ".zip")
      if os.path.isdir(d):
        notes.append(f"{stem}: folder {d}")
        return DirTree(d, label=stem)
      if os.path.isfile(z):
        notes.append(f"{stem}: archive {z} (read in place)")
        tree = ZipTree(z)
        stack.callback(tree.close)
        return tree
      return None

    image, mask = pick("image"), pick("mask")
    dicom: list[Tree] = []
    if want_dicom:
      dirs = {e for e in entries
              if e.lower().startswith("dicom")
              and os.path.isdir(os.path.join(manual_dir, e))}
      for e in sorted(dirs):
        notes.append(f"{e}: folder")
        dicom.append(DirTree(os.path.join(manual_dir, e), label=e))
      tars = []
      for e in entries:
        full = os.path.join(manual_dir, e)
        if not os.path.isfile(full):
          continue
        m = _TAR_RE.match(e) or _ZIP_RE.match(e)
        if not m:
          continue
        if m.group(1) in dirs:
          notes.append(f"{e}: ignored, folder {m.group(1)}/ is used instead")
          continue
        if e.lower().endswith(".zip"):
          notes.append(f"{e}: archive (read in place)")
          tree = ZipTree(full)
          stack.callback(tree.close)
          dicom.append(tree)
        else:
          tars.append(e)
      if tars:
        if extract_dir:
          os.makedirs(extract_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="aisd_ct_", dir=extract_dir)
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        for e in tars:
          dest = os.path.join(tmp, e)
          os.makedirs(dest)
          notes.append(f"{e}: archive, CT series extracted to {dest} "
                       "(temporary)")
          _extract_ct_from_tar(os.path.join(manual_dir, e), dest)
          dicom.append(DirTree(dest, label=e))
    yield Layout(image=image, mask=mask, dicom=dicom, notes=notes,
                 root=manual_dir)


# ----------------------------------------------------------------------------
# Case discovery.


def _slice_sort_key(relpath: str):
  stem = posixpath.splitext(posixpath.basename(relpath))[0]
  return (0, int(stem), relpath) if stem.isdigit() else (1, 0, relpath)


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """Slice files of one case in one tree (empty tuple: empty folder)."""

  tree: Tree
  folder: str
  files: tuple[str, ...]

  def where(self) -> str:
    return self.tree.describe(self.folder)


def find_png_cases(tree: Tree) -> dict[str, list[CaseFiles]]:
  """case_id -> folders (several if the id occurs more than once)."""
  by_dir: dict[str, list[str]] = {}
  for f in tree.files():
    if f.lower().endswith(".png"):
      by_dir.setdefault(posixpath.dirname(f), []).append(f)
  # Leaf folders without PNGs are empty cases.
  dirs = tree.dirs()
  parents = {posixpath.dirname(d) for d in dirs}
  for d in dirs:
    if d not in parents and d not in by_dir:
      by_dir[d] = []
  out: dict[str, list[CaseFiles]] = {}
  for d, files in sorted(by_dir.items()):
    if not d:  # PNGs directly in the root: not a case folder
      continue
    case_id = posixpath.basename(d)
    out.setdefault(case_id, []).append(
        CaseFiles(tree, d, tuple(sorted(files, key=_slice_sort_key))))
  return out


def _dicom_files(files: list[str]) -> tuple[str, ...]:
  dcm = [f for f in files if f.lower().endswith(".dcm")]
  if not dcm:  # DICOM files often have no extension
    dcm = [f for f in files if "." not in posixpath.basename(f)]
  return tuple(sorted(dcm, key=_slice_sort_key))


def find_dicom_cases(trees: Sequence[Tree]) -> dict[str, list[CaseFiles]]:
  """case_id -> CT folders found (``<case_id>/CT/``)."""
  out: dict[str, list[CaseFiles]] = {}
  for tree in trees:
    by_dir: dict[str, list[str]] = {}
    for f in tree.files():
      d = posixpath.dirname(f)
      if posixpath.basename(d) == "CT":
        by_dir.setdefault(d, []).append(f)
    for d in tree.dirs():
      if posixpath.basename(d) == "CT":
        by_dir.setdefault(d, [])
    for d, files in sorted(by_dir.items()):
      case_dir = posixpath.dirname(d)
      if not case_dir:
        continue
      case_id = posixpath.basename(case_dir)
      out.setdefault(case_id, []).append(
          CaseFiles(tree, d, _dicom_files(files)))
  return out


# ----------------------------------------------------------------------------
# PNG reading.


def _read_png(tree: Tree, relpath: str, what: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(tree.read_bytes(relpath))) as im:
      im.load()
      mode = im.mode
      arr = np.asarray(im)
  except Exception as e:  # pylint: disable=broad-except
    raise CaseError(
        f"unreadable {what} PNG {tree.describe(relpath)}: "
        f"{type(e).__name__}: {e}") from e
  if arr.ndim == 3:  # RGB(A)/LA with identical colour channels -> grey
    colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    if not np.all(colour == colour[..., :1]):
      raise CaseError(f"{what} PNG {tree.describe(relpath)} is colour "
                      f"(mode {mode}), expected greyscale")
    arr = colour[..., 0]
  if arr.ndim != 2:
    raise CaseError(f"{what} PNG {tree.describe(relpath)} has shape "
                    f"{arr.shape}, expected 2-D")
  if arr.dtype != np.uint8:
    if arr.dtype == bool:
      arr = arr.astype(np.uint8)
    elif what == "mask" and arr.size and arr.min() >= 0 and arr.max() <= 255:
      arr = arr.astype(np.uint8)
    else:
      raise CaseError(f"{what} PNG {tree.describe(relpath)} is {mode} "
                      f"({arr.dtype}), expected 8-bit")
  return arr


def read_png_stack(cf: CaseFiles, what: str) -> np.ndarray:
  if not cf.files:
    raise CaseError(f"empty {what} folder {cf.where()}")
  slices = [_read_png(cf.tree, f, what) for f in cf.files]
  shapes = sorted({s.shape for s in slices})
  if len(shapes) > 1:
    raise CaseError(f"{what} slices differ in size in {cf.where()}: "
                    + ", ".join(f"{h}x{w}" for h, w in shapes))
  return np.stack(slices)


def check_mask_labels(mask: np.ndarray, where: str) -> None:
  bad = np.unique(mask[mask >= NUM_LABELS])
  if bad.size:
    shown = ", ".join(str(int(v)) for v in bad[:8])
    raise CaseError(f"mask labels outside 0-{NUM_LABELS - 1} in {where}: "
                    f"{shown}{', ...' if bad.size > 8 else ''}")


# ----------------------------------------------------------------------------
# DICOM reading.


def import_pydicom():
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise AisdBuildError(
        "the 'dicom' config needs pydicom, which is not installed: "
        "pip install 'pydicom>=2.4' (or the project's [dicom] extra)") from e
  return pydicom


def _float_list(value) -> list[float] | None:
  if value is None:
    return None
  try:
    return [float(v) for v in value]
  except (TypeError, ValueError):
    return None


@dataclasses.dataclass
class DicomVolume:
  hu: np.ndarray  # (S, H, W) int16, sorted along the slice normal ascending
  spacing_mm: np.ndarray  # (3,) float32, (slice, row, col)
  order: str  # how the slices were sorted


def read_dicom_ct(cf: CaseFiles) -> DicomVolume:
  """Reads a CT series: HU = pixel * RescaleSlope + RescaleIntercept."""
  pydicom = import_pydicom()
  if not cf.files:
    raise CaseError(f"empty CT folder {cf.where()} (no DICOM files)")
  slices = []
  for f in cf.files:
    src = cf.tree.local_path(f) or io.BytesIO(cf.tree.read_bytes(f))
    try:
      ds = pydicom.dcmread(src, force=True)
      pixels = np.asarray(ds.pixel_array)
    except Exception as e:  # pylint: disable=broad-except
      raise CaseError(f"unreadable DICOM {cf.tree.describe(f)}: "
                      f"{type(e).__name__}: {e}") from e
    if pixels.ndim != 2:
      raise CaseError(f"DICOM {cf.tree.describe(f)} has pixel shape "
                      f"{pixels.shape}, expected one 2-D slice")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    hu = pixels.astype(np.float64) * slope + intercept
    slices.append(dict(
        file=f,
        hu=hu,
        series=str(getattr(ds, "SeriesInstanceUID", "")),
        ipp=_float_list(getattr(ds, "ImagePositionPatient", None)),
        iop=_float_list(getattr(ds, "ImageOrientationPatient", None)),
        instance=getattr(ds, "InstanceNumber", None),
        pixel_spacing=_float_list(getattr(ds, "PixelSpacing", None)),
        thickness=getattr(ds, "SliceThickness", None),
        between=getattr(ds, "SpacingBetweenSlices", None),
    ))
  series = {s["series"] for s in slices}
  if len(series) > 1:
    raise CaseError(f"CT folder {cf.where()} holds {len(series)} series, "
                    "expected one")
  shapes = sorted({s["hu"].shape for s in slices})
  if len(shapes) > 1:
    raise CaseError(f"DICOM slices differ in size in {cf.where()}: "
                    + ", ".join(f"{h}x{w}" for h, w in shapes))

  # Sort along the slice normal (ImagePositionPatient projected on the normal
  # from ImageOrientationPatient, i.e. z for axial slices), ascending; else by
  # InstanceNumber; else by file name.
  positions = None
  if all(s["ipp"] is not None and len(s["ipp"]) == 3 for s in slices):
    iop = slices[0]["iop"]
    if iop is not None and len(iop) == 6:
      normal = np.cross(np.array(iop[:3]), np.array(iop[3:]))
      if np.linalg.norm(normal) < 1e-6:
        normal = np.array([0.0, 0.0, 1.0])
    else:
      normal = np.array([0.0, 0.0, 1.0])
    positions = [float(np.dot(normal, s["ipp"])) for s in slices]
  if positions is not None:
    order_by = "ImagePositionPatient"
    idx = np.argsort(positions, kind="stable")
    pos_sorted = np.asarray(positions)[idx]
    if len(pos_sorted) > 1 and np.any(np.diff(pos_sorted) < 1e-3):
      raise CaseError(f"CT folder {cf.where()} has several slices at the "
                      "same position")
  elif all(s["instance"] is not None for s in slices):
    order_by = "InstanceNumber"
    idx = np.argsort([int(s["instance"]) for s in slices], kind="stable")
    pos_sorted = None
  else:
    order_by = "file name"
    idx = np.arange(len(slices))
    pos_sorted = None
  slices = [slices[i] for i in idx]

  hu = np.stack([s["hu"] for s in slices])
  lo, hi = np.iinfo(np.int16).min, np.iinfo(np.int16).max
  if hu.min() < lo or hu.max() > hi:
    raise CaseError(f"HU values of {cf.where()} out of int16 range "
                    f"[{hu.min():g}, {hu.max():g}]")
  hu = np.round(hu).astype(np.int16)

  slice_sp = math.nan
  if pos_sorted is not None and len(pos_sorted) > 1:
    slice_sp = float(np.median(np.diff(pos_sorted)))
  else:
    for key in ("between", "thickness"):
      try:
        v = float(slices[0][key])
      except (TypeError, ValueError):
        continue
      if v > 0:
        slice_sp = v
        break
  ps = slices[0]["pixel_spacing"]
  row_sp, col_sp = (ps[0], ps[1]) if ps and len(ps) == 2 else (math.nan,) * 2
  spacing = np.array([slice_sp, row_sp, col_sp], np.float32)
  return DicomVolume(hu=hu, spacing_mm=spacing, order=order_by)


def _mean_slice_correlation(a: np.ndarray, b: np.ndarray) -> float:
  a = a.reshape(a.shape[0], -1).astype(np.float64)
  b = b.reshape(b.shape[0], -1).astype(np.float64)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)
  return float(r.mean())


def match_dicom_to_png(hu: np.ndarray, png: np.ndarray) -> dict[str, float]:
  """Mean per-slice correlation of the DICOM volume with the PNG images.

  Every DICOM slice is clipped to [-100, 200] HU (where a brain window lies,
  whatever its exact bounds) and compared with the PNG slice of the same
  index. Keys: "forward" (slices as sorted), "reverse" (slice order
  reversed), and, for the better of the two orders, "flip_rows" and
  "flip_cols" (in-plane flips, only used for warnings).
  """
  clipped = np.clip(hu, -100, 200)
  r = {"forward": _mean_slice_correlation(clipped, png),
       "reverse": _mean_slice_correlation(clipped[::-1], png)}
  best = clipped[::-1] if r["reverse"] > r["forward"] else clipped
  r["flip_rows"] = _mean_slice_correlation(best[:, ::-1, :], png)
  r["flip_cols"] = _mean_slice_correlation(best[:, :, ::-1], png)
  return r


# ----------------------------------------------------------------------------
# Whole cases.


@dataclasses.dataclass(frozen=True)
class CaseRef:
  case_id: str
  source: str  # "png" | "dicom"
  mask: CaseFiles
  image: CaseFiles | None  # PNG images (png: the data; dicom: order check)
  ct: CaseFiles | None  # DICOM CT series (dicom only)


@dataclasses.dataclass
class CaseData:
  image: np.ndarray
  mask: np.ndarray
  spacing_mm: np.ndarray
  notes: list[str]


def read_case(ref: CaseRef) -> CaseData:
  """Reads and checks one case; raises CaseError on any defect."""
  notes: list[str] = []
  mask = read_png_stack(ref.mask, "mask")
  if ref.source == "png":
    image = read_png_stack(ref.image, "image")
    if image.shape[0] != mask.shape[0]:
      raise CaseError(f"slice count mismatch: {image.shape[0]} image slices, "
                      f"{mask.shape[0]} mask slices")
    names_i = [posixpath.basename(f) for f in ref.image.files]
    names_m = [posixpath.basename(f) for f in ref.mask.files]
    if names_i != names_m:
      raise CaseError("image and mask slice file names differ")
    spacing = np.array([PNG_SLICE_SPACING_MM, math.nan, math.nan], np.float32)
  else:
    vol = read_dicom_ct(ref.ct)
    image, spacing = vol.hu, vol.spacing_mm
    if image.shape[0] != mask.shape[0]:
      raise CaseError(f"slice count mismatch: {image.shape[0]} CT DICOM "
                      f"slices, {mask.shape[0]} mask slices")
    notes.append(f"slices sorted by {vol.order}, ascending")
    if ref.image is not None:
      try:
        png = read_png_stack(ref.image, "image")
      except CaseError as e:
        png = None
        notes.append(f"slice order not checked against the PNG images: {e}")
      if png is not None and png.shape == image.shape:
        r = match_dicom_to_png(image, png)
        best = max(r["forward"], r["reverse"])
        if r["reverse"] > r["forward"]:
          image = image[::-1].copy()
          notes.append(
              f"slice order reversed to match the PNG images and masks "
              f"(mean r {r['reverse']:.2f} reversed vs {r['forward']:.2f})")
        else:
          notes.append(f"slice order matches the PNG images (mean r "
                       f"{r['forward']:.2f} vs {r['reverse']:.2f} reversed)")
        if best < 0.5:
          notes.append(f"warning: DICOM and PNG images correlate poorly "
                       f"(mean r {best:.2f})")
        for key in ("flip_rows", "flip_cols"):
          if r[key] > best + 0.05:
            notes.append(f"warning: the PNG images match the DICOM better "
                         f"with {key.replace('_', ' ')} (r {r[key]:.2f} vs "
                         f"{best:.2f}); masks may be flipped against HU")
      elif png is not None:
        notes.append(f"slice order not checked: PNG images {png.shape} vs "
                     f"DICOM {image.shape}")
  if image.shape[1:] != mask.shape[1:]:
    raise CaseError(f"image slices are {image.shape[1]}x{image.shape[2]}, "
                    f"mask slices {mask.shape[1]}x{mask.shape[2]}")
  check_mask_labels(mask, ref.mask.where())
  return CaseData(image=image, mask=mask, spacing_mm=spacing, notes=notes)


def _one(cases: dict[str, list[CaseFiles]], case_id: str, what: str,
         skipped: dict[str, str]) -> CaseFiles | None:
  found = cases.get(case_id, [])
  if len(found) > 1:
    skipped[case_id] = (f"{what} found {len(found)} times: "
                        + ", ".join(c.where() for c in found))
    return None
  return found[0] if found else None


def discover(layout: Layout, source: str) -> tuple[list[CaseRef], dict[str, str]]:
  """Pairs up image/CT and mask folders. Returns (refs, skipped reasons)."""
  if source not in ("png", "dicom"):
    raise ValueError(f"unknown source {source!r}")
  where = f"manual_dir {layout.root!r}"
  if layout.mask is None:
    raise AisdBuildError(f"{where} has neither mask/ nor mask.zip "
                         "(needed by both configs)")
  if source == "png" and layout.image is None:
    raise AisdBuildError(f"{where} has neither image/ nor image.zip "
                         "(needed by the 'png' config)")
  if source == "dicom" and not layout.dicom:
    raise AisdBuildError(f"{where} has no dicom-*/ folder or "
                         "dicom-*.tar.gz archive (needed by the 'dicom' "
                         "config)")
  masks = find_png_cases(layout.mask)
  images = find_png_cases(layout.image) if layout.image is not None else {}
  cts = find_dicom_cases(layout.dicom) if source == "dicom" else {}
  primary = images if source == "png" else cts
  primary_name = "image" if source == "png" else "CT DICOM"
  skipped: dict[str, str] = {}
  refs = []
  for case_id in sorted(set(masks) | set(primary)):
    if case_id not in primary:
      skipped[case_id] = f"no {primary_name} folder (mask only)"
      continue
    if case_id not in masks:
      skipped[case_id] = f"no mask folder ({primary_name} only)"
      continue
    mask = _one(masks, case_id, "mask folder", skipped)
    prim = _one(primary, case_id, f"{primary_name} folder", skipped)
    if mask is None or prim is None:
      continue
    if source == "png":
      refs.append(CaseRef(case_id, source, mask=mask, image=prim, ct=None))
    else:
      img = images.get(case_id)
      img = img[0] if img and len(img) == 1 else None
      refs.append(CaseRef(case_id, source, mask=mask, image=img, ct=prim))
  return refs, skipped


def validate(refs: Sequence[CaseRef]) -> tuple[list[CaseRef], dict[str, str],
                                              dict[str, list[str]]]:
  """Reads every case once. Returns (good refs, skipped reasons, notes)."""
  good, skipped, notes = [], {}, {}
  for ref in refs:
    try:
      data = read_case(ref)
    except CaseError as e:
      skipped[ref.case_id] = str(e)
      continue
    good.append(ref)
    if data.notes:
      notes[ref.case_id] = data.notes
  return good, skipped, notes


def as_example(ref: CaseRef, data: CaseData) -> dict[str, Any]:
  return {
      "image": data.image,
      "mask": data.mask,
      "case_id": ref.case_id,
      "spacing_mm": data.spacing_mm.astype(np.float32),
      "source": ref.source,
  }
