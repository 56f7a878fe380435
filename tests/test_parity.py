"""Numerical parity of the JAX models with the independent PyTorch reference in
``tests/torch_reference`` (CPU, float32, JAX matmul precision "highest").

Every test draws fresh random inputs and weights; the seed is printed (and recorded as
a property) and ``SEAN_PARITY_SEED=<seed>`` replays a run. Measured errors are printed
(``pytest -s``) and summarised in a table at the end of the session.

Error measures and tolerances:

* sampler: max |jax - torch| <= 1e-5 (images with values in [0, 1]).
* forward outputs, BatchNorm running statistics: max |jax - torch| / max |torch|
  <= 1e-4 (relative in the max norm; outputs are O(1), so about 1e-5 absolute too).
* loss values: |jax - torch| / |torch| <= 1e-5.
* gradients of a training step: per parameter tensor
  ||g_jax - g_torch||_2 / ||g_torch||_2 <= 1e-4. (The two biases whose gradient is
  zero or nearly so in exact arithmetic, the attention key's and the decoder
  up-convs', were removed from both models: compared, they were rounding noise.)

Known convention difference, checked explicitly: in training mode PyTorch's BatchNorm
updates ``running_var`` with the unbiased batch variance (times n / (n - 1), n the
number of values per channel) while Flax uses the biased one; both normalise with the
biased variance. So after k updates from r0 (decay m = 0.9 per update, both use 0.1 of
the new value): ``torch_var - m^k r0 == (flax_var - m^k r0) * n / (n - 1)``.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch "
                            "(pip install -e '.[test]')")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sean_jax import losses  # noqa: E402
from sean_jax.models import alignment, attention, sampler, sean, unet  # noqa: E402
try:  # tests/ is on sys.path under pytest's default (prepend) import mode
  import helpers  # noqa: E402
  from torch_reference import convert  # noqa: E402
  from torch_reference import modules as ref  # noqa: E402
except ImportError:  # tests/ as a package (rootdir on sys.path)
  from tests import helpers  # noqa: E402
  from tests.torch_reference import convert  # noqa: E402
  from tests.torch_reference import modules as ref  # noqa: E402

SAMPLER_ATOL = 1e-5
FORWARD_RTOL = 1e-4
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
BN_MOMENTUM = 0.1   # torch's momentum; Flax's is 1 - this = 0.9


@pytest.fixture(autouse=True, scope="module")
def _precision():
  """Full float32 matmuls/convs in JAX (and torch), for this module only.

  Also skips most XLA optimisation passes while this module runs: compilation, not
  computation, dominates at these tiny shapes (about 40% less time), and the parity is
  of the models' math. ``SEAN_PARITY_XLA_OPT=1`` runs with the default passes.
  """
  previous = torch.get_float32_matmul_precision()
  torch.set_float32_matmul_precision("highest")
  passes = (helpers.most_xla_passes_off()
            if os.environ.get("SEAN_PARITY_XLA_OPT", "0") == "0"
            else contextlib.nullcontext())
  try:
    with passes, jax.default_matmul_precision("highest"):
      yield
  finally:
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def rng(record_property):
  seed = int(os.environ.get("SEAN_PARITY_SEED", np.random.SeedSequence().entropy))
  print(f"\nseed {seed} (replay with SEAN_PARITY_SEED={seed})")
  record_property("seed", seed)
  return np.random.default_rng(seed)


class Parity:
  """Measures, prints and records errors; asserts each against its tolerance."""

  def __init__(self, record_property):
    self.rows = []
    record_property("parity", self.rows)

  def _record(self, quantity, measured, tol, detail=""):
    print(f"  {quantity:<48} {measured:9.2e}  (tol {tol:.0e}) {detail}")
    self.rows.append((quantity, float(measured), tol))
    assert measured <= tol, f"{quantity}: {measured:.3e} > {tol:.0e} {detail}"

  def max_abs(self, label, got, want, tol=SAMPLER_ATOL):
    got, want = _np64(got), _np64(want)
    assert got.shape == want.shape, (label, got.shape, want.shape)
    self._record(f"abs:{label}", np.abs(got - want).max(), tol)

  def max_rel(self, label, got, want, tol=FORWARD_RTOL, kind="fwd"):
    """max |got - want| / max |want|."""
    got, want = _np64(got), _np64(want)
    assert got.shape == want.shape, (label, got.shape, want.shape)
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert scale > 0, f"{label}: reference is all zero, the check would be vacuous"
    self._record(f"{kind}:{label}", err / scale, tol,
                 f"max|d|={err:.1e} max|ref|={scale:.1e}")

  def l2_rel(self, label, got, want, tol=GRAD_RTOL, kind="grad"):
    got, want = _np64(got), _np64(want)
    assert got.shape == want.shape, (label, got.shape, want.shape)
    norm = np.linalg.norm(want)
    assert norm > 0, f"{label}: reference gradient is zero, the check would be vacuous"
    self._record(f"{kind}:{label}", np.linalg.norm(got - want) / norm, tol,
                 f"|ref|={norm:.1e}")


@pytest.fixture
def parity(record_property):
  return Parity(record_property)


# ------------------------------------------------------------------------- helpers

def _np64(x):
  if isinstance(x, torch.Tensor):
    x = x.detach().cpu().numpy()
  return np.asarray(x, np.float64)


def to_torch(x):
  """Channel-last numpy/JAX array -> channel-first float32 torch tensor."""
  return torch.from_numpy(np.moveaxis(np.asarray(x, np.float32), -1, 1).copy())


def to_channel_last(t):
  return np.moveaxis(t.detach().cpu().numpy(), 1, -1)


def randomize(model, rng):
  """Random biases, BatchNorm affine parameters and running statistics, and random
  values for zero-initialised kernels (the alignment fc); other kernels keep their
  (seeded, random) initialisation."""
  updates = []
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  for path, var in flat:
    x = np.asarray(var[...])
    name = path[-1]
    if isinstance(var, nnx.BatchStat):
      x = rng.normal(0, 0.2, x.shape) if name == "mean" else rng.uniform(0.5, 2, x.shape)
    elif name == "scale":
      x = rng.uniform(0.5, 1.5, x.shape)
    elif name == "bias":
      x = rng.normal(0, 0.1, x.shape)
    elif not np.any(x):
      x = rng.normal(0, 0.5 / np.sqrt(x.shape[0]), x.shape)
    updates.append((path, var.replace(jnp.asarray(x, jnp.float32))))
  nnx.update(model, nnx.from_flat_state(updates))


def pair(make_jax, torch_model, rng):
  """A randomised JAX model and the torch model with its weights copied in."""
  jax_model = make_jax(nnx.Rngs(int(rng.integers(2**31))))
  randomize(jax_model, rng)
  copied = convert.jax_to_torch(jax_model, torch_model)
  expected = len(nnx.to_flat_state(nnx.state(jax_model,
                                             nnx.Any(nnx.Param, nnx.BatchStat))))
  assert copied == expected > 0
  return jax_model, torch_model


def set_mode(jax_model, torch_model, mode):
  if mode == "train":
    jax_model.train()
    torch_model.train()
  else:
    jax_model.eval()
    torch_model.eval()


class BatchNormCounter:
  """Forward hooks on the torch BatchNorms: how many updates, over how many values per
  channel, and the running statistics before the forward."""

  def __init__(self, torch_model):
    self.calls, self.before, self.handles = {}, {}, []
    for name, mod in torch_model.named_modules():
      if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
        self.before[name] = (mod.running_mean.clone().numpy(),
                             mod.running_var.clone().numpy())
        self.calls[name] = []
        self.handles.append(mod.register_forward_hook(self._hook(name)))

  def _hook(self, name):
    def hook(mod, inputs, output):
      x = inputs[0]
      self.calls[name].append(x.numel() // x.shape[1])
    return hook

  def remove(self):
    for h in self.handles:
      h.remove()


def check_batch_stats(parity, jax_model, torch_model, counter, mode):
  """Running statistics after the forward: unchanged in eval mode; in train mode equal
  for the mean and related by n / (n - 1) for the variance (see the module doc)."""
  jax_stats = convert.jax_tree_to_torch_names(
      jax_model, torch_model, nnx.state(jax_model, nnx.BatchStat))
  buffers = dict(torch_model.named_buffers())
  worst_mean, worst_var = (0.0, ""), (0.0, "")
  for name, (mean0, var0) in counter.before.items():
    counts = counter.calls[name]
    jm, jv = jax_stats[f"{name}.running_mean"], jax_stats[f"{name}.running_var"]
    tm, tv = (buffers[f"{name}.running_mean"].numpy(),
              buffers[f"{name}.running_var"].numpy())
    if mode == "eval":
      assert np.array_equal(jm, mean0) and np.array_equal(jv, var0), name
      assert np.array_equal(tm, mean0) and np.array_equal(tv, var0), name
      continue
    assert counts and len(set(counts)) == 1, (name, counts)
    n, decay = counts[0], (1 - BN_MOMENTUM) ** len(counts)
    expected_tv = decay * var0 + (jv - decay * var0) * n / (n - 1)
    err_m = np.abs(jm - tm).max() / np.abs(tm).max()
    err_v = np.abs(expected_tv - tv).max() / np.abs(tv).max()
    worst_mean = max(worst_mean, (err_m, name))
    worst_var = max(worst_var, (err_v, name))
    if n < 5000:  # here the correction is far larger than float32 rounding
      assert np.abs(jv - tv).max() > 10 * np.abs(expected_tv - tv).max(), name
  if mode == "train":
    parity._record("bn_mean:running_mean", worst_mean[0], FORWARD_RTOL, worst_mean[1])
    parity._record("bn_var:running_var*n/(n-1)", worst_var[0], FORWARD_RTOL,
                   worst_var[1])


def forward_and_stats(parity, jax_model, torch_model, jax_in, torch_in, mode,
                      compare):
  set_mode(jax_model, torch_model, mode)
  counter = BatchNormCounter(torch_model)
  jax_out = jax_model(*jax_in)
  with torch.no_grad():
    torch_out = torch_model(*torch_in)
  counter.remove()
  compare(jax_out, torch_out)
  if counter.before:
    check_batch_stats(parity, jax_model, torch_model, counter, mode)


# ------------------------------------------------------------------------- sampler

@pytest.mark.parametrize("height,width", [(16, 16), (12, 20), (20, 12)])
def test_sampler(parity, rng, height, width):
  n = 4
  # Values in [0, 1] (like a normalised image): a float32 rounding of the sample
  # position (~1e-7 of the image size) then moves a value by well under 1e-5.
  images = rng.uniform(size=(n, height, width, 2)).astype(np.float32)
  alpha = np.stack([rng.uniform(-0.8, 0.8, n), rng.uniform(-0.4, 0.4, n),
                    rng.uniform(-0.4, 0.4, n)], -1).astype(np.float32)
  alpha_t = torch.from_numpy(alpha)
  parity.max_abs("rigid_theta", sampler.rigid_theta(jnp.asarray(alpha), height, width),
                 ref.rigid_affine(alpha_t, height, width))
  parity.max_abs("warp", sampler.warp(jnp.asarray(images), jnp.asarray(alpha)),
                 to_channel_last(ref.warp(to_torch(images), alpha_t)))
  parity.max_abs("unwarp", sampler.unwarp(jnp.asarray(images), jnp.asarray(alpha)),
                 to_channel_last(ref.unwarp(to_torch(images), alpha_t)))
  # A general (non-rigid) affine map, with samples outside the image.
  theta = rng.uniform(-1.2, 1.2, (n, 2, 3)).astype(np.float32)
  grid = sampler.affine_grid(jnp.asarray(theta), height, width)
  grid_t = torch.nn.functional.affine_grid(torch.from_numpy(theta),
                                           [n, 2, height, width], align_corners=False)
  parity.max_abs("affine_grid", grid, grid_t)
  parity.max_abs("grid_sample", sampler.grid_sample(jnp.asarray(images), grid),
                 to_channel_last(ref.warp_affine(to_torch(images),
                                                 torch.from_numpy(theta))))


# ------------------------------------------------------------------------- modules

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dims", [2, 3])
def test_conv_block(parity, rng, dims, mode):
  # Shapes here and below are those of the model tests (width 4, 32x32, batch 2, 3
  # slices), so that JAX's eager op compilations are shared: it keeps the file fast.
  shape = (2, 32, 32, 1) if dims == 2 else (2, 3, 32, 32, 1)
  x = rng.normal(size=shape).astype(np.float32)
  jm, tm = pair(lambda r: unet.ConvBlock(1, 4, spatial_dims=dims, rngs=r),
                ref.ConvBlock(1, 4, dims), rng)
  forward_and_stats(parity, jm, tm, (jnp.asarray(x),), (to_torch(x),), mode,
                    lambda j, t: parity.max_rel("conv_block", j, to_channel_last(t)))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("hybrid", [True, False], ids=["hybrid", "unet"])
def test_encoder(parity, rng, hybrid, mode):
  b, d = 2, 3 if hybrid else 1  # SegmentationNet gives the 2D encoder one slice
  slab = rng.normal(size=(b, d, 32, 32, 1)).astype(np.float32)
  jm, tm = pair(lambda r: unet.Encoder(1, 4, hybrid=hybrid, rngs=r),
                ref.Encoder(1, 4, hybrid), rng)
  if hybrid:
    torch_in = to_torch(slab)
  else:  # the 2D Unet encoder treats every slice alone: slices join the batch
    torch_in = to_torch(slab.reshape((b * d,) + slab.shape[2:]))

  def compare(jax_levels, torch_levels):
    assert len(jax_levels) == len(torch_levels) == unet.NUM_LEVELS
    for k, (j, t) in enumerate(zip(jax_levels, torch_levels)):
      t = to_channel_last(t)
      parity.max_rel(f"level{k}", j, t if hybrid else t.reshape(j.shape))

  forward_and_stats(parity, jm, tm, (jnp.asarray(slab),), (torch_in,), mode, compare)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder_block(parity, rng, mode):
  x = rng.normal(size=(2, 2, 2, 64)).astype(np.float32)
  skip = rng.normal(size=(2, 4, 4, 32)).astype(np.float32)
  jm, tm = pair(lambda r: unet.DecoderBlock(64, 32, 32, rngs=r),
                ref.DecoderBlock(64, 32), rng)
  forward_and_stats(parity, jm, tm, (jnp.asarray(x), jnp.asarray(skip)),
                    (to_torch(x), to_torch(skip)), mode,
                    lambda j, t: parity.max_rel("decoder_block", j, to_channel_last(t)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder(parity, rng, mode):
  width, size = 4, 32
  bottleneck = rng.normal(size=(2, 2, 2, 64)).astype(np.float32)
  skips = [rng.normal(size=(2, size >> k, size >> k, width << k)).astype(np.float32)
           for k in range(4)]
  jm, tm = pair(lambda r: unet.Decoder(64, width, rngs=r), ref.Decoder(64, width), rng)
  forward_and_stats(
      parity, jm, tm, (jnp.asarray(bottleneck), [jnp.asarray(s) for s in skips]),
      (to_torch(bottleneck), [to_torch(s) for s in skips]), mode,
      lambda j, t: parity.max_rel("decoder", j, to_channel_last(t)))


@pytest.mark.parametrize("use_self,use_symmetry,depth", [
    (True, True, 3), (True, False, 3), (False, True, 3), (True, True, 5)],
    ids=["self+sym", "self", "sym", "self+sym-D5"])
def test_symmetry_attention(parity, rng, use_self, use_symmetry, depth):
  # 6x8 map in 3x2 partitions of 2x4: non-square partitions catch reshape mix-ups.
  x = rng.normal(size=(2, depth, 6, 8, 8)).astype(np.float32)
  jm, tm = pair(
      lambda r: attention.SymmetryAttention(8, (3, 2), use_self=use_self,
                                            use_symmetry=use_symmetry, rngs=r),
      ref.SymmetryAttention(8, (3, 2), use_self, use_symmetry), rng)
  # No BatchNorm or dropout: train and eval mode compute the same function.
  for mode in ("train", "eval"):
    set_mode(jm, tm, mode)
    with torch.no_grad():
      parity.max_rel(f"attention[{mode}]", jm(jnp.asarray(x)),
                     to_channel_last(tm(to_torch(x))))


def test_alignment_net(parity, rng):
  images = rng.uniform(0, 1, (4, 32, 32, 1)).astype(np.float32)
  jm, tm = pair(lambda r: alignment.AlignmentNet(16, rngs=r), ref.AlignmentNet(16), rng)
  for mode in ("train", "eval"):  # no BatchNorm: the same function
    set_mode(jm, tm, mode)
    with torch.no_grad():
      want = tm(to_torch(images))
    assert want.abs().max() > 1e-3  # a non-trivial (non-identity) fc
    parity.max_rel(f"alpha[{mode}]", jm(jnp.asarray(images)), want)


# ------------------------------------------------------------------- whole models

def model_options(variant, **kw):
  return sean.ModelOptions(width=4, partitions=(2, 2), **{**sean.VARIANTS[variant],
                                                          **kw})


def model_pair(rng, options):
  return pair(lambda r: sean.SegmentationNet(options, rngs=r),
              ref.SegmentationNet(options), rng)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", list(sean.VARIANTS))
def test_variant_forward(parity, rng, variant, mode):
  options = model_options(variant)
  slab = rng.normal(size=(2, options.slab_slices, 32, 32, 1)).astype(np.float32)
  jm, tm = model_pair(rng, options)
  forward_and_stats(parity, jm, tm, (jnp.asarray(slab),), (to_torch(slab),), mode,
                    lambda j, t: parity.max_rel("logits", j, to_channel_last(t)))


def test_sean_forward_multi_token_partitions(parity, rng):
  """At 32x32 the 2x2 bottleneck splits into 1x1 partitions (one token each, softmax
  trivially 1); at 64x64 in 2x2 partitions each holds 2x2 tokens."""
  options = model_options("sean")
  slab = rng.normal(size=(2, 3, 64, 64, 1)).astype(np.float32)
  jm, tm = model_pair(rng, options)
  forward_and_stats(parity, jm, tm, (jnp.asarray(slab),), (to_torch(slab),), "train",
                    lambda j, t: parity.max_rel("logits", j, to_channel_last(t)))


# ------------------------------------------------------------------------- losses

def random_labels(rng, shape):
  labels = (rng.uniform(size=shape) < 0.2).astype(np.int32)
  labels[0] = 0  # one image without lesion: the fallback class weight
  return labels


def test_segmentation_loss(parity, rng):
  logits = rng.normal(0, 2, (3, 16, 12, 2)).astype(np.float32)
  labels = random_labels(rng, logits.shape[:-1])
  labels_t = torch.from_numpy(labels.astype(np.int64))
  logits_t = to_torch(logits).requires_grad_(True)
  for name, jax_fn, torch_fn in [
      ("gdl", losses.generalized_dice_loss, ref.generalized_dice_loss),
      ("gdl+ce", losses.segmentation_loss, ref.segmentation_loss)]:
    value, grad = jax.value_and_grad(jax_fn)(jnp.asarray(logits), jnp.asarray(labels))
    logits_t.grad = None
    want = torch_fn(logits_t, labels_t)
    want.backward()
    parity.max_rel(name, value, want, LOSS_RTOL, kind="loss")
    parity.l2_rel(f"d{name}/dlogits", grad, to_channel_last(logits_t.grad))


def smooth_heads(rng, n, size):
  """Non-negative 'heads' on a zero background, off-centre and tilted."""
  yy, xx = np.mgrid[:size, :size] / size - 0.5
  images = []
  for _ in range(n):
    cx, cy, a = rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(-0.5, 0.5)
    u = np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy)
    v = -np.sin(a) * (xx - cx) + np.cos(a) * (yy - cy)
    head = ((u / 0.3) ** 2 + (v / 0.4) ** 2 < 1).astype(np.float32)
    images.append(head * (1 + 0.5 * np.sin(7 * u + 3 * v) + 0.3 * rng.uniform(size=u.shape)))
  return np.stack(images)[..., None].astype(np.float32)


def test_alignment_loss(parity, rng):
  images = smooth_heads(rng, 4, 24)
  alpha = np.stack([rng.uniform(-0.5, 0.5, 4), rng.uniform(-0.2, 0.2, 4),
                    rng.uniform(-0.2, 0.2, 4)], -1).astype(np.float32)
  value, grad = jax.value_and_grad(alignment.alignment_loss, argnums=1)(
      jnp.asarray(images), jnp.asarray(alpha))
  alpha_t = torch.from_numpy(alpha).requires_grad_(True)
  want = ref.alignment_loss(to_torch(images), alpha_t)
  want.backward()
  parity.max_rel("alignment", value, want, LOSS_RTOL, kind="loss")
  parity.l2_rel("dalignment/dalpha", grad, alpha_t.grad)


# ---------------------------------------------------------------------- gradients

def check_grads(parity, jax_model, torch_model, jax_grads, prefix=""):
  got = convert.jax_tree_to_torch_names(jax_model, torch_model, jax_grads)
  params = dict(torch_model.named_parameters())
  assert set(got) == set(params), set(got) ^ set(params)
  for name, p in params.items():
    parity.l2_rel(prefix + name, got[name], p.grad, GRAD_RTOL)


@pytest.mark.parametrize("use_self,use_symmetry", [
    (True, True), (True, False), (False, True)], ids=["self+sym", "self", "sym"])
def test_symmetry_attention_gradients(parity, rng, use_self, use_symmetry):
  x = rng.normal(size=(2, 3, 6, 8, 8)).astype(np.float32)
  w = rng.normal(size=(2, 6, 8, 8)).astype(np.float32)  # loss = <w, y>
  jm, tm = pair(
      lambda r: attention.SymmetryAttention(8, (3, 2), use_self=use_self,
                                            use_symmetry=use_symmetry, rngs=r),
      ref.SymmetryAttention(8, (3, 2), use_self, use_symmetry), rng)

  def loss_fn(model, x):
    y = model(x)
    return jnp.sum(y * jnp.asarray(w)), y

  (_, y), (grads, dx) = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      jm, jnp.asarray(x))
  x_t = to_torch(x).requires_grad_(True)
  y_t = tm(x_t)
  (y_t * to_torch(w)).sum().backward()
  # The outputs, not the loss: <w, y> of random w cancels, and its float32 rounding
  # reached 8e-5 of the sum for some seeds (the outputs agreed to 1e-6).
  parity.max_rel("attention", y, to_channel_last(y_t), LOSS_RTOL)
  parity.l2_rel("input", dx, to_channel_last(x_t.grad))
  check_grads(parity, jm, tm, grads)


# A ReLU input closer to 0 than this may fall on different sides of the kink in the two
# frameworks (their float32 roundings differ by ~1e-7..1e-6), and one element's
# gradient then enters one side's sum and not the other's: seed 32 of the FT-CC check
# put a decoder BatchNorm output at 8.5e-7 and its bias gradient off by 2.7e-2.
RELU_KINK_MARGIN = 2e-6


def smallest_relu_input(torch_model, run):
  """min |x| over every value that enters a ReLU during ``run()`` (in these models:
  every BatchNorm's output), and ``run()``'s result."""
  seen = []
  hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.detach().abs().min()))
           for m in torch_model.modules()
           if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))]
  try:
    out = run()
  finally:
    for h in hooks:
      h.remove()
  assert seen, "no BatchNorm ran: the kink check would be vacuous"
  return float(min(seen)), out


@pytest.mark.parametrize("variant,size", [
    ("sean", 64), ("hybrid_ft_cc", 32), ("unet_im_l1", 32)])
def test_variant_gradients(parity, rng, variant, size):
  """One training step (train mode, BatchNorm batch statistics), jitted: the loss and
  the gradient of every parameter. SEAN at 64x64 so that each attention partition
  holds several tokens (at 32x32 the query/key gradients would vanish). Inputs and
  weights are drawn again (up to 10 times) while a ReLU input lies within
  ``RELU_KINK_MARGIN`` of 0, where the gradient is not defined to float32 rounding."""
  options = model_options(variant)
  for _ in range(10):
    slab = rng.normal(size=(2, 3, size, size, 1)).astype(np.float32)
    labels = random_labels(rng, (2, size, size))
    jm, tm = model_pair(rng, options)
    set_mode(jm, tm, "train")
    kink, want = smallest_relu_input(tm, lambda: ref.segmentation_loss(
        tm(to_torch(slab)), torch.from_numpy(labels.astype(np.int64))))
    if kink > RELU_KINK_MARGIN:
      break
  else:
    pytest.fail(f"10 draws each put a ReLU input within {RELU_KINK_MARGIN} of 0")

  @nnx.jit
  def step(model, slab, labels):
    return nnx.value_and_grad(
        lambda m: losses.segmentation_loss(m(slab), labels))(model)

  value, grads = step(jm, jnp.asarray(slab), jnp.asarray(labels))
  want.backward()
  parity.max_rel("segmentation", value, want, LOSS_RTOL, kind="loss")
  check_grads(parity, jm, tm, grads)


def test_alignment_gradients(parity, rng):
  images = smooth_heads(rng, 4, 32)
  jm, tm = pair(lambda r: alignment.AlignmentNet(16, rngs=r), ref.AlignmentNet(16), rng)
  assert np.abs(np.asarray(jm.fc.kernel[...])).max() > 0

  def loss_fn(model):
    x = jnp.asarray(images)
    return alignment.alignment_loss(x, model(x))

  value, grads = nnx.value_and_grad(loss_fn)(jm)
  x = to_torch(images)
  want = ref.alignment_loss(x, tm(x))
  want.backward()
  parity.max_rel("alignment", value, want, LOSS_RTOL, kind="loss")
  check_grads(parity, jm, tm, grads)


# ---------------------------------------------------------------------- conversion

def test_convert_round_trip(rng):
  """torch -> JAX -> torch reproduces every tensor exactly, and a model pair that
  does not match is refused."""
  for make_torch, make_jax in [
      (lambda: ref.SegmentationNet(model_options("sean")),
       lambda r: sean.SegmentationNet(model_options("sean"), rngs=r)),
      (lambda: ref.AlignmentNet(16), lambda r: alignment.AlignmentNet(16, rngs=r))]:
    torch.manual_seed(int(rng.integers(2**31)))
    source = make_torch()
    for mod in source.modules():  # non-trivial statistics and fc
      if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
        mod.running_mean.normal_()
        mod.running_var.uniform_(0.5, 2)
      if isinstance(mod, torch.nn.Linear):
        torch.nn.init.normal_(mod.weight)
    jax_model = make_jax(nnx.Rngs(0))
    n = convert.torch_to_jax(source, jax_model)
    target = make_torch()
    assert convert.jax_to_torch(jax_model, target) == n
    src, dst = source.state_dict(), target.state_dict()
    for name, value in src.items():
      if not name.endswith("num_batches_tracked"):
        assert torch.equal(value, dst[name]), name

  jax_model = sean.SegmentationNet(model_options("sean"), rngs=nnx.Rngs(0))
  with pytest.raises(convert.ConversionError):
    convert.jax_to_torch(jax_model, ref.SegmentationNet(model_options("align_self")))
  with pytest.raises(convert.ConversionError):
    convert.jax_to_torch(jax_model, ref.SegmentationNet(model_options("hybrid")))
