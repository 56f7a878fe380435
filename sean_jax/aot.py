"""``python -m sean_jax.aot``: compile SEAN ahead of time for CPUs, GPUs and TPUs, with
no accelerator (:mod:`sean_jax.perf.aot`)."""

import sys

from sean_jax.perf.aot import main

if __name__ == "__main__":
  sys.exit(main())
