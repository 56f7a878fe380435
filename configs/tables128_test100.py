"""The data of the 128x128 Table 2 runs (``python -m sean_jax.tables --image-size 128``)
with 100 further test cases, unseen in their training and validation (phantom cases
416-515 instead of 304-327):

    python -m sean_jax.study --workdir workdirs/tables128 \
        --test-config configs/tables128_test100.py --tag test100

``get_config(ROW)`` keeps each row's model settings (the study checks they match the
checkpoint's) and changes only the split sizes.
"""

from sean_jax import config as base


def get_config(arg: str = "sean"):
  c = base.get_config(arg, "demo")
  c.data.image_size = 128
  c.data.num_train_cases = 316
  c.data.num_val_cases = 100
  c.data.num_test_cases = 100
  # One process tests every run: keep each prepared case (with and without the tissue
  # labels the study's sweep asks for) instead of drawing it again per run.
  c.data.phantom_cache_cases = 200
  return c
