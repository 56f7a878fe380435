"""One benchmark on any backend: SEAN's training step as accelerator people read it.

    python -m sean_jax.benchmark [--quick] [--preset paper|medium|tiny]
        [--dtypes float32,bfloat16] [--results-dir benchmarks/results] [--no-record]

On the default JAX backend (this machine's CPU, a GPU or a TPU), over all local
devices (global batch = per-device batch x devices):
  step       the stage-2 training step of ``python -m sean_jax.train`` (GDL + CE,
             Adam, the non-finite guard, data parallel), float32 and bfloat16: median
             step time after warm-up (compile time apart), slabs/s per device, model
             TFLOP/s per device (``sean_jax.perf.flops``), MFU, and XLA's FLOPs;
  attention  the symmetry enhanced attention alone, forward + backward, at the
             preset's bottleneck;
  scaling    weak scaling over 1, 2, 4, ... local devices (per-device batch fixed):
             efficiency t(1) / t(n);
  pipeline   the phantom input pipeline's batches/s beside the steps/s it must feed.
MFU = model FLOP/s per device / the device's peak: the dense bfloat16 peak of
``sean_jax.perf.measure.PEAK_BF16_FLOPS`` on accelerators (for both precisions, as
MaxText does), on a CPU the float32 matmul rate measured in the same run.

Presets (image size, width w, partitions, per-device batch): ``paper`` 512, 64, 4x4,
8 (the default on accelerators; the per-device batch is halved until the step fits
the device's memory); ``medium`` 256, 16, 4x4, 2 (the default on a CPU, where the
paper's step needs ~29 GiB and minutes per step); ``tiny`` 32, 4, 2x2, 4 (checks the command, measures nothing of interest).
``--quick`` (under 3 minutes on 2 CPU cores): fewer repeats, one pipeline epoch.
Writes ``<results-dir>/benchmark.json`` and a row of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from sean_jax import checkpointing
from sean_jax.data import pipeline, sources
from sean_jax.models.attention import SymmetryAttention
from sean_jax.models.sean import ModelOptions
from sean_jax.perf import aot, flops, measure, steps

PRESETS = {
    "paper": dict(image_size=512, width=64, partitions=(4, 4), per_device_batch=8),
    "medium": dict(image_size=256, width=16, partitions=(4, 4), per_device_batch=2),
    "tiny": dict(image_size=32, width=4, partitions=(2, 2), per_device_batch=4),
}


def _shape(preset: dict) -> dict:
  return {k: v for k, v in preset.items() if k != "per_device_batch"}


def _config(preset: dict, devices, dtype: str):
  """The step's config on ``devices``, with the convolutions ``train`` would run."""
  return steps.step_config(batch_size=preset["per_device_batch"] * len(devices),
                           half_precision=dtype == "bfloat16", conv="auto",
                           **_shape(preset))


def compile_train_step(preset: dict, devices, dtype: str):
  """(config, compiled step, compile seconds, per-device bytes); nothing allocated."""
  config = _config(preset, devices, dtype)
  fn, args = steps.train_step(config, steps.data_mesh(devices))
  start = time.perf_counter()
  compiled = fn.trace(*args).lower().compile()
  return (config, compiled, time.perf_counter() - start,
          aot.memory_per_device(compiled)["total"])


def fitting_step(preset: dict, devices, dtype: str):
  """The compiled step at the preset's per-device batch, halved (in ``preset``) until
  XLA's memory assignment fits the device's limit (where the device reports one)."""
  while True:
    compiled = compile_train_step(preset, devices, dtype)
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if limit is None or compiled[3] <= limit or preset["per_device_batch"] == 1:
      return compiled
    preset["per_device_batch"] //= 2


def time_train_step(preset: dict, devices, dtype: str, repeats: int,
                    compiled=None) -> dict:
  """Times the training step on ``devices`` (compiles it unless ``compiled``, from
  :func:`compile_train_step`, is given)."""
  config, executable, compile_s, _ = compiled or compile_train_step(preset, devices,
                                                                    dtype)
  _, (state, batch) = steps.train_step(config, steps.data_mesh(devices), concrete=True)
  box = [state]

  def run():
    box[0], metrics = executable(box[0], batch)
    jax.block_until_ready(metrics["loss"])
  step_s = measure.median_seconds(run, repeats=repeats, warmup=2)
  return {"step_ms": step_s * 1e3, "compile_s": compile_s,
          "xla_flops": (aot.xla_flops(executable) if aot.native_convolutions(config)
                        else None), "config": config}


def xla_step_flops(config) -> float:
  """XLA's FLOP count of the same step with XLA's own convolutions, compiled for the
  CPU (works on every machine; XLA:GPU gives none, custom calls count zero)."""
  config = config.copy_and_resolve_references()
  config.model.conv = "native"
  cpu = jax.devices("cpu")[:1]
  fn, args = steps.train_step(config, steps.data_mesh(cpu))
  return aot.xla_flops(fn.trace(*args).lower().compile())


def time_attention(preset: dict, dtype: str, repeats: int) -> dict:
  """Forward + backward (input and parameters) of the attention at the bottleneck."""
  b, s = preset["per_device_batch"], preset["image_size"] // 16
  channels = 16 * preset["width"]
  compute = jnp.bfloat16 if dtype == "bfloat16" else None
  module = SymmetryAttention(channels, preset["partitions"], dtype=compute,
                             rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(module)
  x = jax.random.normal(jax.random.key(0), (b, 3, s, s, channels), jnp.float32)
  weights = jax.random.normal(jax.random.key(1), (b, s, s, channels), jnp.float32)

  @jax.jit
  def step(params, x):
    loss = lambda p, v: jnp.sum(nnx.merge(graphdef, p)(v).astype(jnp.float32) * weights)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  run = lambda: jax.block_until_ready(step(params, x))
  run()
  seconds = measure.median_seconds(run, repeats=repeats, warmup=1)
  options = ModelOptions(width=preset["width"], partitions=preset["partitions"])
  model_flops = 3 * sum(op.flops for op in flops.attention_ops(options, b, 3, s, channels))
  return {"ms": seconds * 1e3, "model_tflop": model_flops / 1e12,
          "tflop_per_s": model_flops / seconds / 1e12,
          "shape": [b, 3, s, s, channels]}


def weak_scaling(preset: dict, dtype: str, repeats: int, all_devices_ms: float
                 ) -> list[dict]:
  """Step time on the first n local devices, n = 1, 2, 4, ... (``all_devices_ms``:
  the step already timed on all of them)."""
  local = jax.local_devices()
  rows = [{"devices": n, "step_ms": time_train_step(preset, local[:n], dtype,
                                                     repeats)["step_ms"]}
          for n in (2**k for k in range(8)) if n < len(local)]
  rows.append({"devices": len(local), "step_ms": all_devices_ms})
  for row in rows:
    row["efficiency"] = rows[0]["step_ms"] / row["step_ms"]
  return rows


def pipeline_rate(preset: dict, global_batch: int, quick: bool) -> dict:
  """Batches/s of the phantom training pipeline (what ``python -m sean_jax.train``
  reads) once its cases are prepared, and the first epoch's (cases made on the way)."""
  config = steps.step_config(batch_size=global_batch, **_shape(preset))
  config.data.source = "phantom"
  config.data.num_train_cases = 2 if quick else 4
  config.data.phantom_slices = 8 if quick else 24
  source = sources.case_source(config, "train")
  batches = pipeline.steps_per_epoch(source, global_batch)
  it = pipeline.make_train_iterator(source, batch_size=global_batch, slab_slices=3,
                                    seed=0, shard_index=0, shard_count=1)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  cold = (time.perf_counter() - start) / batches
  warm_batches = 20 if quick else 100
  start = time.perf_counter()
  for _ in range(warm_batches):
    next(it)
  warm = (time.perf_counter() - start) / warm_batches
  return {"warm_batches_per_s": 1 / warm, "cold_batches_per_s": 1 / cold,
          "cases": len(source), "slices": config.data.phantom_slices}


def measure_precision(preset: dict, devices, dtype: str, repeats: int, peak,
                      compiled=None) -> dict:
  """The step in one precision: time, slabs/s, model and XLA FLOPs, MFU, attention."""
  r = time_train_step(preset, devices, dtype, repeats, compiled)
  config = r.pop("config")
  n = len(devices)
  model = flops.step_flops(checkpointing.model_options(config), config.batch_size,
                           preset["image_size"]).train_step
  xla = r["xla_flops"] * n if r["xla_flops"] else xla_step_flops(config)
  per_device = model / n / (r["step_ms"] / 1e3)
  r.update(model_tflop_per_step=model / 1e12,
           xla_tflop_per_step=xla / 1e12 if xla else None,
           slabs_per_s_per_device=preset["per_device_batch"] / (r["step_ms"] / 1e3),
           model_tflop_per_s_per_device=per_device / 1e12,
           mfu=per_device / peak if peak else None,
           attention=time_attention(preset, dtype, repeats))
  return r


def run(preset_name: str, dtypes, quick: bool) -> dict:
  devices = jax.local_devices()
  kind = devices[0].device_kind
  backend = jax.default_backend()
  preset = dict(PRESETS[preset_name])
  repeats = 5 if quick else 20
  if backend == "cpu":
    peak, peak_source = measure.matmul_gflops(1024 if quick else 2048) * 1e9, \
        "float32 matmul measured in this run"
  else:
    peak, peak_source = measure.peak_flops(kind), "dense bfloat16 datasheet peak"
  first_step = fitting_step(preset, devices, dtypes[0])
  n = len(devices)
  result = {"device_kind": kind, "backend": backend, "num_devices": n,
            "preset": preset_name, "shape": {**_shape(preset), "partitions":
                                             list(preset["partitions"])},
            "per_device_batch": preset["per_device_batch"],
            "global_batch": preset["per_device_batch"] * n,
            "peak_flops_per_device": peak, "peak_source": peak_source, "dtypes": {}}
  print(f"{kind} x{n} ({backend}), preset {preset_name}: {result['shape']}, "
        f"batch {result['per_device_batch']}/device; peak "
        f"{peak / 1e12 if peak else float('nan'):.2f} TFLOP/s ({peak_source})", flush=True)
  for dtype in dtypes:
    r = measure_precision(preset, devices, dtype, repeats, peak,
                          first_step if dtype == dtypes[0] else None)
    result["dtypes"][dtype] = r
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (unknown peak)"
    print(f"  {dtype:8s} step {r['step_ms']:8.1f} ms (compile {r['compile_s']:.1f} s), "
          f"{r['slabs_per_s_per_device']:.1f} slabs/s/device, "
          f"{r['model_tflop_per_s_per_device']:.3f} TFLOP/s/device, MFU {mfu}; model "
          f"{r['model_tflop_per_step']:.3f} / XLA {r['xla_tflop_per_step'] or 0:.3f} "
          f"TFLOP/step; attention {r['attention']['ms']:.1f} ms "
          f"({r['attention']['tflop_per_s']:.3f} TFLOP/s)", flush=True)
  first = result["dtypes"][dtypes[0]]
  result["scaling"] = weak_scaling(preset, dtypes[0], repeats, first["step_ms"])
  result["pipeline"] = pipeline_rate(preset, result["global_batch"], quick)
  result["pipeline"]["steps_per_s_needed"] = 1e3 / min(
      r["step_ms"] for r in result["dtypes"].values())
  p = result["pipeline"]
  print(f"  scaling {[(s['devices'], round(s['efficiency'], 3)) for s in result['scaling']]}"
        f"; pipeline {p['warm_batches_per_s']:.1f} batches/s warm, "
        f"{p['cold_batches_per_s']:.2f} cold, against {p['steps_per_s_needed']:.2f} "
        f"steps/s", flush=True)
  for key in ("step_ms", "compile_s", "mfu", "model_tflop_per_step",
              "xla_tflop_per_step"):
    result[key] = first[key]
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sean_jax.benchmark",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="default: paper on accelerators, medium on a CPU")
  parser.add_argument("--dtypes", default=",".join(aot.DTYPES))
  parser.add_argument("--results-dir", type=Path, default=measure.RESULTS_DIR)
  parser.add_argument("--no-record", action="store_true")
  args = parser.parse_args(argv)
  dtypes = args.dtypes.split(",")
  bad = [d for d in dtypes if d not in aot.DTYPES]
  if bad:
    print(f"sean_jax.benchmark: unknown dtype {bad[0]!r}; known: "
          f"{', '.join(aot.DTYPES)}", file=sys.stderr)
    return 2
  preset = args.preset or ("medium" if jax.default_backend() == "cpu" else "paper")
  info = measure.machine_info()
  start = time.perf_counter()
  result = run(preset, dtypes, args.quick)
  result.update(quick=args.quick, wall_s=time.perf_counter() - start, machine=info)
  print(f"done in {result['wall_s']:.0f} s")
  if not args.no_record:
    row = measure.results_row(
        info, "benchmark" + (" --quick" if args.quick else ""),
        f"{result['device_kind']} x{result['num_devices']}, {preset} "
        f"({result['shape']['image_size']}², w={result['shape']['width']}, "
        f"{result['per_device_batch']}/device): " + ", ".join(
            f"{d} {r['step_ms']:.0f} ms, MFU "
            + (f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a")
            for d, r in result["dtypes"].items())
        + f"; pipeline {result['pipeline']['warm_batches_per_s']:.0f} batches/s",
        setting=f"{info['cpu_count']} cores, {result['backend']}",
        versions=f"jax {info['jax']}, flax {info.get('flax')}")
    path = measure.write_results("benchmark", result, row, args.results_dir)
    print(f"wrote {path}")
  return 0
