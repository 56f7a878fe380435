"""Rigid in-plane transforms and a bilinear sampler, in the convention of PyTorch's
``affine_grid`` + ``grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)``.

A transform is ``alpha = (theta, tx, ty)``: rotation in radians and shifts in
normalised coordinates ([-1, 1] spans the image), about the image centre. Warping an
image ``A`` by ``alpha`` gives ``A_t(p) = A(c + R(theta) (p - c) + t_px)`` in pixel
coordinates ``p = (x, y)`` (x the column, y the row), with ``c`` the image centre and
``t_px = (tx * W / 2, ty * H / 2)``. The rotation is rigid in pixel space, also for
non-square images. The phantom records its ground-truth pose in this convention: the
pose is the ``alpha`` that makes its head symmetric.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rigid_theta(alpha: jax.Array, height: int, width: int) -> jax.Array:
  """Sampling matrices for ``affine_grid`` from rigid transforms.

  Args:
    alpha: (..., 3) array of (theta, tx, ty).
    height, width: image size in pixels.

  Returns:
    (..., 2, 3) matrices mapping normalised output coords (x, y, 1) to normalised
    input coords: ``[D R D^-1 | t]`` with ``D = diag(2/W, 2/H)``.
  """
  angle, tx, ty = alpha[..., 0], alpha[..., 1], alpha[..., 2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  aspect = width / height  # D R D^-1 scales the off-diagonal terms.
  row0 = jnp.stack([cos, -sin / aspect, tx], axis=-1)
  row1 = jnp.stack([sin * aspect, cos, ty], axis=-1)
  return jnp.stack([row0, row1], axis=-2)


def invert_alpha(alpha: jax.Array, height: int, width: int) -> jax.Array:
  """The rigid transform that exactly undoes ``alpha`` (same convention).

  With ``q - c = R (p - c) + t_px`` the inverse is ``p - c = R^T (q - c) - R^T t_px``.
  """
  angle, tx, ty = alpha[..., 0], alpha[..., 1], alpha[..., 2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  sx, sy = tx * width / 2, ty * height / 2
  inv_sx = -(cos * sx + sin * sy)
  inv_sy = -(-sin * sx + cos * sy)
  return jnp.stack([-angle, inv_sx * 2 / width, inv_sy * 2 / height], axis=-1)


def affine_grid(theta: jax.Array, height: int, width: int) -> jax.Array:
  """Normalised sampling grid, as ``F.affine_grid(theta, (N, C, H, W), False)``.

  Args:
    theta: (N, 2, 3) matrices.

  Returns:
    (N, H, W, 2) grid of (x, y) input coordinates in [-1, 1] units.
  """
  xs = (2 * jnp.arange(width, dtype=theta.dtype) + 1) / width - 1
  ys = (2 * jnp.arange(height, dtype=theta.dtype) + 1) / height - 1
  gx, gy = jnp.meshgrid(xs, ys)  # (H, W) each
  base = jnp.stack([gx, gy, jnp.ones_like(gx)], axis=-1)  # (H, W, 3)
  return jnp.einsum("hwk,njk->nhwj", base, theta,
                    precision=jax.lax.Precision.HIGHEST)


def grid_sample(images: jax.Array, grid: jax.Array) -> jax.Array:
  """Bilinear sampling with zero padding, as ``F.grid_sample(align_corners=False)``.

  Args:
    images: (N, H, W, C) images.
    grid: (N, Ho, Wo, 2) normalised (x, y) sample positions.

  Returns:
    (N, Ho, Wo, C) sampled images; positions outside the image read zeros.
  """
  return jax.vmap(_sample_one)(images, grid)


def _sample_one(image: jax.Array, grid: jax.Array) -> jax.Array:
  height, width = image.shape[0], image.shape[1]
  x = ((grid[..., 0] + 1) * width - 1) / 2
  y = ((grid[..., 1] + 1) * height - 1) / 2
  x0, y0 = jnp.floor(x), jnp.floor(y)
  wx1, wy1 = x - x0, y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

  def tap(yi, xi, weight):
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    values = image[jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1)]
    return values * jnp.where(inside, weight, 0)[..., None]

  return (tap(y0, x0, (1 - wy1) * (1 - wx1)) + tap(y0, x0 + 1, (1 - wy1) * wx1)
          + tap(y0 + 1, x0, wy1 * (1 - wx1)) + tap(y0 + 1, x0 + 1, wy1 * wx1))


def warp(images: jax.Array, alpha: jax.Array) -> jax.Array:
  """Applies rigid transforms to images.

  Args:
    images: (N, H, W, C) images.
    alpha: (N, 3) transforms, one per image, or (3,) for all of them.

  Returns:
    (N, H, W, C) warped images, zeros where the source lies outside the image.
  """
  n, height, width = images.shape[:3]
  alpha = jnp.broadcast_to(alpha, (n, 3)).astype(images.dtype)
  grid = affine_grid(rigid_theta(alpha, height, width), height, width)
  return grid_sample(images, grid)


def unwarp(images: jax.Array, alpha: jax.Array) -> jax.Array:
  """Applies the inverse of ``alpha``: ``unwarp(warp(A, a), a) == A`` inside."""
  height, width = images.shape[1:3]
  return warp(images, invert_alpha(alpha, height, width))


def alpha_to_pose(alpha, height: int, width: int) -> dict[str, float]:
  """Pose dict (degrees and pixels) of the phantom's ground-truth JSON (host side)."""
  angle, tx, ty = (float(v) for v in np.asarray(alpha))
  return {"rotation_deg": math.degrees(angle),
          "shift_x_px": tx * width / 2, "shift_y_px": ty * height / 2}


def pose_to_alpha(pose: dict, height: int, width: int) -> np.ndarray:
  """Inverse of :func:`alpha_to_pose`: (3,) float32 alpha from a pose dict (NumPy:
  this runs in the input pipeline, where no device array should be made)."""
  return np.array([math.radians(pose["rotation_deg"]),
                   pose["shift_x_px"] * 2 / width,
                   pose["shift_y_px"] * 2 / height], np.float32)
