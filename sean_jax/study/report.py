"""The study of a ``sean_jax.tables`` workdir: specificity, matched-FP detection and
paired statistics per row (``python -m sean_jax.study``).

    python -m sean_jax.study --workdir workdirs/tables128
        [--rows hybrid,align,align_self,sean,hybrid_ft_cc] [--seeds 0,1,2]
        [--template ../shared/data/ct_template/template_with_skull_2mm.nii.gz]
        [--angles -12,-6,0,6,12] [--test-config FILE.py --tag NAME]

For every finished run (``eval.json``): the threshold sweep of its test cases
(``sweep.json``; inside the brain mask, without the component-size filter, whose size
each run chose for itself on validation and which would make the curves
incomparable; with the phantom's distractors counted) and, with ``--template``, the
false positives on the real normal head (``normal_head.json``), each computed once and
kept in the run's folder. Then ``WORKDIR/study.md`` and ``study.json``, per row as
mean ± std over seeds:

- detection: Dice, lesion F1, recall and precision at the run's own postprocessing
  (``eval.json``), and lesion recall at matched false positives (1, 2 and 4 components
  per case, along the sweep);
- specificity: false-positive components per lesion-free test case, false-positive ml
  per lesion-free case at 0.5, the share of the acute infarcts' voxels found and of
  each distractor's voxels flagged (symmetric hypodensities, old infarcts,
  calcifications), and on the normal head the ml after and before postprocessing, inside
  the brain, and the share of it whose mirror image is predicted too;
- validation Dice along training;
- paired differences (bootstrap 95% CIs over test cases) of every row against the
  baseline and of SEAN against +Align+Self;

and ``study.png`` (recall against false positives per case, seed means; the normal
head's ml per run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sean_jax import evaluate
from sean_jax.study import normal_head, stats, sweep

__all__ = ["run_study", "main"]

LABELS = {"hybrid": "Baseline (HybridUnet)", "align": "+Align",
          "align_self": "+Align+Self", "sean": "+Align+Self+Sym (SEAN)",
          "hybrid_ft_cc": "HybridUnet-FT-CC", "unet": "Unet"}
MATCHED_FP = (1.0, 2.0, 4.0)  # false-positive components per case (no size filter)
PAIRS = (("hybrid", "align"), ("hybrid", "align_self"), ("hybrid", "sean"),
         ("hybrid", "hybrid_ft_cc"), ("align_self", "sean"))
# Of the per-run files: 2 added the distractors to sweep.json and the in-brain ml and its
# mirrored share to normal_head.json; older files are computed again.
VERSION = 2
SYM_PAIR = "sym. hypodensity voxels flagged"
PAIR_STATS = (("Dice", "dice"), ("lesion F1", "f1"), ("recall", "recall"),
              ("precision", "precision"), ("FP components per case", "fp_pred"))


def _current(path: Path) -> dict | None:
  """The cached per-run file at ``path``, or None when absent or older than VERSION."""
  if not path.exists():
    return None
  content = json.loads(path.read_text())
  return content if content.get("version", 1) >= VERSION else None


def analyse_run(run_dir: Path, template=None, angles=normal_head.DEFAULT_ANGLES,
                test=None) -> dict:
  """The sweep (and normal-head) results of one run, computed once and cached.

  ``test``: None for the run's own test split (``eval.json``, ``sweep.json``), or
  ``(config_spec, tag)``: the test split of that config file's data (``FILE.py:ROW``,
  as ``evaluate --config`` takes it), kept as ``eval_TAG.json`` and ``sweep_TAG.json``.
  """
  # pylint: disable=g-import-not-at-top
  from sean_jax import checkpointing
  from sean_jax.data import sources
  # pylint: enable=g-import-not-at-top
  out = {}
  suffix = f"_{test[1]}" if test else ""
  eval_file, sweep_file = run_dir / f"eval{suffix}.json", run_dir / f"sweep{suffix}.json"
  if test and not eval_file.exists():
    code = evaluate.main(["--workdir", str(run_dir), "--split", "test", "--config",
                          test[0], "--output", str(eval_file)])
    if code:
      raise RuntimeError(f"{run_dir}: evaluation on {test[0]} failed (exit {code})")
  head_file = run_dir / "normal_head.json"
  out["sweep"] = _current(sweep_file)
  head = _current(head_file) if template is not None else None
  need_sweep, need_head = out["sweep"] is None, template is not None and head is None
  if need_sweep or need_head:
    model, config, _ = checkpointing.load_model(run_dir)
    model.eval()
    if test:
      config = evaluate.override_data(config, test[0])
    settings = evaluate.postprocess_settings(run_dir, config)
    if not model.aligner:
      settings["refine"] = False
    if need_sweep:
      cases = sources.case_source(config, "test", brain_mask=settings["brain_mask"],
                                  tissue=True)
      out["sweep"] = {"version": VERSION, "settings": settings,
                      "cases": sweep.sweep_cases(model, cases, refine=settings["refine"],
                                                 brain_mask=settings["brain_mask"],
                                                 min_size_ml=0.0)}
      evaluate.write_json_atomic(out["sweep"], sweep_file)
    if need_head:
      head = {"version": VERSION, "template": str(template), "settings": settings,
              "angles": normal_head.false_positives(model, config, template, settings,
                                                    angles=angles)}
      evaluate.write_json_atomic(head, head_file)
  if head is None and head_file.exists():  # computed earlier, no --template now
    head = json.loads(head_file.read_text())
  if head is not None:
    out["normal_head"] = head
  out["eval"] = json.loads(eval_file.read_text())
  out["validation"] = validation_curve(run_dir)
  return out


def validation_curve(run_dir: Path) -> list[list]:
  """[[step, validation case-mean Dice], ...] of the evaluations along training."""
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [[r["step"], r["eval"]["dice_case_mean"]] for r in rows if "eval" in r]


def _ms(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _row_numbers(run: dict) -> dict:
  points = sweep.curve(run["sweep"]["cases"])
  at = {p["threshold"]: p for p in points}
  half = at.get(0.5, points[len(points) // 2])
  m = run["eval"]["metrics"]
  numbers = {"dice": m["dice_case_mean"], "f1": m["lesion_f1"],
             "recall": m["lesion_recall"], "precision": m["lesion_precision"],
             "fp_ml_lesion_free": half["fp_ml_lesion_free"],
             "fp_per_case": half["fp_per_case"]}
  free = [r for r in run["eval"]["cases"] if not r["has_lesion"]]
  numbers["fp_components_lesion_free"] = (float(np.mean([r["fp_pred"] for r in free]))
                                          if free else None)
  for fp in MATCHED_FP:
    numbers[f"recall_at_{fp:g}_fp"] = sweep.recall_at_fp(points, fp)
  # Pooled at 0.5: how much of the acute infarcts the run calls lesion, the measure the
  # distractors' shares are read against (the same contrast, 2-8 HU).
  rows = [r for c in run["sweep"]["cases"] for r in c["rows"] if r["threshold"] == 0.5]
  ref = sum(r["ref_voxels"] for r in rows)
  numbers["infarct_voxel_share"] = (sum(r["intersection"] for r in rows) / ref
                                    if ref else None)
  for name, d in sweep.distractors_flagged(run["sweep"]["cases"]).items():
    numbers[f"{name}_voxel_share"] = d["voxel_share"]
    numbers[f"{name}_cases_flagged"] = (d["cases_flagged"] / d["cases"]
                                        if d["cases"] else None)
  if "normal_head" in run:
    numbers["normal_head_ml"] = float(np.mean([a["ml"] for a in run["normal_head"]["angles"]]))
    numbers["normal_head_components"] = float(np.mean(
        [a["components"] for a in run["normal_head"]["angles"]]))
    numbers["normal_head_ml_before_postprocessing"] = float(np.mean(
        [a["ml_before_postprocessing"] for a in run["normal_head"]["angles"]]))
    angles = run["normal_head"]["angles"]
    if all("mirrored_fraction" in a for a in angles):  # absent in older files
      numbers["normal_head_ml_in_brain"] = float(np.mean(
          [a["ml_in_brain_no_size_filter"] for a in angles]))
      # Pooled over the angles: weighted by the ml each share is of.
      weighted = [(a["mirrored_fraction"], a["ml_in_brain_no_size_filter"])
                  for a in angles if a["mirrored_fraction"] is not None]
      numbers["normal_head_mirrored_share"] = (
          float(sum(f * w for f, w in weighted) / sum(w for _, w in weighted))
          if weighted else None)
  return numbers


def _symmetric_flagged(sweep_result: dict) -> dict:
  """eval.json-like ``{"cases": [{"case_id", "flagged"}]}``: per test case with a
  symmetric hypodensity, the share of its voxels predicted as lesion at 0.5."""
  return {"cases": [{"case_id": case_id, "flagged": d["flagged"] / d["voxels"]}
                    for case_id, d in sweep.distractor_counts(
                        sweep_result["cases"], "symmetric_hypodensity")]}


def run_study(workdir: Path, rows, seeds, template=None,
              angles=normal_head.DEFAULT_ANGLES, test_config=None, tag=None) -> dict:
  """Every finished run (``eval.json``) of ``rows`` x ``seeds``; with ``test_config``
  (a config file) tested on its data's test split instead, results tagged ``tag``."""
  runs: dict = {}
  for variant in rows:
    for seed in seeds:
      run_dir = workdir / variant / f"seed{seed}"
      if (run_dir / "eval.json").exists():
        print(f"analysing {variant} seed {seed}", flush=True)
        test = (f"{test_config}:{variant}", tag) if test_config else None
        runs.setdefault(variant, []).append(analyse_run(run_dir, template, angles, test))
  table = {v: [_row_numbers(r) for r in rs] for v, rs in runs.items()}
  pairs = []
  for a, b in PAIRS:
    if a in runs and b in runs:
      ra, rb = [r["eval"] for r in runs[a]], [r["eval"] for r in runs[b]]
      pair = {"a": a, "b": b, **{name: stats.paired_difference(ra, rb, key)
                                 for name, key in PAIR_STATS}}
      sa, sb = ([_symmetric_flagged(r["sweep"]) for r in runs[v]] for v in (a, b))
      if all(r["cases"] for r in sa + sb):
        pair[SYM_PAIR] = stats.paired_difference(sa, sb, "flagged")
      pairs.append(pair)
  curves = {v: [sweep.curve(r["sweep"]["cases"]) for r in rs] for v, rs in runs.items()}
  return {"table": table, "pairs": pairs, "curves": curves,
          "validation": {v: [r["validation"] for r in rs] for v, rs in runs.items()},
          "seeds": {v: len(rs) for v, rs in runs.items()}}


DETECTION_COLUMNS = (
    ("Dice", "dice"), ("lesion F1", "f1"), ("recall", "recall"),
    ("precision", "precision"),
    *((f"recall @ {fp:g} FP/case", f"recall_at_{fp:g}_fp") for fp in MATCHED_FP))
SPECIFICITY_COLUMNS = (
    ("FP comps / lesion-free case", "fp_components_lesion_free"),
    ("FP ml / lesion-free case @ 0.5, no size filter", "fp_ml_lesion_free"),
    ("acute infarct: voxels found", "infarct_voxel_share"),
    ("sym. hypodensity: cases flagged", "symmetric_hypodensity_cases_flagged"),
    ("sym. hypodensity: voxels flagged", "symmetric_hypodensity_voxel_share"),
    ("old infarct: voxels flagged", "old_infarct_voxel_share"),
    ("calcification: voxels flagged", "calcification_voxel_share"),
    ("normal head ml", "normal_head_ml"),
    ("normal head components", "normal_head_components"),
    ("normal head ml, no postproc.", "normal_head_ml_before_postprocessing"),
    ("normal head ml in brain, no size filter", "normal_head_ml_in_brain"),
    ("share of it mirrored", "normal_head_mirrored_share"))


def _table(result: dict, cols) -> list[str]:
  lines = ["| Method | " + " | ".join(c for c, _ in cols) + " | seeds |",
           "|" + " --- |" * (len(cols) + 2)]
  for variant, numbers in result["table"].items():
    cells = [_ms([n.get(k) for n in numbers]) for _, k in cols]
    lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(cells)
                 + f" | {len(numbers)} |")
  return lines


def markdown(result: dict) -> str:
  names = [n for n, _ in PAIR_STATS] + (
      [SYM_PAIR] if any(SYM_PAIR in p for p in result["pairs"]) else [])
  lines = ["Detection on the phantom test cases (mean ± std over seeds; recall at matched "
           "false positives along the threshold sweep):", "",
           *_table(result, DETECTION_COLUMNS), "",
           "Specificity: phantom test cases (distractors flagged at 0.5, inside the "
           "brain, no size filter) and the real normal head (every ml is false):", "",
           *_table(result, SPECIFICITY_COLUMNS)]
  lines += ["", "Validation Dice along training (mean over seeds; whether the curves "
            "flattened):", ""]
  for variant, curves in result.get("validation", {}).items():
    steps = sorted({step for c in curves for step, _ in c})
    cells = [f"{step}: {np.mean([d for c in curves for st, d in c if st == step]):.3f}"
             for step in steps]
    lines.append(f"- {LABELS.get(variant, variant)}: " + ", ".join(cells))
  lines += ["", "Paired differences B - A over the test cases (seed means per case), "
            "bootstrap 95% CI; **bold** where the interval excludes 0:", "",
            "| A | B | " + " | ".join(names) + " |",
            "|" + " --- |" * (len(names) + 2)]
  for pair in result["pairs"]:
    cells = []
    for name in names:
      d = pair.get(name)
      if d is None:
        cells.append("–")
        continue
      cell = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
      cells.append(f"**{cell}**" if d["real"] else cell)
    lines.append(f"| {LABELS.get(pair['a'], pair['a'])} | {LABELS.get(pair['b'], pair['b'])}"
                 f" | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
  """Two panels: lesion recall against false-positive components per case along the
  threshold sweep (seed means), and the ml predicted on the normal head per run (one
  dot per seed and angle mean; before and after the run's postprocessing)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (froc, head) = plt.subplots(1, 2, figsize=(10, 4))
  for variant, curves in result["curves"].items():
    fp = np.mean([[p["fp_per_case"] for p in c] for c in curves], axis=0)
    rec = np.mean([[p["recall"] for p in c] for c in curves], axis=0)
    froc.plot(fp, rec, "o-", ms=3, label=LABELS.get(variant, variant))
  froc.set_xlabel("false-positive components per case")
  froc.set_ylabel("lesion recall")
  froc.set_xscale("symlog", linthresh=0.1)
  froc.grid(alpha=0.3)
  froc.legend(fontsize=7)
  froc.set_title("phantom test cases: thresholds 0.1-0.99, brain mask, no size filter "
                 "(seed means)", fontsize=7)
  variants = list(result["table"])
  for i, variant in enumerate(variants):
    for key, marker, name in (("normal_head_ml_before_postprocessing", "o", "before"),
                              ("normal_head_ml", "x", "after")):
      ml = [n[key] for n in result["table"][variant] if key in n]
      head.scatter([i] * len(ml), ml, marker=marker, color="C0" if name == "before" else "C3",
                   label=f"{name} postprocessing" if i == 0 else None)
  head.set_xticks(range(len(variants)))
  head.set_xticklabels([LABELS.get(v, v) for v in variants], rotation=20, fontsize=7,
                       ha="right")
  head.set_ylabel("ml predicted (all false), mean over angles")
  head.set_yscale("symlog", linthresh=0.1)
  head.set_ylim(bottom=0.0)
  head.grid(alpha=0.3)
  head.legend(fontsize=7)
  head.set_title("real normal head (CQ500 template), one dot per seed", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m sean_jax.study",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, type=Path)
  p.add_argument("--rows", default="hybrid,align,align_self,sean,hybrid_ft_cc")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--template", default=None, type=Path,
                 help="the real normal head CT (../shared/data/ct_template/"
                      "template_with_skull_2mm.nii.gz)")
  p.add_argument("--angles", default=",".join(f"{a:g}" for a in normal_head.DEFAULT_ANGLES),
                 help="in-plane rotations of the normal head, degrees")
  p.add_argument("--test-config", default=None, type=Path, metavar="FILE.py",
                 help="test on the test split of this config file's data (its "
                      "get_config(ROW), the model settings unchanged) instead of the "
                      "runs' own; needs --tag")
  p.add_argument("--tag", default=None,
                 help="name of the --test-config results: eval_TAG.json and "
                      "sweep_TAG.json per run, WORKDIR/study_TAG.{md,json,png}")
  args = p.parse_args(argv)
  if (args.test_config is None) != (args.tag is None):
    p.error("--test-config and --tag go together")
  if args.tag is not None and not args.tag.replace("_", "").replace("-", "").isalnum():
    p.error(f"--tag must be letters, digits, - or _, got {args.tag!r}")
  try:
    angles = tuple(float(a) for a in args.angles.split(","))
  except ValueError:
    p.error(f"--angles must be comma-separated numbers, got {args.angles!r}")
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
  if not args.workdir.is_dir():
    print(f"error: {args.workdir}: no such workdir", file=sys.stderr)
    return 1
  if args.template is not None and not args.template.is_file():
    print(f"error: {args.template}: template not found", file=sys.stderr)
    return 1
  if args.test_config is not None and not args.test_config.is_file():
    print(f"error: {args.test_config}: config file not found", file=sys.stderr)
    return 1
  try:
    result = run_study(args.workdir, args.rows.split(","), seeds, args.template, angles,
                       args.test_config, args.tag)
  except RuntimeError as e:  # an evaluation on --test-config failed (it said why)
    print(f"error: {e}", file=sys.stderr)
    return 1
  if not result["table"]:
    print(f"error: {args.workdir}: no finished run (eval.json) of {args.rows}",
          file=sys.stderr)
    return 1
  name = "study" if args.tag is None else f"study_{args.tag}"
  text = markdown(result)
  (args.workdir / f"{name}.md").write_text(text)
  evaluate.write_json_atomic(result, args.workdir / f"{name}.json")
  figure(result, args.workdir / f"{name}.png")
  print(text)
  print(f"wrote {args.workdir / name}.md, {name}.json, {name}.png")
  return 0
