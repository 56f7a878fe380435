"""Trains a SEAN variant: ``python -m sean_jax.train --config configs/sean.py:demo
--workdir DIR``. Run the same command again to resume from the latest checkpoint.

Several hosts: start the same command on every host with ``--distributed`` (JAX finds
the cluster on SLURM/TPU/GKE), or give ``--coordinator HOST:PORT --num_processes N
--process_id I`` explicitly.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/sean.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (auto-detected).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    print("error: --config and --workdir are required", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  from sean_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, trainer.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("aborted; the last checkpoint is kept", file=sys.stderr)
    return 130
  if "stopped_at_step" in result:
    return 130
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
