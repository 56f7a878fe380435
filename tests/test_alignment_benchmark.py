"""The registration baseline of benchmarks/alignment.py: the pose read off a head's
rigid registration to its own mirror image, checked against the known pose."""

import math

import jax
import numpy as np
import pytest
from scipy import ndimage, optimize

from benchmarks.alignment import mirror_transform_of_pose, pose_from_mirror_transform
from sean_jax import metrics
from sean_jax.models import sampler

SIZE = 48
# Jitted: eager sampling compiles every small op on its own (seconds on this CPU).
warp = jax.jit(sampler.warp)
unwarp = jax.jit(sampler.unwarp)


def symmetric_head(size: int = SIZE) -> np.ndarray:
  """A smooth (H, W) image, mirror-symmetric about the column centre line x = (W-1)/2
  and not symmetric top to bottom (so its rotation is well defined)."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  c = (size - 1) / 2
  u, v = (x - c) / size, (y - c) / size
  image = 1.0 / (1.0 + np.exp(((u / 0.32) ** 2 + (v / 0.40) ** 2 - 1) * 12))
  for bx, by, amp in ((0.15, -0.2, 1.5), (0.1, 0.15, -0.6), (0.0, 0.28, 1.0)):
    for sign in (1, -1):
      image += amp * np.exp(-((u - sign * bx) ** 2 + (v - by) ** 2) / (2 * 0.05 ** 2))
  return image


def posed(image: np.ndarray, alpha) -> np.ndarray:
  """The image of a head whose aligning pose is ``alpha``: warp(posed, alpha) == image."""
  return np.asarray(unwarp(image[None, ..., None].astype(np.float32),
                                   np.asarray(alpha, np.float32))[0, ..., 0], np.float64)


def sample(image, matrix, offset):
  """image(matrix q + offset) at every pixel q = (x, y): a moving image on the fixed grid."""
  h, w = image.shape
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  qx = matrix[0, 0] * x + matrix[0, 1] * y + offset[0]
  qy = matrix[1, 0] * x + matrix[1, 1] * y + offset[1]
  return ndimage.map_coordinates(image, [qy, qx], order=1, mode="constant")


def register_rigid(fixed, moving):
  """A tiny rigid registration (SSD, Powell): F with fixed(q) ~ moving(F(q)), as a
  registration library returns it (fixed points to moving points)."""
  h, w = fixed.shape
  c = np.array([(w - 1) / 2, (h - 1) / 2])

  def transform(params):
    phi, bx, by = params
    rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    return rot, c - rot @ c + np.array([bx, by])

  def cost(params):
    return float(np.sum((sample(moving, *transform(params)) - fixed) ** 2))

  best = optimize.minimize(cost, np.zeros(3), method="Powell",
                           options={"xtol": 1e-5, "ftol": 1e-10})
  return transform(best.x)


POSES = [(math.radians(9.0), 0.08, -0.05), (math.radians(-13.0), -0.06, 0.1),
         (math.radians(4.0), 0.0, 0.0), (0.0, 0.1, 0.04)]


@pytest.mark.parametrize("alpha", POSES)
def test_exact_mirror_transform_maps_the_image_to_its_mirror(alpha):
  head = posed(symmetric_head(), alpha)
  mirror = head[:, ::-1]
  matrix, offset = mirror_transform_of_pose(alpha, SIZE, SIZE)
  diff = np.abs(sample(mirror, matrix, offset) - head)[8:-8, 8:-8]
  assert diff.max() < 0.05 * np.abs(head).max()
  # The pose's own mirror transform gives back the pose (midline and rotation).
  alpha_back = pose_from_mirror_transform(matrix, offset, SIZE, SIZE)
  rot, shift = metrics.alignment_error(alpha_back, alpha, SIZE, SIZE)
  assert rot < 1e-9 and shift < 1e-9


@pytest.mark.parametrize("alpha", POSES[:2])
def test_pose_from_a_real_registration_to_the_mirror(alpha):
  head = posed(symmetric_head(), alpha)
  matrix, offset = register_rigid(head, head[:, ::-1].copy())
  estimate = pose_from_mirror_transform(matrix, offset, SIZE, SIZE)
  rot, shift = metrics.alignment_error(estimate, alpha, SIZE, SIZE)
  assert rot < 0.5 and shift < 0.3, (np.degrees(estimate[0]), rot, shift)
  # Reading the transform the other way round (moving to fixed) gets the sign wrong.
  inverse = np.linalg.inv(matrix)
  wrong = pose_from_mirror_transform(inverse, -inverse @ offset, SIZE, SIZE)
  assert metrics.alignment_error(wrong, alpha, SIZE, SIZE)[0] > 5.0


def test_random_poses_round_trip():
  rng = np.random.default_rng(0)
  for _ in range(50):
    alpha = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3),
                      rng.uniform(-0.3, 0.3)])
    h, w = 40, 56
    estimate = pose_from_mirror_transform(*mirror_transform_of_pose(alpha, h, w), h, w)
    rot, shift = metrics.alignment_error(estimate, alpha, h, w)
    assert rot < 1e-9 and shift < 1e-9
    # The rotation is exact; the shift is fixed only across the midline.
    assert abs(estimate[0] - alpha[0]) < 1e-12


def test_ants_registration_to_the_mirror():
  """With antspyx installed (the `bench` extra): the real baseline on a tiny volume."""
  pytest.importorskip("ants")
  from benchmarks.alignment import register_to_mirror_ants
  alpha = POSES[0]
  head = posed(symmetric_head(64), alpha)
  volume = np.stack([head * (1 + 0.05 * k) for k in range(6)]) * 40.0 - 1000.0
  estimate, seconds = register_to_mirror_ants(volume, (5.0, 1.0, 1.0))
  rot, shift = metrics.alignment_error(estimate, alpha, 64, 64)
  assert seconds > 0 and rot < 1.0 and shift < 0.5, (rot, shift)


# ------------------------------------------- refinement passes of the alignment network


def _blobs(size=40):
  y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
  image = sum(amp * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * 0.12 ** 2))
              for bx, by, amp in ((0.4, 0.35, 1.0), (0.62, 0.55, 0.7), (0.45, 0.7, -0.5)))
  return image.astype(np.float32)[None, ..., None]


def test_compose_alpha_is_warping_twice():
  from sean_jax.models import alignment
  image = _blobs()
  first = np.array([math.radians(20.0), 0.05, -0.03], np.float32)
  second = np.array([math.radians(-5.0), -0.15, 0.1], np.float32)
  twice = np.asarray(warp(warp(image, first), second))[0, 8:-8, 8:-8]
  once = np.asarray(warp(image, alignment.compose_alpha(first, second, 40, 40)))
  error = np.abs(once[0, 8:-8, 8:-8] - twice).max()
  assert error < 0.02
  # The order matters (rotation and shift do not commute): the wrong order is far off.
  swapped = np.asarray(warp(image, alignment.compose_alpha(second, first, 40, 40)))
  assert np.abs(swapped[0, 8:-8, 8:-8] - twice).max() > 5 * error + 0.05


def test_align_volume_refinement_composes_the_passes():
  import jax.numpy as jnp
  from flax import nnx
  from sean_jax.models import alignment
  net = alignment.AlignmentNet(32, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  step = np.array([math.radians(6.0), 0.05, -0.02], np.float32)
  # A net that answers `step` whatever it sees (zero kernel, bias atanh(step / bound)).
  net.fc.bias[...] = jnp.arctanh(jnp.asarray(step) / jnp.asarray(net.max_alpha))
  volume = jnp.asarray(_blobs(32)[..., 0].repeat(3, axis=0))
  align = nnx.jit(alignment.align_volume, static_argnames="iterations")
  _, alpha1 = align(net, volume)
  np.testing.assert_allclose(alpha1, step, atol=1e-6)
  aligned, alpha2 = align(net, volume, iterations=2)
  expected = alignment.compose_alpha(step, step, 32, 32)
  np.testing.assert_allclose(alpha2, expected, atol=1e-6)
  np.testing.assert_allclose(alpha2[0], 2 * step[0], atol=1e-6)
  lo = volume.min()
  np.testing.assert_allclose(
      aligned, warp(volume[..., None] - lo, expected)[..., 0] + lo, atol=1e-5)
  with pytest.raises(ValueError, match="iterations"):
    alignment.align_volume(net, volume, iterations=0)
