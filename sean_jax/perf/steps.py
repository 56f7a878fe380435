"""The steps that the AOT compiler and the benchmark measure, on any set of devices.

The training step is the one ``python -m sean_jax.train`` runs in stage 2
(:func:`sean_jax.trainer.make_train_steps`: GDL + CE, Adam, the non-finite guard,
parameters replicated and the batch sharded over a one-axis "data" mesh, the state
donated); the prediction step is :func:`sean_jax.models.sean.lesion_probability` on a
batch of slabs. Both are built for a mesh of real devices or of compile-only devices
from a topology (``jax.experimental.topologies``), abstractly (shapes only) or with
arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sean_jax import checkpointing, config as base_config, trainer
from sean_jax.models import sean

# The paper's setting (DESIGN.md): 512x512, w = 64, 2T+1 = 3, P = Q = 4, batch 8.
PAPER = dict(image_size=512, width=64, partitions=(4, 4), batch_size=8)
# The learning-rate schedule's length; it changes no shape or cost.
_SCHEDULE_STEPS = 1000


def step_config(*, variant: str = "sean", batch_size: int = 8, image_size: int = 512,
                width: int = 64, partitions=(4, 4), half_precision: bool = False,
                conv: str = "native") -> ml_collections.ConfigDict:
  """The paper's config (``configs/sean.py``) at a given shape and precision."""
  config = base_config.get_config(variant)
  config.batch_size = batch_size
  config.data.image_size = image_size
  config.model.width = width
  config.model.partitions = tuple(partitions)
  config.model.conv = conv
  config.half_precision = half_precision
  check_shape(config)
  return config


def check_shape(config) -> None:
  """One-line errors for a batch, image size or partitioning the model cannot take."""
  options = checkpointing.model_options(config)  # validates the model fields
  size, batch = config.data.image_size, config.batch_size
  if batch < 1:
    raise ValueError(f"batch size must be positive, got {batch}")
  if size < 16 or size % 16:
    raise ValueError(f"image size {size} must divide by 16 (four in-plane poolings)")
  p, q = options.partitions
  if options.fusion == "attention" and ((size // 16) % p or (size // 16) % q):
    raise ValueError(f"the {size // 16}x{size // 16} bottleneck of a {size}x{size} "
                     f"image does not divide into {p}x{q} attention partitions")


def data_mesh(devices) -> Mesh:
  """A one-axis "data" mesh over ``devices`` (real or compile-only)."""
  return Mesh(np.asarray(devices), ("data",),
              axis_types=(jax.sharding.AxisType.Auto,))


def _shardings(mesh: Mesh):
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      tree)


def _batch_shapes(config) -> dict:
  b, s, d = config.batch_size, config.data.image_size, config.model.slab_slices
  return {"slab": ((b, d, s, s, 1), jnp.float32), "mask": ((b, s, s), jnp.int32)}


def train_step(config, mesh: Mesh, *, concrete: bool = False):
  """(jitted step, (state, batch)): ``step(state, batch) -> (state, metrics)``.

  ``concrete=False``: the arguments are ``jax.ShapeDtypeStruct``s with shardings
  (nothing is allocated; for ``.trace(...).lower().compile()``). ``concrete=True``:
  initialised parameters and a random batch (a lesion blob per slab), on the mesh.
  """
  replicated, data = _shardings(mesh)
  make = lambda: checkpointing.TrainState(config, _SCHEDULE_STEPS,
                                          rngs=checkpointing.init_rngs(config.seed))
  graphdef, state = nnx.split(make() if concrete else nnx.eval_shape(make))
  step, _ = trainer.make_train_steps(graphdef, replicated, data)
  if not concrete:
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
             for k, (shape, dtype) in _batch_shapes(config).items()}
    return step, (_abstract(state, replicated), batch)
  return step, (jax.device_put(state, replicated),
                jax.device_put(random_batch(config), data))


def random_batch(config, seed: int = 0) -> dict:
  """{"slab": (B, D, S, S, 1) float32 noise, "mask": (B, S, S) int32, a disc each}."""
  rng = np.random.default_rng(seed)
  (b, d, s, _, _), _ = _batch_shapes(config)["slab"]
  yy, xx = np.mgrid[:s, :s]
  centres = rng.uniform(0.3 * s, 0.7 * s, (b, 2))
  mask = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2
          < (0.08 * s) ** 2).astype(np.int32)
  return {"slab": rng.normal(size=(b, d, s, s, 1)).astype(np.float32), "mask": mask}


def predict_step(config, mesh: Mesh):
  """(jitted step, (state, slabs)), abstract: ``step(state, slabs) -> (B, S, S)``
  lesion probabilities of a batch of ``config.batch_size`` slabs, eval mode."""
  replicated, data = _shardings(mesh)
  model = nnx.eval_shape(lambda: sean.Sean(checkpointing.model_options(config),
                                           dtype=checkpointing.compute_dtype(config),
                                           rngs=checkpointing.init_rngs(config.seed)))
  model.eval()
  graphdef, state = nnx.split(model.segmenter)

  def step(state, slabs):
    return sean.lesion_probability(nnx.merge(graphdef, state), slabs)

  shape, dtype = _batch_shapes(config)["slab"]
  jitted = jax.jit(step, in_shardings=(replicated, data), out_shardings=data)
  return jitted, (_abstract(state, replicated),
                  jax.ShapeDtypeStruct(shape, dtype, sharding=data))
