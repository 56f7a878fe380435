"""Symmetry enhanced attention (paper Eq. 2-3, DESIGN.md §4).

The bottleneck features of the 2T+1 slices of a slab are split into P x Q partitions.
Each partition of the centre slice attends to the same partition of every slice
(self attention) and to the same partition of every horizontally mirrored slice
(symmetry attention), with one softmax per key set. Because the projections are 1x1
and attention ignores key order, partition (j, k) of a mirrored map holds the same
tokens as partition (j, Q-1-k) of the map itself, so the mirror is a reversal of the
partition axis, not a per-pixel flip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SymmetryAttention(nnx.Module):
  """Self and symmetry attention over P x Q partitions of adjacent slices.

  Call with x: (B, D, H, W, C) bottleneck features, D = 2T+1 slices, the centre slice
  at index D // 2. Returns (B, H, W, C): the centre slice plus
  ``W_z(concat(Y_self, Y_sym))``. FLOPs of the attention core:
  ``2 * B * K * C * H * W * (H/P) * (W/Q)`` with K = 2D key sets (D with one branch).
  """

  def __init__(self, channels: int, partitions: tuple[int, int] = (4, 4), *,
               use_self: bool = True, use_symmetry: bool = True,
               dtype=None, rngs: nnx.Rngs):
    if not (use_self or use_symmetry):
      raise ValueError("SymmetryAttention needs use_self or use_symmetry")
    if channels % 2:
      raise ValueError(f"attention channels must be even, got {channels}")
    self.partitions = tuple(partitions)
    self.use_self = use_self
    self.use_symmetry = use_symmetry
    self.inner = channels // 2

    def proj(cin, cout, use_bias=True):
      return nnx.Linear(cin, cout, use_bias=use_bias, dtype=dtype, rngs=rngs)

    self.query = proj(channels, self.inner)        # theta
    # phi has no bias: it adds q.b to every logit of a query, which the softmax cancels.
    self.key = proj(channels, self.inner, use_bias=False)
    self.value_self = proj(channels, self.inner) if use_self else None        # g
    self.value_sym = proj(channels, self.inner) if use_symmetry else None     # h
    branches = int(use_self) + int(use_symmetry)
    self.out = proj(branches * self.inner, channels)  # W_z

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, depth, height, width, _ = x.shape
    p, q = self.partitions
    if height % p or width % q:
      raise ValueError(
          f"attention input {height}x{width} does not divide into {p}x{q} partitions")
    centre = x[:, depth // 2]
    split = lambda y: _to_partitions(y, p, q)
    queries = split(self.query(centre)[:, None])[:, 0]   # (B, P, Q, N, d)
    keys = split(self.key(x))                            # (B, D, P, Q, N, d)
    scale = 1.0 / jnp.sqrt(jnp.asarray(self.inner, jnp.float32)).astype(x.dtype)

    outputs = []
    if self.use_self:
      outputs.append(_attend(queries * scale, keys, split(self.value_self(x))))
    if self.use_symmetry:
      mirror = lambda y: y[:, :, :, ::-1]  # partition (j, k) of the flip = (j, Q-1-k)
      outputs.append(_attend(queries * scale, mirror(keys),
                             mirror(split(self.value_sym(x)))))
    fused = jnp.concatenate(outputs, axis=-1)             # (B, P, Q, N, branches*d)
    fused = _from_partitions(fused, height // p, width // q)
    return centre + self.out(fused)


def _attend(queries, keys, values):
  """Sum over slices of softmax attention, one softmax per slice's key set.

  queries (B, P, Q, N, d); keys, values (B, D, P, Q, M, d) -> (B, P, Q, N, d).
  """
  logits = jnp.einsum("bpqnc,btpqmc->btpqnm", queries, keys)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(values.dtype)
  return jnp.einsum("btpqnm,btpqmc->bpqnc", weights, values)


def _to_partitions(y, p, q):
  """(B, D, H, W, C) -> (B, D, P, Q, H/P * W/Q, C)."""
  b, d, h, w, c = y.shape
  y = y.reshape(b, d, p, h // p, q, w // q, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return y.reshape(b, d, p, q, (h // p) * (w // q), c)


def _from_partitions(y, part_h, part_w):
  """(B, P, Q, H' * W', C) -> (B, P * H', Q * W', C)."""
  b, p, q, _, c = y.shape
  y = y.reshape(b, p, q, part_h, part_w, c).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, p * part_h, q * part_w, c)


def symmetry_attention_naive(module: SymmetryAttention, x: jax.Array) -> jax.Array:
  """The literal computation, for tests and the benchmark: Python loops over
  partitions and slices, and the symmetry keys taken from a per-pixel flipped map.

  x: (B, D, H, W, C) -> (B, H, W, C), equal to ``module(x)``.
  """
  batch, depth, height, width, channels = x.shape
  p, q = module.partitions
  ph, pw = height // p, width // q
  flipped = x[:, :, :, ::-1]
  centre = x[:, depth // 2]
  scale = 1.0 / jnp.sqrt(jnp.float32(module.inner))
  rows = []
  for j in range(p):
    cols = []
    for k in range(q):
      window = (slice(None), slice(j * ph, (j + 1) * ph), slice(k * pw, (k + 1) * pw))
      query = module.query(centre[window]).reshape(batch, ph * pw, -1) * scale
      branches = []
      for use, source, value in ((module.use_self, x, module.value_self),
                                 (module.use_symmetry, flipped, module.value_sym)):
        if not use:
          continue
        total = 0
        for t in range(depth):
          part = source[:, t][window]
          key = module.key(part).reshape(batch, ph * pw, -1)
          weights = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", query, key), axis=-1)
          total = total + jnp.einsum("bnm,bmc->bnc", weights,
                                     value(part).reshape(batch, ph * pw, -1))
        branches.append(total.reshape(batch, ph, pw, -1))
      cols.append(jnp.concatenate(branches, axis=-1))
    rows.append(jnp.concatenate(cols, axis=2))
  return centre + module.out(jnp.concatenate(rows, axis=1))
