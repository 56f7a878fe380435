"""Segmentation, infarct detection and alignment metrics (DESIGN.md §7). NumPy/SciPy.

Dice
----
- :func:`dice`: one case, 3D: ``2 |P ∩ R| / (|P| + |R|)``; an empty prediction of an
  empty reference scores 1 (and an empty/non-empty pair 0).
- *Case-mean Dice* (the paper's "Dice"): the mean of :func:`dice` over cases.
- *Global Dice* (:class:`GlobalDice`): ``2 Σ|P ∩ R| / Σ(|P| + |R|)`` over every voxel of
  every case, so large lesions weigh more; 1 when the whole set is empty in both.

Infarct level (:func:`detection_counts`, :func:`detection_scores`)
-----------------------------------------------------------------
Reference lesions and predicted components are the 3D connected components
(``scipy.ndimage.label``) of the reference and the prediction, with 26 (default), 18 or
6 connectivity. Per case:

- ``tp_ref``: reference lesions that are *found*; ``fn_ref`` the others;
- ``tp_pred``: predicted components that *touch* a reference lesion; ``fp_pred`` the
  others (false positives).

Overlap rule (``overlap``, ``min_overlap``):

- ``"any"`` (default, the paper's rule): a lesion is found if any predicted voxel lies in
  it; a predicted component is a true positive if any of its voxels lies in a lesion.
- ``"fraction"``: a lesion is found if at least ``min_overlap`` of its voxels are
  predicted; a predicted component is a true positive if at least ``min_overlap`` of its
  voxels lie in the reference mask.
- ``"iou"``: a lesion is found if some predicted component has an intersection over
  union of at least ``min_overlap`` with it; a predicted component is a true positive if
  some lesion has an IoU of at least ``min_overlap`` with it (component against
  component, so a lesion split into small pieces may be missed).

Over a test set the counts are summed and
``precision = Σ tp_pred / Σ (tp_pred + fp_pred)`` (predicted components that touch a
lesion / all predicted components), ``recall = Σ tp_ref / Σ (tp_ref + fn_ref)``
(reference lesions found / all reference lesions), ``F1 = 2 P R / (P + R)``.
A ratio 0/0 is 1: no predicted component means no false positive (precision 1), no
reference lesion means none missed (recall 1); F1 is 0 when P + R = 0. So a model that
predicts nothing on a set with lesions gets precision 1, recall 0, F1 0, and an empty
prediction of an empty set scores 1 everywhere (as Dice does).

Alignment (:func:`alignment_error`)
-----------------------------------
``alpha = (theta, tx, ty)`` in the convention of ``sean_jax.models.sampler`` (the
transform that *aligns* the head). ``|Δθ|`` in degrees, the difference wrapped to
[-180, 180). ``|Δx|`` in pixels: by default (``shift="midline"``) the horizontal
distance, on the image's centre row, between the mid-sagittal lines the two transforms
map onto the centre column (``x0 = tx_px + ty_px tan θ``). Symmetry cannot tell a
vertical shift of the aligned image, and with a rotation such a shift changes ``tx``,
so the raw shift difference (``shift="tx"``: ``|Δtx| W / 2``) charges the network for
an ambiguity no symmetry criterion can resolve. For ``θ = 0`` both agree.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

__all__ = ["dice", "GlobalDice", "global_dice", "label_components", "DetectionCounts",
           "detection_counts", "detection_scores", "alignment_error", "safe_ratio",
           "CONNECTIVITIES", "OVERLAP_RULES"]

CONNECTIVITIES = (6, 18, 26)
OVERLAP_RULES = ("any", "fraction", "iou")


def _binary(x) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype != bool:
    x = x != 0
  return x


def _pair(pred, ref):
  pred, ref = _binary(pred), _binary(ref)
  if pred.shape != ref.shape:
    raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
  return pred, ref


def safe_ratio(num: float, den: float, empty: float = 1.0) -> float:
  """``num / den``, or ``empty`` when ``den == 0``."""
  return float(num) / float(den) if den else float(empty)


def dice(pred, ref) -> float:
  """Dice of two binary masks (any shape; nonzero = foreground). Empty/empty = 1."""
  pred, ref = _pair(pred, ref)
  inter = np.count_nonzero(pred & ref)
  return safe_ratio(2 * inter, np.count_nonzero(pred) + np.count_nonzero(ref))


@dataclasses.dataclass
class GlobalDice:
  """Accumulates the global (all voxels of all cases) Dice: ``add`` each case."""
  intersection: int = 0
  total: int = 0  # Σ |P| + |R|

  def add(self, pred, ref) -> None:
    pred, ref = _pair(pred, ref)
    self.intersection += int(np.count_nonzero(pred & ref))
    self.total += int(np.count_nonzero(pred) + np.count_nonzero(ref))

  def value(self) -> float:
    return safe_ratio(2 * self.intersection, self.total)


def global_dice(pairs) -> float:
  """Global Dice over an iterable of ``(pred, ref)`` pairs."""
  acc = GlobalDice()
  for pred, ref in pairs:
    acc.add(pred, ref)
  return acc.value()


def _structure(connectivity: int, ndim: int) -> np.ndarray:
  if connectivity not in CONNECTIVITIES:
    raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
  if ndim != 3:
    raise ValueError(f"connected components need a 3D (S, H, W) mask, got {ndim}D")
  rank = {6: 1, 18: 2, 26: 3}[connectivity]
  return ndimage.generate_binary_structure(3, rank)


def label_components(mask, connectivity: int = 26) -> tuple[np.ndarray, int]:
  """3D connected components: (labels int32 0 = background, 1..n; n)."""
  mask = _binary(mask)
  labels, n = ndimage.label(mask, structure=_structure(connectivity, mask.ndim))
  return labels.astype(np.int32, copy=False), int(n)


@dataclasses.dataclass
class DetectionCounts:
  """Infarct-level counts of one case (or summed over cases with ``+``)."""
  tp_ref: int = 0   # reference lesions found
  fn_ref: int = 0   # reference lesions missed
  tp_pred: int = 0  # predicted components touching a lesion
  fp_pred: int = 0  # predicted components touching none

  def __add__(self, other: "DetectionCounts") -> "DetectionCounts":
    return DetectionCounts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                   dataclasses.astuple(other))))

  @property
  def num_ref(self) -> int:
    return self.tp_ref + self.fn_ref

  @property
  def num_pred(self) -> int:
    return self.tp_pred + self.fp_pred

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _check_overlap(overlap: str, min_overlap: float) -> None:
  if overlap not in OVERLAP_RULES:
    raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
  if overlap != "any" and not 0.0 < float(min_overlap) <= 1.0:
    raise ValueError(f"min_overlap must lie in (0, 1] for overlap {overlap!r}, got "
                     f"{min_overlap}")


def detection_counts(pred, ref, *, connectivity: int = 26, overlap: str = "any",
                     min_overlap: float = 0.5) -> DetectionCounts:
  """Infarct-level counts of one case; see the module doc for the rules."""
  _check_overlap(overlap, min_overlap)
  pred, ref = _pair(pred, ref)
  ref_lab, n_ref = label_components(ref, connectivity)
  pred_lab, n_pred = label_components(pred, connectivity)
  if n_ref == 0 or n_pred == 0:
    return DetectionCounts(0, n_ref, 0, n_pred)
  # Joint histogram: inter[r, p] = voxels in reference lesion r and predicted component
  # p (row/column 0: background).
  both = pred | ref
  inter = np.zeros((n_ref + 1, n_pred + 1), np.int64)
  np.add.at(inter, (ref_lab[both], pred_lab[both]), 1)
  ref_size = inter.sum(axis=1)[1:]
  pred_size = inter.sum(axis=0)[1:]
  overlap_rp = inter[1:, 1:]
  if overlap == "any":
    found = overlap_rp.sum(axis=1) > 0
    touch = overlap_rp.sum(axis=0) > 0
  elif overlap == "fraction":
    found = overlap_rp.sum(axis=1) >= min_overlap * ref_size
    touch = overlap_rp.sum(axis=0) >= min_overlap * pred_size
  else:  # iou
    union = ref_size[:, None] + pred_size[None, :] - overlap_rp
    ok = (overlap_rp > 0) & (overlap_rp >= min_overlap * union)
    found, touch = ok.any(axis=1), ok.any(axis=0)
  tp_ref, tp_pred = int(found.sum()), int(touch.sum())
  return DetectionCounts(tp_ref, n_ref - tp_ref, tp_pred, n_pred - tp_pred)


def detection_scores(counts: DetectionCounts) -> dict:
  """Precision, recall and F1 from (summed) counts; 0/0 handled as in the module doc."""
  precision = safe_ratio(counts.tp_pred, counts.num_pred)
  recall = safe_ratio(counts.tp_ref, counts.num_ref)
  f1 = safe_ratio(2 * precision * recall, precision + recall, empty=0.0)
  return {"precision": precision, "recall": recall, "f1": f1}


def _wrap_degrees(d: float) -> float:
  return (d + 180.0) % 360.0 - 180.0


def alignment_error(alpha_est, alpha_true, height: int, width: int, *,
                    shift: str = "midline") -> tuple[float, float]:
  """(|Δθ| in degrees, |Δx| in pixels) between two transforms (see the module doc).

  ``alpha_*``: (3,) = (theta [rad], tx, ty) in normalised units; ``height``/``width``:
  the image size the pixels refer to. ``shift``: ``"midline"`` (default) or ``"tx"``.
  """
  a = np.asarray(alpha_est, np.float64).reshape(3)
  b = np.asarray(alpha_true, np.float64).reshape(3)
  d_theta = abs(_wrap_degrees(math.degrees(a[0] - b[0])))

  def x0(alpha):
    tx_px, ty_px = alpha[1] * width / 2, alpha[2] * height / 2
    return tx_px + ty_px * math.tan(alpha[0]) if shift == "midline" else tx_px

  if shift not in ("midline", "tx"):
    raise ValueError(f"shift must be 'midline' or 'tx', got {shift!r}")
  return float(d_theta), float(abs(x0(a) - x0(b)))
