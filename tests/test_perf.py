"""sean_jax.perf: model FLOPs against XLA's count, ahead-of-time compilation for the
CPU and lowering for GPU and TPU, and the benchmark command, at tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sean_jax.models.attention import SymmetryAttention
from sean_jax.models.sean import ModelOptions
from sean_jax.perf import aot, flops, steps, targets

REPO = Path(__file__).resolve().parent.parent
TINY = dict(image_size=32, width=4, partitions=(2, 2))


def test_valid_taps_by_hand():
  # 3 taps with padding 1 on 5 voxels: 5 + 4 + 4 = 13 = 3n - 2; a 1x1 kernel: n.
  assert flops.valid_taps(5, 3) == 13
  assert flops.valid_taps(1, 3) == 1
  assert flops.valid_taps(7, 1) == 7
  assert flops.valid_taps(4, 5) == 4 + 3 + 3 + 2 + 2


def test_attention_flops_equal_xla_dot_count():
  """The attention is only products besides a softmax: its forward + backward count
  must match XLA's within the softmax/scale element-wise work (< 2%)."""
  batch, depth, size, channels, parts = 2, 3, 16, 256, (2, 2)
  module = SymmetryAttention(channels, parts, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(module)
  x = jax.ShapeDtypeStruct((batch, depth, size, size, channels), jnp.float32)
  weights = jnp.linspace(-1, 1, batch * size * size * channels).reshape(
      batch, size, size, channels)

  def step(params, x):
    loss = lambda p, v: jnp.sum(nnx.merge(graphdef, p)(v) * weights)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  xla = aot.xla_flops(jax.jit(step).lower(params, x).compile())
  options = ModelOptions(width=channels // 16, partitions=parts)
  model = 3 * sum(op.flops for op in flops.attention_ops(options, batch, depth, size,
                                                          channels))
  assert 0.98 * xla <= model <= xla, (model, xla)


def test_step_flops_against_xla_cost_analysis():
  """The analytic count of a whole training step against XLA's cost analysis of the
  same step lowered for the CPU with XLA's own convolutions. XLA also counts the
  element-wise work (BatchNorm, ReLU, softmax, loss, Adam: one FLOP per element op),
  which the model count leaves out: measured 3.4% of XLA's total at 64x64, w = 8,
  1.4% at 128x128, w = 16; at this test's 64x64, w = 8 it must be under 5%."""
  config = steps.step_config(variant="sean", batch_size=2, image_size=64, width=8,
                             partitions=(2, 2), conv="native")
  fn, args = steps.train_step(config, steps.data_mesh(jax.devices()[:1]))
  xla = aot.xla_flops(fn.trace(*args).lower().compile())
  from sean_jax import checkpointing
  model = flops.step_flops(checkpointing.model_options(config), 2, 64)
  assert 0.95 * xla <= model.train_step <= xla, (model.train_step, xla)
  # Backward is about twice the forward (one product less for the first layer).
  assert 1.9 < model.backward / model.forward < 2.0


def test_variant_flops_relations():
  """Feature concatenation runs the encoder twice and doubles the decoder's input;
  Unet sees one slice where HybridUnet convolves three."""
  from sean_jax.models.sean import VARIANTS
  options = lambda v: ModelOptions(**VARIANTS[v])
  hybrid = flops.step_flops(options("hybrid"), 2, 64).by_part
  concat = flops.step_flops(options("hybrid_ft_cc"), 2, 64).by_part
  assert concat["encoder"] == 2 * hybrid["encoder"]
  assert concat["decoder"] > hybrid["decoder"]
  unet = flops.step_flops(options("unet"), 2, 64).by_part
  # 3x3 vs 3x3x3 over three slices: 9 taps on one slice vs 7 * 9 depth-valid taps.
  first = lambda v: next(op.flops for op in flops.network_ops(options(v), 2, 64)
                         if op.name == "encoder0.conv1")
  assert first("hybrid") == 7 * first("unet")
  assert "attention" not in unet


def test_paper_step_flops_by_hand():
  """The first encoder convolution at the paper's size, by hand: 1 -> 64 channels,
  3x3x3 on (8, 3, 512, 512): 2 * 8 * 64 * 7 * 1534 * 1534 (valid taps)."""
  ops = flops.network_ops(ModelOptions(), batch=8, size=512)
  first = next(op for op in ops if op.name == "encoder0.conv1")
  assert first.flops == 2 * 8 * 1 * 64 * 7 * 1534 * 1534
  assert first.backward_passes == 1  # no input gradient for the data
  parts = flops.step_flops(ModelOptions(), 8, 512).by_part
  assert set(parts) == {"encoder", "attention", "decoder"}


def _cli(args, env_extra=None, timeout=600):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_aot_cpu_target_records_and_reports_what_does_not_fit(tmp_path, monkeypatch,
                                                             capsys):
  """The cpu target compiled at a tiny shape, on a CPU made to have almost no memory:
  everything is recorded, and the requested batch that does not fit is a one-line
  error with exit status 1."""
  monkeypatch.setitem(targets.TARGETS, "cpu",
                      targets.Target("cpu", "cpu", "", 0, 1e-9, "a CPU with no memory"))
  results = tmp_path / "results"
  code = aot.main(["--targets", "cpu", "--dtypes", "float32", "--size", "32",
                   "--width", "4", "--partitions", "2,2", "--batch", "2",
                   "--no-fit-search", "--results-dir", str(results)])
  assert code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cpu: global batch 2" in err[0] and "GiB" in err[0]
  cpu = json.loads((results / "aot.json").read_text())["targets"]["cpu"]
  assert cpu["platform"] == "cpu" and cpu["compiled"] and not cpu["fits"]
  memory = cpu["memory_per_device_bytes"]
  assert 0 < memory["arguments"] < memory["total"]
  train = cpu["steps"]["train_float32"]
  assert train["model_flops_per_device"] > 0 and train["compile_s"] > 0
  assert train["program"]["custom_calls"]  # the CPU's oneDNN convolutions
  assert "predict_float32" in cpu["steps"]
  assert "| aot |" in (tmp_path / "RESULTS.md").read_text()


def test_aot_command_line():
  r = _cli(["-m", "sean_jax.aot", "--targets", "tpu9"], timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "sean_jax.aot: unknown target 'tpu9'; known: cpu, h200, h200x8, v5e-2x2, "
      "v5p-2x2x1"]


def test_aot_table_of_recorded_results(tmp_path, capsys):
  record = {"targets": {
      "h200": {"compiled": True, "num_devices": 1, "device_kind": "NVIDIA H200",
               "date": "2026-12-03", "budget_bytes": 2**30 * 100, "steps": {
                   "train_float32": {"compile_s": 39.0, "largest_per_device_batch": 44,
                                     "xla_flops_per_device": None,
                                     "memory_per_device_bytes": {
                                         "arguments": 2**30, "temporaries": 2**31,
                                         "total": 3 * 2**30}}}},
      "v5e-2x2": {"compiled": False, "error": "needs libtpu"}}}
  (tmp_path / "aot.json").write_text(json.dumps(record))
  assert aot.main(["--table", "--results-dir", str(tmp_path)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert "| h200 | 1 x NVIDIA H200 | float32 | yes (2026-12-03) | 39 |" in lines[2]
  assert "**3.00 GiB** | 100.0 GiB | 44 | - |" in lines[2]
  assert lines[3].startswith("| v5e-2x2 | | | no: needs libtpu |")


@pytest.mark.parametrize("args, message", [
    (["--targets", "cpu,h100"], "unknown target 'h100'"),
    (["--dtypes", "float16"], "unknown dtype 'float16'"),
    (["--size", "40"], "must divide by 16"),
    (["--size", "64", "--partitions", "3,3"], "does not divide into 3x3"),
    (["--batch", "0"], "must be positive"),
])
def test_aot_bad_arguments_are_one_line_errors(args, message, capsys):
  assert aot.main(["--no-record", *args]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], lines


def test_largest_batch_search_finds_the_boundary():
  calls = []

  def bytes_at(b):  # 3 GiB per sample over a 1 GiB constant, slightly convex
    calls.append(b)
    return 2**30 + 3 * 2**30 * b + 2**20 * b * b

  budget = 100 * 2**30
  known = {8: bytes_at(8)}
  best = aot.largest_batch(bytes_at, budget, known)
  assert bytes_at(best) <= budget < bytes_at(best + 1)
  assert len(calls) <= 8
  assert aot.largest_batch(bytes_at, 2**29, {1: bytes_at(1)}) == 0


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering_for_accelerators_has_no_cpu_custom_calls(platform):
  """The training step lowers to StableHLO for GPU and TPU with the CPU-only jaxlib;
  accelerators get XLA's convolutions, never the oneDNN FFI custom calls."""
  config = steps.step_config(batch_size=2, conv="native", **TINY)
  fn, args = steps.train_step(config, steps.data_mesh(jax.devices()[:1]))
  text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert text.count("stablehlo.convolution") >= 20
  assert not any(name in text for name in targets.CPU_ONLY_CUSTOM_CALLS)


def test_check_program_rejects_a_cpu_build_for_an_accelerator():
  """``.compile()`` of a lowering for another platform silently builds for the CPU:
  the check must say so."""
  config = steps.step_config(batch_size=2, conv="native", **TINY)
  fn, args = steps.predict_step(config, steps.data_mesh(jax.devices()[:1]))
  compiled = fn.trace(*args).lower(lowering_platforms=("cuda",)).compile()
  with pytest.raises(AssertionError, match="compiled for .'cpu'., expected gpu"):
    targets.check_program(compiled, targets.TARGETS["h200"])
  targets.check_program(compiled, targets.get("cpu"))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: it stays out of the test extra "
                    "because a tiny step takes ~80 s to compile for TPU on 2 cores "
                    "(pip install 'jax[tpu]' to run this test)")
def test_tpu_compile_at_a_tiny_shape(tmp_path):
  r = _cli(["-m", "sean_jax.aot", "--targets", "v5e-2x2", "--dtypes", "float32",
            "--size", "32", "--width", "4", "--partitions", "2,2", "--batch", "4",
            "--no-fit-search", "--results-dir", str(tmp_path / "results")])
  assert r.returncode == 0, r.stderr[-2000:]
  entry = json.loads((tmp_path / "results" / "aot.json").read_text())["targets"]["v5e-2x2"]
  assert entry["platform"] == "tpu" and entry["num_devices"] == 4
  assert entry["steps"]["train_float32"]["xla_flops_per_device"] > 0


def test_benchmark_quick(tmp_path):
  """The benchmark command end to end at the tiny preset: step, MFU against the matmul
  rate measured in the run, model and XLA FLOPs, attention, scaling and the input
  pipeline. (Run once by hand over two fake devices, where weak scaling times n = 1
  and 2; in the suite one device keeps it short.)"""
  from sean_jax.perf import benchmark
  results = tmp_path / "results"
  assert benchmark.main(["--quick", "--preset", "tiny", "--dtypes", "float32",
                         "--results-dir", str(results)]) == 0
  data = json.loads((results / "benchmark.json").read_text())
  for key in ("device_kind", "step_ms", "compile_s", "mfu", "model_tflop_per_step",
              "xla_tflop_per_step"):
    assert data[key] is not None, key
  assert data["num_devices"] == 1 and data["global_batch"] == 4
  assert 0 < data["mfu"] < 1
  assert 0.85 < data["model_tflop_per_step"] / data["xla_tflop_per_step"] <= 1.0
  assert data["scaling"] == [{"devices": 1, "step_ms": data["step_ms"],
                              "efficiency": 1.0}]
  assert data["pipeline"]["warm_batches_per_s"] > 0
  assert data["dtypes"]["float32"]["attention"]["ms"] > 0
  assert "| benchmark --quick |" in (tmp_path / "RESULTS.md").read_text()
