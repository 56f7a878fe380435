"""Checkpoints that survive damage, one writer per workdir, one-line config errors
(issue #14). Tiny sizes, no training: a run resumed past damaged checkpoints to the
uninterrupted run's parameters is tests/test_train.py's kill -9 test; the long
fault-injection runs are benchmarks/fault_injection.py."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

import helpers  # tests/ is on sys.path under pytest
from sean_jax import checkpointing

REPO = Path(__file__).resolve().parent.parent

truncate, flip_bits = helpers.truncate_checkpoint, helpers.flip_bits


def _two_checkpoints(tmp_path, *, manifests: bool = True, best: bool = False):
  """A tiny workdir with checkpoints 1 and 2 (and a best one at 2)."""
  workdir = helpers.make_tiny_workdir(tmp_path, step=1)
  state = nnx.state(helpers.fast_train_state(helpers.tiny_config(), seed=1))
  for d in ["checkpoints"] + (["checkpoints_best"] if best else []):
    manager = checkpointing.make_manager(workdir / d, 3)
    checkpointing.save(manager, 2, state, {"step": 2})
    manager.close()
  if not manifests:
    for manifest in workdir.rglob(checkpointing.MANIFEST):
      manifest.unlink()
  return workdir


def test_checkpoints_without_manifest_still_fall_back(tmp_path, capsys):
  """Older checkpoints have no manifest: accepted unchecked, and one orbax cannot read
  is still skipped (the "Event loop is closed" tracebacks orbax leaves are dropped)."""
  workdir = _two_checkpoints(tmp_path, manifests=False)
  truncate(workdir / "checkpoints" / "2")
  _, _, step = checkpointing.load_model(workdir)
  assert step == 1
  err = capsys.readouterr().err
  assert "checkpoints/2 is damaged (orbax cannot read it" in err
  assert "Traceback" not in err
  assert (workdir / "checkpoints_corrupt" / "2").is_dir()


def test_damaged_best_falls_back_to_latest(tmp_path, capsys):
  workdir = _two_checkpoints(tmp_path, best=True)
  flip_bits(workdir / "checkpoints_best" / "2")
  _, _, step = checkpointing.load_model(workdir, "best")
  assert step == 2
  err = capsys.readouterr().err
  assert "checkpoints_best/2 is damaged" in err and "using" in err
  assert (workdir / "checkpoints_best_corrupt" / "2").is_dir()


def test_evaluate_with_every_checkpoint_damaged_is_a_one_line_error(tmp_path, capsys):
  from sean_jax import evaluate
  workdir = _two_checkpoints(tmp_path)
  flip_bits(workdir / "checkpoints" / "2")
  truncate(workdir / "checkpoints" / "1")
  assert evaluate.main(["--workdir", str(workdir)]) == 1
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert [l for l in err if not l.startswith("warning:")] == [err[-1]]
  assert err[-1].startswith("error:") and "no checkpoint restores" in err[-1]
  assert len([l for l in err if l.startswith("warning: checkpoint")]) == 2


def test_evaluate_does_not_move_checkpoints_of_a_live_run(tmp_path, capsys):
  workdir = _two_checkpoints(tmp_path)
  flip_bits(workdir / "checkpoints" / "2")
  with checkpointing.workdir_lock(workdir):  # a training run writes the workdir
    _, _, step = checkpointing.load_model(workdir)
  assert step == 1
  assert "left in place" in capsys.readouterr().err
  assert (workdir / "checkpoints" / "2").is_dir()


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_nothing_half_written(
    tmp_path):
  """A full disk, simulated by a file size limit: the OS fails orbax's own writes
  (EFBIG where a full disk gives ENOSPC) in the background save thread."""
  workdir = helpers.make_tiny_workdir(tmp_path, step=1)
  manager = checkpointing.make_manager(workdir / "checkpoints", 3)
  state = nnx.state(helpers.fast_train_state(helpers.tiny_config(), seed=1))
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
  try:
    with pytest.raises(checkpointing.CheckpointError) as error:
      checkpointing.save(manager, 2, state, {"step": 2})
      manager.wait_until_finished()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  manager.close()
  message = str(error.value)
  assert "\n" not in message
  assert "step 2" in message and "File too large" in message
  assert "the checkpoint of step 1 is intact" in message
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]  # no temporary left
  assert checkpointing.verify_manifest(workdir / "checkpoints" / "1") is None
  _, _, step = checkpointing.load_model(workdir)
  assert step == 1


def test_a_second_training_on_a_held_workdir_is_refused(tmp_path):
  """The lock is an flock: held by a live process, released by the OS at kill -9."""
  from sean_jax import trainer
  workdir = tmp_path / "held"
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import fcntl, os, sys, time\n"
       f"f = open({str(workdir / '.lock')!r}, 'a+')\n"
       "fcntl.flock(f, fcntl.LOCK_EX)\n"
       "f.write(f'{os.getpid()}\\n'); f.flush(); print('held', flush=True)\n"
       "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(checkpointing.WorkdirLockedError,
                       match=f"another training run \\(pid {holder.pid}\\)"):
      trainer.train_and_evaluate(helpers.tiny_config(), workdir)
    assert not (workdir / "checkpoints").exists()  # refused before building anything
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with checkpointing.workdir_lock(workdir) as held:
    assert held
    assert (workdir / ".lock").read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("args, message", [
    (["--config=configs/sean.py:demo", "--config.lerning_rate=1"],
     "--config.lerning_rate=1: the config has no field 'lerning_rate' (did you mean "
     "'learning_rate'?)"),
    (["--config=configs/variants.py:nope"], "unknown variant 'nope'"),
    (["--config=configs/sean.py:demo", "--config.batch_size=abc"],
     "--config.batch_size=abc: invalid literal"),
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, args, message):
  workdir = tmp_path / "w"
  result = subprocess.run([sys.executable, "-m", "sean_jax.train",
                           f"--workdir={workdir}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  err = result.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
  assert not workdir.exists()


def test_wrong_type_is_a_one_line_error():
  from sean_jax import config as config_lib
  c = config_lib.get_config("sean", "demo")
  c.model.partitions = ("abc",)  # what --config.model.partitions=abc gives
  with pytest.raises(ValueError, match=r"config.model.partitions=.* must be a tuple of "
                                       r"2 ints"):
    config_lib.check_types(c)
  for setting in config_lib.SETTINGS:
    config_lib.check_types(config_lib.get_config("unet", setting))


def test_sigterm_during_evaluate_is_one_line_and_writes_nothing(tmp_path):
  """evaluate died silently on SIGTERM; now it stops with one line, exit 143, and no
  result file (results are written whole at the end)."""
  import time
  workdir = helpers.make_tiny_workdir(tmp_path)
  out = tmp_path / "e.json"
  proc = subprocess.Popen([sys.executable, "-m", "sean_jax.evaluate", "--workdir",
                           str(workdir), "--output", str(out)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  for line in proc.stdout:  # the model is loaded; the cases are being evaluated
    if line.startswith("evaluating") or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0], err
  assert not out.exists() and not list(tmp_path.glob(".tmp_*"))
