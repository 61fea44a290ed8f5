"""Has a run reached train.num_steps? Exit 0 if so, NOT_DONE (3) if not; 2: bad input, 1: an
error (a traceback: e.g. an unreadable workdir), which callers must not take for "not done".

The SLURM job script asks this after the trainer returns: a trainer stopped by the
--signal before the time limit (or by a preemption) saved a checkpoint and exited 0, and the
job is requeued until the newest checkpoint in WORKDIR/checkpoints/ is at num_steps.

  python launch/progress.py --config=configs/x.py[:arg] --workdir=DIR \\
      [--config.train.num_steps=N ...]

It reads the workdir through yuanjax.workdir (standard library only: no JAX is imported), so
the job's python must import yuanjax, as its pre-flight checks.
"""
from __future__ import annotations

import argparse
import sys

from yuanjax import workdir as workdir_lib

KEY = '--config.train.num_steps='
NOT_DONE = 3  # not 1, which is also Python's status for an uncaught exception


def num_steps(config: str, overrides: list[str]) -> int:
  """train.num_steps: the last override of it, else the config file's value."""
  given = [o[len(KEY):] for o in overrides if o.startswith(KEY)]
  if given:
    return int(given[-1])
  return int(workdir_lib.load_config(*workdir_lib.split_config_spec(config)).train.num_steps)


def newest_step(workdir: str) -> int | None:
  """The highest step among WORKDIR/checkpoints/<step> (local or gs://)."""
  steps = workdir_lib.checkpoint_steps(workdir)
  return steps[-1] if steps else None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--config', required=True)
  p.add_argument('--workdir', required=True)
  args, overrides = p.parse_known_args(argv)
  target, step = num_steps(args.config, overrides), newest_step(args.workdir)
  print(f'[progress] newest checkpoint: step {step}; train.num_steps: {target}', flush=True)
  return 0 if step is not None and step >= target else NOT_DONE


if __name__ == '__main__':
  sys.exit(main())
