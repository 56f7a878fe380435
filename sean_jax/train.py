"""Trains a SEAN variant: ``python -m sean_jax.train --config configs/sean.py:demo
--workdir DIR``. Run the same command again to resume from the latest checkpoint.

Several hosts: start the same command on every host with ``--distributed`` (JAX finds
the cluster on SLURM/TPU/GKE), or give ``--coordinator HOST:PORT --num_processes N
--process_id I`` explicitly.
"""

import re
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
  # pylint: disable=g-import-not-at-top
  from sean_jax import checkpointing, trainer
  # pylint: enable=g-import-not-at-top
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, trainer.NonFiniteLossError,
          checkpointing.CheckpointError, checkpointing.WorkdirLockedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("aborted; the last checkpoint is kept", file=sys.stderr)
    return 130
  if "stopped_at_step" in result:
    return 130
  return 0


def _one_line_flag_error(error: Exception, argv) -> str:
  """The user's mistake in one line, from what flag parsing raised."""
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections: an override of a field the config does not have; the message is
    # the repr of a KeyError, "'foo'", maybe with 'Did you mean "bar" instead of ...'.
    text = str(error).replace("\\'", "'").replace("\\n", " ")
    names = re.findall(r"'([A-Za-z_]\w*)'", text)
    field = names[0] if names else "?"
    hint = re.search(r'Did you mean "(\w+)"', text.replace('\\"', '"'))
    given = [a for a in argv if a.startswith("--config.")
             and a[len("--config."):].split("=")[0].split(".")[-1] == field]
    where = given[0] if given else "--config"
    return (f"{where}: the config has no field {field!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
  # absl wraps errors raised in the config file with their traceback: keep the last line.
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  message = lines[-1] if lines else type(error).__name__
  head = lines[0] if lines else ""
  if len(lines) > 1 and head.startswith("flag --config"):
    message = f"{head.split(':')[0][len('flag '):]}: {message.split(': ', 1)[-1]}"
  return message


def _parse_flags(argv):
  """absl's flag parsing, with config mistakes (unknown field, unknown variant or
  setting, a value of the wrong type) as one line on stderr and exit code 2, before
  anything is built."""
  try:
    remaining = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # a config file that failed to load raises its error here
    return remaining
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    print(f"error: {_one_line_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
