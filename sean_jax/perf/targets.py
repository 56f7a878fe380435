"""Compilation targets: named sets of devices, real (this machine's CPU) or
compile-only (GPUs and TPUs described by a topology, no accelerator needed).

    cpu        this machine's CPU, one device
    h200       one NVIDIA H200 SXM (needs JAX's CUDA plugin: jax[cuda13])
    h200x8     eight H200 in one host, one process (the data-parallel mesh)
    v5e-2x2    TPU v5e, 2x2 chips (needs libtpu)
    v5p-2x2x1  TPU v5p, 2x2x1 chips (needs libtpu)

GPU devices come from XLA's CUDA plugin given a GpuTargetConfig (the text proto
``gpu_target_h200.txtpb`` beside this file: what each value is and where it came
from is written there); TPU devices from libtpu's topology. Both work on a CPU-only
machine, provided JAX has not started its GPU backend first (:func:`prepare`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from pathlib import Path

import jax

GPU_TARGET_CONFIG = Path(__file__).with_name("gpu_target_h200.txtpb")
# Custom calls that exist only in XLA:CPU programs (sean_jax.ops.onednn's FFI targets).
CPU_ONLY_CUSTOM_CALLS = ("sean_conv_",)
# JAX preallocates this fraction of a GPU's memory and allocates from it
# (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75): a step must fit in it.
JAX_GPU_MEM_FRACTION = 0.75


class TargetUnavailable(RuntimeError):
  """The compiler for a target is not installed here (the message says what to do)."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str            # what the compiled program's devices report: cpu, gpu, tpu
  topology: str            # topology name ("" for the CPU)
  device_memory_bytes: int  # per device (for the CPU: this machine's RAM)
  usable_fraction: float   # of the device memory a JAX process can use by default
  description: str
  install: str = ""        # what to install when the compiler is missing

  @property
  def budget_bytes(self) -> int:
    return int(self.device_memory_bytes * self.usable_fraction)


def _host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_CUDA = ("JAX's CUDA plugin: pip install 'jax[cuda13]=={jax}' (about 4.4 GB; a separate "
         "virtualenv is fine, no GPU needed)")
_TPU = ("libtpu: pip install 'jax[tpu]=={jax}' (no TPU needed; TPU_SKIP_MDS_QUERY=1 is "
        "set for you)")
# H200: 150109945856 B is what CUDA reports as total memory (gpu_target_h200.txtpb).
# TPU HBM per chip from Google's tables: v5e 16 GB, v5p 95 GB; the TPU compiler itself
# refuses a program that does not fit.
TARGETS = {
    "cpu": Target("cpu", "cpu", "", 0, 1.0, "this machine's CPU, one device"),
    "h200": Target("h200", "gpu", "1x1x1", 150109945856, JAX_GPU_MEM_FRACTION,
                   "one NVIDIA H200 SXM", _CUDA),
    "h200x8": Target("h200x8", "gpu", "1x1x8", 150109945856, JAX_GPU_MEM_FRACTION,
                     "eight NVIDIA H200 SXM in one host", _CUDA),
    "v5e-2x2": Target("v5e-2x2", "tpu", "v5e:2x2", 16 * 10**9, 1.0,
                      "TPU v5e, 2x2 chips", _TPU),
    "v5p-2x2x1": Target("v5p-2x2x1", "tpu", "v5p:2x2x1", 95 * 10**9, 1.0,
                        "TPU v5p, 2x2x1 chips", _TPU),
}


def get(name: str) -> Target:
  """The target called ``name``; a one-line error naming the known ones otherwise."""
  if name not in TARGETS:
    raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
  target = TARGETS[name]
  if target.platform == "cpu":
    target = dataclasses.replace(target, device_memory_bytes=_host_memory_bytes())
  return target


def prepare() -> None:
  """Call before JAX touches any device: keeps JAX's own backend on the CPU (a CUDA
  plugin without a GPU otherwise fails to register its compile-only client) and tells
  libtpu not to look for TPU metadata."""
  jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def devices(target: Target) -> list:
  """The target's devices: this machine's CPU, or compile-only accelerators."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if target.platform == "cpu":
    return jax.devices("cpu")[:1]
  install = target.install.format(jax=jax.__version__)
  if target.platform == "gpu":
    if not _installed("jax_plugins.xla_cuda13"):
      raise TargetUnavailable(f"needs {install}")
    try:
      topology = _gpu_topology(topologies, target.topology)
    except (NotImplementedError, RuntimeError) as error:
      raise TargetUnavailable(f"the CUDA plugin gave no compile-only "
                              f"devices ({str(error).splitlines()[0]}); was a GPU "
                              "backend started before sean_jax.perf.targets.prepare()?"
                              ) from error
    return list(topology.devices)
  if not _installed("libtpu"):
    raise TargetUnavailable(f"needs {install}")
  return list(topologies.get_topology_desc(target.topology, "tpu").devices)


def _gpu_topology(topologies, name: str):
  """Compile-only GPUs from GPU_TARGET_CONFIG. The config's text format changes
  between XLA versions and the plugin's parser is strict: jax 0.10's proto has a
  ``dnn_version_info`` (cuDNN) field, 0.11's has none (read from its proto, not yet
  tried on 0.11), so a config it refuses is tried once more without that field."""
  text = GPU_TARGET_CONFIG.read_text()
  try:
    return topologies.get_topology_desc(platform="cuda", target_config=text,
                                        topology=name)
  except RuntimeError as error:
    if "parse" not in str(error).lower() or "dnn_version_info" not in text:
      raise
  text = re.sub(r"\ndnn_version_info \{[^}]*\}", "", text)
  return topologies.get_topology_desc(platform="cuda", target_config=text,
                                      topology=name)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # the parent package is missing
    return False


def compiled_platforms(compiled) -> set[str]:
  """The platforms of the devices a compiled program runs on (``jax.stages.Compiled``)."""
  return {d.platform for s in jax.tree.leaves(compiled.input_shardings)
          for d in s.device_set}


def check_program(compiled, target: Target, text: str | None = None) -> None:
  """Asserts that ``compiled`` was built for the target's platform (calling
  ``.compile()`` on a lowering for another platform silently builds for the CPU) and
  that no CPU-only custom call reached an accelerator program. ``text``:
  ``compiled.as_text()`` if already made."""
  platforms = compiled_platforms(compiled)
  if platforms != {target.platform}:
    raise AssertionError(f"{target.name}: compiled for {sorted(platforms)}, expected "
                         f"{target.platform}")
  if target.platform != "cpu":
    text = compiled.as_text() if text is None else text
    found = [name for name in CPU_ONLY_CUSTOM_CALLS if f'"{name}' in text]
    if found:
      raise AssertionError(f"{target.name}: CPU-only custom calls {found} in an "
                           f"accelerator program")
