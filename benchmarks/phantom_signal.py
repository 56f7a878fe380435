"""How visible is a phantom infarct by intensity, and by asymmetry? (docs/results.md)

    python benchmarks/phantom_signal.py [--cases 24] [--size 64]

For held-out phantom lesion cases (the tables' test split: seed 1234, from index 304)
at the model's resolution, in HU resampled as the pipeline does, with d = A - mirror(A):
  lesion_minus_mirror_hu  mean d inside the lesion (the infarct's depth against the
                          healthy contralateral tissue);
  asymmetry_noise_hu      standard deviation of d over brain on both sides away from
                          the lesion (noise, texture and anatomy that do not mirror);
  asymmetry_snr           the ratio: how far a lesion stands out of the asymmetry map.
Each for the slice aligned with the true pose (the best an alignment network can do),
with the trained alignment net's 1.8 deg rotation error added, and unaligned (what the
baselines' IM-L1 / FT-L1 / FT-CC see).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sean_jax.data import preprocess, sources  # noqa: E402
from sean_jax.data.phantom import PhantomConfig, generate_case  # noqa: E402
from sean_jax.models import sampler  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=24)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--first", type=int, default=304)
  args = parser.parse_args(argv)
  config = PhantomConfig(size=256, slices=12)
  rows = []
  for index in range(args.first, args.first + args.cases):
    case = generate_case(1234, index, config)
    if not case.mask.any():
      continue
    hu = preprocess.resize_volume(case.ct_hu.astype(np.float32), (args.size, args.size))
    mask = preprocess.resize_volume(case.mask.astype(np.float32),
                                  (args.size, args.size)) >= 0.5
    alpha = sources._pose_alpha(case.pose, 256, 256)  # resolution-free (normalised)
    images = hu[..., None]
    variants = {"unaligned": images,
                "aligned": np.asarray(sampler.warp(images, alpha)),
                "aligned_1.8deg": np.asarray(sampler.warp(
                    images, alpha + np.array([np.radians(1.8), 0, 0], np.float32)))}
    moved_mask = np.asarray(sampler.warp(mask[..., None].astype(np.float32), alpha))[..., 0] >= 0.5
    row = {"case": index}
    for name, volume in variants.items():
      a = volume[..., 0]
      m = mask if name == "unaligned" else moved_mask
      m_both = m | m[..., ::-1]
      brain = (a > 5) & (a < 60)
      # Brain on both sides, away from the lesion and from its mirror image.
      away = (brain & brain[..., ::-1]
              & ~ndimage.binary_dilation(m_both, iterations=4, structure=np.ones((1, 3, 3))))
      d = a - a[..., ::-1]
      inside = m & brain
      row[f"lesion_minus_mirror_hu_{name}"] = float(d[inside].mean())
      row[f"asymmetry_noise_hu_{name}"] = float(d[away].std())
      row[f"asymmetry_snr_{name}"] = float(-d[inside].mean() / d[away].std())
    rows.append(row)
  summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"}
  summary["num_lesion_cases"] = len(rows)
  for k, v in summary.items():
    print(f"{k:34s} {v:8.3f}")
  out = Path(__file__).parent / "results" / "phantom_signal.json"
  out.write_text(json.dumps({"size": args.size, "summary": summary, "cases": rows},
                            indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
