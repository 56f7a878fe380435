"""Memory of one SEAN training step at the paper's size, and the largest batch per GPU.

    python benchmarks/memory.py [--sizes 1,2,4] [--budget-gib 80]

The step of ``benchmarks/train_step.py`` (forward, backward, Adam) for SEAN at 512x512,
w = 64 (bottleneck C = 1024), P = Q = 4, three slices, compiled by XLA for this
machine's backend without running it; ``compiled.memory_analysis()`` gives the bytes
of arguments, outputs and temporaries. Memory grows linearly with the per-device
batch (activations) on top of a constant (parameters, Adam state), so two or more
batch sizes give the line and the largest batch under the budget. The CPU compiler's
buffer assignment is an estimate of a GPU's: XLA:GPU fuses differently and cuDNN
needs workspace, so keep a margin.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from benchmarks.train_step import jax_step  # noqa: E402

PAPER = dict(size=512, width=64, partitions=(4, 4))


def step_bytes(batch: int, conv: str, half: bool) -> dict:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shape = dict(PAPER, batch=batch)
  step, state, inputs, _ = jax_step("sean", shape, conv,
                                    jnp.bfloat16 if half else None, abstract=True)
  mem = step.lower(state, *inputs).compile().memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
           + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return {"batch": batch, "total_bytes": int(total),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1,2,4")
  parser.add_argument("--budget-gib", type=float, default=80.0)
  parser.add_argument("--conv", default="native",
                      help="native (what a GPU runs; the default) or fold")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]
  if len(sizes) < 2 or min(sizes) < 1:
    parser.error("--sizes needs at least two positive batch sizes")
  info = common.machine_info()
  results = {}
  for half in (False, True):
    rows = [step_bytes(b, args.conv, half) for b in sizes]
    slope, intercept = np.polyfit([r["batch"] for r in rows],
                                  [r["total_bytes"] for r in rows], 1)
    budget = args.budget_gib * 2**30
    largest = int((budget - intercept) // slope)
    name = "bfloat16" if half else "float32"
    results[name] = {"rows": rows, "bytes_per_sample": float(slope),
                     "constant_bytes": float(intercept),
                     "largest_batch_per_device": largest}
    for r in rows:
      print(f"{name} batch {r['batch']}: {r['total_bytes'] / 2**30:.2f} GiB "
            f"(temporaries {r['temp_bytes'] / 2**30:.2f} GiB)")
    print(f"{name}: {slope / 2**30:.2f} GiB per sample + {intercept / 2**30:.2f} GiB; "
          f"largest batch in {args.budget_gib:.0f} GiB: {largest}")
  summary = {"shape": PAPER, "conv": args.conv, "budget_gib": args.budget_gib,
             "paper_batch8_float32_gib": (results["float32"]["constant_bytes"]
                                          + 8 * results["float32"]["bytes_per_sample"])
             / 2**30, **results, "machine": info}
  f32, b16 = results["float32"], results["bfloat16"]
  row = common.results_row(
      info, "memory",
      f"SEAN 512², w=64, per device: float32 "
      f"{f32['bytes_per_sample'] / 2**30:.2f} GiB/sample + "
      f"{f32['constant_bytes'] / 2**30:.2f} GiB, batch 8 = "
      f"{summary['paper_batch8_float32_gib']:.1f} GiB, largest in "
      f"{args.budget_gib:.0f} GiB {f32['largest_batch_per_device']}; bfloat16 largest "
      f"{b16['largest_batch_per_device']}",
      setting=f"{info['jax_backend']} compiler", versions=f"jax {info['jax']}")
  path = common.write_results("memory", summary, row)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
