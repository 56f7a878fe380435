"""Encoders and decoder of Unet and HybridUnet (paper §2.2, DESIGN.md §3).

Both take a slab of slices, (B, D, H, W, C). HybridUnet convolves in 3D over the D
adjacent slices and pools in-plane only, so its bottleneck keeps all D slices for the
attention. Unet convolves each slice in 2D (it is given D = 1). The decoder works on
the middle plane only. Convolutions that feed a BatchNorm take no bias.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sean_jax.ops import onednn

NUM_LEVELS = 5
# How the 3x3(x3) convolutions of the conv blocks are computed (the parameters are the
# same either way; docs/performance.md has the measurements):
#   "onednn" oneDNN's kernels through XLA's FFI (sean_jax.ops.onednn; CPU, float32):
#            2.5-6x faster than XLA's on CPU, level with PyTorch;
#   "fold"   XLA, the three depth taps of a 3D convolution folded into the channel
#            axis, one 2D convolution with 3C input channels (2x XLA's 3D on CPU);
#   "native" XLA's own convolutions;
#   "auto"   "onednn" where it applies (CPU backend, one device, float32 and the
#            library installed), else "fold" on CPU, else "native".
CONV_IMPLS = ("auto", "onednn", "fold", "native")
# The first convolution (1-2 input channels) is not folded: with 3 folded channels
# XLA's kernel gradient sums every voxel in one float32 chain (1.5e-3 relative error
# against PyTorch, measured, instead of < 1e-5), and the layer costs under 1% of a step.
FOLD_MIN_FEATURES = 4
# Initial probability of the foreground classes (infarcts are ~0.5% of the pixels).
FOREGROUND_PRIOR = 0.01


def batch_norm(features: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # momentum 0.9 is PyTorch's 0.1; the two-pass variance matches PyTorch numerically.
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                       dtype=dtype, rngs=rngs)


def depth_folded_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """A 3x3x3 convolution (stride 1, zero padding 1) of x (B, D, H, W, C) with kernel
  (3, 3, 3, C, O), computed as one 2D convolution of (B D, H, W, 3C): output slice d
  sees input slices d-1, d, d+1 stacked along channels, and the kernel is rearranged
  to (3, 3, 3C, O) to match. Returns (B, D, H, W, O).
  """
  b, d, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  taps = jnp.concatenate([padded[:, i:i + d] for i in range(3)], axis=-1)
  kernel = jnp.moveaxis(kernel, 0, 2).reshape(3, 3, 3 * c, -1)
  y = jax.lax.conv_general_dilated(
      taps.reshape(b * d, h, w, 3 * c), kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
  return y.reshape(b, d, h, w, -1)


def _folded(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """``conv(x)`` of a 3x3x3 ``nnx.Conv`` (padding 1, no bias) by the fold."""
  x, kernel = conv.promote_dtype((x, conv.kernel[...]), dtype=conv.dtype)
  return depth_folded_conv(x, kernel, conv.precision)


def resolve_conv(conv: str, dtype=None) -> str:
  """The implementation ("onednn", "fold" or "native") that ``conv`` (one of
  CONV_IMPLS) means here, for a compute ``dtype`` (None: float32)."""
  if conv not in CONV_IMPLS:
    raise ValueError(f"model.conv must be one of {CONV_IMPLS}, got {conv!r}")
  float32 = dtype is None or jnp.dtype(dtype) == jnp.float32
  if conv == "onednn":
    if not float32:
      raise ValueError("model.conv='onednn' computes in float32; half_precision needs "
                       "'fold' or 'native'")
    if not onednn.available():
      raise ValueError(f"model.conv='onednn': {onednn.unavailable_reason()}")
  if conv != "auto":
    return conv
  if jax.default_backend() != "cpu":
    return "native"
  if float32 and jax.local_device_count() == 1:
    if onednn.available():
      return "onednn"
    _warn_once(f"oneDNN convolutions unavailable ({onednn.unavailable_reason()}); "
               "using XLA's, about 2x slower on CPU")
  return "fold"


@functools.cache
def _warn_once(message: str) -> None:
  logging.getLogger(__name__).warning(message)


class ConvBlock(nnx.Module):
  """(conv 3x3[x3] - BatchNorm - ReLU) x 2 on (B, D, H, W, C) or (B, H, W, C).

  ``conv`` is one of CONV_IMPLS (resolved at construction).
  """

  def __init__(self, in_features: int, out_features: int, *, spatial_dims: int,
               conv: str = "auto", dtype=None, rngs: nnx.Rngs):
    self.conv = resolve_conv(conv, dtype)
    kernel = (3,) * spatial_dims
    self.conv1 = nnx.Conv(in_features, out_features, kernel, padding=1, use_bias=False,
                          dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(out_features, dtype, rngs)
    self.conv2 = nnx.Conv(out_features, out_features, kernel, padding=1, use_bias=False,
                          dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(out_features, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn1(self._conv(self.conv1, x)))
    return jax.nn.relu(self.bn2(self._conv(self.conv2, x)))

  def _conv(self, conv: nnx.Conv, x: jax.Array) -> jax.Array:
    if self.conv == "onednn":
      return onednn.conv(*conv.promote_dtype((x, conv.kernel[...]), dtype=conv.dtype))
    if self.conv == "fold" and x.ndim == 5 and conv.in_features >= FOLD_MIN_FEATURES:
      return _folded(conv, x)
    return conv(x)


class Encoder(nnx.Module):
  """Five ConvBlocks with in-plane 2x2 max pooling between them.

  Call with a slab (B, D, H, W, C_in). Returns the feature maps of the five levels,
  level k of shape (B, D, H / 2^k, W / 2^k, width * 2^k). With ``hybrid=False`` the
  convolutions are 2D, applied to each slice alone.
  """

  def __init__(self, in_features: int, width: int, *, hybrid: bool,
               conv: str = "auto", dtype=None, rngs: nnx.Rngs):
    self.hybrid = hybrid
    dims = 3 if hybrid else 2
    features = [width * 2**k for k in range(NUM_LEVELS)]
    self.blocks = nnx.List([
        ConvBlock(cin, cout, spatial_dims=dims, conv=conv, dtype=dtype, rngs=rngs)
        for cin, cout in zip([in_features] + features[:-1], features)])

  def __call__(self, slab: jax.Array) -> list[jax.Array]:
    levels = []
    x = slab
    for k, block in enumerate(self.blocks):
      if k:
        x = max_pool_2x2(x)
      x = block(x) if self.hybrid else _per_slice(block, x)
      levels.append(x)
    return levels


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 in-plane max pooling, stride 2, of (..., H, W, C) with even H and W, as the
  elementwise maximum of the four pixels of each window. Its gradient is elementwise;
  that of XLA's reduce-window max pool carried five full-size index arrays through the
  step (about a tenth of a SEAN step on CPU). (A reshape + ``max`` reduction gave NaN
  gradients in XLA:CPU with optimizations off.) Ties split the gradient where PyTorch
  gives it to one element: ties are zeros after a ReLU, whose gradient is zero anyway.
  """
  *lead, h, w, c = x.shape
  windows = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
  corner = lambda i, j: windows[..., i, :, j, :]
  return jnp.maximum(jnp.maximum(corner(0, 0), corner(0, 1)),
                     jnp.maximum(corner(1, 0), corner(1, 1)))


def _per_slice(fn, x):
  """Applies a 2D module to every slice of (B, D, H, W, C)."""
  b, d = x.shape[:2]
  y = fn(x.reshape((b * d,) + x.shape[2:]))
  return y.reshape((b, d) + y.shape[1:])


def upsample_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """What ``nnx.ConvTranspose(kernel_size=(2, 2), strides=(2, 2), padding="VALID")``
  computes, as one matrix product and a pixel shuffle: output pixel (2i + a, 2j + b) is
  x[i, j] @ kernel[1 - a, 1 - b]. x (B, H, W, C), kernel (2, 2, C, O); returns
  (B, 2H, 2W, O). XLA:CPU computes a transposed convolution's kernel gradient on a
  slow generic path (7% of a SEAN step, measured); a matrix product's runs at speed.
  """
  b, h, w, _ = x.shape
  y = jnp.einsum("nhwc,abco->nhawbo", x, kernel[::-1, ::-1], precision=precision)
  return y.reshape(b, 2 * h, 2 * w, -1)


class DecoderBlock(nnx.Module):
  """Up-conv 2x2 (stride 2), concat with the skip, ConvBlock; 2D, (B, H, W, C).

  The up-conv has no bias: a per-channel constant would pass the conv and be removed
  by the BatchNorm after it (its gradient is rounding noise that Adam would amplify).
  """

  def __init__(self, in_features: int, skip_features: int, out_features: int, *,
               conv: str = "auto", dtype=None, rngs: nnx.Rngs):
    self.up = nnx.ConvTranspose(in_features, out_features, (2, 2), strides=(2, 2),
                                padding="VALID", use_bias=False, dtype=dtype, rngs=rngs)
    self.block = ConvBlock(out_features + skip_features, out_features, spatial_dims=2,
                           conv=conv, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x, kernel = self.up.promote_dtype((x, self.up.kernel[...]), dtype=self.up.dtype)
    up = upsample_conv(x, kernel, self.up.precision)
    return self.block(jnp.concatenate([up, skip], axis=-1))


class Decoder(nnx.Module):
  """Four DecoderBlocks from the bottleneck to full size, then a 1x1 conv to classes.

  Call with the (possibly fused) bottleneck (B, H/16, W/16, C_b) and the middle planes
  of encoder levels 0-3; returns logits (B, H, W, num_classes).
  """

  def __init__(self, bottleneck_features: int, width: int, num_classes: int = 2, *,
               conv: str = "auto", dtype=None, rngs: nnx.Rngs):
    features = [width * 2**k for k in range(NUM_LEVELS)]
    ins = [bottleneck_features] + features[NUM_LEVELS - 2:0:-1]
    outs = features[NUM_LEVELS - 2::-1]
    self.blocks = nnx.List([
        DecoderBlock(cin, cout, cout, conv=conv, dtype=dtype, rngs=rngs)
        for cin, cout in zip(ins, outs)])
    # The head starts at the class prior (as in RetinaNet): from an even 50/50 start
    # Adam spends hundreds of steps learning that almost every pixel is background
    # before any lesion signal (measured on the demo: p(lesion) 0.11 inside lesions vs
    # 0.11 outside after 300 steps from 50/50; 0.45 vs 0.007 from the prior).
    prior_logit = math.log(FOREGROUND_PRIOR / (1 - FOREGROUND_PRIOR))
    bias = jnp.array([0.0] + [prior_logit] * (num_classes - 1))
    self.head = nnx.Conv(width, num_classes, (1, 1), dtype=dtype,
                         bias_init=lambda *_: bias, rngs=rngs)

  def __call__(self, bottleneck: jax.Array, skips: list[jax.Array]) -> jax.Array:
    x = bottleneck
    for block, skip in zip(self.blocks, reversed(skips)):
      x = block(x, skip)
    return self.head(x)
