"""Intensity preprocessing of CT volumes for the models.

The paper clips to "[40, 100] HU" and z-scores per case. Read literally as a range,
[40, 100] would clip away white matter (22-32 HU), most grey matter (35-45 HU) and every
hypodense infarct; we read it as window level 40 / width 100, i.e. [-10, 90] HU, and
keep the window a parameter (docs/phantom.md, "Preprocessing", has the numbers).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_WINDOW", "window_and_normalize", "brain_slice_weights"]

DEFAULT_WINDOW = (-10.0, 90.0)  # level 40, width 100


def window_and_normalize(volume_hu, window=DEFAULT_WINDOW) -> np.ndarray:
  """Clips to the HU ``window`` (lo, hi), then z-scores over the whole volume.

  Mean and standard deviation are taken over every voxel of the clipped volume (one
  pair per case). A constant volume (std 0) maps to zeros. Returns float32 of the
  input's shape.
  """
  lo, hi = float(window[0]), float(window[1])
  if not hi > lo:
    raise ValueError(f"window must be (lo, hi) with hi > lo, got {window}")
  v = np.clip(np.asarray(volume_hu, np.float64), lo, hi)
  mean = v.mean()
  std = v.std()
  if not std > 1e-6 * max(hi - lo, 1.0):
    return np.zeros(v.shape, np.float32)
  return ((v - mean) / std).astype(np.float32)


def brain_slice_weights(volume_preprocessed, min_fraction: float = 0.05) -> np.ndarray:
  """(S,) float32 in {0, 1}: 1 for slices with a meaningful amount of head in view.

  A slice counts when more than ``min_fraction`` of its pixels lie above the volume's
  minimum (after windowing, air sits at the minimum). Used to choose the slices whose
  alignment estimates are aggregated. ``volume_preprocessed`` is (S, H, W) or
  (S, H, W, 1).
  """
  v = np.asarray(volume_preprocessed, np.float32)
  if v.ndim == 4 and v.shape[-1] == 1:
    v = v[..., 0]
  if v.ndim != 3:
    raise ValueError(f"expected an (S, H, W) volume, got shape {v.shape}")
  vmin, vmax = float(v.min()), float(v.max())
  tol = 1e-4 * max(vmax - vmin, 1e-6)
  frac = (v > vmin + tol).reshape(v.shape[0], -1).mean(axis=1)
  return (frac > min_fraction).astype(np.float32)
