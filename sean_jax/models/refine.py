"""Symmetry refinement of a volume's alignment (issue #12): after the alignment
network's estimate, the pose is searched on the volume itself for the transform that
minimises the symmetry term of Eq. 1, L1(flip(A_t), A_t) with A_t = f_alpha(A).

Only the midline is determined by symmetry: its angle and its offset perpendicular to
itself. Moving the head along the midline leaves the mirror image unchanged (the
rank-one argument of ``benchmarks/alignment.py``), so that component of the shift is
kept from the starting estimate.

Method. With the pose alpha = (theta, t), the aligned image's midline is, in the input
image P, the line through ``c + t`` (c the image centre, pixels) with direction
``m = (-sin theta, cos theta)``; ``n = (cos theta, sin theta)`` is its normal and
``s = t . n`` its offset from the centre. Since the warp is rigid, the symmetry term
equals ``sum_q |P(q) - P(F q)|`` over the input grid, with F the reflection about that
line; ``P o F`` is the left-right flip of P warped by a proper rigid transform
(``sampler.warp`` of ``flip(P)`` by ``(-2 theta, -2 s cos theta, 2 s sin theta)`` in
pixels), so each candidate costs one bilinear sampling of the volume, and the slices
travel as channels of one image (one set of sampling positions for all of them).
The search is coarse to fine over (theta, s): a grid around the current best at each
stage, on the volume average-pooled to about 64 px and then about 128 px, and a
parabola through the last grid's minimum and its neighbours on each axis.

Cost. Intensities are the preprocessed volume (HU window [-10, 90], z-scored: bone is
clipped to the window's top) minus its minimum, so air reads 0. The L1 difference is
taken inside the head eroded by ``erode`` (5% of the width: scalp and skull out) where
that mask and its reflection overlap, and divided by the overlap: the midline is read
off the brain, the ventricles and the inner table, not off the outline of the scalp,
whose own asymmetry pulled the rotation off by up to 2 degrees on the phantom.
Slices count by ``slice_weights`` (brain slices).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sean_jax.models import sampler


class Stage(NamedTuple):
  """One stage of the search: a ``points`` x ``points`` grid of (theta, s) centred on
  the best so far, on the volume pooled to about ``size`` px (never upsampled).
  Steps: ``theta_step_deg`` degrees and ``shift_step`` in units of the image width."""
  size: int
  points: int
  theta_step_deg: float
  shift_step: float


# Reach about the start: +-(3 * 1.5 + 2 * 0.5 + 2 * 0.2) = +-5.9 degrees and
# +-(3 / 64 + 2 / 160 + 2 / 400) = +-6.5% of the width (+-33 px at 512).
DEFAULT_STAGES = (Stage(64, 7, 1.5, 1 / 64), Stage(64, 5, 0.5, 1 / 160),
                  Stage(128, 5, 0.2, 1 / 400))


def _pool_factor(height: int, width: int, size: int) -> int:
  """The largest integer factor <= max(H, W) / size that divides both H and W."""
  factor = max(1, max(height, width) // size)
  while height % factor or width % factor:
    factor -= 1
  return factor


def _pool(volume: jax.Array, factor: int) -> jax.Array:
  """(S, H, W) -> (S, H / f, W / f), block means."""
  if factor == 1:
    return volume
  s, h, w = volume.shape
  return volume.reshape(s, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def reflection_alpha(theta: jax.Array, offset_px: jax.Array, height: int, width: int
                     ) -> jax.Array:
  """The warp alpha G with ``warp(flip(P), G) == P o F``, F the reflection about the
  line ``(q - c) . n(theta) = offset_px`` (pixels of an H x W grid).

  theta, offset_px: arrays of one shape (...); returns (..., 3).
  """
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return jnp.stack([-2 * theta, -2 * offset_px * cos * 2 / width,
                    2 * offset_px * sin * 2 / height], axis=-1)


def interior_mask(images: jax.Array, radius: int) -> jax.Array:
  """The head eroded by ``radius`` pixels (a square window): (H, W, S) -> (H, W, S)
  in {0, 1}. ``images`` have background 0."""
  head = (images > 1e-3 * jnp.max(images)).astype(jnp.float32)
  if radius < 1:
    return head
  # A square window is two 1-D ones (rows, then columns): far cheaper on a CPU.
  # Outside the image counts as air, so the border erodes too.
  size = 2 * radius + 1
  for window in ((size, 1, 1), (1, size, 1)):
    head = jax.lax.reduce_window(head, 1.0, jax.lax.min, window, (1, 1, 1), "SAME")
  return head


def symmetry_cost(images: jax.Array, mask: jax.Array, weights: jax.Array,
                  theta: jax.Array, offset_px: jax.Array) -> jax.Array:
  """Weighted mean of |P - P o F| where the mask and its reflection overlap, for
  candidate midlines.

  images: (H, W, S) with background 0 (slices as channels); mask: (H, W, S) in [0, 1];
  weights: (S,); theta, offset_px: (K,) candidate midline angles (rad) and offsets
  (pixels of this grid). Returns (K,) costs.
  """
  height, width, num_slices = images.shape
  masked = images * mask
  both = jnp.concatenate([masked, mask], axis=-1)[:, ::-1]  # mirrored, one sampling
  alphas = reflection_alpha(theta, offset_px, height, width)

  def one(alpha):
    reflected = sampler.warp(both[None], alpha)[0]
    overlap = mask * reflected[..., num_slices:]
    diff = jnp.abs(reflected[..., :num_slices] - masked) * overlap
    return (jnp.sum(diff @ weights)
            / jnp.maximum(jnp.sum(overlap @ weights), 1e-6))

  return jax.lax.map(one, alphas)


def _parabola_offset(left, mid, right):
  """Vertex of the parabola through (-1, left), (0, mid), (1, right), in [-0.5, 0.5]."""
  curvature = left - 2 * mid + right
  step = jnp.where(curvature > 0, 0.5 * (left - right) / jnp.maximum(curvature, 1e-30),
                   0.0)
  return jnp.clip(step, -0.5, 0.5)


def refine_alpha(volume: jax.Array, alpha0: jax.Array,
                 slice_weights: jax.Array | None = None,
                 stages: tuple[Stage, ...] = DEFAULT_STAGES,
                 erode: float = 0.05) -> jax.Array:
  """Refines a volume's alignment by minimising its left-right asymmetry.

  Args:
    volume: (S, H, W) preprocessed volume (air at its minimum).
    alpha0: (3,) starting transform (theta [rad], tx, ty), e.g. the network's.
    slice_weights: (S,) weights of the slices in the cost (default: all equal; all
      zero counts as all equal).
    stages: the coarse-to-fine schedule (static).
    erode: the cost looks at the head eroded by this fraction of the width (static;
      0.05 is 11 mm at a 230 mm field of view): scalp and skull out, what they enclose
      in. The outline's own asymmetry (the phantom draws one) would otherwise pull
      the rotation off the midline of the brain by up to a few degrees.

  Returns:
    (3,) float32 alpha: the rotation and the shift perpendicular to the midline from
    the search, the shift along the midline from ``alpha0``. Jittable.
  """
  volume = jnp.asarray(volume, jnp.float32)
  num_slices, height, width = volume.shape
  alpha0 = jnp.asarray(alpha0, jnp.float32)
  if slice_weights is None:
    slice_weights = jnp.ones((num_slices,), jnp.float32)
  weights = jnp.asarray(slice_weights, jnp.float32)
  weights = jnp.where(weights.sum() > 0, weights, 1.0)
  weights = weights / weights.sum()
  background = volume.min()

  theta0 = alpha0[0]
  t0 = jnp.stack([alpha0[1] * width / 2, alpha0[2] * height / 2])  # pixels
  normal0 = jnp.stack([jnp.cos(theta0), jnp.sin(theta0)])
  along = t0 @ jnp.stack([-jnp.sin(theta0), jnp.cos(theta0)])
  theta, offset = theta0, t0 @ normal0  # offset in pixels of the full grid

  pooled = {}
  for stage in stages:
    factor = _pool_factor(height, width, stage.size)
    if factor not in pooled:
      # Pooled first: the transpose to (H, W, S) is then of the small array.
      level = jnp.transpose(_pool(volume, factor) - background, (1, 2, 0))
      radius = int(round(erode * width / factor))
      pooled[factor] = (level, interior_mask(level, radius))
    level, mask = pooled[factor]
    k = stage.points // 2
    steps = jnp.arange(-k, k + 1, dtype=jnp.float32)
    d_theta = steps * math.radians(stage.theta_step_deg)
    d_offset = steps * stage.shift_step * width
    cand_theta = (theta + d_theta)[:, None] + jnp.zeros_like(d_offset)[None, :]
    cand_offset = jnp.zeros_like(d_theta)[:, None] + (offset + d_offset)[None, :]
    cost = symmetry_cost(level, mask, weights, cand_theta.ravel(),
                         cand_offset.ravel() / factor).reshape(cand_theta.shape)
    best = jnp.argmin(cost)
    i, j = best // stage.points, best % stage.points
    theta, offset = cand_theta[i, j], cand_offset[i, j]

  # Sub-step: a parabola on each axis of the last grid, where the minimum is inside.
  last = stages[-1]
  inner_i = (i > 0) & (i < last.points - 1)
  inner_j = (j > 0) & (j < last.points - 1)
  ci, cj = jnp.clip(i, 1, last.points - 2), jnp.clip(j, 1, last.points - 2)
  di = _parabola_offset(cost[ci - 1, j], cost[ci, j], cost[ci + 1, j])
  dj = _parabola_offset(cost[i, cj - 1], cost[i, cj], cost[i, cj + 1])
  theta = theta + jnp.where(inner_i, di, 0.0) * math.radians(last.theta_step_deg)
  offset = offset + jnp.where(inner_j, dj, 0.0) * last.shift_step * width

  normal = jnp.stack([jnp.cos(theta), jnp.sin(theta)])
  direction = jnp.stack([-jnp.sin(theta), jnp.cos(theta)])
  t = offset * normal + along * direction
  return jnp.stack([theta, t[0] * 2 / width, t[1] * 2 / height]).astype(jnp.float32)
