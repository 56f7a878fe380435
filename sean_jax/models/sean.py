"""One segmentation model for every row of the paper's Tables 1 and 2 (DESIGN.md §5),
and SEAN: the alignment network composed with it.

A variant is a choice of options on :class:`SegmentationNet`: the backbone (``unet``:
2D convs on the middle slice, ``hybrid``: 3D convs over the slab) and how the two
hemispheres are fused (``none``, ``image_l1``, ``feature_l1``, ``feature_concat``,
``attention``). Alignment is a property of the pipeline around the net (:class:`Sean`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sean_jax.models import alignment, unet
from sean_jax.models.attention import SymmetryAttention

BACKBONES = ("unet", "hybrid")
FUSIONS = ("none", "image_l1", "feature_l1", "feature_concat", "attention")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Options of :class:`SegmentationNet`; every field can be set from a config."""
  backbone: str = "hybrid"
  fusion: str = "attention"
  attention_self: bool = True
  attention_symmetry: bool = True
  align: bool = True                  # run the alignment network before segmenting
  width: int = 64                     # w: level k has w * 2^k channels
  slab_slices: int = 3                # 2T + 1
  partitions: tuple[int, int] = (4, 4)
  num_classes: int = 2
  align_input_size: int = 128
  conv: str = "auto"                  # how the 3x3(x3) convolutions run (unet.CONV_IMPLS)

  def __post_init__(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
    if self.fusion not in FUSIONS:
      raise ValueError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")
    if self.slab_slices < 1 or self.slab_slices % 2 == 0:
      raise ValueError(f"model.slab_slices must be odd (2T+1), got {self.slab_slices}")
    if self.fusion == "attention" and not (self.attention_self or self.attention_symmetry):
      raise ValueError("fusion 'attention' needs attention_self or attention_symmetry")
    if self.width < 1:
      raise ValueError(f"model.width must be positive, got {self.width}")
    if self.conv not in unet.CONV_IMPLS:
      raise ValueError(f"model.conv must be one of {unet.CONV_IMPLS}, got {self.conv!r}")


# Rows of Table 1 and Table 2. The paper's baselines ran on unaligned input.
VARIANTS: dict[str, dict] = {
    "unet": dict(backbone="unet", fusion="none", align=False),
    "unet_im_l1": dict(backbone="unet", fusion="image_l1", align=False),
    "unet_ft_l1": dict(backbone="unet", fusion="feature_l1", align=False),
    "unet_ft_cc": dict(backbone="unet", fusion="feature_concat", align=False),
    "hybrid": dict(backbone="hybrid", fusion="none", align=False),
    "hybrid_im_l1": dict(backbone="hybrid", fusion="image_l1", align=False),
    "hybrid_ft_l1": dict(backbone="hybrid", fusion="feature_l1", align=False),
    "hybrid_ft_cc": dict(backbone="hybrid", fusion="feature_concat", align=False),
    "sean": dict(backbone="hybrid", fusion="attention", align=True),
    # Table 2 (ablation); "baseline" is "hybrid" above.
    "align": dict(backbone="hybrid", fusion="none", align=True),
    "align_self": dict(backbone="hybrid", fusion="attention", attention_symmetry=False,
                       align=True),
}


def mirror(x: jax.Array) -> jax.Array:
  """Horizontal (left-right) flip of (..., H, W, C) maps."""
  return x[..., ::-1, :]


class SegmentationNet(nnx.Module):
  """Unet / HybridUnet with an optional hemisphere fusion at the input or bottleneck.

  Call with a slab (B, D, H, W, 1), D = ``slab_slices``, the slice to segment in the
  middle; returns logits (B, H, W, num_classes) for the middle slice. The Unet
  backbone looks at the middle slice only. H and W must divide by 16 (and the
  bottleneck by the attention partitions).
  """

  def __init__(self, options: ModelOptions, *, dtype=None, rngs: nnx.Rngs):
    self.options = options
    o = options
    in_features = 2 if o.fusion == "image_l1" else 1
    self.encoder = unet.Encoder(in_features, o.width, hybrid=o.backbone == "hybrid",
                                conv=o.conv, dtype=dtype, rngs=rngs)
    bottleneck = o.width * 2 ** (unet.NUM_LEVELS - 1)
    self.attention = (
        SymmetryAttention(bottleneck, o.partitions, use_self=o.attention_self,
                          use_symmetry=o.attention_symmetry, dtype=dtype, rngs=rngs)
        if o.fusion == "attention" else None)
    fused = 2 * bottleneck if o.fusion in ("feature_l1", "feature_concat") else bottleneck
    self.decoder = unet.Decoder(fused, o.width, o.num_classes, conv=o.conv, dtype=dtype,
                                rngs=rngs)

  def __call__(self, slab: jax.Array) -> jax.Array:
    o = self.options
    _check_slab(slab, o)
    if o.backbone == "unet":
      mid = slab.shape[1] // 2
      slab = slab[:, mid:mid + 1]
    if o.fusion == "image_l1":
      slab = jnp.concatenate([slab, jnp.abs(slab - mirror(slab))], axis=-1)
    levels = self.encoder(slab)
    middle = lambda y: y[:, y.shape[1] // 2]
    skips = [middle(level) for level in levels[:-1]]
    bottleneck = levels[-1]
    if o.fusion == "attention":
      x = self.attention(bottleneck)
    elif o.fusion == "feature_l1":
      x = middle(bottleneck)
      x = jnp.concatenate([x, jnp.abs(x - mirror(x))], axis=-1)
    elif o.fusion == "feature_concat":
      # Flipped back, so each position sees its own and its contralateral features.
      x_mirror = mirror(middle(self.encoder(mirror(slab))[-1]))
      x = jnp.concatenate([middle(bottleneck), x_mirror], axis=-1)
    else:
      x = middle(bottleneck)
    return self.decoder(x, skips)


def _check_slab(slab, o: ModelOptions):
  if slab.ndim != 5 or slab.shape[-1] != 1:
    raise ValueError(f"expected a slab (B, D, H, W, 1), got shape {slab.shape}")
  if slab.shape[1] != o.slab_slices:
    raise ValueError(f"slab has {slab.shape[1]} slices, model.slab_slices is "
                     f"{o.slab_slices}")
  h, w = slab.shape[2:4]
  if h % 16 or w % 16:
    raise ValueError(f"slice size {h}x{w} must divide by 16 (four in-plane poolings)")
  p, q = o.partitions
  if o.fusion == "attention" and ((h // 16) % p or (w // 16) % q):
    raise ValueError(f"bottleneck {h // 16}x{w // 16} does not divide into {p}x{q} "
                     f"partitions (model.partitions)")


class Sean(nnx.Module):
  """The whole method: alignment network (optional) + segmentation network."""

  def __init__(self, options: ModelOptions, *, dtype=None, rngs: nnx.Rngs):
    self.options = options
    self.aligner = (alignment.AlignmentNet(options.align_input_size, rngs=rngs)
                    if options.align else None)
    self.segmenter = SegmentationNet(options, dtype=dtype, rngs=rngs)


def volume_to_slabs(volume: jax.Array, slab_slices: int) -> jax.Array:
  """Every slice with its neighbours: (S, H, W) -> (S, 2T+1, H, W, 1).

  Edge slices are padded by replicating the first and last slice.
  """
  t = slab_slices // 2
  padded = jnp.pad(volume, ((t, t), (0, 0), (0, 0)), mode="edge")
  index = jnp.arange(volume.shape[0])[:, None] + jnp.arange(slab_slices)[None, :]
  return padded[index][..., None]


def segment_volume(model: Sean, volume: jax.Array, slice_weights=None,
                   batch_size: int = 8, refine: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
  """Lesion probabilities for a preprocessed volume, on the volume's own grid.

  volume: (S, H, W) preprocessed. refine: refine the network's alignment by the
  volume's own symmetry (``alignment.align_volume``). Returns (probabilities
  (S, H, W) of the lesion class, alpha (3,) of the alignment; zeros when the model
  does not align).
  Call ``model.eval()`` first.
  """
  volume = jnp.asarray(volume, jnp.float32)
  alpha = jnp.zeros(3, jnp.float32)
  if model.aligner is not None:
    if slice_weights is None:
      slice_weights = jnp.ones(volume.shape[:1])
    volume, alpha = _align(model.aligner, volume, jnp.asarray(slice_weights),
                           refine=bool(refine))
  slabs = volume_to_slabs(volume, model.options.slab_slices)
  probs = jnp.concatenate([_jit_lesion_probability(model.segmenter,
                                                   slabs[start:start + batch_size])
                           for start in range(0, slabs.shape[0], batch_size)])
  if model.aligner is not None:
    probs = _unalign(probs, alpha)
  return probs, alpha


# Compiled once per shape: run eagerly, the sampler's many small ops took ~1.7 s per
# volume to dispatch (a third of a tiny evaluation).
_unalign = jax.jit(alignment.unalign_volume)


@nnx.jit(static_argnames="refine")
def _align(aligner, volume, slice_weights, refine=False):
  return alignment.align_volume(aligner, volume, slice_weights, refine=refine)


def lesion_probability(segmenter: SegmentationNet, slabs: jax.Array) -> jax.Array:
  """The prediction step: slabs (B, D, H, W, 1) -> lesion probability (B, H, W),
  float32. Put the segmenter in eval mode first."""
  logits = segmenter(slabs)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


_jit_lesion_probability = nnx.jit(lesion_probability)
