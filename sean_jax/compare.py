"""Collects several runs' ``eval.json`` into a Table 1-style markdown comparison.

    python -m sean_jax.compare DIR [DIR ...] [--output table.md]

Each DIR is a workdir holding ``eval.json`` (from ``python -m sean_jax.evaluate``) or an
eval JSON file itself. Rows are variants (the ``variant`` of each run's config), in the
order of the paper's tables; runs of the same variant (e.g. seeds) are one row with
mean ± standard deviation (sample std, n - 1) and the number of runs. Runs evaluated on
different data (split or ``--data`` folder) are never pooled: the row name then says
which data. Columns: Dice (case mean), F1, Recall, Precision (infarct level), global
Dice, and the absolute alignment errors Δθ (deg) and Δx (px) (docs/evaluation.md).
Bad or missing files: one line naming the file, exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from sean_jax import evaluate

__all__ = ["collect", "comparison_table", "main"]

COLUMNS = (("Dice", "dice_case_mean", 4), ("F1", "lesion_f1", 4),
           ("Recall", "lesion_recall", 4), ("Precision", "lesion_precision", 4),
           ("Global Dice", "dice_global", 4), ("Δθ (deg)", "rot_err_deg", 2),
           ("Δx (px)", "shift_err_px", 2))  # absolute errors; no "|" in a table cell

# The paper's row order (Table 1, then Table 2's ablation rows).
ORDER = ("unet", "unet_im_l1", "unet_ft_l1", "unet_ft_cc", "hybrid", "baseline",
         "hybrid_im_l1", "hybrid_ft_l1", "hybrid_ft_cc", "align", "align_self",
         "align_self_sym", "sean")
LABELS = {"unet": "Unet", "unet_im_l1": "Unet-IM-L1", "unet_ft_l1": "Unet-FT-L1",
          "unet_ft_cc": "Unet-FT-CC", "hybrid": "HybridUnet", "baseline": "Baseline",
          "hybrid_im_l1": "HybridUnet-IM-L1", "hybrid_ft_l1": "HybridUnet-FT-L1",
          "hybrid_ft_cc": "HybridUnet-FT-CC", "align": "+Align",
          "align_self": "+Align+Self", "align_self_sym": "+Align+Self+Sym",
          "sean": "SEAN"}


def _data_key(run: dict) -> str:
  if run.get("data"):
    return f"data {os.path.basename(run['data'].rstrip('/'))}"
  return f"{run.get('data_source', '?')} {run.get('split', '?')}"


def collect(paths) -> list[dict]:
  """Rows (one per variant and data) from eval JSONs or workdirs holding eval.json."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for path in paths:
    run = evaluate.load_eval(path)
    groups.setdefault((str(run.get("variant", "?")), _data_key(run)), []).append(run)
  several_data = len({key[1] for key in groups}) > 1
  rank = {name: i for i, name in enumerate(ORDER)}
  rows = []
  for (variant, data), runs in sorted(groups.items(),
                                      key=lambda kv: (rank.get(kv[0][0], len(ORDER)),
                                                      kv[0][0], kv[0][1])):
    name = LABELS.get(variant, variant)
    if several_data:
      name += f" ({data})"
    row = {"name": name, "variant": variant, "data": data, "n": len(runs),
           "runs": _run_names(runs),
           "num_cases": sorted({r["metrics"].get("num_cases") for r in runs},
                               key=str)}
    for _, key, _ in COLUMNS:
      values = [r["metrics"].get(key) for r in runs]
      values = [float(v) for v in values if v is not None]
      row[key] = ((float(np.mean(values)),
                   float(np.std(values, ddof=1)) if len(values) > 1 else None)
                  if values else None)
    rows.append(row)
  return rows


def _run_names(runs: list[dict]) -> list[str]:
  """Workdir names; the full paths where two runs share a name."""
  full = [(r.get("workdir") or os.path.dirname(os.path.abspath(r["_path"]))).rstrip("/")
          for r in runs]
  short = [os.path.basename(f) for f in full]
  return full if len(set(short)) < len(short) else short


def _cell(value, digits):
  if value is None:
    return "–"
  mean, std = value
  return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def comparison_table(rows: list[dict]) -> str:
  """Markdown table of :func:`collect` rows, with a note on what the numbers are."""
  head = ["Method"] + [c[0] for c in COLUMNS] + ["Runs"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for row in rows:
    cells = [row["name"]] + [_cell(row[key], d) for _, key, d in COLUMNS]
    runs = ", ".join(row["runs"])
    cells.append(f"{row['n']}: {runs}" if row["n"] > 1 else runs)
    lines.append("| " + " | ".join(cells) + " |")
  cases = sorted({str(n) for row in rows for n in row["num_cases"]})
  lines += ["", "Dice: mean of per-case 3D Dice; F1, Recall, Precision: infarct level "
            "(3D connected components); Global Dice: all voxels pooled; alignment error "
            "on cases with a known pose (– where none). Several runs of a variant: "
            f"mean ± sample std. Test cases per run: {', '.join(cases)}."]
  return "\n".join(lines)


class _ArgumentParser(argparse.ArgumentParser):

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
  p = _ArgumentParser(prog="python -m sean_jax.compare",
                      description="Compare runs' eval.json as a markdown table.")
  p.add_argument("runs", nargs="+", help="workdirs (with eval.json) or eval JSON files")
  p.add_argument("--output", default=None, help="write the markdown table here too")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
    print(f"error: {args.output}: output directory not found", file=sys.stderr)
    return 1
  try:
    table = comparison_table(collect(args.runs))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(table)
  if args.output:
    from sean_jax.data.nifti import atomic_output  # pylint: disable=g-import-not-at-top
    with atomic_output(args.output, ".md") as tmp:
      with open(tmp, "w") as f:
        f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
