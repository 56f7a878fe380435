"""Ahead-of-time compilation of SEAN for CPUs, GPUs and TPUs, with no accelerator.

    python -m sean_jax.aot [--targets cpu,h200,h200x8,v5e-2x2,v5p-2x2x1]
        [--dtypes float32,bfloat16] [--batch 8] [--no-fit-search] [--size 512]
        [--width 64] [--partitions 4,4] [--results-dir benchmarks/results]

For each target and precision it compiles the paper's training step (the stage-2
step of ``python -m sean_jax.train``: 512x512, w = 64, 2T+1 = 3, P = Q = 4, global
batch 8, data parallel over the target's devices) and the prediction step, and
reports: compiled or the error, compile seconds, the platform the program was built
for (asserted), per-device memory (arguments, temporaries, total) against the
device's memory, the largest per-device batch that fits (found by compiling), XLA's
FLOPs where its cost analysis counts them (TPU; the CPU when no custom calls) beside
the model FLOPs of ``sean_jax.perf.flops``. Accelerator targets compile XLA's own
convolutions; no CPU-only custom call (the oneDNN FFI) may reach them.

Writes ``<results-dir>/aot.json`` and a row of ``RESULTS.md`` (``--no-record``: neither).
Exit status 1 with a one-line error per target when a target cannot be compiled, or
when ``--batch`` was given and does not fit a target's device.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import jax

from sean_jax import checkpointing
from sean_jax.models import unet
from sean_jax.perf import flops, measure, steps, targets

DTYPES = ("float32", "bfloat16")
GIB = 2**30
# The fit search stops here: a small model on a big device would otherwise compile at
# thousands of slabs per device (and constant-fold for minutes).
MAX_SEARCH_BATCH = 256


def memory_per_device(compiled) -> dict:
  """Bytes per device of a compiled program (XLA's buffer assignment)."""
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return {"arguments": int(m.argument_size_in_bytes),
          "outputs": int(m.output_size_in_bytes),
          "aliased": int(m.alias_size_in_bytes),
          "temporaries": int(m.temp_size_in_bytes), "total": int(total)}


def xla_flops(compiled, text: str | None = None) -> float | None:
  """XLA's FLOP count of a compiled program (per device), or None where its cost
  analysis is not available (XLA:GPU compile-only) or misses work (custom calls,
  which it counts as zero). ``text``: ``compiled.as_text()`` if already made."""
  text = compiled.as_text() if text is None else text
  if any(f'"{name}' in text for name in targets.CPU_ONLY_CUSTOM_CALLS):
    return None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def program_summary(text: str) -> dict:
  """What the compiler made of the step, from its optimised HLO text: custom calls
  (cuDNN convolutions, the oneDNN FFI), fusion kinds (Triton GEMMs on GPU) and the
  layouts of cuDNN's convolutions ("dim_labels layout": bf012 with {4,3,2,1,0} is
  channels-first in memory)."""
  layouts = re.findall(r'\{([0-9,]+)\}, u8\[[0-9]+\]\{0\}\) custom-call\([^)]*\), '
                       r'window=\{[^}]*\}, dim_labels=([^,]+), custom_call_target="__cudnn',
                       text)
  return {"custom_calls": dict(collections.Counter(
              re.findall(r'custom_call_target="([^"]+)"', text))),
          "fusion_kinds": dict(collections.Counter(
              re.findall(r'"kind":"([^"]+)"', text))),
          "cudnn_conv_layouts": dict(collections.Counter(
              f"{labels} {{{layout}}}" for layout, labels in layouts))}


def native_convolutions(config) -> bool:
  """Whether a config's step computes XLA's own convolutions: only then is XLA's FLOP
  count comparable (the fold pads depth with zeros that it counts; oneDNN's custom
  calls count zero)."""
  return unet.resolve_conv(config.model.conv,
                           checkpointing.compute_dtype(config)) == "native"


def compile_step(kind: str, config, mesh, target) -> tuple[object, dict]:
  """Compiles the "train" or "predict" step; returns (compiled, measurements)."""
  build = steps.train_step if kind == "train" else steps.predict_step
  fn, args = build(config, mesh)
  start = time.perf_counter()
  lowered = fn.trace(*args).lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  text = compiled.as_text()  # megabytes at the paper's size: made once
  targets.check_program(compiled, target, text)
  return compiled, {"lower_s": lowered_at - start, "compile_s": done - lowered_at,
                    "memory_per_device_bytes": memory_per_device(compiled),
                    "xla_flops_per_device": (xla_flops(compiled, text)
                                             if native_convolutions(config) else None),
                    "program": program_summary(text)}


def largest_batch(per_device_bytes, budget: int, known: dict[int, int],
                  max_compiles: int = 6, cap: int = MAX_SEARCH_BATCH) -> int:
  """The largest per-device batch b <= cap with ``per_device_bytes(b) <= budget``,
  found by compiling: a line through two batches predicts it, then compiles walk to
  the boundary (memory grows linearly with the batch over a constant). ``known`` maps
  batches already compiled to their bytes (updated). Returns 0 if none fits."""

  def measure_at(b):
    if b not in known:
      known[b] = per_device_bytes(b)
    return known[b]

  b0 = min(known)
  b1 = 2 * b0 if len(known) < 2 else sorted(known)[1]
  m0, m1 = measure_at(b0), measure_at(b1)
  slope = max((m1 - m0) / (b1 - b0), 1.0)
  guess = min(max(int((budget - (m0 - slope * b0)) // slope), 1), cap)
  for _ in range(max_compiles):
    if measure_at(guess) > budget:
      if guess == 1:
        return 0
      guess -= 1
    elif guess == cap:
      return cap
    elif measure_at(guess + 1) <= budget:
      guess += 1
    else:
      return guess
  fitting = [b for b, m in known.items() if m <= budget]
  return max(fitting, default=0)


def run_target(target, devices, *, dtypes, batch: int, shape: dict,
               fit_search: bool) -> dict:
  """Compiles every step of one target; returns its aot.json entry."""
  n = len(devices)
  mesh = steps.data_mesh(devices)
  entry = {"platform": target.platform, "description": target.description,
           "device_kind": devices[0].device_kind, "num_devices": n,
           "device_memory_bytes": target.device_memory_bytes,
           "budget_bytes": target.budget_bytes, "global_batch": batch,
           "per_device_batch": batch // n, "steps": {}}
  if batch % n:
    raise ValueError(f"global batch {batch} does not divide over {target.name}'s {n} "
                     f"devices")
  conv = "auto" if target.platform == "cpu" else "native"

  def config_for(global_batch, dtype):
    return steps.step_config(batch_size=global_batch, conv=conv,
                             half_precision=dtype == "bfloat16", **shape)

  for dtype in dtypes:
    for kind in ("train", "predict") if dtype == dtypes[0] else ("train",):
      config = config_for(batch, dtype)
      compiled, result = compile_step(kind, config, mesh, target)
      options = checkpointing.model_options(config)
      counted = flops.step_flops(options, batch, shape["image_size"])
      result["model_flops_per_device"] = (counted.train_step if kind == "train"
                                          else counted.forward) / n
      total = result["memory_per_device_bytes"]["total"]
      result["fits"] = total <= target.budget_bytes
      if kind == "train" and fit_search:
        known = {batch // n: total}
        result["largest_per_device_batch"] = largest_batch(
            lambda b, d=dtype: _bytes_or_inf(config_for(b * n, d), mesh, target),
            target.budget_bytes, known)
        result["fit_search_bytes"] = {str(b): m if m != float("inf") else None
                                      for b, m in sorted(known.items())}
      entry["steps"][f"{kind}_{dtype}"] = result
      _print_step(target, kind, dtype, result)
  first = entry["steps"][f"train_{dtypes[0]}"]
  entry["compiled"] = True
  entry["memory_per_device_bytes"] = first["memory_per_device_bytes"]
  entry["fits"] = first["fits"]
  return entry


def _bytes_or_inf(config, mesh, target) -> float:
  """Per-device bytes of the training step, or infinity where the compiler itself
  refuses it for lack of memory (the TPU compiler checks HBM)."""
  try:
    return compile_step("train", config, mesh, target)[1]["memory_per_device_bytes"][
        "total"]
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
      return float("inf")
    raise


def _print_step(target, kind, dtype, r):
  m = r["memory_per_device_bytes"]
  fit = "fits" if r["fits"] else "DOES NOT FIT"
  largest = (f", largest batch/device {r['largest_per_device_batch']}"
             if "largest_per_device_batch" in r else "")
  xla = (f", XLA {r['xla_flops_per_device'] / 1e12:.3f} TFLOP/device"
         if r["xla_flops_per_device"] else "")
  print(f"{target.name:10s} {kind:7s} {dtype:8s} compile {r['compile_s']:6.1f} s  "
        f"memory/device {m['arguments'] / GIB:.2f} args + {m['temporaries'] / GIB:.2f} "
        f"temp = {m['total'] / GIB:.2f} GiB of {target.budget_bytes / GIB:.1f} ({fit})"
        f"{largest}; model {r['model_flops_per_device'] / 1e12:.3f} TFLOP/device{xla}",
        flush=True)


def markdown_table(result: dict) -> str:
  """aot.json as a Markdown table: one row per target and precision."""
  lines = ["| target | devices | precision | compiled | compile s | memory per device "
           "(args + temp = total) | usable | largest batch per device | XLA TFLOP "
           "per device |", "|---" * 9 + "|"]
  for name, entry in result["targets"].items():
    if not entry.get("compiled"):
      lines.append(f"| {name} | | | no: {entry.get('error')} | | | | | |")
      continue
    for key, r in entry["steps"].items():
      kind, dtype = key.split("_")
      m = r["memory_per_device_bytes"]
      xla = r.get("xla_flops_per_device")
      largest = r.get("largest_per_device_batch", "-" if kind == "predict" else
                      "not searched")
      lines.append(
          f"| {name}{'' if kind == 'train' else ' (predict)'} | {entry['num_devices']} x "
          f"{entry['device_kind']} | {dtype} | yes ({entry.get('date', '')}) | "
          f"{r['compile_s']:.0f} | {m['arguments'] / GIB:.2f} + "
          f"{m['temporaries'] / GIB:.2f} = **{m['total'] / GIB:.2f} GiB** | "
          f"{entry['budget_bytes'] / GIB:.1f} GiB | {largest} | "
          + (f"{xla / 1e12:.2f} |" if xla else "- |"))
  return "\n".join(lines)


def _row(info, result) -> str:
  parts = []
  for name, entry in result["targets"].items():
    if not entry.get("compiled"):
      parts.append(f"{name}: not compiled")
      continue
    train = entry["steps"].get("train_float32") or next(iter(entry["steps"].values()))
    largest = train.get("largest_per_device_batch")
    parts.append(f"{name} {train['memory_per_device_bytes']['total'] / GIB:.1f} GiB/device"
                 + (f", max {largest}/device" if largest is not None else "")
                 + f", {train['compile_s']:.0f} s")
  shape = result["shape"]
  return measure.results_row(
      info, "aot",
      f"SEAN {shape['image_size']}², w={shape['width']}, global batch "
      f"{result['global_batch']}, float32 train step: " + "; ".join(parts),
      setting="compile only", versions=f"jax {info['jax']}")


def _merged(result: dict, path: Path) -> dict:
  """``result`` plus the targets of an earlier aot.json of the same shape and batch
  that this run did not compile (targets may need different installs, so they may
  be compiled by separate runs)."""
  try:
    earlier = json.loads(path.read_text())
  except (OSError, ValueError):
    return result
  if (earlier.get("shape") != json.loads(json.dumps(result["shape"]))
      or earlier.get("global_batch") != result["global_batch"]):
    return result
  return {**result, "targets": {**earlier.get("targets", {}), **result["targets"]}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sean_jax.aot",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default=",".join(targets.TARGETS))
  parser.add_argument("--dtypes", default=",".join(DTYPES))
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: the paper's 8)")
  parser.add_argument("--size", type=int, default=steps.PAPER["image_size"])
  parser.add_argument("--width", type=int, default=steps.PAPER["width"])
  parser.add_argument("--partitions", default="4,4")
  parser.add_argument("--no-fit-search", action="store_true",
                      help="skip the search for the largest batch that fits")
  parser.add_argument("--results-dir", type=Path, default=measure.RESULTS_DIR)
  parser.add_argument("--no-record", action="store_true",
                      help="print only; write no aot.json or RESULTS.md row")
  parser.add_argument("--table", action="store_true",
                      help="print the recorded aot.json as a Markdown table and exit")
  args = parser.parse_args(argv)
  if args.table:
    print(markdown_table(json.loads((args.results_dir / "aot.json").read_text())))
    return 0
  targets.prepare()
  try:
    chosen = [targets.get(name) for name in args.targets.split(",")]
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
      raise ValueError(f"unknown dtype {bad[0]!r}; known: {', '.join(DTYPES)}")
    partitions = tuple(int(p) for p in args.partitions.split(","))
    if args.batch is not None and args.batch < 1:
      raise ValueError(f"--batch must be positive, got {args.batch}")
    shape = dict(image_size=args.size, width=args.width, partitions=partitions)
    steps.step_config(**shape)  # validates the shape's config values
  except ValueError as error:
    print(f"sean_jax.aot: {error}", file=sys.stderr)
    return 2
  batch = args.batch or steps.PAPER["batch_size"]
  info = measure.machine_info()
  result = {"shape": shape, "global_batch": batch, "dtypes": dtypes, "targets": {},
            "machine": info}
  errors = []
  for target in chosen:
    try:
      devices = targets.devices(target)
      entry = run_target(target, devices, dtypes=dtypes, batch=batch, shape=shape,
                         fit_search=not args.no_fit_search)
    except (targets.TargetUnavailable, ValueError, RuntimeError,
            AssertionError) as error:
      message = str(error).splitlines()[0] if str(error) else type(error).__name__
      entry = {"platform": target.platform, "compiled": False, "error": message,
               "memory_per_device_bytes": None}
      errors.append(f"{target.name}: {message}")
      print(f"{target.name:10s} NOT COMPILED: {message}", flush=True)
    else:
      entry.update(date=info["date"], jax=info["jax"])
      if args.batch is not None and not entry["fits"]:
        errors.append(
            f"{target.name}: global batch {batch} ({entry['per_device_batch']} per "
            f"device) needs {entry['memory_per_device_bytes']['total'] / GIB:.1f} GiB "
            f"per device, more than the {target.budget_bytes / GIB:.1f} GiB usable")
    result["targets"][target.name] = entry
    if not args.no_record:
      path = measure.write_json("aot", _merged(result, args.results_dir / "aot.json"),
                                args.results_dir)
  if not args.no_record:
    measure.append_row(_row(info, result), args.results_dir)
    print(f"wrote {path}")
  for line in errors:
    print(f"sean_jax.aot: {line}", file=sys.stderr)
  return 1 if errors else 0
