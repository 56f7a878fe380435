"""The input pipeline: cases -> labels -> intensities -> size -> (alignment) -> slabs
-> shuffled, batched, per-host batches. One pipeline for the phantom, AISD (TFDS) and
NIfTI folders; see ``docs/pipeline.md``.

Case sources
------------
A *case source* is random access over whole cases: ``len(source)`` and
``source[i] -> dict(case_id, image, mask, pose, spacing_mm)`` with

- ``image``: (S, H, W) float32, preprocessed (see below);
- ``mask``: (S, H, W) uint8 in {0, 1} (lesion labels already mapped);
- ``pose``: (3,) float32 alpha = (theta, tx, ty) in the convention of
  ``sean_jax.models.sampler`` (the transform that aligns the head), NaN when unknown;
- ``spacing_mm``: (3,) float32 (slice, row, col), NaN where unknown.

and, optionally, ``slice_counts() -> (len,) int array`` so the slab index can be built
without reading every case. Sources here: :class:`PhantomCaseSource`,
:class:`TfdsCaseSource` (AISD built with ``tfds_aisd``), :class:`NiftiCaseSource`
(a folder written by ``python -m sean_jax.phantom``). They all go through
:func:`prepare_case`:

1. checks (one-line ``ValueError`` naming the case and field);
2. labels: ``lesion_labels`` given -> ``isin(mask, lesion_labels)``; ``None`` -> the mask
   must already be 0/1;
3. intensities: ``"hu"`` -> ``preprocess.window_and_normalize`` (clip to the HU window,
   z-score per case); ``"zscore"`` -> z-score per case *without* a clip, for AISD's PNG
   images, which hold 0..255 of an undocumented window and are not HU;
4. optional in-plane resize to ``image_size`` (linear with antialiasing, the convention
   of ``jax.image.resize(..., "linear")``; the mask is resized the same way as 0/1 floats
   and thresholded at 0.5); the pose (normalised units) is unchanged, in-plane spacing
   scales.

Slabs and batches
-----------------
The slab index is every (case, slice) pair, in case order. A training epoch is a
permutation of it drawn from (seed, epoch) (:class:`EpochOrder`); the stream of epochs is
a ``grain.MapDataset`` that is mapped to slabs, cut into global batches and sharded with
grain (``.map``, ``.batch``, ``[h::n]``): host ``h`` of ``n`` takes rows
``[h B, (h + 1) B)`` of each global batch of ``n B``. Global step ``k`` is
``dataset[k]``: a pure function of (seed, k), so resuming at a step is slicing the
dataset. Epochs run on without a gap: a batch may straddle two epochs.

Prepared volumes (after the optional alignment hook) are kept in a per-iterator cache,
by default of every case, so each case is read, preprocessed and aligned once per
process; with a global shuffle a small cache would re-read a case for almost every slab.
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import math
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

__all__ = [
    "AISD_LESION_LABELS", "PhantomCaseSource", "TfdsCaseSource", "NiftiCaseSource",
    "prepare_case", "map_labels", "zscore", "resize_volume", "slab_index",
    "num_slabs", "steps_per_epoch", "make_train_dataset", "make_train_iterator",
    "make_alignment_dataset", "make_alignment_iterator", "make_eval_cases",
    "alignment_hook", "VolumeCache", "EpochOrder", "check_case",
]

# AISD raw mask labels counted as lesion (the authors' rule): 1 remote infarct,
# 2 clear, 3 blurred acute infarct, 5 infarct; 4 (invisible on CT) is background.
AISD_LESION_LABELS = (1, 2, 3, 5)

INTENSITY_MODES = ("hu", "zscore")


# ------------------------------------------------------------------ preprocessing


def map_labels(mask, lesion_labels: Sequence[int] | None, case_id: str = "?") -> np.ndarray:
  """Raw labels -> uint8 0/1. ``None``: the mask must already hold only 0 and 1."""
  mask = np.asarray(mask)
  if lesion_labels is None:
    if mask.size and (mask.min() < 0 or mask.max() > 1):
      extra = sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]
      raise ValueError(f"case {case_id}: mask holds labels {extra} besides 0/1; "
                       f"pass lesion_labels to map raw labels")
    return mask.astype(np.uint8)
  return np.isin(mask, np.asarray(tuple(lesion_labels))).astype(np.uint8)


def zscore(volume) -> np.ndarray:
  """Per-case z-score over every voxel, no clip (for intensities that are not HU).

  Same statistics as ``preprocess.window_and_normalize`` without its HU window; a
  constant volume maps to zeros. Returns float32.
  """
  v = np.asarray(volume, np.float64)
  mean, std = v.mean(), v.std()
  if not std > 1e-6 * max(float(np.abs(v).max()), 1.0):
    return np.zeros(v.shape, np.float32)
  return ((v - mean) / std).astype(np.float32)


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of linear interpolation with antialiasing (half-pixel
  centres; the triangle kernel widened by the downsampling factor), rows sum to 1."""
  scale = n_in / n_out
  centres = (np.arange(n_out) + 0.5) * scale - 0.5
  width = max(scale, 1.0)
  w = 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / width
  w = np.maximum(w, 0.0)
  return w / w.sum(axis=1, keepdims=True)


def resize_volume(volume, size: tuple[int, int]) -> np.ndarray:
  """In-plane resize of (S, H, W) to (S, *size): separable linear, antialiased."""
  v = np.asarray(volume, np.float32)
  h, w = v.shape[1:]
  out_h, out_w = size
  if (h, w) == (out_h, out_w):
    return v
  wy = _resize_weights(h, out_h).astype(np.float32)
  wx = _resize_weights(w, out_w).astype(np.float32)
  return np.einsum("yh,shw,xw->syx", wy, v, wx, optimize=True).astype(np.float32)


def _as_size(image_size) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, (int, np.integer)):
    image_size = (int(image_size), int(image_size))
  size = tuple(int(s) for s in image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
  return size


def check_case(case: dict, index: int | None = None) -> None:
  """Raises a one-line ``ValueError`` naming the case and field if ``case`` is unusable."""
  cid = f"{case.get('case_id', '?')}" + ("" if index is None else f" (index {index})")
  image, mask = case.get("image"), case.get("mask")
  if image is None or mask is None:
    raise ValueError(f"case {cid}: missing field {'image' if image is None else 'mask'}")
  image, mask = np.asarray(image), np.asarray(mask)
  if image.ndim != 3:
    raise ValueError(f"case {cid}: image must be (S, H, W), got shape {image.shape}")
  if image.shape[0] == 0 or min(image.shape) == 0:
    raise ValueError(f"case {cid}: image has 0 slices or pixels, shape {image.shape}")
  if mask.shape != image.shape:
    raise ValueError(f"case {cid}: mask shape {mask.shape} != image shape {image.shape}")
  finite = np.isfinite(image)
  if not finite.all():
    raise ValueError(f"case {cid}: image has {int(finite.size - finite.sum())} "
                     f"non-finite (NaN/inf) values")
  pose = case.get("pose")
  if pose is not None and np.shape(pose) != (3,):
    raise ValueError(f"case {cid}: pose must have shape (3,), got {np.shape(pose)}")


def prepare_case(case_id: str, image, mask, *, intensity: str, window=None,
                 lesion_labels: Sequence[int] | None = None, image_size=None,
                 pose=None, spacing_mm=None) -> dict:
  """Raw case -> the pipeline's case dict (see the module doc for each step).

  Args:
    case_id: for messages and the output.
    image: (S, H, W) raw intensities: HU for ``intensity="hu"``, anything else for
      ``"zscore"``.
    mask: (S, H, W) raw labels.
    intensity: ``"hu"`` (clip to ``window`` and z-score: ``window_and_normalize``) or
      ``"zscore"`` (z-score, no clip).
    window: HU window for ``"hu"``; ``None``: ``preprocess.DEFAULT_WINDOW``.
    lesion_labels: raw labels counted as lesion; ``None``: the mask must be 0/1.
    image_size: int or (H, W) to resize in-plane to; ``None``: keep.
    pose: (3,) alpha in the sampler's convention (size independent), or None -> NaN.
    spacing_mm: (slice, row, col) of the raw grid, or None -> NaN.
  """
  from sean_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  if intensity not in INTENSITY_MODES:
    raise ValueError(f"case {case_id}: intensity must be one of {INTENSITY_MODES}, "
                     f"got {intensity!r}")
  image = np.asarray(image)
  check_case({"case_id": case_id, "image": image, "mask": mask})
  mask = map_labels(mask, lesion_labels, case_id)
  if intensity == "hu":
    kwargs = {} if window is None else {"window": tuple(window)}
    image = preprocess.window_and_normalize(image, **kwargs)
  else:
    image = zscore(image)
  spacing = (np.full(3, np.nan, np.float32) if spacing_mm is None
             else np.asarray(spacing_mm, np.float32).reshape(3).copy())
  size = _as_size(image_size)
  if size is not None and size != image.shape[1:]:
    spacing[1] *= image.shape[1] / size[0]
    spacing[2] *= image.shape[2] / size[1]
    image = resize_volume(image, size)
    mask = (resize_volume(mask.astype(np.float32), size) >= 0.5).astype(np.uint8)
  pose = (np.full(3, np.nan, np.float32) if pose is None
          else np.asarray(pose, np.float32).reshape(3))
  return {"case_id": str(case_id), "image": np.ascontiguousarray(image, np.float32),
          "mask": np.ascontiguousarray(mask, np.uint8), "pose": pose,
          "spacing_mm": spacing}


def _pose_alpha(pose: dict | None, height: int, width: int) -> np.ndarray | None:
  """Pose dict (degrees, pixels of the raw grid) -> (3,) alpha, or None."""
  if not pose or not all(k in pose for k in ("rotation_deg", "shift_x_px", "shift_y_px")):
    return None
  from sean_jax.models.sampler import pose_to_alpha  # pylint: disable=g-import-not-at-top
  return pose_to_alpha(pose, height, width)


# ------------------------------------------------------------------------ sources


class PhantomCaseSource:
  """Phantom cases ``generate_case(seed, start_index + i, config)``, made on demand.

  Intensities are HU: ``window_and_normalize(window)``; masks are already 0/1.
  """

  def __init__(self, seed: int, num_cases: int, config=None, start_index: int = 0, *,
               image_size=None, window=None, shared_cache: int = 0):
    from sean_jax.data.phantom import PhantomConfig  # pylint: disable=g-import-not-at-top
    if num_cases < 1:
      raise ValueError(f"PhantomCaseSource: num_cases must be >= 1, got {num_cases}")
    self.seed, self.num_cases, self.start_index = int(seed), int(num_cases), int(start_index)
    self.config = PhantomConfig() if config is None else config
    self.image_size, self.window = _as_size(image_size), window
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
           self.image_size, None if self.window is None else tuple(self.window))
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
    return prepare_case(case.case_id, case.ct_hu, case.mask, intensity="hu",
                        window=self.window, lesion_labels=None,
                        image_size=self.image_size, pose=_pose_alpha(case.pose, h, w),
                        spacing_mm=case.spacing_mm)


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
               image_size=None, window=None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tfds_aisd  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    self.data_dir, self.config_name, self.split = os.fspath(data_dir), config_name, split
    self.lesion_labels = None if lesion_labels is None else tuple(lesion_labels)
    self.image_size, self.window = _as_size(image_size), window
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
    return prepare_case(case_id, ex["image"], ex["mask"],
                        intensity="hu" if source == "dicom" else "zscore",
                        window=self.window, lesion_labels=self.lesion_labels,
                        image_size=self.image_size, pose=None,
                        spacing_mm=ex.get("spacing_mm"))


class NiftiCaseSource:
  """Cases from a folder of ``<case_id>_ct.nii[.gz]`` + ``<case_id>_mask.nii[.gz]``
  (+ optional ``<case_id>.json`` with the pose), as ``python -m sean_jax.phantom``
  writes them. Images are read with ``sean_jax.data.nifti`` into model orientation and
  taken as HU. ``lesion_labels=None`` expects 0/1 masks (the phantom's).
  """

  def __init__(self, directory, *, lesion_labels: Sequence[int] | None = None,
               image_size=None, window=None):
    self.directory = os.fspath(directory)
    if not os.path.isdir(self.directory):
      raise ValueError(f"{self.directory}: not a directory")
    self.lesion_labels = None if lesion_labels is None else tuple(lesion_labels)
    self.image_size, self.window = _as_size(image_size), window
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
    return prepare_case(cid, ct.data, mask.data, intensity="hu", window=self.window,
                        lesion_labels=self.lesion_labels, image_size=self.image_size,
                        pose=_pose_alpha(meta, h, w), spacing_mm=ct.spacing_mm)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_index(i, n: int) -> int:
  i = int(i)
  if not 0 <= i < n:
    raise IndexError(f"case index {i} out of range [0, {n})")
  return i


# -------------------------------------------------------------------- slab index


def slab_index(source) -> tuple[np.ndarray, np.ndarray]:
  """Every (case, slice) pair in case order: (case_of, slice_of) int32 arrays.

  Slice counts come from ``source.slice_counts()`` when the source has it, otherwise
  from reading every case once.
  """
  if len(source) == 0:
    raise ValueError("source has no cases")
  if hasattr(source, "slice_counts"):
    counts = np.asarray(source.slice_counts(), np.int64)
  else:
    counts = np.array([np.shape(source[i]["image"])[0] for i in range(len(source))],
                      np.int64)
  if counts.shape != (len(source),):
    raise ValueError(f"slice_counts has shape {counts.shape}, source has {len(source)} "
                     f"cases")
  empty = np.flatnonzero(counts < 1)
  if empty.size:
    raise ValueError(f"case index {int(empty[0])}: 0 slices")
  case_of = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  slice_of = (np.arange(int(counts.sum())) - np.repeat(starts, counts)).astype(np.int32)
  return case_of, slice_of


def num_slabs(source) -> int:
  """Number of (case, slice) pairs: one training epoch."""
  return len(slab_index(source)[0])


def steps_per_epoch(source, batch_size: int) -> int:
  """Global steps that cover one epoch (``ceil(num_slabs / batch_size)``)."""
  return math.ceil(num_slabs(source) / batch_size)


# ------------------------------------------------------------------------- cache


class VolumeCache:
  """Thread-safe LRU of prepared volumes, loaded by ``load(case_index)``.

  ``max_cases=None`` keeps every case. A case being loaded by one thread is waited for,
  not loaded twice. ``loads`` counts calls of ``load``.
  """

  def __init__(self, load: Callable[[int], Any], max_cases: int | None = None):
    if max_cases is not None and max_cases < 1:
      raise ValueError(f"cache_cases must be >= 1 or None, got {max_cases}")
    self._load, self.max_cases = load, max_cases
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self._key_locks: dict[int, threading.Lock] = {}
    self.loads = 0

  def __len__(self) -> int:
    return len(self._items)

  def get(self, key: int):
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
      key_lock = self._key_locks.setdefault(key, threading.Lock())
    with key_lock:
      with self._lock:
        if key in self._items:
          self._items.move_to_end(key)
          return self._items[key]
        self.loads += 1
      value = self._load(key)
      with self._lock:
        self._items[key] = value
        while self.max_cases is not None and len(self._items) > self.max_cases:
          self._items.popitem(last=False)
        self._key_locks.pop(key, None)
    return value


def _load_checked(source, i: int, expected_slices: int) -> dict:
  case = source[i]
  check_case(case, i)
  if np.shape(case["image"])[0] != expected_slices:
    raise ValueError(f"case {case.get('case_id', '?')} (index {i}): image has "
                     f"{np.shape(case['image'])[0]} slices, the slab index expected "
                     f"{expected_slices}")
  return case


_WARP_MASK = []


def _warp_mask(mask: np.ndarray, alpha) -> np.ndarray:
  """Moves a 0/1 mask with the alignment transform (bilinear, >= 0.5), on the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  from sean_jax.models import sampler  # pylint: disable=g-import-not-at-top
  if not _WARP_MASK:
    _WARP_MASK.append(jax.jit(lambda m, a: sampler.warp(m[..., None], a)[..., 0] >= 0.5))
  cpu = jax.local_devices(backend="cpu")[0]
  warped = _WARP_MASK[0](jax.device_put(np.asarray(mask, np.float32), cpu),
                         jax.device_put(np.asarray(alpha, np.float32), cpu))
  return np.asarray(warped).astype(np.uint8)


def _aligned(case: dict, index: int, align_fn) -> dict:
  out = align_fn(case["image"], index)
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise ValueError(f"case {case.get('case_id', '?')} (index {index}): align_fn must "
                     f"return (aligned volume, alpha (3,)), got {type(out).__name__}")
  volume, alpha = np.asarray(out[0], np.float32), np.asarray(out[1], np.float32)
  if volume.shape != np.shape(case["image"]) or alpha.shape != (3,):
    raise ValueError(f"case {case.get('case_id', '?')} (index {index}): align_fn returned "
                     f"volume {volume.shape} / alpha {alpha.shape}, expected "
                     f"{np.shape(case['image'])} / (3,)")
  if not np.isfinite(volume).all():
    raise ValueError(f"case {case.get('case_id', '?')} (index {index}): aligned volume "
                     f"has non-finite values")
  return dict(case, image=volume, mask=_warp_mask(case["mask"], alpha), alpha=alpha)


# ------------------------------------------------------------------ datasets


class EpochOrder:
  """Flat (case, slice) pair indices, epoch after epoch: a grain data source.

  Item ``i`` is pair ``perm_e[i % N]`` of epoch ``e = i // N``, where ``perm_e`` is
  ``numpy.random.default_rng([seed, stream, e]).permutation(N)``: each epoch is a
  permutation of all N pairs, a pure function of (seed, epoch). The last two epochs'
  permutations are kept (a batch may straddle two epochs). The length is finite
  (2**61 items, never reached) because grain's ``batch`` computes its length as a float
  (``repeat()``'s ``sys.maxsize`` overflows it at batch size 1).

  grain's own ``MapDataset.shuffle`` is not used: its per-index Feistel shuffle
  cost 5 ms per index at N = 12 and 0.7 ms at N = 96 on the 2-core CPU (3-6 us from
  N = 10**4 up), more than the rest of the pipeline at the phantom's sizes.
  """

  def __init__(self, num_pairs: int, seed: int, stream: int):
    if int(seed) < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.num_pairs, self.seed, self.stream = int(num_pairs), int(seed), int(stream)
    self._epochs = max(1, 2**61 // self.num_pairs)
    self._perms: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._epochs * self.num_pairs

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        rng = np.random.default_rng([self.seed, self.stream, int(epoch)])
        perm = self._perms[epoch] = rng.permutation(self.num_pairs)
        while len(self._perms) > 2:
          self._perms.popitem(last=False)
      return perm

  def __getitem__(self, index: int) -> int:
    epoch, position = divmod(int(index), self.num_pairs)
    return int(self.permutation(epoch)[position])


def _check_batching(batch_size: int, shard_index, shard_count):
  import jax  # pylint: disable=g-import-not-at-top
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must lie in [0, shard_count "
                     f"{shard_count})")
  if batch_size < 1 or batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} (global) must be a positive multiple of "
                     f"shard_count {shard_count}")
  return batch_size // shard_count, shard_index, shard_count


def _stack(name: str):
  def batch_fn(items):
    shapes = {np.shape(it[name]) for it in items}
    if len(shapes) > 1:
      raise ValueError(f"field {name!r}: cases differ in size {sorted(shapes)}; set "
                       f"image_size on the source")
    return {k: np.stack([it[k] for it in items]) for k in items[0]}
  return batch_fn


def _batched(elements: grain.MapDataset, local_batch: int,
             shard_index: int, shard_count: int, key: str, start_step: int):
  ds = elements.batch(local_batch, batch_fn=_stack(key))
  return ds[shard_index::shard_count][int(start_step):]


def make_train_dataset(source, *, batch_size: int, slab_slices: int, seed: int,
                       start_step: int = 0, shard_index: int | None = None,
                       shard_count: int | None = None, align_fn=None,
                       cache_cases: int | None = None) -> grain.MapDataset:
  """This host's training batches as a random-access ``grain.MapDataset``.

  ``dataset[k]`` is the host's share of global step ``start_step + k``:
  ``{"slab": (B, 2T+1, H, W, 1) float32, "mask": (B, H, W) int32 (middle slice),
  "case_index": (B,) int32, "slice_index": (B,) int32}``, ``B = batch_size //
  shard_count`` (``batch_size`` is the global batch). The dataset is infinite.
  See :func:`make_train_iterator` for the arguments.
  """
  if slab_slices < 1 or slab_slices % 2 == 0:
    raise ValueError(f"slab_slices must be odd (2T+1), got {slab_slices}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  local_batch, shard_index, shard_count = _check_batching(batch_size, shard_index,
                                                          shard_count)
  case_of, slice_of = slab_index(source)
  counts = np.bincount(case_of, minlength=len(source))

  def load(i):
    case = _load_checked(source, i, int(counts[i]))
    if align_fn is not None:
      case = _aligned(case, i, align_fn)
    return case["image"], case["mask"]

  cache = VolumeCache(load, cache_cases)
  t = slab_slices // 2
  offsets = np.arange(-t, t + 1)

  def element(flat):
    c, s = int(case_of[flat]), int(slice_of[flat])
    image, mask = cache.get(c)
    rows = np.clip(s + offsets, 0, image.shape[0] - 1)  # edge slices replicated
    return {"slab": image[rows][..., None], "mask": mask[s].astype(np.int32),
            "case_index": np.int32(c), "slice_index": np.int32(s)}

  elements = grain.MapDataset.source(EpochOrder(len(case_of), seed, 0)).map(element)
  ds = _batched(elements, local_batch, shard_index, shard_count, "slab", start_step)
  ds.volume_cache = cache  # for tests and benchmarks
  return ds


def _iterate(ds: grain.MapDataset, prefetch_threads: int, prefetch_batches: int):
  if prefetch_threads <= 0:
    return (ds[k] for k in itertools.count())
  options = grain.ReadOptions(num_threads=prefetch_threads,
                              prefetch_buffer_size=max(prefetch_batches, 1))
  return iter(ds.to_iter_dataset(options))


def make_train_iterator(source, *, batch_size: int, slab_slices: int, seed: int,
                        start_step: int = 0, shard_index: int | None = None,
                        shard_count: int | None = None, align_fn=None,
                        cache_cases: int | None = None, prefetch_threads: int = 1,
                        prefetch_batches: int = 2) -> Iterator[dict]:
  """Infinite iterator of this host's training batches from global step ``start_step``.

  Args:
    source: a case source (see the module doc).
    batch_size: the GLOBAL batch; each host yields ``batch_size // shard_count`` rows,
      host ``h`` rows ``[h B, (h + 1) B)`` of every global batch.
    slab_slices: 2T+1 (odd); edge slices are replicated as in ``volume_to_slabs``.
    seed: the shuffle seed; epoch ``e`` is a permutation of every (case, slice) pair
      drawn from (seed, e), and the batch at global step ``k`` depends on (seed, k) only.
    start_step: global step to start from (resuming yields exactly what an
      uninterrupted run yields from that step on).
    shard_index, shard_count: this host and the number of hosts; default
      ``jax.process_index()``, ``jax.process_count()``.
    align_fn: optional ``align_fn(volume (S, H, W) float32, case_index) ->
      (aligned volume (S, H, W), alpha (3,))``, called once per case (the result is
      cached); the mask is moved with the same ``alpha`` (bilinear, >= 0.5). See
      :func:`alignment_hook`.
    cache_cases: how many prepared cases to keep (LRU); ``None``: all of them.
    prefetch_threads: threads that prepare batches ahead (grain ``ReadOptions``); 0:
      prepare each batch when asked. Order and content do not depend on it.
    prefetch_batches: batches prepared ahead.
  """
  ds = make_train_dataset(source, batch_size=batch_size, slab_slices=slab_slices,
                          seed=seed, start_step=start_step, shard_index=shard_index,
                          shard_count=shard_count, align_fn=align_fn,
                          cache_cases=cache_cases)
  return _iterate(ds, prefetch_threads, prefetch_batches)


def make_alignment_dataset(source, *, batch_size: int, seed: int, start_step: int = 0,
                           shard_index: int | None = None,
                           shard_count: int | None = None,
                           cache_cases: int | None = None) -> grain.MapDataset:
  """Stage 1 (alignment net, unsupervised): this host's batches of single slices.

  ``dataset[k]``: ``{"image": (B, H, W, 1) float32, the case's preprocessed volume minus
  its minimum (background 0, as ``sean_jax.models.alignment`` expects), "pose": (B, 3)
  float32 true alpha of the case (NaN when unknown), "case_index", "slice_index"}``.
  Shuffling, sharding and resuming as in :func:`make_train_dataset` (own seed stream).
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  local_batch, shard_index, shard_count = _check_batching(batch_size, shard_index,
                                                          shard_count)
  case_of, slice_of = slab_index(source)
  counts = np.bincount(case_of, minlength=len(source))

  def load(i):
    case = _load_checked(source, i, int(counts[i]))
    image = np.asarray(case["image"], np.float32)
    pose = case.get("pose")
    pose = np.full(3, np.nan, np.float32) if pose is None else np.asarray(pose, np.float32)
    return image - image.min(), pose

  cache = VolumeCache(load, cache_cases)

  def element(flat):
    c, s = int(case_of[flat]), int(slice_of[flat])
    image, pose = cache.get(c)
    return {"image": image[s][..., None], "pose": pose, "case_index": np.int32(c),
            "slice_index": np.int32(s)}

  elements = grain.MapDataset.source(EpochOrder(len(case_of), seed, 1)).map(element)
  ds = _batched(elements, local_batch, shard_index, shard_count, "image",
                start_step)
  ds.volume_cache = cache
  return ds


def make_alignment_iterator(source, *, batch_size: int, seed: int, start_step: int = 0,
                            shard_index: int | None = None,
                            shard_count: int | None = None,
                            cache_cases: int | None = None, prefetch_threads: int = 1,
                            prefetch_batches: int = 2) -> Iterator[dict]:
  """Infinite iterator over :func:`make_alignment_dataset` from ``start_step``."""
  ds = make_alignment_dataset(source, batch_size=batch_size, seed=seed,
                              start_step=start_step, shard_index=shard_index,
                              shard_count=shard_count, cache_cases=cache_cases)
  return _iterate(ds, prefetch_threads, prefetch_batches)


def make_eval_cases(source, *, shard_index: int = 0, shard_count: int = 1
                    ) -> Iterator[dict]:
  """Whole cases in source order, checked, with ``"case_index"`` added.

  With ``shard_count > 1`` this host gets cases ``shard_index::shard_count``.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must lie in [0, shard_count "
                     f"{shard_count})")
  for i in range(shard_index, len(source), shard_count):
    case = source[i]
    check_case(case, i)
    yield dict(case, case_index=i)


def alignment_hook(net, slice_weights: bool = True):
  """An ``align_fn`` for :func:`make_train_iterator` from a trained (frozen)
  ``AlignmentNet``: ``align_volume`` under ``jax.jit``, with the brain slices of
  ``preprocess.brain_slice_weights`` as the slices to trust when ``slice_weights``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sean_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sean_jax.models import alignment  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(net)

  @jax.jit
  def run(state, volume, weights):
    return alignment.align_volume(nnx.merge(graphdef, state), volume, weights)

  def align_fn(volume, case_index):
    del case_index
    volume = np.asarray(volume, np.float32)
    weights = (preprocess.brain_slice_weights(volume) if slice_weights
               else np.ones(volume.shape[0], np.float32))
    aligned, alpha = run(state, jnp.asarray(volume), jnp.asarray(weights))
    return np.asarray(aligned, np.float32), np.asarray(alpha, np.float32)

  return align_fn
