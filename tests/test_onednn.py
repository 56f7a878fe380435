"""oneDNN convolutions (sean_jax.ops.onednn) against lax's, forward and both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sean_jax.ops import onednn

pytestmark = pytest.mark.skipif(not onednn.available(),
                                reason=f"oneDNN: {onednn.unavailable_reason()}")

DIMENSION_NUMBERS = {4: ("NHWC", "HWIO", "NHWC"), 5: ("NDHWC", "DHWIO", "NDHWC")}


def lax_conv(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, (1,) * (x.ndim - 2), "SAME", dimension_numbers=DIMENSION_NUMBERS[x.ndim],
      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("x_shape, kernel_shape", [
    ((2, 5, 7, 3), (3, 3, 3, 4)),         # 2D, non-square
    ((1, 8, 8, 16), (3, 3, 16, 16)),      # 2D, blocked channels
    ((2, 9, 6, 5), (1, 1, 5, 7)),         # 1x1
    ((2, 6, 4, 1), (5, 3, 1, 2)),         # one input channel, 5x3 window
    ((2, 3, 5, 7, 1), (3, 3, 3, 1, 4)),   # 3D, the encoder's first conv
    ((1, 5, 8, 8, 16), (3, 3, 3, 16, 16)),
])
def test_conv_equals_lax_conv(x_shape, kernel_shape):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], x_shape)
  kernel = jax.random.normal(keys[1], kernel_shape)
  cotangent = jax.random.normal(keys[2], x_shape[:-1] + kernel_shape[-1:])
  y, vjp = jax.vjp(jax.jit(onednn.conv), x, kernel)
  y_ref, vjp_ref = jax.vjp(lax_conv, x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for grad, grad_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-4)


def test_conv_runs_inside_jit_with_other_ops_and_twice():
  """Two geometries in one step, and the cached primitives reused on a second call."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  k1 = jax.random.normal(jax.random.key(2), (3, 3, 4, 8)) * 0.1
  k2 = jax.random.normal(jax.random.key(3), (3, 3, 8, 2)) * 0.1
  two_layers = lambda conv: lambda x: conv(jax.nn.relu(conv(x, k1)), k2).sum()
  grad = jax.jit(jax.grad(two_layers(onednn.conv)))
  expected = jax.grad(two_layers(lax_conv))(x)
  for _ in range(2):
    np.testing.assert_allclose(grad(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x, kernel, match", [
    (jnp.zeros((1, 4, 4, 2), jnp.bfloat16), jnp.zeros((3, 3, 2, 2)), "float32"),
    (jnp.zeros((1, 4, 4, 2)), jnp.zeros((2, 2, 2, 2)), "odd"),
    (jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 3, 2)), "do not match"),
    (jnp.zeros((4, 4, 2)), jnp.zeros((3, 2, 2)), "do not match"),
])
def test_bad_operands_are_named(x, kernel, match):
  with pytest.raises((TypeError, ValueError), match=match):
    onednn.conv(x, kernel)


def test_implementation_is_reported():
  names = [onednn.implementation(kind, (1, 8, 8, 16), (3, 3, 16, 16))
           for kind in ("forward", "backward_data", "backward_weights")]
  assert all(name and not name.startswith("error") for name in names), names
