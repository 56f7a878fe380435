"""The one definition every experiment config shares (the files in configs/ are thin).

Each file in configs/ is ``get_config(arg)`` = ``config.get_config(variant, arg)``, with
``arg`` the part after ``:`` in ``--config configs/FILE.py:ARG``:
  ""        the paper's setting on AISD (built with ``python -m tfds_aisd``)
  "phantom" the same on the synthetic phantom (no download needed)
  "demo"    a small model on a small phantom: trains and evaluates in minutes on a CPU
Variants are the rows of Tables 1 and 2 (``sean_jax.models.sean.VARIANTS``).
"""

import ml_collections

from sean_jax.models.sean import VARIANTS

SETTINGS = ("", "phantom", "demo")


def get_config(variant: str, setting: str = "") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
  if setting not in SETTINGS:
    raise ValueError(f"unknown config setting {setting!r}; use one of {SETTINGS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # Model: fields of sean_jax.models.sean.ModelOptions.
  c.model = ml_collections.ConfigDict(dict(
      backbone="hybrid", fusion="none", attention_self=True, attention_symmetry=True,
      align=False, width=64, slab_slices=3, partitions=(4, 4), num_classes=2,
      align_input_size=128,
      conv="auto"))  # auto | onednn | fold | native: how convs run, same parameters
  c.model.update(VARIANTS[variant])

  # Data.
  c.data = ml_collections.ConfigDict()
  c.data.source = "aisd"           # aisd | phantom
  c.data.image_size = 512          # in-plane size the model sees (resampled if needed)
  c.data.hu_window = (-10.0, 90.0)  # window level 40, width 100 (see docs/phantom.md)
  c.data.aisd_data_dir = "~/tensorflow_datasets"
  c.data.aisd_config = "dicom"     # dicom (HU) | png (0..255, not HU)
  c.data.lesion_labels = (1, 2, 3, 5)  # AISD raw labels counted as lesion (4: not)
  c.data.phantom_seed = 1234
  # The phantom is made at this in-plane size and resampled to image_size, as a real
  # scan would be: its noise is set per pixel, so making it small would be too noisy.
  c.data.phantom_size = 256
  c.data.phantom_slices = 24
  c.data.num_train_cases = 300     # phantom only; AISD uses its splits
  c.data.num_val_cases = 30
  c.data.num_test_cases = 50

  # Optimisation (paper §3.2): Adam(0.9, 0.99), lr 1e-4, poly decay 0.9, 150 epochs.
  c.batch_size = 8                 # global, over all devices and hosts
  c.num_epochs = 150
  c.num_train_steps = -1           # > 0 replaces the epoch count
  c.learning_rate = 1e-4
  c.adam_b1 = 0.9
  c.adam_b2 = 0.99
  c.poly_power = 0.9
  c.half_precision = False         # bfloat16 activations, float32 params and loss

  # Stage 1: the alignment network (unsupervised), before the segmentation net.
  c.align = ml_collections.ConfigDict(dict(
      num_train_steps=3000, batch_size=32, learning_rate=1e-4,
      # After the net's estimate, each volume's pose is refined on the volume itself
      # (sean_jax.models.refine), in stage 2, evaluate and predict.
      refine=True))

  # Postprocessing, the same in evaluate and predict (sean_jax.clinical): predictions
  # are kept inside the brain mask, and components below a size chosen on the
  # validation split at the end of training (postprocessing.json in the workdir) go.
  c.postprocess = ml_collections.ConfigDict(dict(brain_mask=True))

  # Bookkeeping.
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3

  if setting in ("phantom", "demo"):
    c.data.source = "phantom"
    c.data.image_size = 256
  if setting == "demo":
    c.model.width = 8
    c.model.partitions = (2, 2)
    c.model.align_input_size = 64
    c.data.image_size = 64
    c.data.phantom_slices = 12
    # 48 training cases overfit (train Dice 0.66, test 0.09). The postprocessing is
    # chosen on the validation cases: 4 were too few, and 288 + 16 keeps the test
    # cases (304-315) those of the earlier demo.
    c.data.num_train_cases = 288
    c.data.num_val_cases = 16
    c.data.num_test_cases = 12
    c.batch_size = 8
    c.num_train_steps = 1000
    c.learning_rate = 1e-3
    c.align.num_train_steps = 600
    c.align.batch_size = 16  # lr stays 1e-4: 1e-3 saturates the bounded output
    c.log_every_steps = 25
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 100
  return c


def check_types(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line) for a field whose value has another type than the
  default's: ints where ints are expected (bools are not ints here), numbers for
  floats, tuples of the default's length and element type (any length for
  data.lesion_labels)."""
  reference = get_config("sean")

  def check(name, value, default):
    if isinstance(default, bool):
      ok = isinstance(value, bool)
    elif isinstance(default, int):
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
      ok = isinstance(value, str)
    elif isinstance(default, tuple):
      ok = (isinstance(value, (tuple, list))
            and (len(value) == len(default) or name == "data.lesion_labels")
            and all(check(f"{name}[{i}]", v, default[0]) is None
                    for i, v in enumerate(value)))
    else:
      return None
    if not ok:
      kind = (f"a tuple of {len(default)} {type(default[0]).__name__}s"
              if isinstance(default, tuple) else f"a {type(default).__name__}")
      raise ValueError(f"config.{name}={value!r} must be {kind} (like "
                       f"{default!r})")
    return None

  def walk(prefix, node, ref):
    for key in ref.keys():
      if key not in node:
        continue
      name = f"{prefix}{key}"
      if isinstance(ref[key], ml_collections.ConfigDict):
        walk(f"{name}.", node[key], ref[key])
      else:
        check(name, node[key], ref[key])

  walk("", config, reference)
