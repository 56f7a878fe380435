"""Measuring on any backend: timing, the matmul ceiling, peak FLOP/s by device kind,
the machine's description and the results files (``benchmarks/results``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Where results go when run from a checkout: benchmarks/results/<name>.json and one
# row per run in benchmarks/RESULTS.md.
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def median_seconds(fn, *, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

  ``fn`` must block until its result is ready (``block_until_ready`` for JAX).
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_medians(fns: dict, *, repeats: int = 10, warmup: int = 2) -> dict:
  """Median time of each callable, run in turn (a, b, c, a, b, c, ...) so that the
  machine's load drifts affect all of them alike. Returns {name: seconds}."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """The machine's float32 matmul rate (GFLOP/s) in JAX: the ceiling of this run."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32)
  b = jax.random.normal(key_b, (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
  seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats=repeats)
  return 2 * n**3 / seconds / 1e9


# Dense bfloat16 matrix-unit peak per chip, FLOP/s (vendors' datasheets), the
# denominator of MFU as MaxText and PaLM use it: (pattern in jax's device_kind, peak).
# The first pattern that occurs in the device kind wins, so the specific ones go first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),            # NVIDIA H200 SXM (device_kind "NVIDIA H200")
    ("H100 PCIe", 756e12),
    ("H100", 989e12),            # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),     # TPU v5e
    ("TPU v5", 459e12),          # TPU v5p
    ("TPU v6 lite", 918e12),     # TPU v6e (Trillium)
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The device's dense bfloat16 peak (FLOP/s) from PEAK_BF16_FLOPS, or None."""
  for pattern, peak in PEAK_BF16_FLOPS:
    if pattern in device_kind:
      return peak
  return None


def machine_info() -> dict:
  info = {
      "date": datetime.date.today().isoformat(),
      "machine": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
      "python": platform.python_version(),
      "jax": jax.__version__,
  }
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["machine"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  for name in ("flax", "torch"):
    module = sys.modules.get(name)
    if module is not None:
      info[name] = module.__version__
  return info


def results_row(info: dict, benchmark: str, result: str, *,
                versions: str | None = None, setting: str | None = None) -> str:
  """One RESULTS.md row, | date | benchmark | machine (setting) | versions | result |,
  from ``machine_info()``; setting defaults to cores and backend, versions to jax, flax
  and torch."""
  setting = setting or f"{info['cpu_count']} cores, {info['jax_backend']}"
  versions = versions or (f"jax {info['jax']}, flax {info.get('flax')}, torch "
                          f"{info.get('torch')}")
  return (f"| {info['date']} | {benchmark} | {info['machine']} ({setting}) | {versions}"
          f" | {result} |")


def write_json(name: str, result: dict, results_dir: Path = RESULTS_DIR) -> Path:
  """Writes <results_dir>/<name>.json atomically (whole or absent)."""
  results_dir = Path(results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  path = results_dir / f"{name}.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(result, indent=2, default=_to_json) + "\n")
  os.replace(tmp, path)
  return path


def append_row(markdown_row: str, results_dir: Path = RESULTS_DIR) -> None:
  """Appends a row to the RESULTS.md beside ``results_dir`` (made if missing)."""
  results_md = Path(results_dir).parent / "RESULTS.md"
  if not results_md.exists():
    results_md.write_text("# Benchmark results\n\nOne dated row per run; the JSON of "
                          "the latest run of each benchmark is in `results/`.\n\n"
                          "| date | benchmark | machine | versions | result |\n"
                          "| --- | --- | --- | --- | --- |\n")
  with open(results_md, "a") as f:
    f.write(markdown_row.rstrip("\n") + "\n")


def write_results(name: str, result: dict, markdown_row: str,
                  results_dir: Path = RESULTS_DIR) -> Path:
  """Writes <results_dir>/<name>.json and appends a row to the RESULTS.md beside
  that folder."""
  path = write_json(name, result, results_dir)
  append_row(markdown_row, results_dir)
  return path


def _to_json(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value)}")
