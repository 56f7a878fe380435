"""Behaviour of the model library that does not need PyTorch."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers  # tests/ is on sys.path under pytest
from sean_jax.checkpointing import init_rngs
from sean_jax.models import alignment, sampler
from sean_jax.models.attention import SymmetryAttention, symmetry_attention_naive
from sean_jax.models.sean import (VARIANTS, ModelOptions, Sean, SegmentationNet,
                                  segment_volume, volume_to_slabs)

TINY = dict(width=4, partitions=(2, 2))


def rngs(seed=0):
  return init_rngs(seed)  # fast-compiling initialisation


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture
def quick_compile():
  with helpers.most_xla_passes_off():
    yield


def smooth_image(key, n, h, w):
  """Smooth random images: bilinear sampling is near exact on them."""
  coarse = jax.random.normal(key, (n, 4, 4, 1))
  return jax.image.resize(coarse, (n, h, w, 1), "cubic")


# --- sampler ------------------------------------------------------------------

def test_warp_identity_is_exact():
  images = jax.random.normal(jax.random.key(0), (2, 12, 20, 3))
  out = sampler.warp(images, jnp.zeros(3))
  np.testing.assert_allclose(out, images, atol=1e-5)


def test_shift_by_one_pixel_moves_content_by_one_pixel():
  images = jax.random.normal(jax.random.key(1), (1, 8, 10, 1))
  # A_t(p) = A(p + t_px): tx = 2/W normalised is one pixel.
  out = sampler.warp(images, jnp.array([0.0, 2 / 10, 0.0]))
  np.testing.assert_allclose(out[0, :, :-1], images[0, :, 1:], atol=1e-6)
  np.testing.assert_allclose(out[0, :, -1], 0.0, atol=1e-6)  # zero padding


def test_rotation_by_90_degrees_is_a_transpose_of_axes():
  images = jax.random.normal(jax.random.key(2), (1, 9, 9, 1))
  out = sampler.warp(images, jnp.array([math.pi / 2, 0.0, 0.0]))
  # A_t(x, y) = A(c + R(p - c)): R(90) maps (dx, dy) to (-dy, dx).
  expected = jnp.rot90(images[0, :, :, 0], k=1)
  np.testing.assert_allclose(out[0, :, :, 0], expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_inverse_warp_undoes_forward_on_interior(shape):
  h, w = shape
  images = smooth_image(jax.random.key(3), 4, h, w)
  alpha = jnp.array([[0.2, 0.05, -0.04], [-0.3, -0.06, 0.02],
                     [0.0, 0.1, 0.1], [0.5, 0.0, 0.0]])
  back = sampler.unwarp(sampler.warp(images, alpha), alpha)
  interior = (slice(None), slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))
  error = jnp.abs(back - images)[interior].max()
  scale = jnp.abs(images).max()
  print(f"inverse warp max abs error on interior: {error:.2e} (signal {scale:.2f})")
  assert error < 0.05 * scale
  # The transform composed with its inverse is the identity, exactly.
  inv = sampler.invert_alpha(alpha, h, w)
  theta = sampler.rigid_theta(alpha, h, w)
  theta_inv = sampler.rigid_theta(inv, h, w)
  full = lambda t: jnp.concatenate([t, jnp.broadcast_to(jnp.array([[0, 0, 1.0]]),
                                                        t.shape[:-2] + (1, 3))], -2)
  np.testing.assert_allclose(full(theta) @ full(theta_inv),
                             jnp.broadcast_to(jnp.eye(3), (4, 3, 3)), atol=1e-6)


def test_pose_dict_round_trip():
  alpha = jnp.array([0.1, -0.2, 0.05])
  pose = sampler.alpha_to_pose(alpha, 64, 128)
  assert pose["shift_x_px"] == pytest.approx(-0.2 * 64)
  assert pose["shift_y_px"] == pytest.approx(0.05 * 32)
  np.testing.assert_allclose(sampler.pose_to_alpha(pose, 64, 128), alpha, atol=1e-6)


def test_warp_is_jittable_and_differentiable():
  images = smooth_image(jax.random.key(4), 2, 16, 16)
  grad = jax.jit(jax.grad(lambda a: sampler.warp(images, a).sum()))(jnp.full((2, 3), .1))
  assert grad.shape == (2, 3) and jnp.all(jnp.isfinite(grad)) and jnp.any(grad != 0)


# --- attention ----------------------------------------------------------------

@pytest.mark.parametrize("branches", [(True, True), (True, False), (False, True)])
def test_partition_shortcut_equals_literal_flipped_computation(branches):
  module = SymmetryAttention(8, (2, 4), use_self=branches[0], use_symmetry=branches[1],
                             rngs=rngs())
  x = jax.random.normal(jax.random.key(5), (2, 3, 4, 8, 8))
  fast, literal = module(x), symmetry_attention_naive(module, x)
  print(f"shortcut vs literal flip, branches={branches}: "
        f"{jnp.abs(fast - literal).max():.2e}")
  np.testing.assert_allclose(fast, literal, atol=1e-5)


def test_attention_is_mirror_equivariant():
  module = SymmetryAttention(8, (2, 2), rngs=rngs(1))
  x = jax.random.normal(jax.random.key(6), (2, 3, 4, 4, 8))
  mirror = lambda y: y[..., ::-1, :]
  np.testing.assert_allclose(module(mirror(x)), mirror(module(x)), atol=1e-5)
  symmetric = x + mirror(x)
  out = module(symmetric)
  np.testing.assert_allclose(out, mirror(out), atol=1e-5)


def test_attention_softmax_is_per_slice():
  """Each slice's key set has its own softmax: with identical slices and no value
  differences, the self branch sums D equal terms (D times one slice's output)."""
  module = SymmetryAttention(4, (1, 1), use_symmetry=False, rngs=rngs(2))
  one = jax.random.normal(jax.random.key(7), (1, 1, 2, 2, 4))
  three = jnp.repeat(one, 3, axis=1)
  y1 = module(one) - one[:, 0]
  y3 = module(three) - three[:, 1]
  bias = module.out.bias[...]
  np.testing.assert_allclose(y3 - bias, 3 * (y1 - bias), atol=1e-5)


def test_attention_rejects_indivisible_partitions():
  module = SymmetryAttention(4, (3, 3), rngs=rngs())
  with pytest.raises(ValueError, match="partitions"):
    module(jnp.zeros((1, 3, 4, 4, 4)))


# --- models -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_has_finite_gradients(name, quick_compile):
  net = SegmentationNet(ModelOptions(**TINY, **VARIANTS[name]), rngs=rngs())
  slab = jax.random.normal(jax.random.key(8), (2, 3, 32, 32, 1))
  labels = (jax.random.uniform(jax.random.key(9), (2, 32, 32)) > 0.8).astype(jnp.int32)
  from sean_jax.losses import segmentation_loss

  def loss_fn(model):
    return segmentation_loss(model(slab), labels)

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(net)
  leaves = jax.tree.leaves(grads)
  assert jnp.isfinite(loss)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_variants_differ_only_in_options():
  shapes = {}
  for name, kw in VARIANTS.items():
    net = SegmentationNet(ModelOptions(**TINY, **kw), rngs=rngs())
    shapes[name] = nnx.state(net, nnx.Param)
  # Fusion adds inputs/weights; the encoders of unet and hybrid differ in kernel rank.
  enc = lambda n: shapes[n]["encoder"]["blocks"][0]["conv1"]["kernel"].shape
  assert enc("unet") == (3, 3, 1, 4)
  assert enc("hybrid") == (3, 3, 3, 1, 4)
  assert enc("unet_im_l1") == (3, 3, 2, 4)
  assert "attention" in shapes["sean"] and "attention" not in shapes["hybrid"]
  assert "value_sym" not in shapes["align_self"]["attention"]


def test_unet_uses_only_the_middle_slice():
  net = SegmentationNet(ModelOptions(**TINY, **VARIANTS["unet"]), rngs=rngs())
  net.eval()
  slab = jax.random.normal(jax.random.key(10), (1, 3, 32, 32, 1))
  other = slab.at[:, 0].set(5.0).at[:, 2].set(-5.0)
  np.testing.assert_allclose(net(slab), net(other), atol=1e-6)


def test_hybrid_uses_adjacent_slices():
  net = SegmentationNet(ModelOptions(**TINY, **VARIANTS["sean"]), rngs=rngs())
  net.eval()
  slab = jax.random.normal(jax.random.key(10), (1, 3, 32, 32, 1))
  other = slab.at[:, 0].set(5.0)
  assert jnp.abs(net(slab) - net(other)).max() > 1e-4


@pytest.mark.parametrize("bad, match", [
    (dict(backbone="resnet"), "backbone"), (dict(fusion="sum"), "fusion"),
    (dict(slab_slices=2), "odd"), (dict(conv="im2col"), "model.conv"),
    (dict(fusion="attention", attention_self=False, attention_symmetry=False),
     "attention")])
def test_bad_options_are_named(bad, match):
  with pytest.raises(ValueError, match=match):
    ModelOptions(**{**TINY, **bad})


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_depth_folded_conv_equals_xla_3d_conv(depth):
  """The fold (one 2D conv over stacked depth taps) against lax's own 3D convolution,
  forward and both gradients, including the zero padding at the first and last slice."""
  from sean_jax.models import unet
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 3, 4, 6)) * 0.2
  x = jax.random.normal(jax.random.key(3), (2, depth, 8, 8, 4))
  cotangent = jax.random.normal(jax.random.key(4), (2, depth, 8, 8, 6))

  def native(kernel, x):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), [(1, 1)] * 3,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

  folded = lambda kernel, x: unet.depth_folded_conv(x, kernel)
  y_native, vjp_native = jax.vjp(native, kernel, x)
  y_folded, vjp_folded = jax.vjp(folded, kernel, x)
  np.testing.assert_allclose(y_folded, y_native, rtol=1e-5, atol=1e-5)
  for g_folded, g_native in zip(vjp_folded(cotangent), vjp_native(cotangent)):
    np.testing.assert_allclose(g_folded, g_native, rtol=1e-5, atol=1e-4)


def test_conv_choice_keeps_parameters_outputs_and_gradients(quick_compile):
  """Every implementation of model.conv computes the same network from the same
  parameters: logits and the loss gradient of every parameter agree."""
  from sean_jax.ops import onednn
  impls = ["fold", "native"] + (["onednn"] if onednn.available() else [])
  options = ModelOptions(**{**TINY, "backbone": "hybrid"})  # 3D encoder, 2D decoder
  slab = jax.random.normal(jax.random.key(5), (2, 3, 32, 32, 1))
  results = []
  for impl in impls:
    net = SegmentationNet(dataclasses.replace(options, conv=impl), rngs=rngs())
    if results:
      nnx.update(net, nnx.state(first))
    else:
      first = net
    loss = lambda net: jnp.mean(jnp.square(net(slab)))
    results.append(nnx.jit(lambda net: (net(slab), nnx.grad(loss)(net)))(net))
  for logits, grads in results[1:]:
    np.testing.assert_allclose(logits, results[0][0], rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5),
                 grads, results[0][1])


def test_bad_input_shapes_are_named():
  net = SegmentationNet(ModelOptions(**TINY), rngs=rngs())
  with pytest.raises(ValueError, match="divide by 16"):
    net(jnp.zeros((1, 3, 40, 40, 1)))
  with pytest.raises(ValueError, match="slab_slices"):
    net(jnp.zeros((1, 5, 32, 32, 1)))
  with pytest.raises(ValueError, match="partitions"):
    SegmentationNet(ModelOptions(width=4, partitions=(3, 3)),
                    rngs=rngs())(jnp.zeros((1, 3, 32, 32, 1)))


def test_paper_size_sean_compiles():
  """The full model at 512x512, w = 64 (C = 1024 at the bottleneck) traces."""
  options = ModelOptions(width=64, partitions=(4, 4), align_input_size=128)
  model = nnx.eval_shape(lambda: Sean(options, rngs=rngs()))
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, slab, slices):
    m = nnx.merge(graphdef, state)
    return m.segmenter(slab), m.aligner(slices)

  logits, alpha = jax.eval_shape(
      forward, state, jax.ShapeDtypeStruct((8, 3, 512, 512, 1), jnp.float32),
      jax.ShapeDtypeStruct((8, 512, 512, 1), jnp.float32))
  assert logits.shape == (8, 512, 512, 2) and alpha.shape == (8, 3)
  attention_channels = state["segmenter"]["attention"]["query"]["kernel"].shape
  assert attention_channels == (1024, 512)


# --- alignment ----------------------------------------------------------------

def test_alignment_net_starts_at_identity_and_is_bounded():
  net = alignment.AlignmentNet(32, rngs=rngs())
  images = jax.random.normal(jax.random.key(11), (3, 64, 64, 1))
  np.testing.assert_allclose(net(images), 0.0)
  net.fc.kernel[...] = jnp.full(net.fc.kernel.shape, 100.0)
  alpha = net(images)
  assert jnp.all(jnp.abs(alpha[:, 0]) <= math.radians(30) + 1e-6)
  assert jnp.all(jnp.abs(alpha[:, 1:]) <= 0.25 + 1e-6)


def test_alignment_loss_rewards_symmetry():
  """A symmetric head moved off-centre: the loss is lower at the true transform."""
  h = w = 32
  yy, xx = jnp.mgrid[0:h, 0:w]
  head = ((xx - 15.5) ** 2 / 100 + (yy - 15.5) ** 2 / 150 < 1).astype(jnp.float32)
  head = head * (1 + 0.5 * (yy / h))  # asymmetric front-back, symmetric left-right
  true_alpha = jnp.array([0.0, 0.25, 0.0])  # content sits 4 px to the right
  posed = sampler.unwarp(head[None, :, :, None], true_alpha)
  loss_identity = alignment.alignment_loss(posed, jnp.zeros((1, 3)))
  loss_true = alignment.alignment_loss(posed, true_alpha[None])
  assert loss_true < 0.5 * loss_identity


def test_aggregate_alpha_ignores_empty_slices():
  alphas = jnp.array([[9.0, 9, 9], [0.1, 0.2, 0.3], [0.2, 0.3, 0.4], [0.3, 0.4, 0.5]])
  weights = jnp.array([0, 1, 1, 1])
  np.testing.assert_allclose(alignment.aggregate_alpha(alphas, weights), [.2, .3, .4],
                             atol=1e-6)
  np.testing.assert_allclose(alignment.aggregate_alpha(alphas, jnp.zeros(4)),
                             np.median(np.asarray(alphas), axis=0), atol=1e-6)


def test_align_volume_applies_one_transform_to_every_slice():
  net = alignment.AlignmentNet(32, rngs=rngs())
  volume = jax.random.normal(jax.random.key(12), (4, 32, 32))
  aligned, alpha = alignment.align_volume(net, volume)
  np.testing.assert_allclose(alpha, 0.0)
  np.testing.assert_allclose(aligned, volume, atol=1e-5)


def test_volume_to_slabs_replicates_edges():
  volume = jnp.arange(4.0)[:, None, None] * jnp.ones((4, 2, 2))
  slabs = volume_to_slabs(volume, 3)
  assert slabs.shape == (4, 3, 2, 2, 1)
  np.testing.assert_array_equal(slabs[:, :, 0, 0, 0],
                                [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])


def test_segment_volume_returns_input_grid_probabilities():
  model = Sean(ModelOptions(**TINY, align_input_size=32), rngs=rngs())
  model.eval()
  volume = jax.random.normal(jax.random.key(13), (3, 32, 32))
  probs, alpha = segment_volume(model, volume, batch_size=2)
  assert probs.shape == (3, 32, 32) and alpha.shape == (3,)
  assert jnp.all((probs >= 0) & (probs <= 1))


def test_bfloat16_step_stays_close_to_float32():
  """half_precision: bfloat16 activations and matrix products, float32 parameters and
  loss. bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per value);
  the forward pass through ~20 conv + BatchNorm layers stays within about 1%, so the
  loss is held to 2%. The backward pass goes through the same layers again, and at
  initialisation the deep encoder's gradients are small differences of large terms:
  measured here (jitted), the gradient's direction (what Adam follows) has a cosine of
  0.983 overall and 0.92 at worst against float32 (eagerly 0.974 and 0.88, a BatchNorm
  bias). The test holds 0.95
  overall and 0.8 per tensor; a float32 path left in bfloat16 by mistake (a cast lost
  in the loss, bfloat16 parameters) fails the dtype checks, a broken one the cosines."""
  from sean_jax import losses
  options = ModelOptions(**{**TINY, "backbone": "hybrid", "fusion": "attention"})
  f32 = SegmentationNet(options, rngs=rngs())
  bf16 = SegmentationNet(options, dtype=jnp.bfloat16, rngs=rngs())
  nnx.update(bf16, nnx.state(f32))
  params = nnx.state(bf16, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  slab = jax.random.normal(jax.random.key(6), (4, 3, 32, 32, 1))
  yy, xx = np.mgrid[:32, :32]
  mask = jnp.asarray(np.broadcast_to((yy - 12) ** 2 + (xx - 20) ** 2 < 25, (4, 32, 32)),
                     jnp.int32)

  def loss_and_grads(net):
    logits_dtype = []  # filled while tracing

    def objective(n):
      logits = n(slab)
      logits_dtype.append(logits.dtype)
      return losses.segmentation_loss(logits, mask)
    # Jitted as training is (and eagerly its ~100 small ops cost a minute to dispatch).
    loss, grads = nnx.jit(nnx.value_and_grad(objective))(net)
    return loss, grads, logits_dtype[0]

  loss32, grads32, dtype32 = loss_and_grads(f32)
  loss16, grads16, dtype16 = loss_and_grads(bf16)
  assert dtype32 == jnp.float32 and dtype16 == jnp.bfloat16
  assert loss16.dtype == jnp.float32
  assert abs(float(loss16) - float(loss32)) <= 0.02 * abs(float(loss32))
  g32 = [np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads32)]
  g16 = [np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads16)]
  cosine = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
  assert cosine(np.concatenate(g16), np.concatenate(g32)) > 0.95
  per_tensor = [cosine(a, b) for a, b in zip(g16, g32) if np.linalg.norm(b) > 1e-8]
  assert min(per_tensor) > 0.8, sorted(per_tensor)[:3]


def test_upsample_conv_equals_flax_conv_transpose():
  """The decoder's up-conv as a matrix product against nnx.ConvTranspose, forward and
  both gradients."""
  from sean_jax.models import unet
  up = nnx.ConvTranspose(3, 5, (2, 2), strides=(2, 2), padding="VALID", use_bias=False,
                         rngs=rngs())
  x = jax.random.normal(jax.random.key(6), (2, 4, 6, 3))
  kernel = up.kernel[...]
  cotangent = jax.random.normal(jax.random.key(7), (2, 8, 12, 5))

  def lax_up(kernel, x):  # what nnx.ConvTranspose calls
    return jax.lax.conv_transpose(x, kernel, (2, 2), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))

  np.testing.assert_allclose(lax_up(kernel, x), up(x), rtol=1e-6, atol=1e-6)
  y, vjp = jax.vjp(lambda k, x: unet.upsample_conv(x, k), kernel, x)
  y_ref, vjp_ref = jax.vjp(lax_up, kernel, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for grad, grad_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_max_pool_2x2_equals_flax_max_pool():
  from sean_jax.models import unet
  x = jax.random.normal(jax.random.key(8), (2, 3, 8, 6, 4))
  cotangent = jax.random.normal(jax.random.key(9), (2, 3, 4, 3, 4))
  flax_pool = lambda x: nnx.max_pool(x, (1, 2, 2), strides=(1, 2, 2))
  y, vjp = jax.vjp(unet.max_pool_2x2, x)
  y_ref, vjp_ref = jax.vjp(flax_pool, x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(cotangent)[0], vjp_ref(cotangent)[0])


def test_conv_auto_falls_back_to_xla_without_onednn(monkeypatch):
  from sean_jax.models import unet
  from sean_jax.ops import onednn
  monkeypatch.setattr(onednn, "_load", lambda: (None, "no compiler"))
  assert unet.resolve_conv("auto") == "fold"
  with pytest.raises(ValueError, match="no compiler"):
    unet.resolve_conv("onednn")
  with pytest.raises(ValueError, match="float32"):
    unet.resolve_conv("onednn", jnp.bfloat16)
  assert unet.resolve_conv("auto", jnp.bfloat16) == "fold"
