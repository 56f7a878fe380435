"""One full training step (forward, backward, Adam update): ours against PyTorch.

    python benchmarks/train_step.py [--quick] [--shapes main,small]

Models: SEAN (HybridUnet + symmetry enhanced attention) and HybridUnet (no fusion), the
segmentation network of stage 2 with the GDL + CE loss of training.
  jax         ``SegmentationNet`` under ``jax.jit``, the step of ``sean_jax.trainer``
              (value_and_grad + optax Adam), float32, ``model.conv="auto"``: oneDNN's
              convolutions through XLA's FFI where installed (the CPU default), else
              the fold below.
  jax_fold    ``conv="fold"``: XLA's convolutions, a 3D one as a 2D convolution over
              the depth taps folded into channels.
  jax_native  ``conv="native"``: XLA's own convolutions.
  jax_bf16    ``half_precision`` (bfloat16 activations and matrix products, float32
              parameters, optimizer state and loss); XLA's convolutions (fold), since
              the oneDNN path is float32.
  torch       the PyTorch reference of the parity tests (tests/torch_reference) with
              the same weights, eager, torch.optim.Adam; float32.
All see the same batch. Timings are interleaved (a, b, c, a, b, c, ...), median of at
least 10 after warm-up. FLOPs are XLA's cost analysis of the float32 step; GFLOP/s of
every implementation is that count over its time. The ceiling is a float32 matmul timed
in the same run. Peak memory: XLA's ``memory_analysis`` of the compiled step (arguments
+ outputs + temporaries), and for every implementation the growth of the process's
peak resident memory over two steps, each measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from sean_jax import losses  # noqa: E402
from sean_jax.models.sean import VARIANTS, ModelOptions, SegmentationNet  # noqa: E402
from sean_jax.models.unet import resolve_conv  # noqa: E402

# "main": the paper's network shape (B, depth, P x Q) at a width and size a CPU can step
# in about a second; "small": the demo's.
SHAPES = {
    "main": dict(batch=2, size=256, width=16, partitions=(4, 4)),
    "small": dict(batch=8, size=64, width=8, partitions=(2, 2)),
}
MODELS = ("sean", "hybrid")
IMPLS = ("jax", "jax_fold", "jax_native", "jax_bf16", "torch")
CONV = {"jax": "auto", "jax_fold": "fold", "jax_native": "native", "jax_bf16": "auto"}
LEARNING_RATE = 1e-4


def options(model: str, shape: dict, conv: str) -> ModelOptions:
  fields = dict(VARIANTS[model], width=shape["width"], partitions=shape["partitions"],
                conv=conv)
  fields.pop("align")
  return ModelOptions(align=False, **fields)


def batch(shape: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A slab (B, 3, H, W, 1) of smooth noise and a mask (B, H, W) with a blob."""
  rng = np.random.default_rng(seed)
  b, s = shape["batch"], shape["size"]
  slab = rng.normal(size=(b, 3, s, s, 1)).astype(np.float32)
  yy, xx = np.mgrid[:s, :s]
  mask = np.zeros((b, s, s), np.int32)
  for i in range(b):
    cy, cx = rng.uniform(0.3 * s, 0.7 * s, 2)
    mask[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.08 * s) ** 2
  return slab, mask


def jax_step(model: str, shape: dict, conv: str, dtype=None, abstract: bool = False):
  """(step, state, inputs, net): ``step(state, *inputs)`` returns the new state and
  loss. ``abstract``: shapes only (``jax.ShapeDtypeStruct``), nothing allocated."""

  def make():
    net = SegmentationNet(options(model, shape, conv), dtype=dtype, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(net, optax.adam(LEARNING_RATE, b1=0.9, b2=0.99), wrt=nnx.Param)
    return net, opt

  net, opt = nnx.eval_shape(make) if abstract else make()
  graphdef, state = nnx.split((net, opt))

  @jax.jit
  def step(state, slab, mask):
    net, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(
        lambda n: losses.segmentation_loss(n(slab), mask))(net)
    opt.update(net, grads)
    return nnx.state((net, opt)), loss

  if abstract:
    b, size = shape["batch"], shape["size"]
    return step, state, (jax.ShapeDtypeStruct((b, 3, size, size, 1), jnp.float32),
                         jax.ShapeDtypeStruct((b, size, size), jnp.int32)), net
  slab, mask = batch(shape)
  return step, state, (jnp.asarray(slab), jnp.asarray(mask)), net


def torch_step(model: str, shape: dict, jax_net):
  import torch  # pylint: disable=g-import-not-at-top
  from tests.torch_reference import convert, modules  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  ref = modules.SegmentationNet(options(model, shape, "native"))
  convert.jax_to_torch(jax_net, ref)
  ref.train()
  opt = torch.optim.Adam(ref.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.99))
  slab, mask = batch(shape)
  slab = torch.from_numpy(slab).permute(0, 4, 1, 2, 3).contiguous()
  mask = torch.from_numpy(mask).long()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = modules.segmentation_loss(ref(slab), mask)
    loss.backward()
    opt.step()
    return loss.item()
  return step


def make_runner(impl: str, model: str, shape: dict):
  """A no-argument callable running one step of ``impl`` (state carried inside)."""
  if impl == "torch":
    _, _, _, net = jax_step(model, shape, "native")
    return torch_step(model, shape, net), None
  dtype = jnp.bfloat16 if impl == "jax_bf16" else None
  step, state, inputs, _ = jax_step(model, shape, CONV[impl], dtype)
  compiled = step.lower(state, *inputs).compile()
  box = [state]

  def run():
    box[0], loss = compiled(box[0], *inputs)
    return float(loss)
  return run, compiled


def step_flops(model: str, shape: dict) -> float:
  """XLA's FLOP count of the float32 step with its own convolutions (the same work for
  every implementation; XLA does not count the FLOPs of oneDNN's custom calls)."""
  step, state, inputs, _ = jax_step(model, shape, "native", abstract=True)
  return xla_numbers(step.lower(state, *inputs).compile())["flops"]


def xla_numbers(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = {"flops": float(cost.get("flops", float("nan")))}
  if mem is not None:
    out["memory_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                              + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    out["temp_bytes"] = int(mem.temp_size_in_bytes)
  return out


def peak_rss_growth(impl: str, model: str, shape_name: str) -> float:
  """Peak resident memory of two steps (MiB) above the memory before them, in a fresh
  process (Linux: the high-water mark is reset after set-up and compilation)."""
  out = subprocess.run(
      [sys.executable, __file__, "--_rss", f"{impl},{model},{shape_name}"],
      capture_output=True, text=True, check=True, env=dict(os.environ))
  return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_child(spec: str) -> None:
  impl, model, shape_name = spec.split(",")
  run, _ = make_runner(impl, model, SHAPES[shape_name])
  run()  # compiles (JAX) / warms up (torch)
  before = _status_kib("VmRSS")
  Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
  run()
  run()
  print((_status_kib("VmHWM") - before) / 1024)


def bench(model: str, shape_name: str, repeats: int, impls, memory: bool) -> dict:
  shape = SHAPES[shape_name]
  runners, compiled = {}, {}
  for impl in impls:
    runners[impl], compiled[impl] = make_runner(impl, model, shape)
  losses_first = {impl: run() for impl, run in runners.items()}
  seconds = common.interleaved_medians(runners, repeats=repeats, warmup=1)
  flops = step_flops(model, shape)
  result = {
      "model": model, "shape": shape, "gflop": flops / 1e9,
      "first_loss": losses_first,
      "ms": {k: v * 1e3 for k, v in seconds.items()},
      "gflops_per_s": {k: flops / v / 1e9 for k, v in seconds.items()},
      "xla_memory_mib": {k: xla_numbers(c).get("memory_bytes", 0) / 2**20
                         for k, c in compiled.items() if c is not None},
  }
  if "torch" in seconds:
    result["speedup_vs_torch"] = {k: seconds["torch"] / v for k, v in seconds.items()
                                  if k != "torch"}
  if memory and shape_name == "main":
    result["peak_rss_growth_mib"] = {impl: peak_rss_growth(impl, model, shape_name)
                                     for impl in impls}
  print(f"[{model} {shape_name}] B={shape['batch']} {shape['size']}^2 w={shape['width']}"
        f": {flops / 1e9:.1f} GFLOP per step")
  for impl in impls:
    extra = (f"  {result['speedup_vs_torch'][impl]:.2f}x torch"
             if impl != "torch" and "torch" in seconds else "")
    mem = (f"  peak +{result['peak_rss_growth_mib'][impl]:.0f} MiB"
           if "peak_rss_growth_mib" in result else "")
    print(f"  {impl:10s} {result['ms'][impl]:9.1f} ms {result['gflops_per_s'][impl]:7.1f}"
          f" GFLOP/s{extra}{mem}")
  return result


def conv_parts(repeats: int, batch=2, depth=3, size=256, channels=32,
               native: bool = True) -> dict:
  """Where a 3x3x3 convolution's time goes: forward, input gradient (dx) and kernel
  gradient (dk) of one encoder-like layer: XLA native, fold, oneDNN through the FFI (where
  installed) and PyTorch (oneDNN, eager)."""
  import torch  # pylint: disable=g-import-not-at-top
  from sean_jax.models import unet  # pylint: disable=g-import-not-at-top
  from sean_jax.ops import onednn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, depth, size, size, channels)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, channels, channels)) * 0.05, jnp.float32)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  flops = 2 * 27 * channels * channels * batch * depth * size * size
  impls = {
      "native": lambda x, k: jax.lax.conv_general_dilated(
          x, k, (1, 1, 1), [(1, 1)] * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")),
      "fold": lambda x, k: unet.depth_folded_conv(x, k)}
  if not native:
    del impls["native"]
  if onednn.available():
    impls["onednn"] = onednn.conv
  fns = {}
  for name, conv in impls.items():
    fns[f"{name}_fwd"] = jax.jit(conv)
    fns[f"{name}_dx"] = jax.jit(lambda x, k, dy, c=conv: jax.vjp(lambda v: c(v, k), x)[1](dy))
    fns[f"{name}_dk"] = jax.jit(lambda x, k, dy, c=conv: jax.vjp(lambda w: c(x, w), k)[1](dy))
  runs = {n: (lambda f=f, n=n: jax.block_until_ready(
      f(x, k) if n.endswith("fwd") else f(x, k, dy))) for n, f in fns.items()}
  torch.set_num_threads(os.cpu_count())
  conv_t = torch.nn.Conv3d(channels, channels, 3, padding=1, bias=False)
  xt = torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous()
  dyt = torch.from_numpy(np.asarray(dy)).permute(0, 4, 1, 2, 3).contiguous()

  def torch_fwd():
    with torch.no_grad():
      conv_t(xt)

  def torch_fwd_bwd():
    xt.requires_grad_(True)
    conv_t.zero_grad(set_to_none=True)
    conv_t(xt).backward(dyt)
    xt.requires_grad_(False)
    xt.grad = None
  runs.update(torch_fwd=torch_fwd, torch_fwd_dx_dk=torch_fwd_bwd)
  seconds = common.interleaved_medians(runs, repeats=repeats, warmup=1)
  rates = {n: (3 if n == "torch_fwd_dx_dk" else 1) * flops / t / 1e9
           for n, t in seconds.items()}
  print(f"[conv parts] {batch}x{depth}x{size}^2, {channels}->{channels}, 3x3x3: "
        f"{flops / 1e9:.1f} GFLOP per pass")
  for n in seconds:
    print(f"  {n:16s} {seconds[n] * 1e3:8.1f} ms {rates[n]:7.1f} GFLOP/s")
  return {"shape": dict(batch=batch, depth=depth, size=size, channels=channels),
          "ms": {n: t * 1e3 for n, t in seconds.items()}, "gflops_per_s": rates}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="SEAN only; jax, jax_fold and torch; 10 repeats; no memory "
                      "subprocesses and no XLA-native conv parts (under 3 minutes "
                      "on 2 cores)")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--shapes", default="main,small")
  parser.add_argument("--models", default=None, help=f"default {','.join(MODELS)}")
  parser.add_argument("--impls", default=None, help=f"default {','.join(IMPLS)}")
  parser.add_argument("--_rss", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._rss:
    return _rss_child(args._rss)
  repeats = args.repeats or (10 if args.quick else 15)
  if repeats < 10:
    parser.error("--repeats must be at least 10")
  shapes = args.shapes.split(",")
  args.models = args.models or ("sean" if args.quick else ",".join(MODELS))
  impls = (args.impls or ("jax,jax_fold,torch" if args.quick else ",".join(IMPLS))
           ).split(",")
  for name, known in (("shape", SHAPES), ("model", MODELS), ("impl", IMPLS)):
    chosen = {"shape": shapes, "model": args.models.split(","), "impl": impls}[name]
    bad = [c for c in chosen if c not in known]
    if bad:
      parser.error(f"unknown {name} {bad}; known: {list(known)}")
  import torch  # noqa: F401  (imported before machine_info, which records its version)
  info = common.machine_info()
  ceiling = common.matmul_gflops(1024 if args.quick else 2048, repeats=10)
  print(f"float32 matmul ceiling: {ceiling:.1f} GFLOP/s ({info['machine']}, "
        f"{info['cpu_count']} cores, {info['jax_backend']})")
  parts = conv_parts(repeats, native=not args.quick)
  results = {f"{m}_{s}": bench(m, s, repeats, impls, memory=not args.quick)
             for s in shapes for m in args.models.split(",")}
  main_key = f"sean_{shapes[0]}" if f"sean_{shapes[0]}" in results else next(iter(results))
  head = results[main_key]
  summary = {
      "main": main_key,
      "jax_step_ms": head["ms"].get("jax"),
      "torch_step_ms": head["ms"].get("torch"),
      "speedup_vs_torch": head.get("speedup_vs_torch", {}).get("jax"),
      "jax_fold_step_ms": head["ms"].get("jax_fold"),
      "jax_bf16_step_ms": head["ms"].get("jax_bf16"),
      "conv": resolve_conv("auto"),
      "jax_peak_memory_mib": head.get("peak_rss_growth_mib", {}).get("jax"),
      "torch_peak_memory_mib": head.get("peak_rss_growth_mib", {}).get("torch"),
      "jax_xla_memory_mib": head["xla_memory_mib"].get("jax"),
      "fraction_of_matmul_peak": head["gflops_per_s"].get("jax", 0) / ceiling,
      "matmul_gflops_per_s": ceiling,
      "repeats": repeats,
      "conv_parts": parts,
      "results": results,
      "machine": info,
  }
  print(json.dumps({k: v for k, v in summary.items()
                    if k not in ("results", "machine")}, indent=1))
  ms = head["ms"]
  row = common.results_row(
      info, "train_step",
      f"{main_key}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
      + (f"; {summary['speedup_vs_torch']:.2f}x torch" if summary["speedup_vs_torch"]
         else "")
      + f"; jax at {summary['fraction_of_matmul_peak']:.0%} of {ceiling:.0f} GFLOP/s"
      " matmul")
  path = common.write_results("train_step", summary, row)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
