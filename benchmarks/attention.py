"""Throughput of the symmetry enhanced attention: ours, a naive JAX loop, PyTorch.

    python benchmarks/attention.py [--quick]

Shapes (B, D = 2T+1, H, W, C, P x Q): the paper-size bottleneck (8, 3, 32, 32, 1024,
4x4: 512x512 input, w = 64, four in-plane poolings) and a small one (2, 3, 8, 8, 64,
2x2). Implementations, all in float32, forward pass:
  ours  - ``SymmetryAttention``: one batched einsum over batch, partitions and slices,
          the mirror taken as a reversal of the partition axis; jitted.
  naive - ``symmetry_attention_naive``: Python loops over partitions, slices and
          branches, a per-pixel flip for the mirror; jitted (the loops unroll).
  torch - the PyTorch reference of the parity tests (tests/torch_reference), eager,
          with the same weights.

Analytic FLOPs (multiply-add = 2), d = C/2, N' = (H/P)(W/Q), K = key sets = D per
branch, V = number of branches (value maps):
  core        2 * B * (D * V) * C * H * W * N'       (scores and weighted values)
  projections 2 * B * H * W * C * d * (1 + D * (1 + V))   (query; key + values)
  output      2 * B * H * W * (V * d) * C             (W_z)
The ceiling is a 2048^3 float32 matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from sean_jax.models.attention import (SymmetryAttention,  # noqa: E402
                                       symmetry_attention_naive)

SHAPES = {
    "paper": dict(batch=8, depth=3, size=32, channels=1024, partitions=(4, 4)),
    "small": dict(batch=2, depth=3, size=8, channels=64, partitions=(2, 2)),
}


def attention_flops(batch, depth, size, channels, partitions, branches=2) -> float:
  inner = channels // 2
  pixels = size * size
  part_tokens = pixels // (partitions[0] * partitions[1])
  core = 2 * batch * depth * branches * channels * pixels * part_tokens
  projections = 2 * batch * pixels * channels * inner * (1 + depth * (1 + branches))
  output = 2 * batch * pixels * branches * inner * channels
  return float(core + projections + output)


def torch_attention(module: SymmetryAttention):
  """The PyTorch reference module with the weights of ``module``."""
  import torch
  from tests.torch_reference import convert, modules
  ref = modules.SymmetryAttention(module.query.in_features, module.partitions,
                                  use_self=module.use_self,
                                  use_symmetry=module.use_symmetry)
  convert.jax_to_torch(module, ref)
  return ref.eval(), torch


def bench_shape(name: str, shape: dict, repeats: int) -> dict:
  module = SymmetryAttention(shape["channels"], shape["partitions"], rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (shape["batch"], shape["depth"],
                                            shape["size"], shape["size"],
                                            shape["channels"]), jnp.float32)
  graphdef, state = nnx.split(module)
  ours = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
  naive = jax.jit(lambda s, v: symmetry_attention_naive(nnx.merge(graphdef, s), v))
  ref, torch = torch_attention(module)
  torch.set_num_threads(os.cpu_count())
  x_torch = torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous()

  def run_torch():
    with torch.no_grad():
      return ref(x_torch)

  out_ours = np.asarray(ours(state, x))
  out_naive = np.asarray(naive(state, x))
  out_torch = run_torch().permute(0, 2, 3, 1).numpy()
  agree = {"naive": float(np.abs(out_ours - out_naive).max()),
           "torch": float(np.abs(out_ours - out_torch).max())}
  seconds = common.interleaved_medians({
      "ours": lambda: ours(state, x).block_until_ready(),
      "naive": lambda: naive(state, x).block_until_ready(),
      "torch": run_torch,
  }, repeats=repeats, warmup=1)
  flops = attention_flops(**shape)
  result = {"shape": shape, "gflop": flops / 1e9,
            "max_abs_diff_vs": agree,
            "ms": {k: v * 1e3 for k, v in seconds.items()},
            "gflops_per_s": {k: flops / v / 1e9 for k, v in seconds.items()},
            "speedup_vs_naive": seconds["naive"] / seconds["ours"],
            "speedup_vs_torch": seconds["torch"] / seconds["ours"]}
  print(f"[{name}] B={shape['batch']} D={shape['depth']} {shape['size']}x{shape['size']}"
        f" C={shape['channels']} P,Q={shape['partitions']}: {flops / 1e9:.2f} GFLOP")
  for impl in ("ours", "naive", "torch"):
    print(f"  {impl:6s} {result['ms'][impl]:9.2f} ms  "
          f"{result['gflops_per_s'][impl]:7.1f} GFLOP/s")
  print(f"  speedup vs naive {result['speedup_vs_naive']:.2f}x, vs torch "
        f"{result['speedup_vs_torch']:.2f}x; max |diff| {agree}")
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer repeats (10, the minimum) and a smaller matmul probe")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args(argv)
  repeats = args.repeats or (10 if args.quick else 20)
  if repeats < 10:
    parser.error("--repeats must be at least 10")
  import torch  # noqa: F401  (imported before machine_info, which records its version)
  info = common.machine_info()
  ceiling = common.matmul_gflops(1024 if args.quick else 2048, repeats=repeats)
  print(f"float32 matmul ceiling: {ceiling:.1f} GFLOP/s ({info['machine']}, "
        f"{info['cpu_count']} cores, {info['jax_backend']})")
  results = {name: bench_shape(name, shape, repeats) for name, shape in SHAPES.items()}
  paper = results["paper"]
  fraction = paper["gflops_per_s"]["ours"] / ceiling
  summary = {
      "speedup_vs_naive": paper["speedup_vs_naive"],
      "speedup_vs_torch": paper["speedup_vs_torch"],
      "fraction_of_matmul_peak": fraction,
      "matmul_gflops_per_s": ceiling,
      "repeats": repeats,
      "shapes": results,
      "machine": info,
  }
  print(f"paper shape: ours at {fraction:.0%} of the matmul ceiling")
  row = common.results_row(
      info, "attention",
      f"paper shape: ours {paper['ms']['ours']:.0f} ms, naive "
      f"{paper['ms']['naive']:.0f} ms, torch {paper['ms']['torch']:.0f} ms; "
      f"{paper['speedup_vs_naive']:.2f}x vs naive, {paper['speedup_vs_torch']:.2f}x vs"
      f" torch, {fraction:.0%} of {ceiling:.0f} GFLOP/s matmul")
  path = common.write_results("attention", summary, row)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
