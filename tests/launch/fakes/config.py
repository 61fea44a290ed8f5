"""A config file for launcher tests that start a launcher process (its config must be in the
repo): no model, so the pre-flight only warns (with --force) and imports no jax."""


def get_config(arg=None):
  del arg
  return {}


def sweep():
  return [{'train.seed': 0}, {'train.seed': 1}]
