"""Every row of the paper's Tables 1 and 2, from the one definition in base.py.

    --config configs/variants.py:NAME[,SETTING]

NAME is a key of ``sean_jax.models.sean.VARIANTS`` (unet, unet_im_l1, unet_ft_l1,
unet_ft_cc, hybrid, hybrid_im_l1, hybrid_ft_l1, hybrid_ft_cc, sean, align,
align_self) or a Table 2 name (baseline = hybrid, align_self_sym = sean); SETTING is
"", "phantom" or "demo" as in base.py. Example: ``configs/variants.py:unet_ft_cc,phantom``.
"""

from sean_jax import config as base

TABLE2_NAMES = {"baseline": "hybrid", "align_self_sym": "sean"}


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("configs/variants.py needs a variant: configs/variants.py:NAME"
                     "[,SETTING], e.g. configs/variants.py:unet,phantom")
  name, _, setting = arg.partition(",")
  config = base.get_config(TABLE2_NAMES.get(name, name), setting)
  config.variant = name
  return config
