"""oneDNN convolutions for XLA:CPU (float32, channels-last, 2D or 3D, stride 1, "same"
zero padding).

XLA's CPU convolutions ran the encoder's shapes at 25-110 GFLOP/s where PyTorch's
oneDNN ran them at 70-250 (docs/performance.md). ``conv`` computes the forward pass
and both gradients with oneDNN through XLA's FFI, as custom calls inside the jitted
step. It needs the ``onednn-cpu-gomp`` wheel (a dependency on Linux x86-64) and a C++
compiler: the kernel (onednn_conv.cc) is compiled once per source version into
``$SEAN_JAX_CACHE`` (default ``~/.cache/sean_jax``). ``available()`` says whether that
worked and ``unavailable_reason()`` why not; the model then uses XLA's convolutions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("onednn_conv.cc")
LIBRARY = "libdnnl.so.3"
_TARGETS = {"forward": "SeanConvForward", "backward_data": "SeanConvBackwardData",
            "backward_weights": "SeanConvBackwardWeights"}


def _library_dir() -> Path | None:
  """Where libdnnl.so.3 is: $SEAN_JAX_ONEDNN_LIB, else the wheel's <prefix>/lib."""
  candidates = [os.environ.get("SEAN_JAX_ONEDNN_LIB", ""), Path(sys.prefix) / "lib"]
  for directory in candidates:
    if directory and (Path(directory) / LIBRARY).exists():
      return Path(directory)
  return None


def _compile(library_dir: Path) -> Path:
  """Builds onednn_conv.cc into the cache (atomically) unless it is there already."""
  source = SOURCE.read_bytes()
  digest = hashlib.sha256(source + str(library_dir).encode()
                          + jax.__version__.encode()).hexdigest()[:16]
  cache = Path(os.environ.get("SEAN_JAX_CACHE", Path.home() / ".cache" / "sean_jax"))
  target = cache / f"onednn_conv-{digest}.so"
  if target.exists():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    built = Path(tmp) / target.name
    command = [os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built),
               f"-L{library_dir}", f"-l:{LIBRARY}", f"-Wl,-rpath,{library_dir}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"compiling {SOURCE.name} failed: {result.stderr.strip()[-500:]}")
    os.replace(built, target)
  return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """(library, "") with the FFI targets registered, or (None, reason)."""
  if jax.default_backend() != "cpu":
    return None, f"the default backend is {jax.default_backend()}, not cpu"
  library_dir = _library_dir()
  if library_dir is None:
    return None, (f"{LIBRARY} not found (pip install onednn-cpu-gomp, or set "
                  "SEAN_JAX_ONEDNN_LIB)")
  try:
    library = ctypes.CDLL(str(_compile(library_dir)))
  except (OSError, RuntimeError) as error:
    return None, str(error).splitlines()[0]
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f"sean_conv_{name}",
                                jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  library.SeanConvImpl.restype = ctypes.c_char_p
  library.SeanConvImpl.argtypes = [ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_int64),
                                   ctypes.POINTER(ctypes.c_int64)]
  return library, ""


def available() -> bool:
  return _load()[0] is not None


def unavailable_reason() -> str:
  return _load()[1]


def implementation(kind: str, x_shape, kernel_shape) -> str:
  """oneDNN's implementation of one geometry, e.g. 'brg_conv_fwd:avx512_core'; kind is
  forward, backward_data or backward_weights."""
  library, reason = _load()
  if library is None:
    raise RuntimeError(f"oneDNN convolutions are not available: {reason}")
  shape = ctypes.c_int64 * len(x_shape)
  return library.SeanConvImpl(list(_TARGETS).index(kind), len(x_shape), shape(*x_shape),
                              shape(*kernel_shape)).decode()


def _call(kind: str, out_shape, *operands):
  if not available():
    raise RuntimeError(f"oneDNN convolutions are not available: {unavailable_reason()}")
  return jax.ffi.ffi_call(f"sean_conv_{kind}",
                          jax.ShapeDtypeStruct(out_shape, jnp.float32))(*operands)


@jax.custom_vjp
def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (N, *S, Ci) convolved with kernel (*K, Ci, Co), S and K 2 or 3 spatial sizes,
  odd K, stride 1, zero padding (K - 1) / 2 on every side; returns (N, *S, Co). The
  same as ``lax.conv_general_dilated(x, kernel, (1,) * d, "SAME", dimension_numbers=
  ("NHWC", "HWIO", "NHWC"))`` (or "NDHWC", "DHWIO"), computed by oneDNN. float32 only."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(f"oneDNN convolutions take float32, got {x.dtype} and {kernel.dtype}")
  if x.ndim not in (4, 5) or kernel.ndim != x.ndim or x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f"conv: x {x.shape} and kernel {kernel.shape} do not match")
  if any(k % 2 == 0 for k in kernel.shape[:-2]):
    raise ValueError(f"conv: kernel sizes must be odd, got {kernel.shape[:-2]}")
  return _call("forward", x.shape[:-1] + kernel.shape[-1:], x, kernel)


def _forward(x, kernel):
  return conv(x, kernel), (x, kernel)


def _backward(residuals, dy):
  x, kernel = residuals
  dx = _call("backward_data", x.shape, dy, kernel)
  dkernel = _call("backward_weights", kernel.shape, x, dy)
  return dx, dkernel


conv.defvjp(_forward, _backward)
