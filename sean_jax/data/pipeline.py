"""Slabs and batches: the cases of a source (``sean_jax.data.sources``) -> (alignment)
-> slabs of 2T+1 adjacent slices -> shuffled, batched, per-host batches, for training
(both stages) and whole cases for evaluation; see ``docs/pipeline.md``.

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
import itertools
import math
import threading
from typing import Any, Callable, Iterator

import grain
import numpy as np

from sean_jax.data.preprocess import check_case

__all__ = [
    "slab_index", "num_slabs", "steps_per_epoch", "make_train_dataset",
    "make_train_iterator", "make_alignment_dataset", "make_alignment_iterator",
    "make_eval_cases", "alignment_hook", "VolumeCache", "EpochOrder",
]


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


def alignment_hook(net, slice_weights: bool = True, refine: bool = False):
  """An ``align_fn`` for :func:`make_train_iterator` from a trained (frozen)
  ``AlignmentNet``: ``align_volume`` under ``jax.jit``, with the brain slices of
  ``preprocess.brain_slice_weights`` as the slices to trust when ``slice_weights``,
  and the symmetry refinement of the pose when ``refine``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sean_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sean_jax.models import alignment  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(net)

  @jax.jit
  def run(state, volume, weights):
    return alignment.align_volume(nnx.merge(graphdef, state), volume, weights,
                                  refine=refine)

  def align_fn(volume, case_index):
    del case_index
    volume = np.asarray(volume, np.float32)
    weights = (preprocess.brain_slice_weights(volume) if slice_weights
               else np.ones(volume.shape[0], np.float32))
    aligned, alpha = run(state, jnp.asarray(volume), jnp.asarray(weights))
    return np.asarray(aligned, np.float32), np.asarray(alpha, np.float32)

  return align_fn
