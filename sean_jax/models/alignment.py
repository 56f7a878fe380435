"""The alignment network (paper §2.1, DESIGN.md §2): a spatial transformer that
predicts the rigid transform making each slice bilaterally symmetric.

Images given to the network and the loss are preprocessed slices shifted so that the
background is 0 (``volume - volume.min()``), which agrees with the sampler's zero
padding: what the warp brings into view reads as air.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sean_jax.models import refine as refine_lib
from sean_jax.models import sampler


class AlignmentNet(nnx.Module):
  """conv 32@7x7 - relu - maxpool 2 - conv 32@5x5 - relu - maxpool 2 - fc 3.

  Call with slices (N, H, W, 1); returns alpha (N, 3) = (theta [rad], tx, ty), smoothly
  bounded to +-``max_rotation_deg`` and +-``max_shift``. Slices larger than
  ``input_size`` are average-pooled by an integer factor first, so the fc layer sees a
  fixed size (the fc flattens the feature map: a global pool would discard the position
  information a transform is made of). The fc starts at zero: the identity transform.
  """

  def __init__(self, input_size: int = 128, *, max_rotation_deg: float = 30.0,
               max_shift: float = 0.25, features: int = 32, rngs: nnx.Rngs):
    if input_size % 4:
      raise ValueError(f"alignment input_size must divide by 4, got {input_size}")
    self.input_size = input_size
    self.max_alpha = (math.radians(max_rotation_deg), max_shift, max_shift)
    self.conv1 = nnx.Conv(1, features, (7, 7), padding=3, rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (5, 5), padding=2, rngs=rngs)
    flat = features * (input_size // 4) ** 2
    self.fc = nnx.Linear(flat, 3, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, slices: jax.Array) -> jax.Array:
    n, height, width, _ = slices.shape
    if height != width or height % self.input_size:
      raise ValueError(f"alignment net takes square slices whose size divides by "
                       f"{self.input_size}, got {height}x{width}")
    factor = height // self.input_size
    x = slices
    if factor > 1:
      x = nnx.avg_pool(x, (factor, factor), strides=(factor, factor))
    x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    raw = self.fc(x.reshape(n, -1))
    return jnp.tanh(raw) * jnp.asarray(self.max_alpha, raw.dtype)


def alignment_loss(images: jax.Array, alpha: jax.Array) -> jax.Array:
  """Eq. 1: L1(flip(A_t), A_t) + L1(f_alpha^-1(A_t), A), with A_t = f_alpha(A).

  images: (N, H, W, 1) with background 0; alpha: (N, 3). Returns a float32 scalar.
  """
  images = images.astype(jnp.float32)
  aligned = sampler.warp(images, alpha)
  symmetry = jnp.mean(jnp.abs(aligned[:, :, ::-1] - aligned))
  restoration = jnp.mean(jnp.abs(sampler.unwarp(aligned, alpha) - images))
  return symmetry + restoration


def aggregate_alpha(alphas: jax.Array, slice_weights: jax.Array) -> jax.Array:
  """The volume's transform: median over slices with weight > 0 (all if none).

  alphas: (S, 3); slice_weights: (S,). Returns (3,).
  """
  use = slice_weights > 0
  use = jnp.where(use.any(), use, True)
  return jnp.nanmedian(jnp.where(use[:, None], alphas, jnp.nan), axis=0)


def compose_alpha(first: jax.Array, second: jax.Array, height: int, width: int
                  ) -> jax.Array:
  """The transform of warping by ``first`` and then by ``second``:
  ``warp(warp(A, first), second) == warp(A, compose_alpha(first, second, H, W))``
  (inside the image). With ``T(p) = c + R (p - c) + t_px`` the result is ``T1 o T2``:
  rotation ``theta1 + theta2``, shift ``t1 + R(theta1) t2`` (pixels)."""
  angle = first[..., 0]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  sx, sy = second[..., 1] * width / 2, second[..., 2] * height / 2
  tx = first[..., 1] + (cos * sx - sin * sy) * 2 / width
  ty = first[..., 2] + (sin * sx + cos * sy) * 2 / height
  return jnp.stack([angle + second[..., 0], tx, ty], axis=-1)


def align_volume(net: AlignmentNet, volume: jax.Array,
                 slice_weights: jax.Array | None = None, iterations: int = 1,
                 refine: bool = False) -> tuple[jax.Array, jax.Array]:
  """Estimates one transform for a preprocessed volume and applies it to every slice.

  volume: (S, H, W); slice_weights: (S,) slices to trust (default: all).
  iterations: passes of the net; each later pass estimates the residual transform of
  the volume aligned so far, which is composed with it (``compose_alpha``), and the
  input volume is warped once by the total. 1 is the paper's single estimate.
  refine: then search the rotation and midline shift that make the volume itself most
  symmetric, starting from the net's estimate (``refine.refine_alpha``; the shift
  along the midline stays the net's).
  Returns (aligned volume (S, H, W), alpha (3,)). What the warp brings into view takes
  the volume's minimum (air).
  """
  if iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}")
  background = volume.min()
  slices = (volume - background)[..., None]
  height, width = volume.shape[1:]
  if slice_weights is None:
    slice_weights = jnp.ones(volume.shape[:1])
  alpha = aggregate_alpha(net(slices), slice_weights)
  aligned = sampler.warp(slices, alpha)
  for _ in range(iterations - 1):
    alpha = compose_alpha(alpha, aggregate_alpha(net(aligned), slice_weights),
                          height, width)
    aligned = sampler.warp(slices, alpha)
  if refine:
    alpha = refine_lib.refine_alpha(volume, alpha, slice_weights)
    aligned = sampler.warp(slices, alpha)
  return aligned[..., 0] + background, alpha


def unalign_volume(volume: jax.Array, alpha: jax.Array, fill=0.0) -> jax.Array:
  """Maps an aligned (S, H, W) map back to the input grid (inverse of ``alpha``)."""
  return sampler.unwarp((volume - fill)[..., None], alpha)[..., 0] + fill
