"""Copies parameters and BatchNorm statistics between the JAX (Flax NNX) models and the
PyTorch reference in ``modules.py``, in both directions.

The two trees use the same attribute names (``encoder.blocks.0.conv1``,
``attention.value_sym``, ``decoder.head``, ...), so a Flax state path maps to a torch
module; the layout change depends on the pair of module types:

* ``nnx.Conv`` kernel (k..., in, out) -> ``nn.ConvNd`` weight (out, in, k...).
* ``nnx.ConvTranspose`` (transpose_kernel=False) kernel (kh, kw, in, out) ->
  ``nn.ConvTranspose2d`` weight (in, out, kh, kw) *spatially flipped*: Flax's
  transposed conv correlates the dilated input with the kernel as is, torch's is the
  gradient of a conv, i.e. a correlation with the flipped kernel.
* ``nnx.Linear`` kernel (in, out) -> ``nn.Linear`` weight (out, in), or -> a 1x1
  ``nn.ConvNd`` weight (out, in, 1, ...) (the attention projections). A torch Linear
  that follows a CHW flatten (``input_chw`` attribute, the alignment fc) gets its
  columns permuted from Flax's HWC flatten order.
* ``nnx.BatchNorm`` scale, bias, mean, var -> weight, bias, running_mean, running_var.

Every Flax Param/BatchStat and every torch parameter and BatchNorm running statistic
must be matched exactly once, or a ``ConversionError`` names what is left over.
``num_batches_tracked`` (only used by torch with momentum=None) is not compared.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_COPIED = nnx.Any(nnx.Param, nnx.BatchStat)
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}


class ConversionError(RuntimeError):
  pass


def _flax_submodule(model, path):
  for key in path:
    model = model[key] if isinstance(key, int) else getattr(model, key)
  return model


def _pair(flax_mod, torch_mod, name):
  """(torch attribute name, to_torch(np) -> np, to_flax(np) -> np) for one leaf."""
  ident = (lambda a: a, lambda a: a)
  if isinstance(flax_mod, nnx.BatchNorm):
    if not isinstance(torch_mod, _NORM):
      raise ConversionError(f"BatchNorm vs {type(torch_mod).__name__}")
    return (_BN_NAMES[name],) + ident
  if name == "bias":
    return ("bias",) + ident
  if name != "kernel":
    raise ConversionError(f"unknown leaf {name!r} of {type(flax_mod).__name__}")
  if isinstance(flax_mod, nnx.ConvTranspose):
    if type(torch_mod) is not nn.ConvTranspose2d:
      raise ConversionError(f"ConvTranspose vs {type(torch_mod).__name__}")
    return ("weight",
            lambda k: np.flip(k, (0, 1)).transpose(2, 3, 0, 1),
            lambda w: np.flip(w.transpose(2, 3, 0, 1), (0, 1)))
  if isinstance(flax_mod, nnx.Conv):
    if not isinstance(torch_mod, _CONV):
      raise ConversionError(f"Conv vs {type(torch_mod).__name__}")
    nd = torch_mod.weight.ndim - 2
    to_t = (nd + 1, nd) + tuple(range(nd))
    to_f = tuple(range(2, nd + 2)) + (1, 0)
    return "weight", lambda k: k.transpose(to_t), lambda w: w.transpose(to_f)
  if isinstance(flax_mod, nnx.Linear):
    if isinstance(torch_mod, _CONV):  # 1x1 conv in torch
      shape = tuple(torch_mod.weight.shape)
      return ("weight", lambda k: k.T.reshape(shape),
              lambda w: w.reshape(shape[:2]).T)
    if not isinstance(torch_mod, nn.Linear):
      raise ConversionError(f"Linear vs {type(torch_mod).__name__}")
    chw = getattr(torch_mod, "input_chw", None)
    if chw is None:
      return "weight", lambda k: k.T, lambda w: w.T
    c, h, w_ = chw

    def to_t(k):  # rows in HWC order -> columns in CHW order
      return k.reshape(h, w_, c, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], -1)

    def to_f(w):
      return w.reshape(-1, c, h, w_).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    return "weight", to_t, to_f
  raise ConversionError(f"no rule for {type(flax_mod).__name__}")


def _torch_leaves(torch_model):
  leaves = dict(torch_model.named_parameters())
  for name, buf in torch_model.named_buffers():
    if name.endswith(("running_mean", "running_var")):
      leaves[name] = buf
  return leaves


def _plan(jax_model, torch_model, state=None):
  """[(flax path, torch name, to_torch, to_flax)] covering both models exactly."""
  if state is None:
    state = nnx.state(jax_model, _COPIED)
  other = [p for p, _ in nnx.to_flat_state(
      nnx.state(jax_model, nnx.Not(_COPIED)))]
  if other:
    raise ConversionError(f"JAX model has state that is neither Param nor BatchStat "
                          f"and would not be copied: {other}")
  torch_leaves = _torch_leaves(torch_model)
  plan, used = [], set()
  for path, _ in nnx.to_flat_state(state):
    mod_path, leaf = path[:-1], path[-1]
    flax_mod = _flax_submodule(jax_model, mod_path)
    dotted = ".".join(str(k) for k in mod_path)
    try:
      torch_mod = torch_model.get_submodule(dotted)
    except AttributeError as e:
      raise ConversionError(f"torch model has no module {dotted!r} for {path}") from e
    tname, to_t, to_f = _pair(flax_mod, torch_mod, leaf)
    full = f"{dotted}.{tname}" if dotted else tname
    if full not in torch_leaves:
      raise ConversionError(f"torch model has no leaf {full!r} for {path}")
    if full in used:
      raise ConversionError(f"torch leaf {full!r} matched twice")
    used.add(full)
    plan.append((path, full, to_t, to_f))
  missing = sorted(set(torch_leaves) - used)
  if missing:
    raise ConversionError(f"{len(missing)} torch leaves have no JAX counterpart: "
                          f"{missing}")
  return plan


def jax_to_torch(jax_model, torch_model) -> int:
  """Copies every Param and BatchStat of ``jax_model`` into ``torch_model``.

  Returns the number of tensors copied; raises ConversionError if anything on either
  side is left unmatched or a shape does not fit.
  """
  state = nnx.state(jax_model, _COPIED)
  flat = dict(nnx.to_flat_state(state))
  torch_leaves = _torch_leaves(torch_model)
  plan = _plan(jax_model, torch_model, state)
  with torch.no_grad():
    for path, name, to_t, _ in plan:
      value = np.array(to_t(np.asarray(flat[path][...])), copy=True, order="C")
      target = torch_leaves[name]
      if tuple(value.shape) != tuple(target.shape):
        raise ConversionError(f"{path} -> {name}: shape {value.shape} vs "
                              f"{tuple(target.shape)}")
      target.copy_(torch.from_numpy(value))
  return len(plan)


def jax_tree_to_torch_names(jax_model, torch_model, tree) -> dict[str, np.ndarray]:
  """Maps a state-shaped tree (e.g. gradients from ``nnx.grad``) to torch names and
  layouts; only the leaves present in ``tree`` are returned."""
  flat = dict(nnx.to_flat_state(tree))
  plan = _plan(jax_model, torch_model)
  return {name: np.ascontiguousarray(to_t(np.asarray(flat[path][...])))
          for path, name, to_t, _ in plan if path in flat}


def torch_to_jax(torch_model, jax_model) -> int:
  """Copies every torch parameter and running statistic into ``jax_model`` (in place).

  Returns the number of tensors copied; raises ConversionError on any mismatch.
  """
  state = nnx.state(jax_model, _COPIED)
  values = dict(nnx.to_flat_state(state))
  torch_leaves = _torch_leaves(torch_model)
  plan = _plan(jax_model, torch_model, state)
  updated = []
  for path, name, _, to_f in plan:
    value = to_f(torch_leaves[name].detach().cpu().numpy())
    old = values[path]
    if tuple(value.shape) != tuple(old[...].shape):
      raise ConversionError(f"{name} -> {path}: shape {value.shape} vs "
                            f"{tuple(old[...].shape)}")
    updated.append((path, old.replace(
        jnp.asarray(np.ascontiguousarray(value), dtype=old[...].dtype))))
  nnx.update(jax_model, nnx.from_flat_state(updated))
  return len(plan)
