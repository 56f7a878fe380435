"""Flax (NNX) modules of SEAN: sampler, alignment network, Unet/HybridUnet, attention."""

from sean_jax.models.alignment import AlignmentNet, align_volume, alignment_loss
from sean_jax.models.attention import SymmetryAttention
from sean_jax.models.sean import (VARIANTS, ModelOptions, Sean, SegmentationNet,
                                  segment_volume, volume_to_slabs)
