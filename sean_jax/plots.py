"""PNG figures of a run: training curves, and validation slices with outlines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 100) -> None:
  """Writes ``fig`` to ``path`` whole or not at all (temporary file, then rename)."""
  tmp = Path(path).with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def training_curves(metrics_jsonl: Path, out_png: Path) -> None:
  """Loss per stage against the step, and the validation Dice where evaluated."""
  records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines()
             if line.strip()]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for stage, colour in (("align", "tab:orange"), ("segment", "tab:blue")):
    rows = [r for r in records if r.get("stage") == stage]
    if rows:
      axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], colour,
                   label=f"{stage} loss")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("training loss")
  axes[0].legend()
  evals = [r for r in records if "eval" in r]
  if evals:
    axes[1].plot([r["step"] for r in evals],
                 [r["eval"].get("dice_case_mean", np.nan) for r in evals], "o-")
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("validation Dice (case mean)")
  axes[1].set_ylim(0, 1)
  save_figure(fig, out_png)


def outline_panel(ax, image, truth, prediction, title=""):
  """One slice in grey with the true (green) and predicted (red) outlines."""
  ax.imshow(image, cmap="gray", vmin=np.percentile(image, 1),
            vmax=np.percentile(image, 99.5))
  if truth is not None and truth.any():
    ax.contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
  if prediction is not None and prediction.any():
    ax.contour(prediction, levels=[0.5], colors="red", linewidths=0.8)
  ax.set_title(title, fontsize=8)
  ax.axis("off")


def largest_lesion_slices(source, max_cases: int) -> list[tuple[dict, int]]:
  """(case, index of its largest lesion slice) for the first ``max_cases`` cases of
  ``source`` that have a lesion."""
  picks = []
  for i in range(len(source)):
    if len(picks) == max_cases:
      break
    case = source[i]
    area = case["mask"].reshape(case["mask"].shape[0], -1).sum(1)
    if area.max() > 0:
      picks.append((case, int(area.argmax())))
  return picks


def predicted_lesion(model, volume) -> np.ndarray:
  """Boolean lesion mask (S, H, W) of ``model`` on a preprocessed volume."""
  from sean_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sean_jax.models.sean import segment_volume  # pylint: disable=g-import-not-at-top
  probs, _ = segment_volume(model, volume, preprocess.brain_slice_weights(volume))
  return np.asarray(probs) > 0.5


def validation_slices(model, source, out_png: Path, max_cases: int = 4) -> None:
  """A few validation slices (the largest lesion slice of each lesion case)."""
  panels = [(case["image"][s], case["mask"][s],
             predicted_lesion(model, case["image"])[s], f"{case['case_id']} slice {s}")
            for case, s in largest_lesion_slices(source, max_cases)]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2),
                           squeeze=False)
  for ax, (image, truth, pred, title) in zip(axes[0], panels):
    outline_panel(ax, image, truth, pred, title)
  fig.suptitle("validation: truth green, prediction red", fontsize=9)
  save_figure(fig, out_png)
