"""Segmentation loss (DESIGN.md §6): generalized Dice + cross-entropy, in float32.

The alignment loss (Eq. 1) lives with the alignment network:
:func:`sean_jax.models.alignment.alignment_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sean_jax.models.alignment import alignment_loss  # noqa: F401  (re-export)


def generalized_dice_loss(logits: jax.Array, labels: jax.Array,
                          smooth: float = 1e-5) -> jax.Array:
  """Generalized Dice loss (Sudre et al. 2017), averaged over the batch.

  Class weights are 1 / (sum of the reference)^2 per image; a class absent from an
  image's reference would get an infinite weight, so it takes the largest finite
  weight of that image instead (as MONAI's GeneralizedDiceLoss does).

  Args:
    logits: (B, H, W, K) any float dtype; computed in float32.
    labels: (B, H, W) integer class indices.
  Returns:
    scalar float32 loss in [0, 1].
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  axes = tuple(range(1, logits.ndim - 1))
  ref_sum = onehot.sum(axes)                                   # (B, K)
  intersection = (probs * onehot).sum(axes)
  denominator = (probs + onehot).sum(axes)
  weights = jnp.where(ref_sum > 0, 1.0 / jnp.maximum(ref_sum, 1.0) ** 2, 0.0)
  fallback = jnp.max(weights, axis=-1, keepdims=True)
  weights = jnp.where(ref_sum > 0, weights, fallback)
  numerator = 2.0 * (weights * intersection).sum(-1) + smooth
  denom = (weights * denominator).sum(-1) + smooth
  return jnp.mean(1.0 - numerator / denom)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over pixels; logits (B, H, W, K), labels (B, H, W).

  Written with a one-hot product rather than a gather of the label's log-probability
  (optax's integer-label form): the gather's gradient is a scatter-add, which XLA
  constant-folded for minutes when compiling large batches and which accelerators
  run slowly; the product's gradient is element-wise. Same value.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return -jnp.mean(jnp.sum(onehot * log_probs, axis=-1))


def segmentation_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Generalized Dice + cross-entropy (the paper's training loss)."""
  return generalized_dice_loss(logits, labels) + cross_entropy_loss(logits, labels)
