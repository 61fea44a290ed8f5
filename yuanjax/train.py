"""Train a yuanjax model.

  python -m yuanjax.train --config=configs/demo.py --workdir=/tmp/demo \
      [--config.model.router.type=linear --config.train.num_steps=100 ...]

Multi-process (docs/scale_out.md; the launchers in launch/ write these): every process runs
the same command plus --coordinator_address=HOST:PORT --num_processes=N --process_id=i. On a
Cloud TPU pod, in a SLURM job step with several tasks, or with JAX_COORDINATOR_ADDRESS set,
the flags may be left out: `yuanjax.distributed.initialize` asks the environment.
"""
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from yuanjax import checkpoint, distributed, step_guard, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and logs go.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Drops Orbax's INFO chatter (a dozen lines per save); its warnings and errors stay."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger('absl').addFilter(_quiet_orbax)  # Orbax logs through absl
  # Before anything creates a JAX backend (the trainer's first jax.devices()).
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (step_guard.HaltError, checkpoint.SaveError) as e:
    sys.exit(f'error: {e}')  # exit status 1, the message on stderr
  logging.info('done: %s', {k: v for k, v in summary.items() if k != 'sample'})


if __name__ == '__main__':
  app.run(main)
