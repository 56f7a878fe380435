"""Loss and gradients of one stage-2 step, computed twice from the same parameters and
batch: data parallel over every local device (the trainer's shardings, as in training)
and on one device alone (a plain jit, nothing sharded). Saved to an .npz, the
data-parallel ones under "parallel/", the one-device ones under "single/".

Run by tests/test_train.py in a subprocess (the device count is fixed at start-up):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/data_parallel_grads.py OUT
One process computes both: a second process for the one-device result started and
compiled everything again.
"""

import sys

import jax
import numpy as np
from flax import nnx

import helpers  # tests/, this script's directory
from sean_jax import config as base_config
from sean_jax import trainer
from sean_jax.data import pipeline, sources


def main(out):
  config = base_config.get_config("sean", "demo")
  config.model.update(width=4, align=False)
  config.data.update(image_size=32, phantom_size=32, phantom_slices=4, num_train_cases=4)
  config.batch_size = 8
  source = sources.case_source(config, "train")
  host_batch = next(pipeline.make_train_iterator(source, batch_size=8, slab_slices=3,
                                                 seed=0))
  # Parameters drawn by NumPy (helpers.fast_train_state): JAX's initialisers compile a
  # program per parameter shape, most of the process's time, and any parameters do.
  model = helpers.fast_train_state(config).model
  graphdef, state = nnx.split(model.segmenter)

  def loss_and_grads(state, batch):
    return nnx.value_and_grad(trainer.segmentation_objective)(
        nnx.merge(graphdef, state), batch)

  def flat(grads):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(grads)}

  results = {}
  # Data parallel: parameters replicated, the batch split over every device.
  replicated, data_sharding = trainer.data_parallel_shardings()
  batch = trainer._global_batch(host_batch, ("slab", "mask"), data_sharding)  # pylint: disable=protected-access
  loss, grads = jax.jit(loss_and_grads)(jax.device_put(state, replicated), batch)
  results["parallel"] = dict(flat(grads), loss=np.asarray(loss),
                             devices=len(batch["slab"].sharding.device_set))
  # One device: everything on the first device, a plain jit.
  one = jax.devices()[0]
  batch = {k: jax.device_put(np.asarray(host_batch[k]), one) for k in ("slab", "mask")}
  loss, grads = jax.jit(loss_and_grads)(jax.device_put(state, one), batch)
  results["single"] = dict(flat(grads), loss=np.asarray(loss),
                           devices=len(loss.sharding.device_set))
  np.savez(out, **{f"{name}/{k}": v for name, r in results.items() for k, v in r.items()})


if __name__ == "__main__":
  main(sys.argv[1])
