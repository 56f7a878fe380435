"""``python -m sean_jax.benchmark``: SEAN's training step, attention, scaling and input
pipeline on any backend, with model FLOPs and MFU (:mod:`sean_jax.perf.benchmark`)."""

import sys

from sean_jax.perf.benchmark import main

if __name__ == "__main__":
  sys.exit(main())
