"""Case sources: random access over whole cases, and the source of a config's split.

A *case source* has ``len(source)`` and ``source[i] -> dict(case_id, image, mask, pose,
spacing_mm)`` with

- ``image``: (S, H, W) float32, preprocessed (``sean_jax.data.preprocess.prepare_case``);
- ``mask``: (S, H, W) uint8 in {0, 1} (lesion labels already mapped);
- ``pose``: (3,) float32 alpha = (theta, tx, ty) in the convention of
  ``sean_jax.models.sampler`` (the transform that aligns the head), NaN when unknown;
- ``spacing_mm``: (3,) float32 (slice, row, col), NaN where unknown;

and, optionally, ``slice_counts() -> (len,) int array`` so the slab index
(``sean_jax.data.pipeline``) can be built without reading every case. Sources here:
:class:`PhantomCaseSource`, :class:`TfdsCaseSource` (AISD built with ``tfds_aisd``),
:class:`NiftiCaseSource` (a folder written by ``python -m sean_jax.phantom``).

Phantom splits are disjoint index ranges of one seed: train [0, n_train), validation
[n_train, n_train + n_val), test after that.
"""

from __future__ import annotations

import glob
import json
import os
import threading
from typing import Sequence

import numpy as np

from sean_jax.data import preprocess
from sean_jax.data.phantom import PhantomConfig

__all__ = ["AISD_LESION_LABELS", "SPLITS", "PhantomCaseSource", "TfdsCaseSource",
           "NiftiCaseSource", "case_source"]

SPLITS = ("train", "validation", "test")

# AISD raw mask labels counted as lesion (the authors' rule): 1 remote infarct,
# 2 clear, 3 blurred acute infarct, 5 infarct; 4 (invisible on CT) is background.
AISD_LESION_LABELS = (1, 2, 3, 5)


def case_source(config, split: str, *, brain_mask: bool = False, aspects: bool = False,
                tissue: bool = False):
  """Case source of ``split`` for ``config.data`` (see sean_jax/config.py); with
  ``brain_mask`` its cases carry ``"brain"``, with ``aspects`` the phantom's cases carry
  ``"aspects_regions"``, their true ASPECTS regions, with ``tissue`` their
  ``"tissue_labels"`` (for evaluation)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  data = config.data
  size = data.image_size
  if data.source == "phantom":
    counts = {"train": data.num_train_cases, "validation": data.num_val_cases,
              "test": data.num_test_cases}
    start = {"train": 0, "validation": counts["train"],
             "test": counts["train"] + counts["validation"]}[split]
    phantom = PhantomConfig(size=data.get("phantom_size", size),
                            slices=data.phantom_slices)
    return PhantomCaseSource(data.phantom_seed, counts[split], phantom,
                                      start_index=start, image_size=size,
                                      window=tuple(data.hu_window),
                                      shared_cache=data.get("phantom_cache_cases", 0),
                                      brain_mask=brain_mask, aspects=aspects,
                                      tissue=tissue)
  if data.source == "aisd":
    data_dir = os.path.expanduser(data.aisd_data_dir)
    try:
      return TfdsCaseSource(data_dir, data.aisd_config, split,
                                     lesion_labels=tuple(data.lesion_labels),
                                     image_size=size, window=tuple(data.hu_window),
                                     brain_mask=brain_mask)
    except Exception as e:  # TFDS raises several types for a missing dataset
      raise FileNotFoundError(
          f"{data_dir}: AISD ({data.aisd_config}) is not built there ({type(e).__name__})."
          f" Download AISD by hand and run `python -m tfds_aisd --manual_dir M "
          f"--data_dir {data.aisd_data_dir} --config {data.aisd_config}` (docs/aisd.md),"
          f" or train on the phantom: --config configs/sean.py:phantom") from None
  raise ValueError(f"config.data.source must be phantom or aisd, got "
                   f"{data.source!r}")


def _pose_alpha(pose: dict | None, height: int, width: int) -> np.ndarray | None:
  """Pose dict (degrees, pixels of the raw grid) -> (3,) alpha, or None."""
  if not pose or not all(k in pose for k in ("rotation_deg", "shift_x_px", "shift_y_px")):
    return None
  from sean_jax.models.sampler import pose_to_alpha  # pylint: disable=g-import-not-at-top
  return pose_to_alpha(pose, height, width)


class PhantomCaseSource:
  """Phantom cases ``generate_case(seed, start_index + i, config)``, made on demand.

  Intensities are HU: ``window_and_normalize(window)``; masks are already 0/1. With
  ``aspects`` a case carries ``"aspects_regions"``: (S, H, W) uint8 codes 0-20 of its
  true ASPECTS regions (``sean_jax.data.phantom_aspects``), with ``tissue``
  ``"tissue_labels"``: (S, H, W) uint8 codes of ``phantom.LABELS`` (which tissue each
  voxel is, distractors included); both resized by nearest neighbour.
  """

  def __init__(self, seed: int, num_cases: int, config=None, start_index: int = 0, *,
               image_size=None, window=None, shared_cache: int = 0,
               brain_mask: bool = False, aspects: bool = False, tissue: bool = False):
    if num_cases < 1:
      raise ValueError(f"PhantomCaseSource: num_cases must be >= 1, got {num_cases}")
    self.seed, self.num_cases, self.start_index = int(seed), int(num_cases), int(start_index)
    self.config = PhantomConfig() if config is None else config
    self.image_size, self.window = preprocess.as_size(image_size), window
    self.brain_mask = bool(brain_mask)
    self.aspects = bool(aspects)
    self.tissue = bool(tissue)
    # Prepared cases kept for every source of this process (a run of many trainings on
    # the same cases, such as sean_jax.tables, makes each case once); 0: no cache.
    self.shared_cache = int(shared_cache)

  def __len__(self) -> int:
    return self.num_cases

  def slice_counts(self) -> np.ndarray:
    return np.full(self.num_cases, self.config.slices, np.int64)

  def raw_case(self, i: int):
    """The :class:`PhantomCase` (HU, labels, pose dict) behind ``self[i]``."""
    from sean_jax.data.phantom import generate_case  # pylint: disable=g-import-not-at-top
    return generate_case(self.seed, self.start_index + _check_index(i, len(self)),
                         self.config)

  def __getitem__(self, i: int) -> dict:
    if not self.shared_cache:
      return self._prepare(i)
    key = (self.seed, self.start_index + _check_index(i, len(self)), self.config,
           self.image_size, None if self.window is None else tuple(self.window),
           self.brain_mask, self.aspects, self.tissue)
    with _PHANTOM_CACHE_LOCK:
      case = _PHANTOM_CACHE.pop(key, None)
    if case is None:
      case = self._prepare(i)
    with _PHANTOM_CACHE_LOCK:
      _PHANTOM_CACHE[key] = case  # most recent last
      while len(_PHANTOM_CACHE) > self.shared_cache:
        _PHANTOM_CACHE.pop(next(iter(_PHANTOM_CACHE)))
    return dict(case)

  def _prepare(self, i: int) -> dict:
    case = self.raw_case(i)
    _, h, w = case.ct_hu.shape
    out = preprocess.prepare_case(case.case_id, case.ct_hu, case.mask, intensity="hu",
                                  window=self.window, lesion_labels=None,
                                  image_size=self.image_size,
                                  pose=_pose_alpha(case.pose, h, w),
                                  spacing_mm=case.spacing_mm, brain_mask=self.brain_mask)
    height, width = out["image"].shape[1:]
    if self.aspects:
      from sean_jax.data import phantom_aspects  # pylint: disable=g-import-not-at-top
      regions = phantom_aspects.true_regions(case, self.seed, self.start_index + int(i),
                                             self.config)
      out["aspects_regions"] = _nearest(regions, height, width)
    if self.tissue:
      out["tissue_labels"] = _nearest(case.labels, height, width)
    return out


def _nearest(labels, height: int, width: int) -> np.ndarray:
  """(S, h, w) label codes -> (S, height, width), nearest pixel centre."""
  _, h, w = labels.shape
  rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
  return np.ascontiguousarray(labels[:, rows][:, :, cols])


_PHANTOM_CACHE: dict = {}  # see PhantomCaseSource.shared_cache
_PHANTOM_CACHE_LOCK = threading.Lock()


class TfdsCaseSource:
  """AISD cases from a dataset built by ``tfds_aisd``, read with ``tfds.data_source``.

  ``config_name`` ``"png"``: the images are 0..255 of an undocumented window, not HU, so
  they are z-scored per case *without* the HU clip (``window`` is not used).
  ``"dicom"``: HU, ``window_and_normalize(window)``. Which one is decided by each
  example's ``source`` field. Raw mask labels are mapped with ``lesion_labels``
  (default {1, 2, 3, 5} -> 1; 4 and 0 -> 0). AISD has no pose: NaN.

  Slice counts (needed up front for the slab index) are read on first use by decoding
  every case once, and kept for the life of the object.
  """

  def __init__(self, data_dir, config_name: str = "png", split: str = "train", *,
               lesion_labels: Sequence[int] | None = AISD_LESION_LABELS,
               image_size=None, window=None, brain_mask: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tfds_aisd  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    self.data_dir, self.config_name, self.split = os.fspath(data_dir), config_name, split
    self.lesion_labels = None if lesion_labels is None else tuple(lesion_labels)
    self.image_size, self.window = preprocess.as_size(image_size), window
    self.brain_mask = bool(brain_mask)
    self._ds = tfds.data_source(f"aisd/{config_name}", data_dir=self.data_dir,
                                split=split, download=False)
    self._slice_counts = None

  def __len__(self) -> int:
    return len(self._ds)

  def slice_counts(self) -> np.ndarray:
    if self._slice_counts is None:
      self._slice_counts = np.array(
          [np.shape(self._ds[i]["image"])[0] for i in range(len(self))], np.int64)
    return self._slice_counts

  def __getitem__(self, i: int) -> dict:
    ex = self._ds[_check_index(i, len(self))]
    source = _text(ex.get("source", self.config_name))
    case_id = _text(ex["case_id"])
    if source not in ("png", "dicom"):
      raise ValueError(f"case {case_id}: unknown AISD source {source!r}")
    return preprocess.prepare_case(case_id, ex["image"], ex["mask"],
                        intensity="hu" if source == "dicom" else "zscore",
                        window=self.window, lesion_labels=self.lesion_labels,
                        image_size=self.image_size, pose=None,
                        spacing_mm=ex.get("spacing_mm"),
                        brain_mask=self.brain_mask and source == "dicom")


class NiftiCaseSource:
  """Cases from a folder of ``<case_id>_ct.nii[.gz]`` + ``<case_id>_mask.nii[.gz]``
  (+ optional ``<case_id>.json`` with the pose), as ``python -m sean_jax.phantom``
  writes them. Images are read with ``sean_jax.data.nifti`` into model orientation and
  taken as HU. ``lesion_labels=None`` expects 0/1 masks (the phantom's).
  """

  def __init__(self, directory, *, lesion_labels: Sequence[int] | None = None,
               image_size=None, window=None, brain_mask: bool = False):
    self.directory = os.fspath(directory)
    self.brain_mask = bool(brain_mask)
    if not os.path.isdir(self.directory):
      raise ValueError(f"{self.directory}: not a directory")
    self.lesion_labels = None if lesion_labels is None else tuple(lesion_labels)
    self.image_size, self.window = preprocess.as_size(image_size), window
    cts = {}
    for suffix in ("_ct.nii.gz", "_ct.nii"):
      for path in glob.glob(os.path.join(glob.escape(self.directory), "*" + suffix)):
        cts.setdefault(os.path.basename(path)[:-len(suffix)], path)
    if not cts:
      raise ValueError(f"{self.directory}: no <case_id>_ct.nii.gz files")
    self.case_ids = sorted(cts)
    self._ct = [cts[c] for c in self.case_ids]
    self._mask = []
    for cid, ct in zip(self.case_ids, self._ct):
      mask = ct[:-len("_ct.nii.gz")] if ct.endswith(".gz") else ct[:-len("_ct.nii")]
      found = [mask + s for s in ("_mask.nii.gz", "_mask.nii") if os.path.exists(mask + s)]
      if not found:
        raise ValueError(f"case {cid}: no mask file {mask}_mask.nii.gz")
      self._mask.append(found[0])
    self._slice_counts = None

  def __len__(self) -> int:
    return len(self.case_ids)

  def slice_counts(self) -> np.ndarray:
    """From the headers only (the model's slice axis after reorientation)."""
    if self._slice_counts is None:
      import nibabel as nib  # pylint: disable=g-import-not-at-top
      from nibabel import orientations as nio  # pylint: disable=g-import-not-at-top
      from sean_jax.data import nifti  # pylint: disable=g-import-not-at-top
      model = nio.axcodes2ornt(nifti.MODEL_AXCODES)
      counts = []
      for path in self._ct:
        img = nib.load(path)
        to_model = nio.ornt_transform(nio.io_orientation(img.affine), model)
        axis = int(np.flatnonzero(to_model[:3, 0] == 0)[0])
        counts.append(int(img.shape[axis]))
      self._slice_counts = np.array(counts, np.int64)
    return self._slice_counts

  def __getitem__(self, i: int) -> dict:
    from sean_jax.data import nifti  # pylint: disable=g-import-not-at-top
    i = _check_index(i, len(self))
    cid = self.case_ids[i]
    ct, mask = nifti.load_pair(self._ct[i], self._mask[i])
    meta = {}
    meta_path = os.path.join(self.directory, cid + ".json")
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
    _, h, w = ct.data.shape
    return preprocess.prepare_case(cid, ct.data, mask.data, intensity="hu", window=self.window,
                        lesion_labels=self.lesion_labels, image_size=self.image_size,
                        pose=_pose_alpha(meta, h, w), spacing_mm=ct.spacing_mm,
                        brain_mask=self.brain_mask)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_index(i, n: int) -> int:
  i = int(i)
  if not 0 <= i < n:
    raise IndexError(f"case index {i} out of range [0, {n})")
  return i
