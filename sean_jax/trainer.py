"""The training loop (paper §3.2, DESIGN.md §6): stage 1 trains the alignment network
(unsupervised), stage 2 the segmentation network on input aligned by the frozen
aligner. Data parallel over every device of every host: the batch is sharded over a
one-axis mesh, parameters are replicated, and ``jit`` inserts the all-reduces (so the
BatchNorm statistics are those of the global batch, as on one device).

Steps are counted globally: [0, A) are stage 1, [A, A + S) stage 2. The batch and every
random choice at step k are pure functions of (seed, k), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sean_jax import checkpointing, losses, plots
from sean_jax import config as config_lib
from sean_jax.data import pipeline, sources
from sean_jax.models import alignment


class NonFiniteLossError(RuntimeError):
  pass


def stage_lengths(config, train_source) -> tuple[int, int]:
  """(alignment steps, segmentation steps) of a run."""
  if config.num_train_steps > 0:
    seg_steps = int(config.num_train_steps)
  else:
    seg_steps = int(config.num_epochs) * pipeline.steps_per_epoch(train_source,
                                                                  config.batch_size)
  align_steps = int(config.align.num_train_steps) if config.model.align else 0
  return align_steps, seg_steps


def check_config(config) -> None:
  """One-line errors for config values the run cannot use."""
  config_lib.check_types(config)
  checkpointing.model_options(config)  # validates the model fields
  n = jax.device_count()
  for name, value in (("batch_size", config.batch_size),
                      ("align.batch_size", config.align.batch_size)):
    if value < 1 or value % n:
      raise ValueError(f"config.{name}={value} must be a positive multiple of the "
                       f"{n} devices")
  for name in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
    if config[name] < 1:
      raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
  if not config.learning_rate > 0 or not math.isfinite(config.learning_rate):
    raise ValueError(f"config.learning_rate must be a positive number, got "
                     f"{config.learning_rate}")
  size = config.data.image_size
  if size % 16:
    raise ValueError(f"config.data.image_size={size} must divide by 16")
  if config.model.align and size % config.model.align_input_size:
    raise ValueError(f"config.data.image_size={size} must be a multiple of "
                     f"config.model.align_input_size={config.model.align_input_size}")


def _guarded(new_state, old_state, loss):
  """Keeps the old state where the loss is not finite: a NaN never reaches params."""
  finite = jnp.isfinite(loss)
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old_state), finite


def segmentation_objective(segmenter, batch):
  """Stage 2 loss of a batch {"slab": (B, D, H, W, 1), "mask": (B, H, W)}."""
  return losses.segmentation_loss(segmenter(batch["slab"]), batch["mask"])


def alignment_objective(aligner, batch):
  """Stage 1 loss (Eq. 1) of a batch {"image": (B, H, W, 1)}; aux: alpha (B, 3)."""
  alpha = aligner(batch["image"])
  return alignment.alignment_loss(batch["image"], alpha), alpha


def make_train_steps(graphdef, replicated, data_sharding):
  """Jitted (state, batch) -> (state, metrics) for both stages."""

  def seg_step(state, batch):
    ts = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(segmentation_objective)(ts.model.segmenter, batch)
    ts.seg_opt.update(ts.model.segmenter, grads)
    new_state, finite = _guarded(nnx.state(ts), state, loss)
    return new_state, {"loss": loss, "finite": finite}

  def align_step(state, batch):
    ts = nnx.merge(graphdef, state)
    (loss, alpha), grads = nnx.value_and_grad(alignment_objective, has_aux=True)(
        ts.model.aligner, batch)
    ts.align_opt.update(ts.model.aligner, grads)
    new_state, finite = _guarded(nnx.state(ts), state, loss)
    return new_state, {"loss": loss, "finite": finite,
                       "rot_err_deg": _nanmean(jnp.degrees(
                           jnp.abs(alpha[:, 0] - batch["pose"][:, 0])))}

  jit = lambda f: jax.jit(f, in_shardings=(replicated, data_sharding),
                          out_shardings=(replicated, replicated), donate_argnums=0)
  return jit(seg_step), jit(align_step)


def _nanmean(x):
  ok = jnp.isfinite(x)
  return jnp.where(ok.any(), jnp.sum(jnp.where(ok, x, 0)) / jnp.maximum(ok.sum(), 1),
                   jnp.nan)


def data_parallel_shardings() -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-sharded) over a one-axis mesh of every device of every host."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def _global_batch(batch: dict, keys, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in keys}


class MetricsLog:
  """metrics.jsonl: one JSON object per logged step; entries past a resumed step are
  dropped, so the file tells the story of the checkpointed run (and a line cut short
  by ``kill -9`` goes too)."""

  def __init__(self, path: Path, resume_step: int, enabled: bool):
    self.path, self.enabled = path, enabled
    if enabled and path.exists():
      kept = [line for line in path.read_text().splitlines()
              if (step := _json_step(line)) is not None and step <= resume_step]
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      os.replace(tmp, path)

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _json_step(line: str) -> int | None:
  """The step of a metrics line; None for a line that is not a JSON object."""
  try:
    return int(json.loads(line).get("step", 0))
  except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
    return None


def _format_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns the final validation metrics.

  The chief process holds ``workdir/.lock`` throughout: a second run on the same
  workdir stops with ``checkpointing.WorkdirLockedError``.
  """
  workdir = Path(workdir)
  check_config(config)
  workdir.mkdir(parents=True, exist_ok=True)
  with (checkpointing.workdir_lock(workdir) if jax.process_index() == 0
        else contextlib.nullcontext()):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  from sean_jax import evaluate  # pylint: disable=g-import-not-at-top

  is_chief = jax.process_index() == 0
  train_source = sources.case_source(config, "train")
  post = evaluate.postprocess_settings(workdir, config, min_size_ml=0.0)
  val_source = sources.case_source(config, "validation", brain_mask=post["brain_mask"])
  align_steps, seg_steps = stage_lengths(config, train_source)
  total_steps = align_steps + seg_steps

  replicated, data_sharding = data_parallel_shardings()

  train_state = checkpointing.TrainState(config, seg_steps,
                                         rngs=checkpointing.init_rngs(config.seed))
  graphdef, state = nnx.split(train_state)
  manager = checkpointing.make_manager(workdir / "checkpoints",
                                       config.max_checkpoints_to_keep)
  best_manager = checkpointing.make_manager(workdir / "checkpoints_best", 1)
  step, best_dice = 0, -1.0
  try:
    # The newest checkpoint that restores; damaged ones are moved aside with a warning.
    found = checkpointing.restore_newest(manager, state)
  except checkpointing.NoUsableCheckpointError as e:
    raise checkpointing.NoUsableCheckpointError(
        f"{e}; they were moved to {workdir / 'checkpoints_corrupt'}, run again to start "
        f"from step 0") from None
  if found is not None:
    state, meta, _ = found
    step, best_dice = int(meta["step"]), float(meta.get("best_dice", -1.0))
    print(f"resuming from {workdir / 'checkpoints'} at step {step}/{total_steps}",
          flush=True)
  elif is_chief:
    checkpointing.save_config(config, workdir)
  state = jax.device_put(state, replicated)
  log = MetricsLog(workdir / "metrics.jsonl", step, is_chief)
  seg_step, align_step = make_train_steps(graphdef, replicated, data_sharding)

  last_saved = [step if manager.latest_step() is not None else None]

  def save(at_step):
    """Saves the state at ``at_step`` unless that step is already saved."""
    if last_saved[0] != at_step:
      checkpointing.save(manager, at_step, state, {"step": at_step,
                                                   "best_dice": best_dice})
      last_saved[0] = at_step

  def evaluate_now(at_step, segmented=None):
    nonlocal best_dice
    model = _host_model(graphdef, state)
    result = evaluate.evaluate_cases(model, pipeline.make_eval_cases(val_source),
                                     refine=post["refine"],
                                     brain_mask=post["brain_mask"], segmented=segmented)
    result.pop("cases", None)
    log.write({"step": at_step, "eval": result, "split": "validation"})
    dice = result.get("dice_case_mean", float("nan"))
    print(f"step {at_step}: validation dice {dice:.4f}", flush=True)
    if dice > best_dice:
      best_dice = dice
      checkpointing.save(best_manager, at_step, state, {"step": at_step,
                                                        "best_dice": best_dice})
    return result

  stop_requested = []  # SIGINT/SIGTERM: finish the step in flight, save, stop.

  def request_stop(signum, _):
    if stop_requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, keep the last checkpoint
    stop_requested.append(signum)
    print(f"\n{signal.Signals(signum).name}: stopping after this step, saving a "
          f"checkpoint (Ctrl-C again to abort)", flush=True)

  previous_handlers = {sig: signal.signal(sig, request_stop)
                       for sig in (signal.SIGINT, signal.SIGTERM)}
  start_time, start_step = time.time(), step

  def run_stage(stage, batches, keys, step_fn, end, evaluate_every=None):
    """Runs steps until ``end`` or a stop request: log, checkpoint, evaluate."""
    nonlocal state, step
    pending = []
    while step < end and not stop_requested:
      batch = _global_batch(next(batches), keys, data_sharding)
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append(metrics)
      if step % config.log_every_steps == 0:
        pending = _flush(pending, step, total_steps, stage, log, start_time, start_step)
      if step % config.checkpoint_every_steps == 0:
        _check_finite(pending, step)
        save(step)
      if evaluate_every and step % evaluate_every == 0 and step < end:
        evaluate_now(step)
    _flush(pending, step, total_steps, stage, log, start_time, start_step)

  result = {}
  try:
    # Stage 1: the alignment network.
    if step < align_steps:
      run_stage("align", pipeline.make_alignment_iterator(
          train_source, batch_size=config.align.batch_size, seed=config.seed,
          start_step=step), ("image", "pose"), align_step, align_steps)
      if step == align_steps:
        save(step)
    # Stage 2: the segmentation network on aligned input.
    if step < total_steps and not stop_requested:
      align_fn = None
      if config.model.align:
        # A copy: the train state's buffers are donated to the next step.
        align_fn = pipeline.alignment_hook(_host_model(graphdef, state).aligner,
                                           refine=post["refine"])
      run_stage("segment", pipeline.make_train_iterator(
          train_source, batch_size=config.batch_size,
          slab_slices=config.model.slab_slices, seed=config.seed,
          start_step=step - align_steps, align_fn=align_fn), ("slab", "mask"),
                seg_step, total_steps, evaluate_every=config.eval_every_steps)
    if stop_requested:
      save(step)
      print(f"stopped at step {step}/{total_steps}; checkpoint saved, run again to "
            f"resume", flush=True)
      result = {"stopped_at_step": step}
    elif step >= total_steps:
      save(step)
      segmented = []  # the final evaluation's predictions choose the postprocessing
      result = evaluate_now(step, segmented)
      if is_chief:
        _choose_postprocessing(segmented, post, step, workdir)
        plots.training_curves(workdir / "metrics.jsonl", workdir / "training_curves.png")
        plots.validation_slices(_host_model(graphdef, state), val_source,
                                workdir / "validation_slices.png")
  finally:
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
    # close() waits for the save in flight and writes its manifest; both managers are
    # closed also when one of them reports a failed save.
    with contextlib.ExitStack() as closing:
      closing.callback(best_manager.close)
      closing.callback(manager.close)
  return result


def _choose_postprocessing(segmented: list, post: dict, step: int, workdir) -> None:
  """Chooses the smallest component to keep on the validation split's predictions
  ``segmented`` (as nnU-Net does) and stores it in ``workdir/postprocessing.json`` for
  evaluate and predict."""
  from sean_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sean_jax.clinical import postprocess  # pylint: disable=g-import-not-at-top
  chosen = evaluate.postprocessing_from(segmented, refine=post["refine"],
                                        brain_mask=post["brain_mask"])
  chosen.update(step=int(step), checkpoint="latest", split="validation")
  path = postprocess.save_postprocessing(workdir, chosen)
  print(f"postprocessing: components below {chosen['min_ml']:g} ml removed "
        f"(chosen on {chosen['num_cases']} validation cases; {path})", flush=True)


def _host_model(graphdef, state):
  """The model in eval mode on this host's own copy of the (replicated) parameters:
  what it computes involves no other host, and the copy outlives donated buffers."""
  local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
  model = nnx.merge(graphdef, local).model
  model.eval()
  return model


def _check_finite(pending, step):
  for i, metrics in enumerate(pending):
    if not bool(metrics["finite"]):
      bad = step - len(pending) + i + 1
      raise NonFiniteLossError(
          f"non-finite loss at step {bad} (loss={float(metrics['loss'])}); stopped "
          f"without saving, the last good checkpoint is intact. Lower the learning "
          f"rate or check the data.")


def _flush(pending, step, total_steps, stage, log, start_time, start_step):
  if not pending:
    return []
  _check_finite(pending, step)
  loss = float(np.mean([float(m["loss"]) for m in pending]))
  elapsed = time.time() - start_time
  rate = (step - start_step) / max(elapsed, 1e-9)
  record = {"step": step, "stage": stage, "loss": loss, "steps_per_sec": rate,
            "elapsed_s": elapsed}
  rot = [float(m["rot_err_deg"]) for m in pending if "rot_err_deg" in m]
  if rot and np.isfinite(rot).any():
    record["rot_err_deg"] = float(np.nanmean(rot))
  log.write(record)
  eta = (total_steps - step) / max(rate, 1e-9)
  extra = f" rot err {record['rot_err_deg']:.2f} deg" if "rot_err_deg" in record else ""
  if jax.process_index() == 0:
    print(f"step {step}/{total_steps} [{stage}] loss {loss:.4f}{extra} {rate:.2f} "
          f"steps/s, {_format_time(elapsed)} elapsed, {_format_time(eta)} left",
          flush=True)
  return []
