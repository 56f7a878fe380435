"""Orbax checkpoints of the whole training state, and models restored from a workdir.

Layout of a workdir:
    config.json                the run's config (so evaluate/predict need no --config)
    checkpoints/<step>/        latest checkpoints: model, optimizers, step
    checkpoints_best/<step>/   the checkpoint with the best validation Dice so far
Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a checkpoint is either whole or absent, also after ``kill -9``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp
from flax import nnx

from sean_jax.models.sean import ModelOptions, Sean


def model_options(config: ml_collections.ConfigDict) -> ModelOptions:
  m = config.model
  return ModelOptions(
      backbone=m.backbone, fusion=m.fusion, attention_self=m.attention_self,
      attention_symmetry=m.attention_symmetry, align=m.align, width=m.width,
      slab_slices=m.slab_slices, partitions=tuple(m.partitions),
      num_classes=m.num_classes, align_input_size=m.align_input_size,
      conv=m.get("conv", m.get("conv3d", "auto")))  # "conv3d": before 2026-11-25


def compute_dtype(config):
  return jax.numpy.bfloat16 if config.get("half_precision", False) else None


def init_rngs(seed: int) -> nnx.Rngs:
  """Initialisation streams. The "rbg" generator compiles its per-shape kernels about
  5x faster than the default threefry on CPU, which dominated start-up (30 s -> 7 s
  for the demo model); only initial values depend on it."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


class TrainState(nnx.Module):
  """The model and its optimizers: everything a resumed run needs besides the step.

  The data position and random streams are pure functions of (seed, step).
  """

  def __init__(self, config: ml_collections.ConfigDict, seg_steps: int, *,
               rngs: nnx.Rngs):
    self.model = Sean(model_options(config), dtype=compute_dtype(config), rngs=rngs)
    seg_lr = optax.polynomial_schedule(config.learning_rate, 0.0, config.poly_power,
                                       max(seg_steps, 1))
    self.seg_opt = nnx.Optimizer(
        self.model.segmenter, optax.adam(seg_lr, b1=config.adam_b1, b2=config.adam_b2),
        wrt=nnx.Param)
    self.align_opt = (
        nnx.Optimizer(self.model.aligner,
                      optax.adam(config.align.learning_rate, b1=config.adam_b1,
                                 b2=config.adam_b2), wrt=nnx.Param)
        if self.model.aligner is not None else None)


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  path = workdir / "config.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(config.to_json_best_effort(indent=2) + "\n")
  os.replace(tmp, path)


def load_config(workdir: Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no config.json; is this a training workdir?")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: corrupt config.json ({e})") from None
  for key in ("partitions",):
    data["model"][key] = tuple(data["model"][key])
  data["data"]["hu_window"] = tuple(data["data"]["hu_window"])
  data["data"]["lesion_labels"] = tuple(data["data"]["lesion_labels"])
  return ml_collections.ConfigDict(data)


def make_manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory.absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: nnx.State,
         meta: dict) -> None:
  """Saves asynchronously from a host copy (the device buffers may be donated to the
  next step while the checkpoint is written)."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_get(state.to_pure_dict())),
      meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: nnx.State
            ) -> tuple[nnx.State, dict]:
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state.to_pure_dict())
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  state = abstract_state
  nnx.replace_by_pure_dict(state, restored["state"])
  return state, restored["meta"]


def load_model(workdir, which: str = "latest") -> tuple[Sean, ml_collections.ConfigDict,
                                                        int]:
  """The trained model of a workdir, in eval mode: (model, config, step).

  ``which``: "latest" or "best" (best validation Dice; falls back to latest).
  """
  workdir = Path(workdir)
  config = load_config(workdir)
  directories = {"latest": workdir / "checkpoints",
                 "best": workdir / "checkpoints_best"}
  if which not in directories:
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  directory = directories[which]
  if which == "best" and not directory.exists():
    directory = directories["latest"]
  if not directory.exists():
    raise FileNotFoundError(f"{directory}: no checkpoints in workdir {workdir}")
  manager = make_manager(directory, max_to_keep=None)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: no complete checkpoint")
  abstract = nnx.eval_shape(lambda: TrainState(config, 1, rngs=init_rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state, _ = restore(manager, step, abstract_state)
  manager.close()
  train_state = nnx.merge(graphdef, state)
  model = train_state.model
  model.eval()
  return model, config, step
