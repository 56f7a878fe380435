"""Numerics on the GPU against the CPU, in one process (benchmarks/device_check.sh).

    python benchmarks/device_numerics.py OUT.json

Computes each quantity on ``jax.devices("cpu")[0]`` (the reference, float32 with
``jax.default_matmul_precision("highest")``) and on the first GPU, twice: at "highest"
precision (checked against the tolerances below) and at JAX's default precision
(TF32 for float32 matrix work and convolutions on Hopper; reported, not checked):

  sampler    ``sampler.warp`` and ``sampler.unwarp`` of random images by random rigid
             transforms, and the gradient of a weighted sum of the warp w.r.t. the
             images and the transforms (what the alignment loss back-propagates);
  attention  ``SymmetryAttention`` forward at a bottleneck-like (2, 3, 16, 16, 256)
             with 4x4 partitions, and the gradients w.r.t. its input and parameters;
  network    ``SegmentationNet`` (align=False, w=16, partitions 2x2, XLA's own
             convolutions) on a (2, 3, 64, 64, 1) slab in training mode: logits, the
             loss (``losses.segmentation_loss``) and its gradients w.r.t. every
             parameter; and the logits in eval mode.

Per quantity: the largest absolute error, the relative L2 error ||gpu - cpu|| / ||cpu||,
and for gradient trees also the worst single parameter's relative L2 error. Without a
GPU it compares the CPU with the CPU (the JSON says "no gpu") so the script can be
checked anywhere. Exit status 0 when every checked quantity passes, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sean_jax import losses
from sean_jax.models import sampler
from sean_jax.models.attention import SymmetryAttention
from sean_jax.models.sean import ModelOptions, SegmentationNet

# Relative L2 error allowed at "highest" precision (float32 on both sides; the two
# differ only in the order of sums and in the convolution algorithms).
TOLERANCES = {
    "sampler": 1e-5,
    "attention": 1e-5,
    "network": 1e-4,
}


def gpu_device():
  for name in ("cuda", "gpu", "rocm"):
    try:
      return jax.devices(name)[0]
    except RuntimeError:
      continue
  return None


def compare(reference, candidate) -> dict:
  """Errors of ``candidate`` against ``reference`` (pytrees of arrays)."""
  ref = [np.asarray(x, np.float64) for x in jax.tree.leaves(reference)]
  cand = [np.asarray(x, np.float64) for x in jax.tree.leaves(candidate)]
  diff = np.concatenate([(c - r).ravel() for r, c in zip(ref, cand)])
  flat_ref = np.concatenate([r.ravel() for r in ref])
  ref_norm = float(np.linalg.norm(flat_ref))
  result = {"max_abs": float(np.max(np.abs(diff))),
            "rel_l2": float(np.linalg.norm(diff) / max(ref_norm, 1e-30)),
            "ref_max_abs": float(np.max(np.abs(flat_ref))),
            "finite": bool(all(np.isfinite(c).all() for c in cand))}
  if len(ref) > 1:
    paths = [jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
    per_leaf = []
    for path, r, c in zip(paths, ref, cand):
      norm = float(np.linalg.norm(r))
      # Leaves whose reference is ~0 next to the whole (e.g. a bias that a BatchNorm
      # cancels: its gradient is rounding noise) have no meaningful relative error.
      if norm > 1e-6 * ref_norm:
        per_leaf.append((float(np.linalg.norm(c - r) / norm), path))
    per_leaf.sort(reverse=True)
    result["worst_leaves"] = [{"path": p, "rel_l2": e} for e, p in per_leaf[:3]]
  return result


def run_on(device, fn, *args):
  """``fn(*args)`` jit-compiled and run on ``device`` (inputs placed there)."""
  args = jax.device_put(args, device)
  with jax.default_device(device):
    out = jax.jit(fn)(*args)
    return jax.tree.map(np.asarray, jax.block_until_ready(out))


def sampler_case(rng):
  images = rng.standard_normal((4, 128, 96, 2)).astype(np.float32)
  alpha = np.stack([rng.uniform(-0.5, 0.5, 4), rng.uniform(-0.2, 0.2, 4),
                    rng.uniform(-0.2, 0.2, 4)], axis=-1).astype(np.float32)
  weights = rng.standard_normal(images.shape).astype(np.float32)

  def fn(images, alpha, weights):
    warped = sampler.warp(images, alpha)
    loss = lambda im, a: jnp.sum(sampler.warp(im, a) * weights)
    grad_images, grad_alpha = jax.grad(loss, argnums=(0, 1))(images, alpha)
    return {"warp": warped, "unwarp": sampler.unwarp(images, alpha),
            "grad_images": grad_images, "grad_alpha": grad_alpha}
  return fn, (images, alpha, weights)


def attention_case(rng):
  module = SymmetryAttention(256, (4, 4), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(module)
  params = jax.tree.map(np.asarray, params)
  x = rng.standard_normal((2, 3, 16, 16, 256)).astype(np.float32)
  weights = rng.standard_normal((2, 16, 16, 256)).astype(np.float32)

  def fn(params, x, weights):
    forward = lambda p, v: nnx.merge(graphdef, p)(v)
    loss = lambda p, v: jnp.sum(forward(p, v) * weights)
    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
    return {"forward": forward(params, x), "grad_x": grad_x, "grad_params": grad_params}
  return fn, (params, x, weights)


def random_values(tree, rng):
  """NumPy values for a tree of shapes: He-normal kernels, small biases, BatchNorm
  scales near 1 and running statistics near (0, 1)."""
  def leaf(path, x):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    shape = x.shape
    if name == "kernel":
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(shape)
    return value.astype(x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, tree)


def network_case(rng):
  options = ModelOptions(align=False, width=16, partitions=(2, 2), conv="native")
  # Shapes only, then random values from NumPy: the model's own initialisers compile
  # one small program per kernel shape (a minute on 2 CPU cores), and any weights do.
  model = nnx.eval_shape(lambda: SegmentationNet(options, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = random_values(params, rng), random_values(rest, rng)
  slab = rng.standard_normal((2, 3, 64, 64, 1)).astype(np.float32)
  # Two classes in every image: a disc of "lesion" in each.
  yy, xx = np.mgrid[:64, :64]
  labels = np.stack([((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
                     for cy, cx, r in ((20, 40, 8), (44, 22, 11))]).astype(np.int32)

  def fn(params, rest, slab, labels):
    def loss(net):
      logits = net(slab)
      return losses.segmentation_loss(logits, labels), logits
    net = nnx.merge(graphdef, params, rest)
    net.train()  # BatchNorm on batch statistics, as in training
    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(net)
    grads = getattr(nnx, "to_pure_dict", lambda state: state)(grads)
    net = nnx.merge(graphdef, params, rest)  # the running statistics before the step
    net.eval()
    return {"loss": value, "logits_train": logits, "grads": grads,
            "logits_eval": net(slab)}
  return fn, (params, rest, slab, labels)


def main(argv) -> int:
  if len(argv) != 2:
    print(__doc__.splitlines()[2].strip(), file=sys.stderr)
    return 2
  start = time.perf_counter()
  cpu = jax.devices("cpu")[0]
  gpu = gpu_device()
  candidate = gpu if gpu is not None else cpu
  report = {"jax": jax.__version__, "default_backend": jax.default_backend(),
            "reference": f"{cpu.platform}:{cpu.id} {cpu.device_kind}",
            "candidate": f"{candidate.platform}:{candidate.id} {candidate.device_kind}",
            "gpu": gpu is not None,
            "note": ("GPU against CPU" if gpu is not None else
                     "no gpu: the CPU compared with the CPU (checks the script only)"),
            "tolerances_rel_l2_highest": TOLERANCES, "highest": {}, "default": {},
            "seconds": {}}
  print(f"device_numerics: {report['candidate']} against {report['reference']}"
        + ("" if gpu is not None else " (no gpu)"), flush=True)
  rng = np.random.default_rng(0)
  with jax.default_device(cpu):  # inputs and parameters made on the CPU, once
    cases = {"sampler": sampler_case(rng), "attention": attention_case(rng),
             "network": network_case(rng)}
  ok = True
  for name, (fn, args) in cases.items():
    t0 = time.perf_counter()
    with jax.default_matmul_precision("highest"):
      reference = run_on(cpu, fn, *args)
      highest = run_on(candidate, fn, *args)
    default = run_on(candidate, fn, *args)
    report["seconds"][name] = time.perf_counter() - t0
    for key in reference:
      errors = compare(reference[key], highest[key])
      errors["pass"] = bool(errors["finite"] and errors["rel_l2"] <= TOLERANCES[name])
      ok &= errors["pass"]
      report["highest"][f"{name}.{key}"] = errors
      report["default"][f"{name}.{key}"] = compare(reference[key], default[key])
      d = report["default"][f"{name}.{key}"]
      print(f"  {name}.{key:13s} highest: rel_l2 {errors['rel_l2']:.2e} max_abs "
            f"{errors['max_abs']:.2e} (tol {TOLERANCES[name]:.0e}) "
            f"{'pass' if errors['pass'] else 'FAIL'} | default: rel_l2 "
            f"{d['rel_l2']:.2e} max_abs {d['max_abs']:.2e}", flush=True)
  report["pass"] = bool(ok)
  report["seconds"]["total"] = time.perf_counter() - start
  with open(argv[1], "w") as f:
    json.dump(report, f, indent=1)
  print(f"device_numerics: {'PASS' if ok else 'FAIL'} ({report['note']}) in "
        f"{report['seconds']['total']:.0f} s; wrote {argv[1]}", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
