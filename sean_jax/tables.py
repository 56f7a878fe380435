r"""Tables 1 and 2 of the paper on the phantom: every row, several seeds, one budget.

    python -m sean_jax.tables --workdir workdirs/tables [--seeds 0,1,2]
        [--rows sean,hybrid] [--steps 500] [--image-size 64] [--evals 1] [--report-only]

Each (row, seed) trains in WORKDIR/<row>/seed<k> with the demo setting of
sean_jax/config.py (64x64 phantom, w = 8; ``--image-size 128`` puts 4x4 tokens in each
of the 2x2 attention partitions of the 8x8 bottleneck) and the same data, steps and
seeds for every row (``--evals`` validation evaluations along the way, for the curves), then is evaluated on the held-out phantom test split (eval.json, as
``python -m sean_jax.evaluate`` writes it). Runs that have an eval.json are skipped and
an interrupted run resumes from its checkpoint, so the command can be run again until
it is done. At the end it writes WORKDIR/tables.md (both tables, mean ± std over seeds)
and WORKDIR/figure3.png (the same test slices under each method, seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# (label, variant) in the paper's order. Table 2's baseline and full model are Table 1's
# HybridUnet and SEAN (the same variant, so the same runs).
TABLE1 = (("Unet", "unet"), ("Unet-IM-L1", "unet_im_l1"), ("Unet-FT-L1", "unet_ft_l1"),
          ("Unet-FT-CC", "unet_ft_cc"), ("HybridUnet", "hybrid"),
          ("HybridUnet-IM-L1", "hybrid_im_l1"), ("HybridUnet-FT-L1", "hybrid_ft_l1"),
          ("HybridUnet-FT-CC", "hybrid_ft_cc"), ("SEAN", "sean"))
TABLE2 = (("Baseline", "hybrid"), ("+Align", "align"), ("+Align+Self", "align_self"),
          ("+Align+Self+Sym", "sean"))
ROWS = tuple(dict.fromkeys(v for _, v in TABLE1 + TABLE2))
METRICS = (("Dice", "dice_case_mean"), ("Dice (lesion cases)", "dice_case_mean_lesion_cases"),
           ("F1", "lesion_f1"), ("Recall", "lesion_recall"),
           ("Precision", "lesion_precision"))


def run_config(variant: str, seed: int, steps: int, align_steps: int,
               test_cases: int, image_size: int = 64, evals: int = 1):
  from sean_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.get_config(variant, "demo")
  c.seed = seed
  c.num_train_steps = steps
  c.align.num_train_steps = align_steps
  c.data.num_test_cases = test_cases
  c.data.image_size = image_size
  c.eval_every_steps = max(1, steps // evals)  # evals times, the last at the end
  c.data.phantom_cache_cases = (c.data.num_train_cases + c.data.num_val_cases
                                + test_cases)
  return c


def train_and_test(run_dir: Path, config) -> dict:
  """Trains (or resumes) one run and evaluates it on the test split."""
  from sean_jax import evaluate, trainer  # pylint: disable=g-import-not-at-top
  trainer.train_and_evaluate(config, run_dir)
  code = evaluate.main(["--workdir", str(run_dir), "--split", "test"])
  if code:
    raise RuntimeError(f"{run_dir}: evaluation failed (exit {code})")
  return json.loads((run_dir / "eval.json").read_text())


def _mean_std(values) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "–"
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(title: str, rows, results: dict, with_alignment: bool) -> str:
  """Markdown table: one line per row, mean ± std over the seeds that finished."""
  head = ["Method"] + [name for name, _ in METRICS] + ["seeds"]
  if with_alignment:
    head[-1:-1] = ["rot. err (°)", "shift err (px)"]
  lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
           "|" + " --- |" * len(head)]
  for label, variant in rows:
    runs = results.get(variant, [])
    cells = [_mean_std([r["metrics"].get(key) for r in runs]) for _, key in METRICS]
    if with_alignment:
      aligned = [r for r in runs if r["config_align"]]
      cells += [_mean_std([r["metrics"].get(k) for r in aligned])
                for k in ("rot_err_deg", "shift_err_px")]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} |")
  return "\n".join(lines)


def figure3(workdir: Path, variants, out_png: Path, num_slices: int = 3) -> None:
  """The same test slices (largest lesion slice of the first lesion cases) under each
  method's seed-0 model: truth green, prediction red."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from sean_jax import checkpointing, plots  # pylint: disable=g-import-not-at-top
  from sean_jax.data import sources  # pylint: disable=g-import-not-at-top

  labels = [(label, v) for label, v in variants
            if (workdir / v / "seed0" / "eval.json").exists()]
  if not labels:
    return
  config = checkpointing.load_config(workdir / labels[0][1] / "seed0")
  picks = plots.largest_lesion_slices(sources.case_source(config, "test"), num_slices)
  fig, axes = plt.subplots(len(picks), len(labels),
                           figsize=(1.9 * len(labels), 2.0 * len(picks)), squeeze=False)
  for col, (label, variant) in enumerate(labels):
    model, _, _ = checkpointing.load_model(workdir / variant / "seed0")
    for row, (case, s) in enumerate(picks):
      plots.outline_panel(axes[row, col], case["image"][s], case["mask"][s],
                          plots.predicted_lesion(model, case["image"])[s],
                          label if row == 0 else "")
  fig.suptitle("phantom test slices: truth green, prediction red (seed 0)", fontsize=9)
  fig.tight_layout()
  out_png.parent.mkdir(parents=True, exist_ok=True)
  plots.save_figure(fig, out_png, dpi=110)


def collect(workdir: Path, seeds) -> dict:
  results = {}
  for variant in ROWS:
    for seed in seeds:
      path = workdir / variant / f"seed{seed}" / "eval.json"
      if path.exists():
        result = json.loads(path.read_text())
        config = json.loads((path.parent / "config.json").read_text())
        result["config_align"] = bool(config["model"]["align"])
        results.setdefault(variant, []).append(result)
  return results


def budgets(workdir: Path, seeds) -> list[str]:
  """The budgets the finished runs were trained with (one, unless options changed)."""
  found = set()
  for variant in ROWS:
    for seed in seeds:
      run = workdir / variant / f"seed{seed}"
      if (run / "eval.json").exists():
        c = json.loads((run / "config.json").read_text())
        align = (f", {c['align']['num_train_steps']} alignment steps"
                 if c["model"]["align"] else "")
        found.add((c["num_train_steps"], c["batch_size"], c["data"]["num_test_cases"],
                   align, c["data"]["image_size"]))
  return sorted(f"{size}x{size} input, {steps} segmentation steps (batch {batch}), "
                f"{test} test cases{align}"
                for steps, batch, test, align, size in found)


def report(workdir: Path, seeds) -> str:
  results = collect(workdir, seeds)
  text = "\n\n".join([
      f"Phantom test split; mean ± std over the seeds that finished (of {list(seeds)}); "
      f"runs trained with: {'; '.join(budgets(workdir, seeds)) or 'none yet'}.",
      table("Table 1", TABLE1, results, with_alignment=False),
      table("Table 2", TABLE2, results, with_alignment=True)]) + "\n"
  (workdir / "tables.md").write_text(text)
  figure3(workdir, TABLE1 + TABLE2[1:3], workdir / "figure3.png")
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=Path)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--rows", default=",".join(ROWS),
                      help=f"variants to run (default all: {','.join(ROWS)})")
  parser.add_argument("--steps", type=int, default=500, help="segmentation steps per run")
  parser.add_argument("--align-steps", type=int, default=400)
  parser.add_argument("--test-cases", type=int, default=24)
  parser.add_argument("--image-size", type=int, default=64,
                      help="in-plane input size (a multiple of 32: 2x2 partitions of the "
                           "size/16 bottleneck)")
  parser.add_argument("--evals", type=int, default=1,
                      help="validation evaluations per run (the validation curve)")
  parser.add_argument("--report-only", action="store_true")
  args = parser.parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
  rows = args.rows.split(",")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
  if args.steps < 1 or args.align_steps < 1 or args.test_cases < 1 or args.evals < 1:
    parser.error("--steps, --align-steps, --test-cases and --evals must be positive")
  if args.image_size < 32 or args.image_size % 32:
    parser.error(f"--image-size must be a multiple of 32, got {args.image_size}")
  budget = (f"{args.image_size}x{args.image_size} input, {args.steps} segmentation "
            f"steps (batch 8), {args.align_steps} alignment steps, {args.test_cases} "
            f"test cases")
  if not args.report_only:
    todo = [(v, s) for s in seeds for v in rows
            if not (args.workdir / v / f"seed{s}" / "eval.json").exists()]
    print(f"{len(todo)} runs to do ({budget})", flush=True)
    for k, (variant, seed) in enumerate(todo):
      start = time.time()
      run_dir = args.workdir / variant / f"seed{seed}"
      train_and_test(run_dir, run_config(variant, seed, args.steps, args.align_steps,
                                         args.test_cases, args.image_size, args.evals))
      print(f"[{k + 1}/{len(todo)}] {variant} seed {seed}: {time.time() - start:.0f} s",
            flush=True)
  print(report(args.workdir, seeds))
  return 0


if __name__ == "__main__":
  sys.exit(main())
