"""Train a yuanjax model.

  python -m yuanjax.train --config=configs/demo.py --workdir=/tmp/demo \
      [--config.model.router.type=linear --config.train.num_steps=100 ...]
"""
from absl import app, flags, logging
from ml_collections import config_flags

from yuanjax import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and logs go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('done: %s', {k: v for k, v in summary.items() if k != 'sample'})


if __name__ == '__main__':
  app.run(main)
