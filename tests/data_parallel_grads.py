"""Loss and gradients of one stage-2 step on every local device, saved to an .npz.

Run by tests/test_train.py in a subprocess (the device count is fixed at start-up):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/data_parallel_grads.py OUT
"""

import sys

import jax
import numpy as np
from flax import nnx

from sean_jax import config as base_config
from sean_jax import checkpointing, trainer
from sean_jax.data import pipeline, sources


def main(out):
  config = base_config.get_config("sean", "demo")
  config.model.update(width=4, align=False)
  config.data.update(image_size=32, phantom_size=32, phantom_slices=4, num_train_cases=4)
  config.batch_size = 8
  source = sources.case_source(config, "train")
  batch = next(pipeline.make_train_iterator(source, batch_size=8, slab_slices=3, seed=0))
  replicated, data_sharding = trainer.data_parallel_shardings()
  model = checkpointing.TrainState(config, 10, rngs=checkpointing.init_rngs(0)).model
  graphdef, state = nnx.split(model.segmenter)

  @jax.jit
  def loss_and_grads(state, batch):
    return nnx.value_and_grad(trainer.segmentation_objective)(
        nnx.merge(graphdef, state), batch)

  batch = trainer._global_batch(batch, ("slab", "mask"), data_sharding)  # pylint: disable=protected-access
  loss, grads = loss_and_grads(jax.device_put(state, replicated), batch)
  flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(grads)}
  np.savez(out, loss=np.asarray(loss), devices=jax.device_count(), **flat)


if __name__ == "__main__":
  main(sys.argv[1])
