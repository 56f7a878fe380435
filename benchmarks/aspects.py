"""ASPECTS mapping accuracy: the atlas's regions against the phantom's true regions.

    python benchmarks/aspects.py --atlas ../shared/data/aspects_atlas [--cases 60]
        [--seed 1234] [--start 316] [--size 256] [--slices 12]

For each phantom case (pose known, so the alignment is exact here) the atlas is mapped
(``sean_jax.clinical.aspects.regions_of_scan`` on the HU volume, its brain mask and the
true pose) and scored with the *true* lesion mask, against the score of the phantom's
analytic regions (``sean_jax.data.phantom_aspects``): the error of the mapping alone,
without the segmentation's. Prints the agreement at each involvement fraction, the
Dice of each region type, how far the found ganglionic level lies from the true one,
and the seconds per case; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--atlas", required=True)
  p.add_argument("--cases", type=int, default=60)
  p.add_argument("--seed", type=int, default=1234)
  p.add_argument("--start", type=int, default=316)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--slices", type=int, default=12)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  # pylint: disable=g-import-not-at-top
  from sean_jax.clinical import aspects, brain as brain_lib
  from sean_jax.data import phantom, phantom_aspects
  from sean_jax.models.sampler import pose_to_alpha
  # pylint: enable=g-import-not-at-top
  atlas = aspects.load_atlas(args.atlas)
  config = phantom.PhantomConfig(size=args.size, slices=args.slices)
  rows, dice, level_err, seconds = [], {k: [] for k in aspects.REGIONS}, [], []
  for index in range(args.start, args.start + args.cases):
    case = phantom.generate_case(args.seed, index, config)
    truth = phantom_aspects.true_regions(case, args.seed, index, config)
    alpha = pose_to_alpha(case.pose, args.size, args.size)
    start = time.perf_counter()
    brain = brain_lib.brain_mask(case.ct_hu, case.spacing_mm)
    mapped, info = aspects.regions_of_scan(case.ct_hu, brain, alpha, case.spacing_mm, atlas)
    seconds.append(time.perf_counter() - start)
    rows.append(aspects.case_row(mapped, case.mask, truth, case.mask,
                                 phantom_aspects.TRUTH_FRACTION))
    for k, name in enumerate(aspects.REGIONS):
      a = (mapped == k + 1) | (mapped == k + 11)
      b = (truth == k + 1) | (truth == k + 11)
      if a.any() or b.any():
        dice[name].append(2 * np.count_nonzero(a & b) / (a.sum() + b.sum()))
    anatomy = phantom._draw_anatomy(np.random.default_rng([args.seed, index, 1]),  # pylint: disable=protected-access
                                    config.asymmetry)
    level_err.append(case.info["z_mm"][info["ganglionic_slice"]] - anatomy["bg_shift"][2])
  summary = aspects.summarize(rows)
  out = {"cases": args.cases, "seed": args.seed, "start": args.start, "size": args.size,
         "slices": args.slices, "atlas": atlas.source,
         "truth_scores": np.bincount([r["true_score"] for r in rows], minlength=11).tolist(),
         "region_dice": {k: float(np.mean(v)) if v else None for k, v in dice.items()},
         "ganglionic_level_error_mm": {"median_abs": float(np.median(np.abs(level_err))),
                                       "mean": float(np.mean(level_err))},
         "seconds_per_case": float(np.median(seconds)), **summary}
  print(f"{args.cases} phantom cases from index {args.start} (seed {args.seed}), "
        f"{args.size}^2 x {args.slices}; true scores (count of 0..10): "
        f"{out['truth_scores']}")
  print("mapping alone (true pose, true lesion):")
  for f, m in summary["aspects_by_fraction"].items():
    print(f"  fraction {f:>4}: r {m['aspects_pearson_r'] if m['aspects_pearson_r'] is None else round(m['aspects_pearson_r'], 3)}"
          f", MAE {m['aspects_mae']:.2f}, same {m['aspects_exact']:.0%}, region sens "
          f"{m['aspects_region_sensitivity']:.3f} spec {m['aspects_region_specificity']:.3f}")
  print("region Dice (atlas vs analytic): " + ", ".join(
      f"{k} {v:.2f}" for k, v in out["region_dice"].items() if v is not None))
  print(f"ganglionic level found minus true: median |error| "
        f"{out['ganglionic_level_error_mm']['median_abs']:.1f} mm, mean "
        f"{out['ganglionic_level_error_mm']['mean']:+.1f} mm; "
        f"{out['seconds_per_case']:.2f} s per case (brain mask + mapping)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
