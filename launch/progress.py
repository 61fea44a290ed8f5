"""Has a run reached train.num_steps? Exit 0 if so, 1 if not (2: bad input).

The SLURM job script asks this after the trainer returns: a trainer stopped by the
--signal before the time limit (or by a preemption) saved a checkpoint and exited 0, and the
job is requeued until the newest checkpoint in WORKDIR/checkpoints/ is at num_steps.

  python launch/progress.py --config=configs/x.py[:arg] --workdir=DIR \\
      [--config.train.num_steps=N ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

KEY = '--config.train.num_steps='


def num_steps(config: str, overrides: list[str]) -> int:
  """train.num_steps: the last override of it, else the config file's value."""
  given = [o[len(KEY):] for o in overrides if o.startswith(KEY)]
  if given:
    return int(given[-1])
  path, _, arg = config.partition(':')
  spec = importlib.util.spec_from_file_location('_progress_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  return int(cfg.train.num_steps)


def newest_step(workdir: str) -> int | None:
  """The highest step among WORKDIR/checkpoints/<step> (gs:// through etils.epath)."""
  directory = os.path.join(workdir, 'checkpoints')
  if '://' in directory:
    from etils import epath  # pylint: disable=g-import-not-at-top  # Orbax's own path library
    path = epath.Path(directory)
    names = [p.name for p in path.iterdir()] if path.exists() else []
  else:
    names = os.listdir(directory) if os.path.isdir(directory) else []
  steps = [int(n) for n in names if n.isdigit()]
  return max(steps) if steps else None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--config', required=True)
  p.add_argument('--workdir', required=True)
  args, overrides = p.parse_known_args(argv)
  target, step = num_steps(args.config, overrides), newest_step(args.workdir)
  print(f'[progress] newest checkpoint: step {step}; train.num_steps: {target}', flush=True)
  return 0 if step is not None and step >= target else 1


if __name__ == '__main__':
  sys.exit(main())
