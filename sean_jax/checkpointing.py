"""Orbax checkpoints of the whole training state, and models restored from a workdir.

Layout of a workdir:
    config.json                the run's config (so evaluate/predict need no --config)
    checkpoints/<step>/        latest checkpoints: model, optimizers, step
    checkpoints_best/<step>/   the checkpoint with the best validation Dice so far
    checkpoints_corrupt/<step>  checkpoints that failed to restore, moved aside (kept)
    .lock                      held by the training run that writes the workdir
Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a checkpoint is either whole or absent, also after ``kill -9``. Once committed, the
sha256 of each of its files goes to ``<step>/sean_manifest.json``; restoring checks
them, so damage done later (truncation, bit rot) is found, not only unparsable files.
A checkpoint that fails (a changed file, an orbax read error, non-finite values) is
moved aside with a one-line warning and the next newer one is used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import jax
import ml_collections
import numpy as np
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


MANIFEST = "sean_manifest.json"
# Orbax's in-progress directories: <step>.orbax-checkpoint-tmp[-<time>].
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (one-line message for the user)."""


class NoUsableCheckpointError(FileNotFoundError):
  """Checkpoints exist but none of them restores."""


class WorkdirLockedError(RuntimeError):
  """Another live training run writes the workdir."""


def _file_digest(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(step_dir: Path) -> Path:
  """Writes the size and sha256 of every file of a committed checkpoint, atomically."""
  step_dir = Path(step_dir)
  files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size,
                                          "sha256": _file_digest(p)}
           for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
  path = step_dir / MANIFEST
  tmp = step_dir / (MANIFEST + ".tmp")
  try:
    with open(tmp, "w") as f:
      json.dump({"format": 1, "files": files}, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def verify_manifest(step_dir: Path) -> str | None:
  """Why the checkpoint's files differ from its manifest, or None when they match.

  A checkpoint without a manifest (written before manifests existed, or a run killed
  between orbax's commit and the manifest) is accepted unchecked; orbax's read errors
  and the finiteness check in ``restore_newest`` still apply to it.
  """
  path = Path(step_dir) / MANIFEST
  if not path.exists():
    return None
  try:
    files = json.loads(path.read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable {MANIFEST} ({type(e).__name__})"
  for name, expected in files.items():
    p = Path(step_dir) / name
    try:
      size = p.stat().st_size
    except FileNotFoundError:
      return f"{name} is missing"
    if size != expected["size"]:
      return f"{name} has {size} bytes, {expected['size']} when saved"
    if _file_digest(p) != expected["sha256"]:
      return f"{name} changed since it was saved (sha256 differs)"
  return None


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that writes the manifest of each checkpoint as soon as orbax
  has committed it, and turns a failed save into a ``CheckpointError`` naming the step
  and the checkpoint that is intact.

  Saves stay asynchronous: a thread per save waits for orbax's commit and writes the
  manifest right after it (hashing took 20 ms for the demo model, 0.25 s at the
  paper's size), so after ``kill -9`` at most the newest checkpoint, killed in that
  window, lacks one. ``wait_until_finished`` (which
  orbax's ``save`` calls first) joins it and raises what failed.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._pending = None  # (step, thread, [error]) of the save in flight
    self._reported = False  # a failed save was raised as CheckpointError

  def save(self, step, *args, **kwargs):
    self.wait_until_finished()
    try:
      saved = super().save(step, *args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(step, e)
    if saved:
      errors = []
      thread = threading.Thread(target=self._manifest_after_commit,
                                args=(step, errors), daemon=True,
                                name=f"sean_manifest_{step}")
      self._pending = (step, thread, errors)
      thread.start()
    return saved

  def _manifest_after_commit(self, step, errors):
    try:
      ocp.CheckpointManager.wait_until_finished(self)  # orbax's commit of ``step``
      if jax.process_index() == 0:
        write_manifest(Path(self.directory) / str(step))
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)  # raised by wait_until_finished in the caller's thread

  def wait_until_finished(self):
    step, thread, errors = self._pending or (None, None, [])
    self._pending = None
    if thread is not None:
      thread.join()
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if self._reported:
        return  # orbax raises a failed save once per calling thread; told already
      self._save_failed(step, e)
    if errors and not self._reported:
      self._save_failed(step, errors[0])

  def close(self):
    """Closes orbax's manager; after a failed save, once its threads have ended, removes
    what they wrote meanwhile (the removal in ``_save_failed`` can race them)."""
    try:
      super().close()
    except Exception:  # pylint: disable=broad-except
      if not self._reported:
        raise
    finally:
      if self._reported:
        self._remove_temporaries()

  def _remove_temporaries(self):
    if jax.process_index() == 0:
      for tmp in Path(self.directory).glob(f"*{_TMP_MARKER}*"):
        shutil.rmtree(tmp, ignore_errors=True)

  def _save_failed(self, step, error):
    """Removes what the failed save left and raises a one-line CheckpointError."""
    self._reported = _OrbaxErrorLogFilter.reported = True
    directory = Path(self.directory)
    self._remove_temporaries()
    self.reload()
    intact = [s for s in self.all_steps() if s != step]
    kept = (f"the checkpoint of step {max(intact)} is intact" if intact
            else "no earlier checkpoint exists")
    _ignore_closed_loop_errors()
    raise CheckpointError(
        f"saving the checkpoint of step {step} in {directory} failed "
        f"({_error_summary(error)}); {kept}, nothing half-written is left. Free space "
        f"(or fix the cause) and run again to resume") from error


def _error_summary(error: Exception) -> str:
  """The operating system's reason when there is one ("No space left on device"),
  else the error's first 200 characters."""
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror} [errno {error.errno}]"
  text = " ".join(str(error).split())
  # TensorStore (orbax's array writer): '...: File too large [os_error_code='27']'.
  found = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='?(\d+)", text)
  if found:
    return f"{found.group(1)} [errno {found.group(2)}]"
  return f"{type(error).__name__}: {text[:200]}"


class _OrbaxErrorLogFilter(logging.Filter):
  """Orbax logs a failed save from each of its threads, with a traceback each (about
  400 lines for one full disk); ``_Manager`` reports the failure in one line. Its
  records keep their message without the traceback, and those after the report go."""

  reported = False

  def filter(self, record):
    if record.levelno >= logging.ERROR and "orbax" in record.pathname:
      if _OrbaxErrorLogFilter.reported:
        return False
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _quiet_orbax_error_logs():
  _OrbaxErrorLogFilter.reported = False  # a new manager: its failures are logged
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxErrorLogFilter) for f in logger.filters):
    logger.addFilter(_OrbaxErrorLogFilter())


def make_manager(directory: Path, max_to_keep: int | None, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager of ``directory``. ``read_only``: for evaluate/predict, which must not
  delete the temporary directories of a save that a live run has in progress."""
  _ignore_closed_loop_errors()
  _quiet_orbax_error_logs()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         cleanup_tmp_directories=not read_only)
  return _Manager(Path(directory).absolute(), options=options)


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


def _ignore_closed_loop_errors():
  """After orbax fails to read or write a checkpoint, the operations it had in flight
  finish later and their callbacks report "Event loop is closed" through
  sys.excepthook or sys.unraisablehook, one traceback each (hundreds per failure); the
  failure itself is reported once, so these are dropped."""
  if getattr(sys.excepthook, "_sean_filter", False):
    return
  closed = lambda e: isinstance(e, RuntimeError) and "Event loop is closed" in str(e)
  previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

  def except_hook(kind, value, traceback):
    if not closed(value):
      previous_except(kind, value, traceback)

  def unraisable_hook(unraisable):
    if not closed(unraisable.exc_value):
      previous_unraisable(unraisable)

  except_hook._sean_filter = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = except_hook, unraisable_hook


def _non_finite(tree) -> str | None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
      return f"non-finite values in {jax.tree_util.keystr(path)}"
  return None


def move_aside(step_dir: Path, reason: str) -> Path:
  """Moves a bad checkpoint to ``<directory>_corrupt/<step>[.N]`` (outside orbax's
  view; never deleted) with the reason beside it; returns the new path."""
  step_dir = Path(step_dir)
  parent = step_dir.parent.with_name(step_dir.parent.name + "_corrupt")
  parent.mkdir(exist_ok=True)
  target, n = parent / step_dir.name, 0
  while target.exists():
    n += 1
    target = parent / f"{step_dir.name}.{n}"
  os.replace(step_dir, target)
  (parent / (target.name + ".reason.txt")).write_text(reason + "\n")
  return target


def _reload_after_moves(manager, moved: bool) -> None:
  """Lets orbax forget the moved checkpoints, on every process once process 0 moved
  them: its list of steps is cached, and latest_step() and the max_to_keep clean-up
  would still count them."""
  if moved and jax.process_count() > 1:
    ocp.multihost.sync_global_processes("sean_checkpoints_moved_aside")
  manager.reload()


def restore_newest(manager: ocp.CheckpointManager, abstract_state: nnx.State, *,
                   move_bad: bool = True, warn=None
                   ) -> tuple[nnx.State, dict, int] | None:
  """Restores the newest checkpoint that is whole: (state, meta, step), or None when
  the directory has no checkpoint.

  Each checkpoint is checked against its manifest, then read by orbax, then checked
  for non-finite values; one that fails is reported with a one-line warning (``warn``,
  default stderr) and, with ``move_bad``, moved aside so it is not picked again.
  Raises ``NoUsableCheckpointError`` when checkpoints exist but none restores.
  """
  warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
  directory = Path(manager.directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    step_dir = directory / str(step)
    reason = verify_manifest(step_dir)
    if reason is None:
      try:
        state, meta = restore(manager, step, abstract_state)
        reason = _non_finite(state.to_pure_dict())
      except Exception as e:  # pylint: disable=broad-except
        _ignore_closed_loop_errors()
        reason = f"orbax cannot read it ({_error_summary(e)})"
    if reason is None:
      if failures:
        _reload_after_moves(manager, move_bad)
      if not (step_dir / MANIFEST).exists():
        warn(f"note: checkpoint {step_dir} has no {MANIFEST} (written before manifests "
             f"existed, or killed right after its commit): restored without a checksum "
             f"check")
      return state, meta, step
    failures.append(f"step {step}: {reason}")
    where = "left in place"
    if move_bad and jax.process_index() == 0:
      try:
        where = f"moved to {move_aside(step_dir, reason)}"
      except OSError as e:
        where = f"left in place (cannot move it: {e.strerror or e})"
    elif move_bad:
      where = "moved aside by process 0"
    warn(f"warning: checkpoint {step_dir} is damaged ({reason}); {where}; trying "
         f"the previous one")
  _reload_after_moves(manager, move_bad)
  raise NoUsableCheckpointError(
      f"{directory}: no checkpoint restores ({'; '.join(failures)})")


@contextlib.contextmanager
def workdir_lock(workdir: Path, *, blocking_error: bool = True):
  """Holds ``workdir/.lock`` (flock) while the block runs: one writer per workdir.

  The OS releases the lock when the process dies, so ``kill -9`` leaves nothing stuck.
  Yields True when held; when another process holds it, raises ``WorkdirLockedError``
  (``blocking_error``) or yields False.
  """
  path = Path(workdir) / ".lock"
  try:
    f = open(path, "a+")  # pylint: disable=consider-using-with
  except OSError:
    if blocking_error:
      raise
    yield False  # a read-only workdir: nobody can be writing it from here
    return
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise
      f.seek(0)
      holder = f.read().strip() or "?"
      if blocking_error:
        raise WorkdirLockedError(
            f"{workdir} is being written by another training run (pid {holder}); "
            f"wait for it to end or stop it, or use another --workdir") from None
      yield False
      return
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    yield True
  finally:
    f.close()  # releases the lock


def load_model(workdir, which: str = "latest") -> tuple[Sean, ml_collections.ConfigDict,
                                                        int]:
  """The trained model of a workdir, in eval mode: (model, config, step).

  ``which``: "latest" or "best" (best validation Dice; falls back to latest, also when
  no best checkpoint restores). A damaged checkpoint is skipped with a warning, and
  moved aside unless a training run holds the workdir (it moves it when it resumes).
  """
  workdir = Path(workdir)
  config = load_config(workdir)
  directories = {"latest": workdir / "checkpoints",
                 "best": workdir / "checkpoints_best"}
  if which not in directories:
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  candidates = [directories[which]] + ([directories["latest"]] if which == "best" else [])
  candidates = [d for d in candidates if d.is_dir()]
  if not candidates:
    raise FileNotFoundError(f"{directories[which]}: no checkpoints in workdir {workdir}")
  abstract = nnx.eval_shape(lambda: TrainState(config, 1, rngs=init_rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  found, error = None, None
  with workdir_lock(workdir, blocking_error=False) as no_writer:
    for directory in candidates:
      manager = make_manager(directory, max_to_keep=None, read_only=True)
      try:
        found = restore_newest(manager, abstract_state, move_bad=no_writer)
      except NoUsableCheckpointError as e:
        error = e
      finally:
        manager.close()
      if found is not None:
        break
      if directory != candidates[-1]:
        print(f"warning: {directory}: no usable checkpoint; using "
              f"{candidates[-1]}", file=sys.stderr, flush=True)
  if found is None:
    raise error or FileNotFoundError(f"{candidates[-1]}: no complete checkpoint")
  state, _, step = found
  train_state = nnx.merge(graphdef, state)
  model = train_state.model
  model.eval()
  return model, config, step
