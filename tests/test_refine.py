"""Symmetry refinement of the alignment (sean_jax.models.refine): the reflection it
samples, the pose it recovers on the phantom and on a real CT template, and its wiring
into align_volume / segment_volume."""

import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from sean_jax import metrics
from sean_jax.study import normal_head
from sean_jax.data import phantom, preprocess
from sean_jax.models import alignment, refine, sampler, sean

TEMPLATE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct_template"
            / "template_with_skull_2mm.nii.gz")

refine_alpha = jax.jit(refine.refine_alpha)
unwarp = jax.jit(sampler.unwarp)


def perturbed(alpha, rng, degrees: float, pixels: float, height: int, width: int):
  """alpha moved by +-degrees and +-pixels along x and y (random signs)."""
  signs = rng.choice([-1.0, 1.0], size=3)
  delta = np.array([math.radians(degrees), pixels * 2 / width, pixels * 2 / height])
  return (np.asarray(alpha, np.float64) + signs * delta).astype(np.float32)


def test_reflection_alpha_samples_the_reflection_about_the_midline():
  rng = np.random.default_rng(0)
  height, width = 40, 48
  image = ndimage.gaussian_filter(rng.normal(size=(height, width)), 3)
  c = np.array([(width - 1) / 2, (height - 1) / 2])
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  q = np.stack([x, y], axis=-1) - c
  for theta, offset in ((0.0, 0.0), (0.3, 4.0), (-0.2, -3.0)):
    normal = np.array([math.cos(theta), math.sin(theta)])
    reflected = q - 2 * (q @ normal - offset)[..., None] * normal + c
    expected = ndimage.map_coordinates(image, [reflected[..., 1], reflected[..., 0]],
                                       order=1, mode="constant")
    alpha = refine.reflection_alpha(jnp.float32(theta), jnp.float32(offset), height,
                                    width)
    got = sampler.warp(jnp.asarray(image[None, :, ::-1, None], jnp.float32), alpha)
    # Inside (the two libraries treat the last half pixel at the border differently).
    inside = ((reflected[..., 0] > 0.5) & (reflected[..., 0] < width - 1.5)
              & (reflected[..., 1] > 0.5) & (reflected[..., 1] < height - 1.5))
    np.testing.assert_allclose(np.asarray(got)[0, ..., 0][inside], expected[inside],
                               atol=1e-5)


@pytest.fixture(scope="module")
def phantom_cases():
  size = 128
  config = phantom.PhantomConfig(size=size, slices=16)
  cases = []
  for index in range(3):
    case = phantom.generate_case(11, index, config)
    volume = preprocess.window_and_normalize(case.ct_hu)
    cases.append((volume, preprocess.brain_slice_weights(volume),
                  sampler.pose_to_alpha(case.pose, size, size)))
  return cases


@pytest.fixture(scope="module")
def near_case():
  """A phantom case posed within the refinement's reach of the identity (+-5 deg)."""
  size = 128
  config = phantom.PhantomConfig(size=size, slices=16, max_rotation_deg=4.5,
                                 max_shift_frac=0.03)
  case = phantom.generate_case(11, 3, config)  # 4.2 deg, midline 2.4 px off
  volume = preprocess.window_and_normalize(case.ct_hu)
  truth = sampler.pose_to_alpha(case.pose, size, size)
  rot, shift = metrics.alignment_error(truth, np.zeros(3), size, size)
  assert rot > 3.0 and shift > 2.0
  return volume, preprocess.brain_slice_weights(volume), truth


def test_refinement_recovers_the_phantom_pose(phantom_cases):
  rng = np.random.default_rng(1)
  for volume, weights, truth in phantom_cases:
    size = volume.shape[-1]
    start = perturbed(truth, rng, 4.0, 3.0, size, size)
    start_rot, start_shift = metrics.alignment_error(start, truth, size, size)
    assert start_rot > 3.9 and start_shift > 0.5  # the test starts off the pose
    alpha = np.asarray(refine_alpha(volume, start, weights))
    rot, shift = metrics.alignment_error(alpha, truth, size, size)
    assert rot < 1.0 and shift < 1.0, (rot, shift, truth)
    # The shift along the midline is not the search's to change: it stays the start's.
    along = lambda a: (-math.sin(a[0]) * a[1] + math.cos(a[0]) * a[2]) * size / 2
    assert abs(along(alpha) - along(start)) < 1e-3


def test_align_volume_refines_the_net_estimate(near_case):
  volume, weights, truth = near_case
  size = volume.shape[-1]
  # A fresh net (fc at zero) estimates the identity: refinement has to find the pose
  # from there. sean._align is segment_volume's jitted align_volume (refine static).
  net = alignment.AlignmentNet(32, rngs=nnx.Rngs(0))
  volume, weights = jnp.asarray(volume), jnp.asarray(weights)
  aligned, alpha = sean._align(net, volume, weights, refine=True)
  rot, shift = metrics.alignment_error(alpha, truth, size, size)
  assert rot < 1.0 and shift < 1.0, (rot, shift, truth)
  expected = sampler.warp((volume - volume.min())[..., None], alpha)[..., 0] + volume.min()
  np.testing.assert_allclose(np.asarray(aligned), np.asarray(expected), atol=1e-5)


def test_segment_volume_passes_refine_to_the_alignment(monkeypatch):
  # Only the hand-over is under test here: stand-ins for the model and the jitted
  # steps (building and compiling the real ones takes a minute on this CPU).
  model = types.SimpleNamespace(aligner="net", segmenter="segmenter",
                                options=sean.ModelOptions(slab_slices=1))
  calls = []

  def fake_align(aligner, volume, slice_weights, refine=False):
    calls.append(refine)
    return volume, jnp.zeros(3)

  monkeypatch.setattr(sean, "_align", fake_align)
  monkeypatch.setattr(sean, "_jit_lesion_probability",
                      lambda segmenter, slabs: jnp.zeros(slabs.shape[:1] + slabs.shape[2:4]))
  volume = jnp.zeros((2, 16, 16))
  sean.segment_volume(model, volume)
  sean.segment_volume(model, volume, refine=True)
  assert calls == [False, True]


# ------------------------------------------------------------------ real CT template


@pytest.fixture(scope="module")
def template_hu():
  """(28, 128, 128) HU: the template's 2 mm slices through the brain as 5 mm slices,
  air at -1000 HU (the file stores air as 0)."""
  if not TEMPLATE.exists():
    pytest.skip(f"../shared/data/ct_template not found: {TEMPLATE} (the real CT "
                f"template lives outside the repository)")
  from sean_jax.data import nifti  # pylint: disable=g-import-not-at-top
  volume = nifti.load_volume(TEMPLATE, expect_hu=False)
  assert volume.spacing_mm == (2.0, 2.0, 2.0)
  hu = volume.data.astype(np.float64)
  head = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(s > 0, iterations=2))
                   for s in hu])
  hu = np.where(head, hu, -1000.0)
  # 2 mm slices 34 .. 104 hold the brain above the skull base.
  return normal_head.thick_slices(hu, 34, 28, 2.5).astype(np.float32)


def posed_template(hu, alpha, rng, noise_hu: float):
  """The template posed so that ``warp(posed, alpha) == template``, with noise."""
  moved = unwarp(jnp.asarray(hu + 1000.0)[..., None], jnp.asarray(alpha, jnp.float32))
  moved = np.asarray(moved)[..., 0] - 1000.0
  return moved + rng.normal(scale=noise_hu, size=moved.shape)


def test_refinement_recovers_a_posed_real_head(template_hu):
  num_slices, height, width = template_hu.shape
  rng = np.random.default_rng(2)
  # The template's own symmetric pose (its midline is near, not on, the grid centre).
  volume = preprocess.window_and_normalize(template_hu)
  weights = preprocess.brain_slice_weights(volume)
  own = np.asarray(refine_alpha(volume, np.zeros(3, np.float32), weights))
  own_rot, own_shift = metrics.alignment_error(own, np.zeros(3), height, width)
  assert own_rot < 3.0 and own_shift < 3.0, (own_rot, own_shift)
  errors = []
  for _ in range(3):
    pose = np.array([math.radians(rng.uniform(-15, 15)),
                     *rng.uniform(-0.1, 0.1, size=2) * 2], np.float32)
    hu = posed_template(template_hu, pose, rng, noise_hu=4.0)
    volume = preprocess.window_and_normalize(hu)
    weights = preprocess.brain_slice_weights(volume)
    # warp(warp(P, pose), own) == warp(P, compose(pose, own)) is the symmetric head.
    truth = np.asarray(alignment.compose_alpha(jnp.asarray(pose), jnp.asarray(own),
                                               height, width))
    start = perturbed(truth, rng, 4.0, 3.0, height, width)
    alpha = np.asarray(refine_alpha(volume, start, weights))
    errors.append(metrics.alignment_error(alpha, truth, height, width))
  errors = np.array(errors)
  assert errors[:, 0].max() < 1.0 and errors[:, 1].max() < 1.0, errors
