"""Model FLOPs of a SEAN training step, counted from the architecture.

Every convolution, matrix product and attention einsum of ``SegmentationNet`` (the
network that stage 2 trains), forward and backward. A multiply-add counts 2 FLOPs.

Convolution (stride 1, "same" zero padding, kernel K per axis): only the products
that meet a real input voxel are counted, as XLA's cost analysis does; along an axis
of n voxels the kernel taps that land inside are ``sum_o max(0, n - |o|)`` over the
offsets o = -(K-1)/2 .. (K-1)/2, i.e. 3n - 2 for K = 3. So a 3x3x3 convolution of
C_in -> C_out channels on (B, D, H, W) costs

    2 * B * C_in * C_out * (3D - 2) * (3H - 2) * (3W - 2)

(7/9 of the dense count in depth for D = 3: padding slices hold no data).

Attention at the bottleneck (B, D, h, w, C), d = C / 2, N' = hw / (PQ) tokens per
partition, branches b (self, symmetry):

    projections  2 B h w C d (query, centre slice) + 2 B D h w C d (key, shared)
                 + b * 2 B D h w C d (values) + 2 B h w (b d) C (output W_z)
    core         b * 2 * 2 B D h w N' d (logits and weighted sum, one set per slice)

Backward: every product is computed again for each operand that needs a gradient:
the weight gradient of every layer and the input gradient of every layer but the
first (its input is data), and both operands of the attention's two einsums. So the
step is about 3x the forward pass. Element-wise work (BatchNorm, ReLU, softmax, the
loss, Adam) is left out, as in the usual MFU convention (PaLM, MaxText): XLA counts
it too, which is why XLA's total is a few percent higher.
"""

from __future__ import annotations

import dataclasses
import math

from sean_jax.models import unet
from sean_jax.models.sean import ModelOptions


def valid_taps(n: int, kernel: int) -> int:
  """Kernel taps inside an axis of n voxels, summed over the n outputs (stride 1,
  padding (kernel - 1) / 2 each side)."""
  half = kernel // 2
  return sum(max(0, n - abs(o)) for o in range(-half, half + 1))


@dataclasses.dataclass(frozen=True)
class Op:
  """One product of the network: its forward FLOPs and how many times the backward
  pass repeats them (one per operand that needs a gradient)."""
  name: str
  part: str          # encoder | attention | decoder
  flops: float
  backward_passes: int


def _conv(name, part, batch, cin, cout, spatial, kernel, first=False) -> Op:
  taps = math.prod(valid_taps(n, kernel) for n in spatial)
  return Op(name, part, 2.0 * batch * cin * cout * taps, 1 if first else 2)


def network_ops(options: ModelOptions, batch: int, size: int) -> list[Op]:
  """The products of ``SegmentationNet(options)`` on a (batch, D, size, size, 1) slab."""
  o = options
  depth = o.slab_slices if o.backbone == "hybrid" else 1
  widths = [o.width * 2**k for k in range(unet.NUM_LEVELS)]
  ops = []

  def encoder(tag):
    cin = 2 if o.fusion == "image_l1" else 1
    for k, cout in enumerate(widths):
      s = size // 2**k
      spatial = (depth, s, s) if o.backbone == "hybrid" else (s, s)
      kernel_batch = batch if o.backbone == "hybrid" else batch * depth
      ops.append(_conv(f"{tag}{k}.conv1", "encoder", kernel_batch, cin, cout, spatial,
                       3, first=k == 0))
      ops.append(_conv(f"{tag}{k}.conv2", "encoder", kernel_batch, cout, cout, spatial, 3))
      cin = cout

  encoder("encoder")
  if o.fusion == "feature_concat":
    encoder("mirror_encoder")
  channels = widths[-1]
  h = size // 2**(unet.NUM_LEVELS - 1)
  if o.fusion == "attention":
    ops += attention_ops(o, batch, depth, h, channels)
  fused = 2 * channels if o.fusion in ("feature_l1", "feature_concat") else channels
  ins = [fused] + widths[unet.NUM_LEVELS - 2:0:-1]
  outs = widths[unet.NUM_LEVELS - 2::-1]
  for j, (cin, cout) in enumerate(zip(ins, outs)):
    s = 2 * h * 2**j
    ops.append(Op(f"decoder{j}.up", "decoder", 2.0 * batch * s * s * cin * cout, 2))
    ops.append(_conv(f"decoder{j}.conv1", "decoder", batch, 2 * cout, cout, (s, s), 3))
    ops.append(_conv(f"decoder{j}.conv2", "decoder", batch, cout, cout, (s, s), 3))
  ops.append(_conv("head", "decoder", batch, o.width, o.num_classes, (size, size), 1))
  return ops


def attention_ops(o: ModelOptions, batch, depth, h, channels) -> list[Op]:
  """The attention's products on a (batch, depth, h, h, channels) bottleneck."""
  d = channels // 2
  names = [n for n, on in (("self", o.attention_self),
                           ("symmetry", o.attention_symmetry)) if on]
  tokens = h * h
  per_partition = tokens // (o.partitions[0] * o.partitions[1])
  proj = lambda n_maps, cin, cout: 2.0 * batch * n_maps * tokens * cin * cout
  ops = [Op("attention.query", "attention", proj(1, channels, d), 2),
         Op("attention.key", "attention", proj(depth, channels, d), 2)]
  for branch in names:
    ops.append(Op(f"attention.value_{branch}", "attention",
                  proj(depth, channels, d), 2))
    core = 2.0 * batch * depth * tokens * per_partition * d
    ops.append(Op(f"attention.logits_{branch}", "attention", core, 2))
    ops.append(Op(f"attention.weighted_sum_{branch}", "attention", core, 2))
  ops.append(Op("attention.out", "attention", proj(1, len(names) * d, channels), 2))
  return ops


@dataclasses.dataclass(frozen=True)
class StepFlops:
  forward: float
  backward: float
  by_part: dict  # forward FLOPs of encoder, attention, decoder

  @property
  def train_step(self) -> float:
    return self.forward + self.backward


def step_flops(options: ModelOptions, batch: int, size: int) -> StepFlops:
  """Model FLOPs of one training step (forward + backward) of a global batch of
  ``batch`` slabs of size x size; the forward alone is what prediction costs."""
  ops = network_ops(options, batch, size)
  parts = {}
  for op in ops:
    parts[op.part] = parts.get(op.part, 0.0) + op.flops
  return StepFlops(forward=sum(op.flops for op in ops),
                   backward=sum(op.flops * op.backward_passes for op in ops),
                   by_part=parts)
