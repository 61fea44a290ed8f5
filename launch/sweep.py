"""Runs every variant of a config file's sweep(), one run each, with its own workdir.

`sweep()` in the --config file returns a list of dicts of dotted overrides, e.g.
[{'model.router.type': 'attention'}, {'model.router.type': 'linear'}]. Each dict becomes
one run of the chosen backend with --config.KEY=VALUE flags (after any given here, which
apply to every variant) and --workdir=WORKDIR/<name>, the name made from the overrides
(`model.router.type=linear`, filesystem-safe). Backends:

  local  one launch/local.py job after another (a failed variant does not stop the rest);
  tpu    one launch/tpu_pod.py slice after another, named NAME-0, NAME-1, ...;
  slurm  one sbatch job each (they queue side by side), job names JOB_NAME-<name>.

Flags this launcher does not know go to the backend (e.g. --zone, --nodes).

  python -m launch.sweep --backend=local --config=configs/demo.py --workdir=/tmp/sweep \\
      --num_processes=2 --config.train.steps=20
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import sys

from launch import common, gpu_slurm, local, tpu_pod

BACKENDS = {'local': local, 'tpu': tpu_pod, 'slurm': gpu_slurm}


def load_sweep(path: str) -> list[dict]:
  """Imports the config file by path (as ml_collections' config_flags does), calls sweep()."""
  spec = importlib.util.spec_from_file_location('_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ValueError(f'importing it failed: {type(e).__name__}: {e}') from e
  if not callable(getattr(module, 'sweep', None)):
    raise ValueError('it defines no sweep() function')
  variants = module.sweep()
  if not isinstance(variants, (list, tuple)) or not variants:
    raise ValueError(f'sweep() must return a non-empty list of dicts, got {variants!r}')
  for i, v in enumerate(variants):
    if not isinstance(v, dict):
      raise ValueError(f'sweep()[{i}] is {v!r}, not a dict of overrides')
    for k in v:
      if not (isinstance(k, str) and common.FIELD_RE.fullmatch(k)):
        raise ValueError(f'sweep()[{i}] has key {k!r}, not a dotted config field like model.x')
  return list(variants)


def variant_name(overrides: dict) -> str:
  """{'model.router.type': 'linear', 'lr': 1e-3} -> 'model.router.type=linear+lr=0.001'."""
  name = '+'.join(f'{k}={v}' for k, v in overrides.items()) or 'base'
  name = re.sub(r'[^A-Za-z0-9._=+-]', '_', name)
  if len(name) > 100:  # keep paths short; the hash keeps long names apart
    name = name[:90] + '-' + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def parse(argv=None):
  p = common.parser(__doc__)
  p.add_argument('--backend', choices=sorted(BACKENDS), default='local',
                 help='where each variant runs (default local)')
  args = common.parse(p, argv, pass_through=True)
  try:
    args.variants = load_sweep(args.config_path)
  except ValueError as e:
    p.error(f'--config={args.config}: {e}')
  if args.backend == 'slurm' and any(a.startswith('--script') for a in args.rest):
    p.error('--script: not in a sweep (each variant writes LOG_DIR/JOB_NAME-<variant>.sbatch)')
  return args


def runs(args) -> list[tuple[str, argparse.Namespace]]:
  """(name, backend args) per variant; the backend checks its own flags (exit 2 if bad)."""
  backend, out, seen = BACKENDS[args.backend], [], set()
  fixed = {common.OVERRIDE_RE.fullmatch(a).group(1): a for a in args.overrides}
  for i, variant in enumerate(args.variants):
    name = variant_name(variant)
    if name in seen:
      name = f'{name}-{i}'
    seen.add(name)
    overrides = {**fixed, **{k: f'--config.{k}={v}' for k, v in variant.items()}}
    argv = [*args.rest, f'--config={args.config}',
            f'--workdir={args.workdir.rstrip("/")}/{name}', *overrides.values()]
    run = backend.parse(argv)
    # Names and local folders of their own, so that variants do not overwrite each other.
    if args.backend == 'local' and run.log_dir:
      run.log_dir = os.path.join(run.log_dir, name)
    elif args.backend == 'tpu':
      run.name = f'{run.name}-{i}'
      if run.local_dir:
        run.local_dir = os.path.join(run.local_dir, run.name)
    elif args.backend == 'slurm':
      run.job_name = f'{run.job_name}-{name}'
    out.append((name, run))
  return out


def main(argv=None) -> int:
  args = parse(argv)
  backend = BACKENDS[args.backend]
  plans = [(name, backend.plan(run)) for name, run in runs(args)]  # all checked before any runs
  failed = []
  for name, plan in plans:
    if not args.dry_run:
      print(f'[sweep] variant {name}', file=sys.stderr, flush=True)
    if common.execute(plan, args.dry_run):
      failed.append(name)
  if failed:
    print(f'[sweep] failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
