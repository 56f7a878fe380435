"""Throughput of the input pipeline (phantom source) against what a training step eats.

    python benchmarks/input_pipeline.py [--quick] [--paper-size 256|512]

Shapes (phantom cases of S slices of H x W, global batch B, slab 2T+1 = 3, one host):
  demo   H = W = 128, S = 16, B = 8
  paper  H = W = 256 (or 512), S = 24, B = 8

Measured per shape:
  case_prepare_s    one ``source[i]``: phantom generation + HU window + z-score (what a
                    cache miss costs; paid once per case with the default cache)
  cold_batches_s    the first epoch from a fresh iterator (every case generated once),
                    ``make_train_iterator`` with its default (1 prefetch thread)
  warm_batches_s    after every case is cached: ``dataset[k]`` on the calling thread
                    (prefetch 0) and the iterator with 1 and 2 prefetch threads
  align_case_s      ``alignment_hook`` (AlignmentNet, jitted) on one volume, once per
                    case in stage 2
  consumer_step_s   one SEAN segmenter forward + backward (GDL + CE, width 8,
                    hybrid + attention, no aligner) at (B, 3, H, W, 1) under
                    ``nnx.jit``: a rough rate of what training consumes on this machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from sean_jax import losses  # noqa: E402
from sean_jax.data import pipeline, sources  # noqa: E402
from sean_jax.data.phantom import PhantomConfig  # noqa: E402
from sean_jax.models.alignment import AlignmentNet  # noqa: E402
from sean_jax.models.sean import ModelOptions, SegmentationNet  # noqa: E402

SLAB = 3


def _rate(it, n: int) -> float:
  """Seconds per batch over n batches of an iterator."""
  start = time.perf_counter()
  for _ in range(n):
    next(it)
  return (time.perf_counter() - start) / n


def bench_pipeline(size: int, slices: int, batch: int, cases: int, warm_batches: int,
                   seed: int = 0) -> dict:
  config = PhantomConfig(size=size, slices=slices)
  source = sources.PhantomCaseSource(seed, cases, config)
  prep = []
  for i in range(min(cases, 3)):
    start = time.perf_counter()
    source[i]
    prep.append(time.perf_counter() - start)
  steps = pipeline.steps_per_epoch(source, batch)
  kw = dict(batch_size=batch, slab_slices=SLAB, seed=seed, shard_index=0, shard_count=1)

  start = time.perf_counter()
  cold_it = pipeline.make_train_iterator(source, **kw)
  for _ in range(steps):
    next(cold_it)
  cold = (time.perf_counter() - start) / steps

  ds = pipeline.make_train_dataset(source, **kw)
  for k in range(steps + 1):  # fills the cache with every case
    ds[k]
  assert ds.volume_cache.loads == cases
  warm = {}
  start = time.perf_counter()
  for k in range(warm_batches):
    ds[steps + 1 + k]
  warm["prefetch_0"] = (time.perf_counter() - start) / warm_batches
  for threads in (1, 2):
    # The iterator's own cache: warm it on the first epoch, then time.
    it = pipeline.make_train_iterator(source, prefetch_threads=threads,
                                      prefetch_batches=2 * threads, **kw)
    _rate(it, steps + 2 * threads)
    warm[f"prefetch_{threads}"] = _rate(it, warm_batches)

  volume = source[0]["image"]
  hook = pipeline.alignment_hook(AlignmentNet(input_size=min(128, size),
                                              rngs=nnx.Rngs(0)))
  hook(volume, 0)  # compile
  align = statistics.median(
      _timed(lambda: hook(volume, 0)) for _ in range(3))
  return {"size": size, "slices": slices, "batch": batch, "cases": cases,
          "slab_slices": SLAB, "steps_per_epoch": steps,
          "case_prepare_s": statistics.median(prep),
          "cold_batch_s": cold, "cold_batches_per_s": 1 / cold,
          "warm_batch_s": warm,
          "warm_batches_per_s": {k: 1 / v for k, v in warm.items()},
          "warm_slabs_per_s": {k: batch / v for k, v in warm.items()},
          "align_case_s": align}


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def bench_consumer(size: int, batch: int, repeats: int) -> dict:
  options = ModelOptions(backbone="hybrid", fusion="attention", align=False, width=8,
                         slab_slices=SLAB)
  model = SegmentationNet(options, rngs=nnx.Rngs(0))
  slab = jax.random.normal(jax.random.key(0), (batch, SLAB, size, size, 1), jnp.float32)
  mask = (jax.random.uniform(jax.random.key(1), (batch, size, size)) < 0.05).astype(
      jnp.int32)

  @nnx.jit
  def step(model, slab, mask):
    def loss_fn(model):
      return losses.segmentation_loss(model(slab), mask)
    return nnx.value_and_grad(loss_fn)(model)

  def run():
    loss, grads = step(model, slab, mask)
    jax.block_until_ready((loss, grads))

  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  seconds = common.median_seconds(run, repeats=repeats, warmup=1)
  return {"step_s": seconds, "steps_per_s": 1 / seconds, "slabs_per_s": batch / seconds,
          "first_call_s": compile_s, "width": 8}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
  parser.add_argument("--paper-size", type=int, default=256, choices=(256, 512))
  args = parser.parse_args(argv)
  if args.quick:
    shapes = {"demo": dict(size=64, slices=6, batch=8, cases=2),
              "paper": dict(size=128, slices=8, batch=8, cases=2)}
    warm_batches, repeats = 20, 2
  else:
    shapes = {"demo": dict(size=128, slices=16, batch=8, cases=6),
              "paper": dict(size=args.paper_size, slices=24, batch=8, cases=4)}
    warm_batches, repeats = 200, 5
  result = {"benchmark": "input_pipeline", "command": " ".join(
      ["python", "benchmarks/input_pipeline.py"] + (argv or sys.argv[1:])),
            **common.machine_info(), "grain": _version("grain"),
            "numpy": np.__version__, "load_average_start": os.getloadavg(),
            "shapes": {}}
  for name, shape in shapes.items():
    print(f"{name}: {shape}", flush=True)
    row = bench_pipeline(warm_batches=warm_batches, **shape)
    row["consumer"] = bench_consumer(shape["size"], shape["batch"], repeats)
    row["warm_pipeline_over_step"] = row["warm_batch_s"]["prefetch_0"] / row[
        "consumer"]["step_s"]
    row["cold_pipeline_over_step"] = row["cold_batch_s"] / row["consumer"]["step_s"]
    result["shapes"][name] = row
    print(f"  case {row['case_prepare_s'] * 1e3:.0f} ms; cold {row['cold_batches_per_s']:.1f}"
          f" batches/s; warm {row['warm_batches_per_s']['prefetch_0']:.0f} batches/s"
          f" ({row['warm_slabs_per_s']['prefetch_0']:.0f} slabs/s) on the caller, "
          f"{row['warm_batches_per_s']['prefetch_1']:.0f} / "
          f"{row['warm_batches_per_s']['prefetch_2']:.0f} with 1 / 2 threads; align "
          f"{row['align_case_s'] * 1e3:.0f} ms/case; step (w=8) "
          f"{row['consumer']['step_s'] * 1e3:.0f} ms = "
          f"{row['consumer']['steps_per_s']:.2f} batches/s", flush=True)
  summary = "; ".join(
      f"{n} {r['size']}px x{r['slices']} B{r['batch']}: warm "
      f"{r['warm_batches_per_s']['prefetch_0']:.0f} batches/s, cold "
      f"{r['cold_batches_per_s']:.1f}, step(w=8) {r['consumer']['steps_per_s']:.2f}/s"
      for n, r in result["shapes"].items())
  result["load_average_end"] = os.getloadavg()
  if args.quick:
    print(summary)
    return result
  row = (f"| {result['date']} | input_pipeline | {result['machine']} "
         f"({result['cpu_count']} cores, {result['jax_backend']}) | jax {result['jax']}, "
         f"flax {result.get('flax')}, grain {result['grain']} | {summary} |")
  path = common.write_results("input_pipeline", result, row)
  print(f"wrote {path}")
  return result


def _version(name):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


if __name__ == "__main__":
  main()
