"""SEAN, the paper's method: alignment + HybridUnet + symmetry enhanced attention.

    --config configs/sean.py          the paper's setting on AISD
    --config configs/sean.py:phantom  the same on the synthetic phantom
    --config configs/sean.py:demo     small, on a small phantom: minutes on a CPU
"""

from sean_jax import config as base


def get_config(arg: str = ""):
  return base.get_config("sean", arg)
