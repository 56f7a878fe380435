"""SEAN in plain PyTorch (NCHW / NCDHW), written from DESIGN.md as a reference for the
JAX models. Clarity over speed: it is only run on tiny shapes in the parity tests.

Conventions fixed by DESIGN.md (the JAX code follows the same ones, so weights can be
copied with ``convert.py``):

* alignment transform alpha = (theta [rad], tx, ty), shifts in normalised units,
  applied with ``F.affine_grid`` + ``F.grid_sample(bilinear, zeros,
  align_corners=False)``; the rotation is rigid in pixel space about the centre.
* AlignmentNet: [avg-pool to ``input_size``] conv 7x7 - relu - maxpool 2 - conv 5x5 -
  relu - maxpool 2 - flatten - fc 3 (zero at the start) - tanh scaled to
  (30 deg, 0.25, 0.25).
* Encoder: 5 x (conv-bn-relu x2), no conv bias; max pooling in-plane only (1x2x2 for
  the hybrid 3D encoder, 2x2 for the 2D Unet); level k has width * 2^k channels.
* Decoder on the middle plane: 4 x (ConvTranspose 2x2/2 with bias, concat
  [up, skip], conv-bn-relu x2), then a 1x1 conv with bias to the classes.
* Symmetry attention: 1x1 projections theta, phi (keys for both branches), g (self
  values), h (symmetry values) to C/2 with bias; a softmax per slice's key set scaled
  by 1/sqrt(C/2); symmetry keys/values from the literally flipped feature map; output
  W_z(concat(Y_self, Y_sym)) (1x1 with bias) added to the centre slice.
* BatchNorm: PyTorch defaults (momentum 0.1, eps 1e-5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_LEVELS = 5


# ----------------------------------------------------------------------------- sampler

def rigid_affine(alpha: torch.Tensor, height: int, width: int) -> torch.Tensor:
  """(N, 3) alpha -> (N, 2, 3) ``affine_grid`` matrices.

  A pixel offset from the centre, d = (x, y) in pixels, is read at ``R d + t_px``.
  Normalised coordinates are u = D^-1 d with D = diag(W/2, H/2), so the matrix acting
  on normalised coordinates is ``D^-1 R D`` and the shift is (tx, ty) unchanged.
  """
  angle, tx, ty = alpha[:, 0], alpha[:, 1], alpha[:, 2]
  cos, sin = torch.cos(angle), torch.sin(angle)
  rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
  to_px = torch.diag(alpha.new_tensor([width / 2.0, height / 2.0]))
  to_norm = torch.diag(alpha.new_tensor([2.0 / width, 2.0 / height]))
  linear = to_norm @ rot @ to_px
  return torch.cat([linear, torch.stack([tx, ty], -1)[:, :, None]], dim=-1)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
  """The inverse of (N, 2, 3) affine maps, via the 3x3 homogeneous matrix."""
  bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
  return torch.linalg.inv(torch.cat([theta, bottom], dim=1))[:, :2]


def warp_affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
  grid = F.affine_grid(theta, list(images.shape), align_corners=False)
  return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                       align_corners=False)


def warp(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
  """images (N, C, H, W), alpha (N, 3) -> warped (N, C, H, W)."""
  return warp_affine(images, rigid_affine(alpha, *images.shape[-2:]))


def unwarp(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
  return warp_affine(images, invert_affine(rigid_affine(alpha, *images.shape[-2:])))


# --------------------------------------------------------------------------- alignment

class AlignmentNet(nn.Module):
  """Input (N, 1, H, W) with H = W a multiple of ``input_size``; output alpha (N, 3)."""

  def __init__(self, input_size: int = 128, features: int = 32,
               max_rotation_deg: float = 30.0, max_shift: float = 0.25):
    super().__init__()
    self.input_size = input_size
    self.conv1 = nn.Conv2d(1, features, 7, padding=3)
    self.conv2 = nn.Conv2d(features, features, 5, padding=2)
    side = input_size // 4
    self.fc = nn.Linear(features * side * side, 3)
    self.fc.input_chw = (features, side, side)  # for convert.py: torch flattens CHW
    nn.init.zeros_(self.fc.weight)
    nn.init.zeros_(self.fc.bias)
    self.register_buffer(
        "bounds", torch.tensor([math.radians(max_rotation_deg), max_shift, max_shift]),
        persistent=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    factor = x.shape[-1] // self.input_size
    if factor > 1:
      x = F.avg_pool2d(x, factor)
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return torch.tanh(self.fc(torch.flatten(x, 1))) * self.bounds


def alignment_loss(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
  """Eq. 1 with mean L1: |flip(A_t) - A_t| + |f^-1(A_t) - A|, A_t = f_alpha(A)."""
  aligned = warp(images, alpha)
  symmetry = (torch.flip(aligned, dims=[-1]) - aligned).abs().mean()
  restoration = (unwarp(aligned, alpha) - images).abs().mean()
  return symmetry + restoration


# ------------------------------------------------------------------------ unet blocks

class ConvBlock(nn.Module):
  """(conv 3x3[x3] without bias - BatchNorm - ReLU) x 2."""

  def __init__(self, cin: int, cout: int, dims: int):
    super().__init__()
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    self.conv1 = conv(cin, cout, 3, padding=1, bias=False)
    self.bn1 = norm(cout)
    self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
    self.bn2 = norm(cout)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(x)))


class Encoder(nn.Module):
  """hybrid: (B, C, D, H, W) with 3D convs and 1x2x2 pooling; else (B, C, H, W), 2D."""

  def __init__(self, cin: int, width: int, hybrid: bool):
    super().__init__()
    dims = 3 if hybrid else 2
    widths = [width * 2**k for k in range(NUM_LEVELS)]
    self.blocks = nn.ModuleList(
        ConvBlock(a, b, dims) for a, b in zip([cin] + widths[:-1], widths))
    self.pool = nn.MaxPool3d((1, 2, 2)) if hybrid else nn.MaxPool2d(2)

  def forward(self, x):
    levels = []
    for k, block in enumerate(self.blocks):
      x = block(self.pool(x) if k else x)
      levels.append(x)
    return levels


class DecoderBlock(nn.Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)  # BN follows
    self.block = ConvBlock(2 * cout, cout, 2)

  def forward(self, x, skip):
    return self.block(torch.cat([self.up(x), skip], dim=1))


class Decoder(nn.Module):
  """(B, C_b, H/16, W/16) + 4 skips (levels 0-3, 2D) -> logits (B, K, H, W)."""

  def __init__(self, bottleneck: int, width: int, num_classes: int = 2):
    super().__init__()
    outs = [width * 2**k for k in reversed(range(NUM_LEVELS - 1))]  # 8w 4w 2w w
    ins = [bottleneck] + outs[:-1]
    self.blocks = nn.ModuleList(DecoderBlock(a, b) for a, b in zip(ins, outs))
    self.head = nn.Conv2d(width, num_classes, 1)

  def forward(self, x, skips):
    for block, skip in zip(self.blocks, reversed(skips)):
      x = block(x, skip)
    return self.head(x)


# -------------------------------------------------------------------------- attention

class SymmetryAttention(nn.Module):
  """x (B, C, D, H, W) -> (B, C, H, W): centre slice + W_z(concat(Y, Y~)).

  For every partition (j, k) of the centre slice, attention to partition (j, k) of each
  slice t (self) and of each horizontally flipped slice (symmetry), one softmax per t,
  summed over t.
  """

  def __init__(self, channels: int, partitions=(4, 4), use_self: bool = True,
               use_symmetry: bool = True):
    super().__init__()
    d = channels // 2
    self.partitions = tuple(partitions)
    self.use_self, self.use_symmetry = use_self, use_symmetry
    self.query = nn.Conv2d(channels, d, 1)                                 # theta
    self.key = nn.Conv3d(channels, d, 1, bias=False)  # phi; softmax cancels a bias
    self.value_self = nn.Conv3d(channels, d, 1) if use_self else None      # g
    self.value_sym = nn.Conv3d(channels, d, 1) if use_symmetry else None   # h
    self.out = nn.Conv2d((int(use_self) + int(use_symmetry)) * d, channels, 1)  # W_z

  def forward(self, x):
    b, _, depth, height, width = x.shape
    p, q = self.partitions
    h, w = height // p, width // q
    centre = x[:, :, depth // 2]
    queries = self.query(centre)
    d = queries.shape[1]
    # (B, d, P*h, Q*w) -> (B, P, Q, h*w, d)
    queries = (queries.reshape(b, d, p, h, q, w).permute(0, 2, 4, 3, 5, 1)
               .reshape(b, p, q, h * w, d))

    def parts(y):  # (B, d, D, P*h, Q*w) -> (B, P, Q, D, h*w, d)
      return (y.reshape(b, d, depth, p, h, q, w).permute(0, 3, 5, 2, 4, 6, 1)
              .reshape(b, p, q, depth, h * w, d))

    def attend(source, value_proj):
      keys, values = parts(self.key(source)), parts(value_proj(source))
      logits = torch.einsum("bpqnc,bpqtmc->bpqtnm", queries, keys) / math.sqrt(d)
      return torch.einsum("bpqtnm,bpqtmc->bpqnc", logits.softmax(dim=-1), values)

    ys = []
    if self.use_self:
      ys.append(attend(x, self.value_self))
    if self.use_symmetry:
      ys.append(attend(torch.flip(x, dims=[-1]), self.value_sym))
    y = torch.cat(ys, dim=-1)
    c = y.shape[-1]
    y = y.reshape(b, p, q, h, w, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)
    return centre + self.out(y)


# ------------------------------------------------------------------------ whole model

class SegmentationNet(nn.Module):
  """Unet / HybridUnet with a hemisphere fusion (DESIGN.md §5).

  ``options``: any object with the fields backbone, fusion, attention_self,
  attention_symmetry, width, slab_slices, partitions, num_classes (e.g. the JAX
  ``ModelOptions``). Input slab (B, 1, D, H, W); output logits (B, K, H, W) of the
  middle slice.
  """

  def __init__(self, options):
    super().__init__()
    o = self.options = options
    self.hybrid = o.backbone == "hybrid"
    cin = 2 if o.fusion == "image_l1" else 1
    self.encoder = Encoder(cin, o.width, self.hybrid)
    c = o.width * 2 ** (NUM_LEVELS - 1)
    self.attention = (SymmetryAttention(c, o.partitions, o.attention_self,
                                        o.attention_symmetry)
                      if o.fusion == "attention" else None)
    fused = 2 * c if o.fusion in ("feature_l1", "feature_concat") else c
    self.decoder = Decoder(fused, o.width, o.num_classes)

  def _middle(self, y):
    return y[:, :, y.shape[2] // 2] if self.hybrid else y

  def forward(self, slab):
    fusion = self.options.fusion
    x = slab if self.hybrid else slab[:, :, slab.shape[2] // 2]
    if fusion == "image_l1":
      x = torch.cat([x, (x - torch.flip(x, dims=[-1])).abs()], dim=1)
    levels = self.encoder(x)
    skips = [self._middle(y) for y in levels[:-1]]
    bottleneck = levels[-1]
    if fusion == "attention":
      z = self.attention(bottleneck if self.hybrid else bottleneck[:, :, None])
    elif fusion == "feature_l1":
      m = self._middle(bottleneck)
      z = torch.cat([m, (m - torch.flip(m, dims=[-1])).abs()], dim=1)
    elif fusion == "feature_concat":
      other = self._middle(self.encoder(torch.flip(x, dims=[-1]))[-1])
      z = torch.cat([self._middle(bottleneck), torch.flip(other, dims=[-1])], dim=1)
    else:
      z = self._middle(bottleneck)
    return self.decoder(z, skips)


# ------------------------------------------------------------------------------ losses

def generalized_dice_loss(logits: torch.Tensor, labels: torch.Tensor,
                          smooth: float = 1e-5) -> torch.Tensor:
  """GDL (Sudre et al. 2017), weights 1/(sum ref)^2 per image and class; a class
  missing from an image's reference gets the largest weight of the present classes.
  logits (B, K, H, W), labels (B, H, W) int64."""
  probs = logits.float().softmax(dim=1)
  onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
  dims = tuple(range(2, logits.ndim))
  ref = onehot.sum(dims)
  weights = 1.0 / ref**2
  missing = torch.isinf(weights)
  largest = weights.masked_fill(missing, 0.0).amax(dim=1, keepdim=True)
  weights = torch.where(missing, largest.expand_as(weights), weights)
  overlap = (weights * (probs * onehot).sum(dims)).sum(1)
  total = (weights * (probs + onehot).sum(dims)).sum(1)
  return (1.0 - (2.0 * overlap + smooth) / (total + smooth)).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  return generalized_dice_loss(logits, labels) + F.cross_entropy(logits.float(), labels)
