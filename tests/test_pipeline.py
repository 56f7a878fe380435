"""Tests of the input pipeline (sean_jax/data/pipeline.py)."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from sean_jax.data import pipeline as P
from sean_jax.data import sources as S
from sean_jax.data import preprocess
from sean_jax.data.phantom import PhantomConfig, generate_case

import fake_aisd  # noqa: E402  (tests/ is on sys.path under pytest)

TINY = PhantomConfig(size=32, slices=6)


class ListSource:
  """In-memory case source: cases already preprocessed."""

  def __init__(self, slice_counts, size=(8, 12), seed=0):
    rng = np.random.default_rng(seed)
    self.cases = []
    for i, s in enumerate(slice_counts):
      image = rng.normal(size=(s, *size)).astype(np.float32)
      mask = (rng.random((s, *size)) < 0.3).astype(np.uint8)
      self.cases.append({"case_id": f"c{i}", "image": image, "mask": mask,
                         "pose": np.full(3, np.nan, np.float32),
                         "spacing_mm": np.ones(3, np.float32)})
    self.reads = 0

  def __len__(self):
    return len(self.cases)

  def slice_counts(self):  # pylint: disable=method-hidden
    return np.array([c["image"].shape[0] for c in self.cases])

  def __getitem__(self, i):
    self.reads += 1
    return self.cases[i]


class _NoCounts(ListSource):
  slice_counts = property()  # hasattr() is False: the index reads every case


def _rows(batches):
  return np.concatenate([np.stack([b["case_index"], b["slice_index"]], 1)
                         for b in batches])


def _train(source, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  kw.setdefault("slab_slices", 3)
  return P.make_train_dataset(source, **kw)


# ---------------------------------------------------------------- index, epochs


def test_slab_index_varying_slice_counts():
  case_of, slice_of = P.slab_index(ListSource([3, 1, 4]))
  assert case_of.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
  assert slice_of.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
  src = _NoCounts([2, 3])
  assert P.num_slabs(src) == 5 and src.reads == 2
  assert P.steps_per_epoch(ListSource([3, 1, 4]), 3) == 3


@pytest.mark.parametrize("batch_size", [4, 5])
def test_every_pair_once_per_epoch(batch_size):
  src = ListSource([3, 5, 1, 4, 2])  # 15 pairs; batch 4 straddles epochs
  n = 15
  ds = _train(src, batch_size=batch_size, seed=3)
  steps = -(-3 * n // batch_size) + 1
  rows = _rows([ds[k] for k in range(steps)])
  expected = sorted(zip(*P.slab_index(src)))
  epochs = [rows[e * n:(e + 1) * n] for e in range(3)]
  for ep in epochs:
    assert sorted(map(tuple, ep.tolist())) == [tuple(map(int, p)) for p in expected]
  assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled each epoch


def test_deterministic_and_seed_dependent():
  src = ListSource([4, 4, 4])
  a = [_train(src, batch_size=4, seed=7)[k] for k in range(5)]
  b = [_train(src, batch_size=4, seed=7)[k] for k in range(5)]
  c = [_train(src, batch_size=4, seed=8)[k] for k in range(5)]
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert _rows(a).tolist() != _rows(c).tolist()


def test_resume_at_step_equals_uninterrupted():
  src = ListSource([3, 5, 2, 4])
  full = P.make_train_iterator(src, batch_size=4, slab_slices=3, seed=11,
                               shard_index=0, shard_count=1, prefetch_threads=2)
  uninterrupted = [next(full) for _ in range(10)]
  resumed = P.make_train_iterator(src, batch_size=4, slab_slices=3, seed=11,
                                  start_step=6, shard_index=0, shard_count=1,
                                  prefetch_threads=0)
  for k in range(6, 10):
    got = next(resumed)
    for key in got:
      np.testing.assert_array_equal(got[key], uninterrupted[k][key])


def test_two_shards_make_the_global_batch():
  src = ListSource([3, 5, 2, 4])
  glob = _train(src, batch_size=6, seed=5)
  shards = [_train(src, batch_size=6, seed=5, shard_index=h, shard_count=2)
            for h in range(2)]
  for k in range(8):
    g = glob[k]
    parts = [s[k] for s in shards]
    assert parts[0]["slab"].shape[0] == 3
    for key in g:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), g[key])
  # Disjoint within an epoch: 14 pairs = steps 0, 1 (12 rows) of the global stream.
  a = set(map(tuple, _rows([shards[0][k] for k in range(2)]).tolist()))
  b = set(map(tuple, _rows([shards[1][k] for k in range(2)]).tolist()))
  assert len(a) == len(b) == 6 and not a & b


def test_default_shard_is_this_process():
  ds = P.make_train_dataset(ListSource([4]), batch_size=2, slab_slices=1, seed=0)
  assert ds[0]["slab"].shape == (2, 1, 8, 12, 1)


# ---------------------------------------------------------------- content


def test_slab_content_equals_volume_to_slabs():
  import jax
  from sean_jax.models.sean import volume_to_slabs
  src = ListSource([1, 2, 5])
  for slab_slices in (1, 3, 5):
    ds = _train(src, batch_size=4, seed=2, slab_slices=slab_slices)
    slabs = {i: np.asarray(jax.jit(volume_to_slabs, static_argnums=1)(
        c["image"], slab_slices))
             for i, c in enumerate(src.cases)}
    for k in range(3):
      b = ds[k]
      for j in range(4):
        c, s = int(b["case_index"][j]), int(b["slice_index"][j])
        np.testing.assert_array_equal(b["slab"][j], slabs[c][s])
        np.testing.assert_array_equal(b["mask"][j], src.cases[c]["mask"][s])


def test_phantom_batches_shapes_dtypes():
  src = S.PhantomCaseSource(seed=0, num_cases=3, config=TINY)
  it = P.make_train_iterator(src, batch_size=4, slab_slices=3, seed=0,
                             shard_index=0, shard_count=1)
  b = next(it)
  assert b["slab"].shape == (4, 3, 32, 32, 1) and b["slab"].dtype == np.float32
  assert b["mask"].shape == (4, 32, 32) and b["mask"].dtype == np.int32
  assert b["case_index"].shape == (4,) and b["case_index"].dtype == np.int32
  assert b["slice_index"].dtype == np.int32
  assert set(np.unique(b["mask"]).tolist()) <= {0, 1}


def test_phantom_source_matches_generator():
  from sean_jax.models.sampler import pose_to_alpha
  src = S.PhantomCaseSource(seed=4, num_cases=2, config=TINY, start_index=5)
  case = generate_case(4, 6, TINY)
  got = src[1]
  assert got["case_id"] == case.case_id
  np.testing.assert_array_equal(got["image"], preprocess.window_and_normalize(case.ct_hu))
  np.testing.assert_array_equal(got["mask"], case.mask)
  np.testing.assert_allclose(got["pose"], np.asarray(pose_to_alpha(case.pose, 32, 32)))
  np.testing.assert_allclose(got["spacing_mm"], case.spacing_mm)
  assert src.slice_counts().tolist() == [6, 6]


def test_resize_to_model_size():
  src = S.PhantomCaseSource(seed=0, num_cases=1, config=PhantomConfig(size=64, slices=6),
                            image_size=32)
  full = S.PhantomCaseSource(seed=0, num_cases=1, config=PhantomConfig(size=64, slices=6))
  got, ref = src[0], full[0]
  assert got["image"].shape == got["mask"].shape == (6, 32, 32)
  assert set(np.unique(got["mask"]).tolist()) <= {0, 1}
  np.testing.assert_allclose(got["spacing_mm"][1:], 2 * ref["spacing_mm"][1:])
  np.testing.assert_array_equal(got["pose"], ref["pose"])  # normalised: size free
  # Same convention as jax.image.resize (linear, antialiased).
  import jax
  want = jax.image.resize(ref["image"], (6, 32, 32), "linear", antialias=True)
  np.testing.assert_allclose(got["image"], np.asarray(want), atol=1e-5)
  up = preprocess.resize_volume(ref["image"][:, :20, :24], (30, 36))
  want = jax.image.resize(ref["image"][:, :20, :24], (6, 30, 36), "linear")
  np.testing.assert_allclose(up, np.asarray(want), atol=1e-5)


def test_tissue_labels_on_the_model_grid():
  """``tissue=True``: the phantom's tissue codes at the pixel centres of the model grid
  (every other pixel of the 64-pixel labels at 32), the lesion among them."""
  from sean_jax.data import phantom  # pylint: disable=g-import-not-at-top
  config = PhantomConfig(size=64, slices=6)
  src = S.PhantomCaseSource(seed=0, num_cases=1, config=config, image_size=32,
                            tissue=True)
  labels = src.raw_case(0).labels
  got = src[0]["tissue_labels"]
  assert got.shape == (6, 32, 32) and got.dtype == labels.dtype
  np.testing.assert_array_equal(got, labels[:, 1::2, 1::2])
  assert "tissue_labels" not in S.PhantomCaseSource(seed=0, num_cases=1, config=config)[0]
  assert (got == phantom.LABELS["white_matter"]).any()


# ---------------------------------------------------------------- AISD via TFDS


@pytest.fixture(scope="module")
def aisd_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  import tfds_aisd
  try:
    import pydicom  # noqa: F401
    configs = ("png", "dicom")
  except ImportError:
    configs = ("png",)
  root = tmp_path_factory.mktemp("aisd")
  fake = fake_aisd.write_fake_aisd(str(root / "manual"), dicom="dicom" in configs)
  for config in configs:
    tfds_aisd.Aisd(config=config, data_dir=str(root / "data")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=fake.root, try_download_gcs=False))
  return str(root / "data"), fake, configs


def test_tfds_png_label_mapping_and_zscore(aisd_dir):
  data_dir, fake, _ = aisd_dir
  src = S.TfdsCaseSource(data_dir, "png", "train")
  assert len(src) >= 3
  for i in range(len(src)):
    got = src[i]
    raw = fake.cases[got["case_id"]]
    np.testing.assert_array_equal(got["mask"], np.isin(raw.mask, (1, 2, 3, 5)))
    # PNG grey values are not HU: z-scored without the HU clip.
    np.testing.assert_allclose(got["image"], preprocess.zscore(raw.image), atol=1e-6)
    assert np.isnan(got["pose"]).all()
    assert got["spacing_mm"][0] == 5.0
  assert src.slice_counts().tolist() == [src[i]["image"].shape[0] for i in range(len(src))]
  has4 = next(i for i in range(len(src)) if (fake.cases[src[i]["case_id"]].mask == 4).any())
  cid = src[has4]["case_id"]
  assert not src[has4]["mask"][fake.cases[cid].mask == 4].any()  # 4 -> background
  four = S.TfdsCaseSource(data_dir, "png", "train", lesion_labels=(1, 2, 3, 4, 5))
  np.testing.assert_array_equal(four[has4]["mask"], fake.cases[cid].mask > 0)
  b = next(P.make_train_iterator(src, batch_size=2, slab_slices=3, seed=0,
                                 shard_index=0, shard_count=1))
  assert b["slab"].shape == (2, 3, 32, 32, 1)


def test_tfds_dicom_is_hu(aisd_dir):
  data_dir, fake, configs = aisd_dir
  if "dicom" not in configs:
    pytest.skip("pydicom not installed")
  src = S.TfdsCaseSource(data_dir, "dicom", "train")
  for i in range(len(src)):
    got = src[i]
    raw = fake.cases[got["case_id"]]
    np.testing.assert_allclose(got["image"], preprocess.window_and_normalize(raw.hu),
                               atol=1e-6)
    np.testing.assert_array_equal(got["mask"], np.isin(raw.mask, (1, 2, 3, 5)))


# ---------------------------------------------------------------- NIfTI


def test_nifti_source_reads_phantom_cli(tmp_path):
  from sean_jax import phantom as cli
  out = tmp_path / "cases"
  assert cli.main(["--out", str(out), "--num-cases", "2", "--seed", "3",
                   "--size", "32", "--slices", "6", "--start-index", "1"]) == 0
  src = S.NiftiCaseSource(out)
  ref = S.PhantomCaseSource(seed=3, num_cases=2, config=TINY, start_index=1)
  assert len(src) == 2 and src.slice_counts().tolist() == [6, 6]
  for i in range(2):
    got, want, raw = src[i], ref[i], ref.raw_case(i)
    assert got["case_id"] == want["case_id"]
    # The CLI stores HU rounded to int16.
    np.testing.assert_allclose(
        got["image"], preprocess.window_and_normalize(np.rint(raw.ct_hu)), atol=1e-5)
    np.testing.assert_array_equal(got["mask"], want["mask"])
    np.testing.assert_allclose(got["pose"], want["pose"], atol=1e-6)
    np.testing.assert_allclose(got["spacing_mm"], want["spacing_mm"], rtol=1e-5)
  cases = list(P.make_eval_cases(src))
  assert [c["case_index"] for c in cases] == [0, 1]
  # Without the JSON the pose is unknown.
  os.remove(out / f"{src.case_ids[0]}.json")
  assert np.isnan(S.NiftiCaseSource(out)[0]["pose"]).all()


# ---------------------------------------------------------------- alignment


def test_align_hook_called_once_per_case_and_moves_mask():
  src = ListSource([3, 4, 2], size=(16, 16))
  calls = []
  lock = threading.Lock()
  alpha = np.array([0.0, 0.25, 0.0], np.float32)  # 2 px right at width 16

  def align_fn(volume, case_index):
    with lock:
      calls.append(case_index)
    return volume + 1.0, alpha

  it = P.make_train_iterator(src, batch_size=3, slab_slices=3, seed=1, shard_index=0,
                             shard_count=1, align_fn=align_fn, prefetch_threads=2)
  batches = [next(it) for _ in range(12)]  # 4 epochs
  assert sorted(calls) == [0, 1, 2]
  b = batches[0]
  c, s = int(b["case_index"][0]), int(b["slice_index"][0])
  np.testing.assert_array_equal(b["slab"][0, 1, ..., 0], src.cases[c]["image"][s] + 1.0)
  # warp samples A(x + 2): the mask moves 2 px left, zeros come in on the right.
  np.testing.assert_array_equal(b["mask"][0, :, :-2], src.cases[c]["mask"][s][:, 2:])
  assert not b["mask"][0, :, -2:].any()


def test_align_hook_must_return_alpha():
  src = ListSource([2])
  ds = _train(src, batch_size=1, seed=0, align_fn=lambda v, i: v)
  with pytest.raises(ValueError, match=r"c0.*align_fn must return"):
    ds[0]


def test_alignment_hook_from_net():
  from flax import nnx
  from sean_jax.models.alignment import AlignmentNet
  src = S.PhantomCaseSource(seed=0, num_cases=2, config=TINY)
  net = AlignmentNet(input_size=32, rngs=nnx.Rngs(0))  # fc at zero: identity
  hook = P.alignment_hook(net)
  ds = _train(src, batch_size=2, seed=0, align_fn=hook)
  b = ds[0]
  c, s = int(b["case_index"][0]), int(b["slice_index"][0])
  np.testing.assert_allclose(b["slab"][0, 1, ..., 0], src[c]["image"][s], atol=1e-4)
  np.testing.assert_array_equal(b["mask"][0], src[c]["mask"][s])


def test_alignment_iterator():
  src = S.PhantomCaseSource(seed=1, num_cases=2, config=TINY)
  ds = P.make_alignment_dataset(src, batch_size=4, seed=0, shard_index=0,
                                shard_count=1)
  rows = []
  for k in range(3):  # 12 slices = one epoch
    b = ds[k]
    assert b["image"].shape == (4, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["pose"].shape == (4, 3) and b["pose"].dtype == np.float32
    for j in range(4):
      c, s = int(b["case_index"][j]), int(b["slice_index"][j])
      vol = src[c]["image"]
      np.testing.assert_array_equal(b["image"][j, ..., 0], vol[s] - vol.min())
      np.testing.assert_array_equal(b["pose"][j], src[c]["pose"])
      rows.append((c, s))
  assert sorted(rows) == [(c, s) for c in range(2) for s in range(6)]
  it = P.make_alignment_iterator(src, batch_size=4, seed=0, start_step=2,
                                 shard_index=0, shard_count=1)
  np.testing.assert_array_equal(next(it)["image"], ds[2]["image"])


# ---------------------------------------------------------------- errors


def _bad(**change):
  src = ListSource([3, 3])
  src.cases[1] = dict(src.cases[1], **change)
  return src


@pytest.mark.parametrize("change, match", [
    ({"image": np.full((3, 8, 12), np.nan, np.float32)}, r"case c1 \(index 1\).*non-finite"),
    ({"mask": np.zeros((3, 8, 10), np.uint8)}, r"case c1 \(index 1\): mask shape"),
    ({"image": np.zeros((2, 8, 12), np.float32),
      "mask": np.zeros((2, 8, 12), np.uint8)}, r"c1 \(index 1\).*2 slices.*expected 3"),
])
def test_invalid_case_raises(change, match):
  src = _bad(**change)
  src.slice_counts = lambda: np.array([3, 3])  # what the index was told
  ds = _train(src, batch_size=6, seed=0)
  with pytest.raises(ValueError, match=match) as info:
    ds[0]
  assert "\n" not in str(info.value)


def test_invalid_arguments_raise():
  src = ListSource([3, 0])
  with pytest.raises(ValueError, match=r"case index 1: 0 slices"):
    _train(src, batch_size=2, seed=0)
  src = ListSource([3])
  with pytest.raises(ValueError, match=r"batch_size 3.*shard_count 2"):
    _train(src, batch_size=3, seed=0, shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match=r"slab_slices must be odd"):
    _train(src, batch_size=2, seed=0, slab_slices=4)
  with pytest.raises(ValueError, match=r"case x: mask holds labels \[4\]"):
    preprocess.prepare_case("x", np.zeros((2, 4, 4)), np.full((2, 4, 4), 4), intensity="hu")
  with pytest.raises(ValueError, match=r"case x: image has 0 slices"):
    preprocess.prepare_case("x", np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), intensity="hu")
  with pytest.raises(ValueError, match=r"case x: image has 1 non-finite"):
    img = np.zeros((2, 4, 4))
    img[1, 2, 3] = np.nan
    preprocess.prepare_case("x", img, np.zeros((2, 4, 4)), intensity="zscore")
  with pytest.raises(ValueError, match=r"case c0.*mask shape"):
    src.cases[0]["mask"] = np.zeros((3, 8, 8), np.uint8)
    list(P.make_eval_cases(src))


def test_cases_of_different_size_need_image_size():
  src = ListSource([2, 2])
  src.cases[1] = dict(src.cases[1], image=np.zeros((2, 8, 8), np.float32),
                      mask=np.zeros((2, 8, 8), np.uint8))
  ds = _train(src, batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"field 'slab'.*image_size"):
    ds[0]


def test_lru_cache_bound():
  src = ListSource([2, 2, 2, 2])
  ds = _train(src, batch_size=2, seed=0, cache_cases=2)
  for k in range(8):
    ds[k]
  assert len(ds.volume_cache) == 2
  assert ds.volume_cache.loads > 4
  full = _train(src, batch_size=2, seed=0)
  for k in range(8):
    full[k]
  assert full.volume_cache.loads == 4  # default: every case prepared once


def test_shared_phantom_cache_makes_each_case_once(monkeypatch):
  """Sources of one process with shared_cache reuse prepared cases (the tables runner
  trains many models on the same cases); the cache is bounded and keyed on the case."""
  calls = []
  real = S.PhantomCaseSource.raw_case
  monkeypatch.setattr(S.PhantomCaseSource, "raw_case",
                      lambda self, i: calls.append(i) or real(self, i))
  monkeypatch.setattr(S, "_PHANTOM_CACHE", {})
  first = S.PhantomCaseSource(seed=5, num_cases=3, config=TINY, shared_cache=2)
  again = S.PhantomCaseSource(seed=5, num_cases=3, config=TINY, shared_cache=2)
  other_seed = S.PhantomCaseSource(seed=6, num_cases=3, config=TINY, shared_cache=2)
  a = first[0]
  b = again[0]
  assert calls == [0]
  np.testing.assert_array_equal(a["image"], b["image"])
  other_seed[0]
  assert calls == [0, 0]  # another seed is another case
  first[1]  # evicts seed 5 case 0 (least recently used)
  again[0]
  assert calls == [0, 0, 1, 0] and len(S._PHANTOM_CACHE) == 2
  np.testing.assert_array_equal(a["image"], S.PhantomCaseSource(5, 3, TINY)[0]["image"])
