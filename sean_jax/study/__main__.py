"""``python -m sean_jax.study``: see :mod:`sean_jax.study.report`."""

import sys

from sean_jax.study.report import main

sys.exit(main())
