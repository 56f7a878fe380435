"""Fault injection: what training, evaluate and their checkpoints survive (issue #14).

    python benchmarks/fault_injection.py [--quick] [--kill-trials N] [--seed S]
        [--workdir DIR] [--no-write]

Runs a small training (the SEAN variant, 32 px, alignment then segmentation, a
checkpoint every 2 steps and a validation evaluation in the middle) uninterrupted,
then again under each fault, and checks the outcome:
  kill -9 at a random time    0-1.5 s after a random step: resumed to the end, the
                              parameters equal the uninterrupted run's, bit for bit
  kill -9 during a save       the same, killed while orbax's temporary checkpoint
                              directory exists
  full disk during a save     the file size limit of the running trainer is lowered
                              (prlimit) once a checkpoint exists, so the OS fails the
                              next save's writes (EFBIG, as ENOSPC would): the run
                              must stop with a one-line error, the earlier checkpoints
                              intact, nothing temporary left; rerun to the end
  truncated checkpoint        the newest checkpoint of a finished run cut in half:
                              evaluate falls back with a warning, train resumes from
                              the previous one to the same parameters
  bit-flipped checkpoint      the same with 8 bytes flipped (size unchanged)
  NaN in a batch              one training batch made NaN: the run must stop with
                              "non-finite loss", the checkpoints intact and finite
  SIGTERM in evaluation       SIGTERM to the trainer during its validation
                              evaluation (must finish it, save, stop, then resume to
                              the same parameters), and to ``python -m
                              sean_jax.evaluate`` (no output file half-written)
After every trial the workdir is audited: each checkpoint matches its manifest, no
temporary directory remains after the final run, metrics.jsonl and the JSON files
parse. Prints a Markdown table (tried / survived / lost) and writes
benchmarks/results/fault_injection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TINY = ["--config=configs/sean.py:demo", "--config.data.image_size=32",
        "--config.data.phantom_size=32", "--config.model.width=4",
        "--config.model.align_input_size=32", "--config.data.phantom_slices=4",
        "--config.data.num_train_cases=4", "--config.data.num_val_cases=1",
        "--config.data.num_test_cases=1", "--config.batch_size=4",
        "--config.align.batch_size=4", "--config.log_every_steps=1",
        "--config.align.num_train_steps=4", "--config.num_train_steps=12",
        "--config.checkpoint_every_steps=2", "--config.eval_every_steps=10"]
TOTAL_STEPS = 16
EVAL_STEP = 10
TMP_MARKER = ".orbax-checkpoint-tmp"

# A child mode of this script: the trainer with one batch made NaN (the data pipeline
# has no such fault of its own to trigger).
_NAN_CHILD = "--nan-batch-child"


def _nan_batch_child(argv):
  at_step = int(os.environ["SEAN_FAULT_NAN_STEP"])
  from absl import app  # pylint: disable=g-import-not-at-top
  from sean_jax import train, trainer  # pylint: disable=g-import-not-at-top
  original, calls = trainer._global_batch, [0]  # pylint: disable=protected-access

  def poisoned(batch, keys, sharding):
    calls[0] += 1
    if calls[0] == at_step:
      batch = {k: (np.full_like(np.asarray(v), np.nan)
                   if np.issubdtype(np.asarray(v).dtype, np.floating) else v)
               for k, v in batch.items()}
    return original(batch, keys, sharding)

  trainer._global_batch = poisoned  # pylint: disable=protected-access
  sys.argv = [sys.argv[0]] + argv
  app.run(lambda a: sys.exit(train.main(a)), flags_parser=train._parse_flags)  # pylint: disable=protected-access


def train_cmd(workdir):
  return [sys.executable, "-m", "sean_jax.train", f"--workdir={workdir}", *TINY]


def run(cmd, timeout=900, **kwargs):
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        **kwargs)


def final_params(workdir):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sean_jax import checkpointing  # pylint: disable=g-import-not-at-top
  model, _, step = checkpointing.load_model(workdir)
  return step, {"/".join(map(str, k)): np.asarray(v)
                for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def same_params(a, b) -> bool:
  return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
      np.array_equal(a[1][k], b[1][k]) for k in a[1])


def audit(workdir, *, final: bool) -> list[str]:
  """What is half-written or inconsistent in a workdir (empty: nothing)."""
  from sean_jax import checkpointing  # pylint: disable=g-import-not-at-top
  problems = []
  workdir = Path(workdir)
  for name in ("checkpoints", "checkpoints_best"):
    directory = workdir / name
    if not directory.is_dir():
      continue
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    for step in steps:
      step_dir = directory / str(step)
      if not (step_dir / checkpointing.MANIFEST).exists():
        if final or step != steps[-1]:
          problems.append(f"{name}/{step}: no manifest")
        continue
      reason = checkpointing.verify_manifest(step_dir)
      if reason:
        problems.append(f"{name}/{step}: {reason}")
    tmps = [p.name for p in directory.iterdir() if TMP_MARKER in p.name]
    if tmps and final:
      problems.append(f"{name}: temporary {tmps} left")
  for path in workdir.glob("*.json"):
    try:
      json.loads(path.read_text())
    except ValueError:
      problems.append(f"{path.name} does not parse")
  metrics = workdir / "metrics.jsonl"
  if metrics.exists():
    for i, line in enumerate(metrics.read_text().splitlines()):
      try:
        json.loads(line)
      except ValueError:
        problems.append(f"metrics.jsonl line {i + 1} does not parse")
  return problems


def last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


def wait_for(predicate, proc, timeout, poll=0.005):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(poll)
  return False


def checkpoint_steps(workdir):
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() \
      else []


def resume_to_end(workdir, reference, notes):
  """Runs train again (as a user would) until it finishes; checks parameters."""
  result = run(train_cmd(workdir))
  if result.returncode != 0:
    notes.append(f"resume failed: {last_line(result.stderr)}")
    return False
  equal = same_params(final_params(workdir), reference)
  if not equal:
    notes.append("final parameters differ from the uninterrupted run's")
  return equal


def trial_kill_random(base, reference, rng, index):
  """kill -9 a random 0-1.5 s after a random step's log line: mid-step, mid-save,
  mid-evaluation or in the final postprocessing, wherever it falls."""
  workdir = base / f"kill{index}"
  at_step, delay = rng.randint(1, TOTAL_STEPS), rng.uniform(0.0, 1.5)
  proc = subprocess.Popen(train_cmd(workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith(f"step {at_step}/"):
      break
  time.sleep(delay)
  finished_first = proc.poll() is not None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  notes = [f"killed {delay:.1f} s after step {at_step}, newest checkpoint "
           f"{max(checkpoint_steps(workdir), default=None)}"
           + (" (the run had already finished)" if finished_first else "")]
  problems = audit(workdir, final=False)
  ok = resume_to_end(workdir, reference, notes)
  problems += audit(workdir, final=True)
  return ok and not problems, not ok, notes + problems


def trial_kill_in_save(base, reference, index):
  workdir = base / f"killsave{index}"
  ckpt = workdir / "checkpoints"
  proc = subprocess.Popen(train_cmd(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # The (index+1)-th save: wait for its temporary directory, then kill at once.
  target = 2 * (index + 2)
  caught = wait_for(lambda: ckpt.is_dir() and any(
      p.name.startswith(f"{target}{TMP_MARKER}") for p in ckpt.iterdir()), proc, 600,
                    poll=0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  left = [p.name for p in ckpt.iterdir() if TMP_MARKER in p.name] if ckpt.is_dir() else []
  notes = [f"killed while saving step {target}: temporary directory "
           f"{'left' if left else 'gone (commit won the race)'}"]
  if not caught:
    notes.append("the save was not caught in progress")
  problems = audit(workdir, final=False)
  ok = resume_to_end(workdir, reference, notes)
  problems += audit(workdir, final=True)
  return ok and caught and not problems, not ok, notes + problems


def trial_disk_full(base, reference):
  workdir = base / "diskfull"
  proc = subprocess.Popen(train_cmd(workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for(lambda: 4 in checkpoint_steps(workdir), proc, 600, poll=0.01)
  # 256 KiB: metrics.jsonl stays far below, a checkpoint's largest file (1 MiB) not.
  _, hard = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (256 * 1024, hard))
  out, err = proc.communicate(timeout=900)
  message = last_line(err)
  notes = [f"exit {proc.returncode}: {message[:160]}"]
  clear = (proc.returncode == 1 and message.startswith("error: saving the checkpoint")
           and "intact" in message)
  if not clear:
    notes.append("no clear one-line error")
  problems = audit(workdir, final=True)  # nothing temporary may be left
  ok = resume_to_end(workdir, reference, notes)
  problems += audit(workdir, final=True)
  return ok and clear and not problems, not ok, notes + problems


def trial_damaged(base, reference_dir, reference, kind):
  from sean_jax import checkpointing  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  workdir = base / kind
  shutil.copytree(reference_dir, workdir)
  newest = workdir / "checkpoints" / str(checkpoint_steps(workdir)[-1])
  (helpers.truncate_checkpoint if kind == "truncated" else helpers.flip_bits)(newest)
  notes = []
  evaluation = run([sys.executable, "-m", "sean_jax.evaluate", f"--workdir={workdir}",
                    "--split=validation", f"--output={workdir / 'eval_check.json'}"])
  warned = "is damaged" in evaluation.stderr
  notes.append(f"evaluate: exit {evaluation.returncode}"
               f"{', warned and fell back' if warned else ', no warning'}")
  # evaluate moved the bad checkpoint aside; put it back so training meets it too.
  moved = workdir / "checkpoints_corrupt" / newest.name
  if moved.is_dir():
    os.replace(moved, newest)
  result = run(train_cmd(workdir))
  resumed_warned = "is damaged" in result.stderr
  ok = result.returncode == 0 and same_params(final_params(workdir), reference)
  notes.append(f"train: exit {result.returncode}, "
               f"{'warned, ' if resumed_warned else 'no warning, '}"
               f"{'same parameters' if ok else 'parameters differ'}")
  problems = audit(workdir, final=True)
  del checkpointing
  good = ok and warned and resumed_warned and evaluation.returncode == 0
  return good and not problems, not ok, notes + problems


def trial_nan_batch(base):
  workdir = base / "nan"
  at_step = 7
  result = run([sys.executable, str(Path(__file__).resolve()), _NAN_CHILD,
                f"--workdir={workdir}", *TINY],
               env={**os.environ, "SEAN_FAULT_NAN_STEP": str(at_step)})
  message = last_line(result.stderr)
  clear = result.returncode == 1 and "non-finite loss" in message
  notes = [f"NaN batch at step {at_step}: exit {result.returncode}: {message[:120]}"]
  step, params = final_params(workdir)
  finite = all(np.isfinite(v).all() for v in params.values())
  notes.append(f"last checkpoint step {step}, finite: {finite}")
  problems = audit(workdir, final=True)
  # "lost": a checkpoint with NaN, or none left; stopping is the designed outcome.
  return clear and finite and not problems, not finite, notes + problems


def trial_sigterm_in_training_eval(base, reference):
  workdir = base / "sigterm_eval"
  proc = subprocess.Popen(train_cmd(workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith(f"step {EVAL_STEP}/"):  # logged right before the evaluation
      proc.send_signal(signal.SIGTERM)
      break
  rest, err = proc.communicate(timeout=900)
  out = "".join(out) + rest
  stopped = f"stopped at step {EVAL_STEP}/" in out and proc.returncode == 130
  evaluated = f"step {EVAL_STEP}: validation dice" in out
  notes = [f"exit {proc.returncode}; evaluation finished: {evaluated}; "
           f"{'stopped and saved' if stopped else 'did not stop cleanly'}"]
  problems = audit(workdir, final=True)
  ok = resume_to_end(workdir, reference, notes)
  problems += audit(workdir, final=True)
  return ok and stopped and evaluated and not problems, not ok, notes + problems


def trial_sigterm_evaluate_cli(base, reference_dir):
  output = base / "sigterm_eval_cli.json"
  proc = subprocess.Popen([sys.executable, "-m", "sean_jax.evaluate",
                           f"--workdir={reference_dir}", "--split=validation",
                           f"--output={output}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(6.0)  # past start-up, into loading and evaluation
  running = proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  leftovers = [p.name for p in base.iterdir() if p.name.startswith(output.name)
               and p.name != output.name]
  complete = True
  if output.exists():
    try:
      json.loads(output.read_text())
    except ValueError:
      complete = False
  message = last_line(err)
  notes = [f"{'during the run' if running else 'after it had finished'}: exit "
           f"{proc.returncode}, message: {message[:100] or '(none)'}; output "
           f"{'written whole' if output.exists() and complete else 'not written'}"]
  problems = ([f"temporary {leftovers} left"] if leftovers else []) + (
      [] if complete else ["output half-written"]) + (
      [] if message else ["no message: evaluate has no SIGTERM handler"])
  return not problems, not complete, notes + problems


def main(argv=None):
  if argv is None and len(sys.argv) > 1 and sys.argv[1] == _NAN_CHILD:
    return _nan_batch_child(sys.argv[2:])
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="one trial of each fault")
  p.add_argument("--kill-trials", type=int, default=6)
  p.add_argument("--save-kill-trials", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=None, help="keep the workdirs here")
  p.add_argument("--no-write", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.kill_trials, args.save_kill_trials = 1, 1
  rng = random.Random(args.seed)
  base = Path(args.workdir or tempfile.mkdtemp(prefix="fault_injection_"))
  base.mkdir(parents=True, exist_ok=True)
  started = time.time()

  reference_dir = base / "reference"
  t0 = time.time()
  result = run(train_cmd(reference_dir))
  ref_seconds = time.time() - t0
  if result.returncode != 0:
    sys.exit(f"the uninterrupted run failed: {result.stderr[-2000:]}")
  reference = final_params(reference_dir)
  print(f"uninterrupted run: {TOTAL_STEPS} steps in {ref_seconds:.0f} s", flush=True)

  trials = {}

  def record(fault, outcome):
    survived, lost, notes = outcome
    trials.setdefault(fault, []).append(
        {"survived": bool(survived), "lost": bool(lost), "notes": notes})
    print(f"{fault}: {'survived' if survived else 'LOST' if lost else 'FAILED'}; "
          f"{'; '.join(notes)}", flush=True)

  for i in range(args.kill_trials):
    record("kill -9 at a random time",
           trial_kill_random(base, reference, rng, i))
  for i in range(args.save_kill_trials):
    record("kill -9 during a checkpoint save", trial_kill_in_save(base, reference, i))
  record("full disk during a save", trial_disk_full(base, reference))
  record("truncated newest checkpoint",
         trial_damaged(base, reference_dir, reference, "truncated"))
  record("bit-flipped newest checkpoint",
         trial_damaged(base, reference_dir, reference, "bitflip"))
  record("NaN in a training batch", trial_nan_batch(base))
  record("SIGTERM during the validation evaluation (train)",
         trial_sigterm_in_training_eval(base, reference))
  record("SIGTERM during evaluate", trial_sigterm_evaluate_cli(base, reference_dir))

  from sean_jax.perf.measure import machine_info, write_json  # pylint: disable=g-import-not-at-top
  rows = ["| fault | tried | survived | lost | notes |", "|---|---|---|---|---|"]
  for fault, runs in trials.items():
    first_notes = "; ".join(runs[0]["notes"])
    if len(runs) > 1:
      first_notes = f"{len(runs)} trials; first: {first_notes}"
    rows.append(f"| {fault} | {len(runs)} | {sum(r['survived'] for r in runs)} | "
                f"{sum(r['lost'] for r in runs)} | {first_notes} |")
  table = "\n".join(rows)
  print()
  print(table)
  summary = {"machine": machine_info(), "command": " ".join(
      ["python benchmarks/fault_injection.py"] + sys.argv[1:]),
      "uninterrupted_run_s": ref_seconds, "total_s": time.time() - started,
      "workload": TINY, "trials": trials, "table": table}
  if not args.no_write:
    print(f"\nwrote {write_json('fault_injection', summary)}")
  if args.workdir is None:
    shutil.rmtree(base, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
