"""sean_jax.metrics against hand-made cases and a brute-force (flood fill, sets) version."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sean_jax import metrics
from sean_jax.metrics import DetectionCounts


def vol(shape=(4, 8, 8)):
  return np.zeros(shape, np.uint8)


# ------------------------------------------------------------------- brute force


def offsets(connectivity):
  out = []
  for d in itertools.product((-1, 0, 1), repeat=3):
    nonzero = sum(1 for v in d if v)
    if 0 < nonzero and (connectivity == 26 or (connectivity == 18 and nonzero <= 2)
                        or (connectivity == 6 and nonzero == 1)):
      out.append(d)
  return out


def components_bf(mask, connectivity):
  """List of sets of voxel tuples, by breadth-first flood fill."""
  todo = {tuple(int(v) for v in p) for p in zip(*np.nonzero(mask))}
  nbrs = offsets(connectivity)
  comps = []
  while todo:
    seed = todo.pop()
    comp, frontier = {seed}, [seed]
    while frontier:
      p = frontier.pop()
      for d in nbrs:
        q = (p[0] + d[0], p[1] + d[1], p[2] + d[2])
        if q in todo:
          todo.remove(q)
          comp.add(q)
          frontier.append(q)
    comps.append(comp)
  return comps


def counts_bf(pred, ref, connectivity=26, overlap="any", min_overlap=0.5):
  rc, pc = components_bf(ref, connectivity), components_bf(pred, connectivity)
  p_all = set().union(*pc) if pc else set()
  r_all = set().union(*rc) if rc else set()
  if overlap == "any":
    found = [bool(r & p_all) for r in rc]
    touch = [bool(p & r_all) for p in pc]
  elif overlap == "fraction":
    found = [len(r & p_all) >= min_overlap * len(r) for r in rc]
    touch = [len(p & r_all) >= min_overlap * len(p) for p in pc]
  else:
    iou = lambda a, b: len(a & b) / len(a | b)
    found = [any(len(r & p) and iou(r, p) >= min_overlap for p in pc) for r in rc]
    touch = [any(len(r & p) and iou(r, p) >= min_overlap for r in rc) for p in pc]
  return DetectionCounts(sum(found), len(rc) - sum(found), sum(touch),
                         len(pc) - sum(touch))


def dice_bf(pred, ref):
  p = {tuple(x) for x in np.argwhere(pred)}
  r = {tuple(x) for x in np.argwhere(ref)}
  return 1.0 if not p and not r else 2 * len(p & r) / (len(p) + len(r))


# -------------------------------------------------------------------------- dice


def test_dice_empty_cases():
  e, f = vol(), vol()
  f[1, 2:4, 2:4] = 1
  assert metrics.dice(e, e) == 1.0
  assert metrics.dice(e, f) == 0.0
  assert metrics.dice(f, e) == 0.0
  assert metrics.dice(f, f) == 1.0


def test_dice_value_and_nonbinary_input():
  p, r = vol(), vol()
  p[0, 0, 0:4] = 1          # 4 voxels
  r[0, 0, 2:8] = 3          # 6 voxels, label 3 counts as foreground
  assert metrics.dice(p, r) == pytest.approx(2 * 2 / 10)


def test_dice_shape_mismatch():
  with pytest.raises(ValueError, match="shape"):
    metrics.dice(vol(), vol((4, 8, 9)))


def test_global_dice_weights_voxels():
  p1, r1 = vol(), vol()
  r1[0, :4, :4] = 1; p1[0, :4, :4] = 1          # 16/16 perfect
  p2, r2 = vol(), vol()
  r2[0, 0, 0] = 1                               # 1 voxel missed
  g = metrics.GlobalDice()
  g.add(p1, r1); g.add(p2, r2)
  assert g.value() == pytest.approx(2 * 16 / (16 + 17))
  assert metrics.global_dice([(p1, r1), (p2, r2)]) == pytest.approx(g.value())
  assert metrics.global_dice([(vol(), vol())]) == 1.0
  assert metrics.global_dice([]) == 1.0


# --------------------------------------------------------------------- detection


def test_detection_empty_empty():
  c = metrics.detection_counts(vol(), vol())
  assert c == DetectionCounts(0, 0, 0, 0)
  assert metrics.detection_scores(c) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_detection_empty_pred_nonempty_ref():
  r = vol(); r[1, 1:3, 1:3] = 1
  c = metrics.detection_counts(vol(), r)
  assert c == DetectionCounts(0, 1, 0, 0)
  assert metrics.detection_scores(c) == {"precision": 1.0, "recall": 0.0, "f1": 0.0}


def test_detection_nonempty_pred_empty_ref():
  p = vol(); p[1, 1:3, 1:3] = 1
  c = metrics.detection_counts(p, vol())
  assert c == DetectionCounts(0, 0, 0, 1)
  assert metrics.detection_scores(c) == {"precision": 0.0, "recall": 1.0, "f1": 0.0}


def test_one_lesion_split_in_two_predicted_pieces():
  r = vol(); r[1, 2, 1:7] = 1
  p = vol(); p[1, 2, 1:3] = 1; p[1, 2, 5:7] = 1     # two pieces, both inside
  assert metrics.detection_counts(p, r) == DetectionCounts(1, 0, 2, 0)
  # IoU rule: each piece has IoU 2/6 with the lesion.
  assert metrics.detection_counts(p, r, overlap="iou", min_overlap=0.3) == \
      DetectionCounts(1, 0, 2, 0)
  assert metrics.detection_counts(p, r, overlap="iou", min_overlap=0.5) == \
      DetectionCounts(0, 1, 0, 2)
  # Fraction rule: 4 of 6 lesion voxels predicted; every predicted voxel is inside.
  assert metrics.detection_counts(p, r, overlap="fraction", min_overlap=0.6) == \
      DetectionCounts(1, 0, 2, 0)
  assert metrics.detection_counts(p, r, overlap="fraction", min_overlap=0.7) == \
      DetectionCounts(0, 1, 2, 0)


def test_two_lesions_one_found_and_a_false_positive():
  r = vol(); r[0, 0:2, 0:2] = 1; r[3, 5:8, 5:8] = 1
  p = vol(); p[0, 1, 1] = 1                # touches lesion 1
  p[2, 0:2, 6:8] = 1                       # false positive blob, far from both
  c = metrics.detection_counts(p, r)
  assert c == DetectionCounts(1, 1, 1, 1)
  s = metrics.detection_scores(c)
  assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == pytest.approx(0.5)


def test_diagonal_voxels_connectivity():
  r = vol(); r[1, 1, 1] = 1; r[2, 2, 2] = 1      # touch at a corner only
  p = vol(); p[1, 1, 1] = 1                      # hits the first voxel only
  assert metrics.label_components(r, 26)[1] == 1
  assert metrics.label_components(r, 18)[1] == 2
  assert metrics.label_components(r, 6)[1] == 2
  assert metrics.detection_counts(p, r, connectivity=26) == DetectionCounts(1, 0, 1, 0)
  assert metrics.detection_counts(p, r, connectivity=6) == DetectionCounts(1, 1, 1, 0)
  # Edge neighbours: one component under 18 and 26, two under 6.
  e = vol(); e[1, 1, 1] = 1; e[1, 2, 2] = 1
  assert [metrics.label_components(e, c)[1] for c in (6, 18, 26)] == [2, 1, 1]


def test_detection_sums_over_cases():
  a = DetectionCounts(1, 2, 3, 4) + DetectionCounts(10, 20, 30, 40)
  assert a == DetectionCounts(11, 22, 33, 44)
  assert (a.num_ref, a.num_pred) == (33, 77)


def test_bad_options():
  with pytest.raises(ValueError, match="connectivity"):
    metrics.detection_counts(vol(), vol(), connectivity=8)
  with pytest.raises(ValueError, match="overlap"):
    metrics.detection_counts(vol(), vol(), overlap="dice")
  with pytest.raises(ValueError, match="min_overlap"):
    metrics.detection_counts(vol(), vol(), overlap="iou", min_overlap=0)
  with pytest.raises(ValueError, match="3D"):
    metrics.label_components(np.zeros((4, 4)))


@pytest.mark.parametrize("seed", range(6))
def test_random_volumes_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = (4, 9, 10)
  density = rng.uniform(0.05, 0.3)
  ref = rng.random(shape) < density
  pred = (ref & (rng.random(shape) < 0.6)) | (rng.random(shape) < density / 2)
  assert metrics.dice(pred, ref) == pytest.approx(dice_bf(pred, ref))
  for conn in (6, 18, 26):
    assert metrics.label_components(ref, conn)[1] == len(components_bf(ref, conn))
    for overlap, mo in (("any", 0.5), ("fraction", 0.5), ("iou", 0.25)):
      got = metrics.detection_counts(pred, ref, connectivity=conn, overlap=overlap,
                                     min_overlap=mo)
      assert got == counts_bf(pred, ref, conn, overlap, mo), (conn, overlap)


# --------------------------------------------------------------------- alignment


def test_alignment_error_wraps_angles():
  h = w = 64
  a = np.array([math.radians(179.0), 0.0, 0.0])
  b = np.array([math.radians(-179.0), 0.0, 0.0])
  rot, shift = metrics.alignment_error(a, b, h, w)
  assert rot == pytest.approx(2.0) and shift == pytest.approx(0.0)
  rot, _ = metrics.alignment_error([math.radians(10), 0, 0], [math.radians(-5), 0, 0], h, w)
  assert rot == pytest.approx(15.0)


def test_alignment_error_shift_in_pixels():
  # tx = 0.1 of the half-width: 0.1 * 64 / 2 = 3.2 px at W = 64, 12.8 at 256.
  assert metrics.alignment_error([0, 0.1, 0.3], [0, 0, 0], 64, 64)[1] == pytest.approx(3.2)
  assert metrics.alignment_error([0, 0.1, 0], [0, 0, 0], 32, 256)[1] == pytest.approx(12.8)
  assert metrics.alignment_error([0, 0.1, 0.3], [0, 0, 0], 64, 64, shift="tx")[1] == \
      pytest.approx(3.2)


def test_alignment_error_midline_against_sampler_grid():
  """|Δx| (midline) is where the aligned centre column comes from, on the centre row,
  measured on the sampler's own sampling grid; it ignores vertical shifts."""
  import jax.numpy as jnp
  from sean_jax.models import sampler

  h = w = 64

  def midline_x(alpha):
    # Sample positions of the output's centre "column" (x_n = 0) for two output rows,
    # in input pixels; intersect that line with the input's centre row.
    theta = sampler.rigid_theta(jnp.asarray(alpha, jnp.float32), h, w)
    pts = [np.asarray(theta) @ np.array([0.0, y, 1.0]) for y in (-0.5, 0.5)]
    px = [((p[0] + 1) * w - 1) / 2 for p in pts]
    py = [((p[1] + 1) * h - 1) / 2 for p in pts]
    cy = (h - 1) / 2
    return px[0] + (cy - py[0]) * (px[1] - px[0]) / (py[1] - py[0])

  a = [math.radians(12.0), 0.08, -0.2]
  b = [math.radians(-7.0), -0.05, 0.15]
  _, got = metrics.alignment_error(a, b, h, w)
  assert got == pytest.approx(abs(midline_x(a) - midline_x(b)), abs=1e-3)
  # Adding a vertical shift of the aligned image: same midline, zero error.
  v = 0.2  # normalised
  th = a[0]
  a_v = [th, a[1] - math.sin(th) * v, a[2] + math.cos(th) * v]
  rot, shift = metrics.alignment_error(a, a_v, h, w)
  assert rot == pytest.approx(0.0) and shift == pytest.approx(0.0, abs=1e-9)
  assert metrics.alignment_error(a, a_v, h, w, shift="tx")[1] > 1.0
