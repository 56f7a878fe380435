"""sean_jax: SEAN (Liang et al., MICCAI 2021) in JAX/Flax."""

__version__ = "0.1.0"
