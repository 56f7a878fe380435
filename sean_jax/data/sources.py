"""The case source of a config's split: the phantom or AISD (TFDS).

Phantom splits are disjoint index ranges of one seed: train [0, n_train), validation
[n_train, n_train + n_val), test after that.
"""

from __future__ import annotations

import os

from sean_jax.data import pipeline
from sean_jax.data.phantom import PhantomConfig

SPLITS = ("train", "validation", "test")


def case_source(config, split: str):
  """Case source of ``split`` for ``config.data`` (see sean_jax/config.py)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  data = config.data
  size = data.image_size
  if data.source == "phantom":
    counts = {"train": data.num_train_cases, "validation": data.num_val_cases,
              "test": data.num_test_cases}
    start = {"train": 0, "validation": counts["train"],
             "test": counts["train"] + counts["validation"]}[split]
    phantom = PhantomConfig(size=data.get("phantom_size", size),
                            slices=data.phantom_slices)
    return pipeline.PhantomCaseSource(data.phantom_seed, counts[split], phantom,
                                      start_index=start, image_size=size,
                                      window=tuple(data.hu_window),
                                      shared_cache=data.get("phantom_cache_cases", 0))
  if data.source == "aisd":
    data_dir = os.path.expanduser(data.aisd_data_dir)
    try:
      return pipeline.TfdsCaseSource(data_dir, data.aisd_config, split,
                                     lesion_labels=tuple(data.lesion_labels),
                                     image_size=size, window=tuple(data.hu_window))
    except Exception as e:  # TFDS raises several types for a missing dataset
      raise FileNotFoundError(
          f"{data_dir}: AISD ({data.aisd_config}) is not built there ({type(e).__name__})."
          f" Download AISD by hand and run `python -m tfds_aisd --manual_dir M "
          f"--data_dir {data.aisd_data_dir} --config {data.aisd_config}` (docs/aisd.md),"
          f" or train on the phantom: --config configs/sean.py:phantom") from None
  raise ValueError(f"config.data.source must be phantom or aisd, got "
                   f"{data.source!r}")
