"""Runs every variant of a config file's sweep(), one run each, with its own workdir.

`sweep(arg)` in the --config file returns a list of dicts of dotted overrides, e.g.
[{'model.router.type': 'attention'}, {'model.router.type': 'linear'}]; `arg` is the
`:variant` of --config=FILE:variant (None without one; a sweep() taking no argument is
called without it), the same one get_config receives. Each dict becomes one run of the
chosen backend with --config.KEY=VALUE flags (after any given here, which apply to every
variant) and --workdir=WORKDIR/<name>, the name made from the overrides
(`model.router.type=linear`, filesystem-safe). Backends:

  local  one launch/local.py job per variant; each run's output also goes to
         WORKDIR/<name>/logs/process_<i>.log (or --log_dir/<name>);
  tpu    one launch/tpu_pod.py slice per variant, named NAME-0, NAME-1, ...; with
         --parallel=N, N slices are asked for, and wait in the queue, at once; with --reuse
         every variant runs on the one existing slice NAME, one after another;
  slurm  one sbatch job each (they queue side by side), job names JOB_NAME-<name>;
  xpk    one `xpk workload create` each on an existing GKE cluster (they queue side by side
         on its capacity), workloads WORKLOAD-0, WORKLOAD-1, ...

--parallel=N runs up to N variants at once (default 1: one after another); a failed
variant never stops the others. With a local WORKDIR the sweep keeps a manifest,
WORKDIR/sweep.json: the config, the common overrides and, per run, its name, overrides,
workdir, status (pending, running, done, failed) and return code; `yuanjax.report` reads
it. Running the same command again skips the runs the manifest says are done (for slurm,
"done" means submitted) and starts the others again (training resumes from its
checkpoints).

Flags this launcher does not know go to the backend (e.g. --zone, --nodes).

  python -m launch.sweep --backend=local --config=configs/demo.py --workdir=/tmp/sweep \\
      --num_processes=2 --config.train.num_steps=20
  python -m launch.sweep --backend=local --parallel=2 --num_processes=1 \\
      --config=configs/router_ablation.py:smoke --workdir=/tmp/smoke
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import os
import re
import sys
import threading
import types
from collections.abc import Callable

from launch import common, gpu_slurm, local, tpu_pod, xpk
from yuanjax import publish, workdir as workdir_lib

Named = list[tuple[str, argparse.Namespace | None]]  # (variant name, its backend args or None)


def load_sweep(path: str, arg: str | None = None) -> list[dict]:
  """Imports the config file by path (as ml_collections' config_flags does), calls sweep(arg)."""
  try:
    module = workdir_lib.load_config_module(path)
  except Exception as e:
    raise ValueError(f'importing it failed: {type(e).__name__}: {e}') from e
  if not callable(getattr(module, 'sweep', None)):
    raise ValueError('it defines no sweep() function')
  takes_arg = bool(inspect.signature(module.sweep).parameters)
  try:
    variants = module.sweep(arg) if takes_arg else module.sweep()
  except Exception as e:
    raise ValueError(f'sweep({arg!r}) failed: {type(e).__name__}: {e}') from e
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
  p.add_argument('--parallel', type=int, default=1,
                 help='variants run at once (default 1: one after another)')
  args = common.parse(p, argv, pass_through=True)
  if args.parallel < 1:
    p.error(f'--parallel={args.parallel}: must be at least 1')
  args.config_arg = workdir_lib.split_config_spec(args.config)[1]
  try:
    args.variants = load_sweep(args.config_path, args.config_arg)
  except ValueError as e:
    p.error(f'--config={args.config}: {e}')
  refusal = BACKENDS[args.backend].refuse(args)
  if refusal:
    p.error(refusal)
  return args


def runs(args) -> Named:
  """(name, backend args) per variant; the backend checks its own flags (exit 2 if bad)."""
  backend, named, seen = BACKENDS[args.backend], [], set()
  fixed = {common.OVERRIDE_RE.fullmatch(a).group(1): a for a in args.overrides}
  for i, variant in enumerate(args.variants):
    name = variant_name(variant)
    if name in seen:
      name = f'{name}-{i}'
    seen.add(name)
    overrides = {**fixed, **{k: f'--config.{k}={v}' for k, v in variant.items()}}
    argv = [
        *args.rest, f'--config={args.config}', f'--workdir={args.workdir.rstrip("/")}/{name}',
        *overrides.values()
    ]
    named.append((name, _parse_variant(backend, argv)))
  if all(run is None for _, run in named):
    raise SystemExit(2)  # refused whatever the variant: the sweep's own flags
  backend.distinct(args, [(n, run) for n, run in named if run is not None])  # no overwriting
  return named


def _parse_variant(backend, argv: list[str]) -> argparse.Namespace | None:
  """The backend's args for one variant, or None when it refuses that variant alone (e.g. its
  pre-flight: the message is on stderr): that variant fails and the others run."""
  try:
    return backend.module.parse(argv)
  except SystemExit as e:
    if not e.code:
      raise
    return None


# ------------------------------------------------------------------------------- backends


def _distinct_local(args, named: Named) -> None:
  """A free port each (variants at once need their own; a given --port counts up with
  --parallel), and logs in the variant's workdir (or --log_dir/<name>)."""
  ports = common.free_ports(len(named))
  for i, (name, run) in enumerate(named):
    if run.port is None:
      run.port = ports[i]
    elif args.parallel > 1:
      run.port += i
    if run.log_dir:
      run.log_dir = os.path.join(run.log_dir, name)
    elif '://' not in run.workdir:
      run.log_dir = workdir_lib.logs_dir(run.workdir)


def _distinct_tpu(args, named: Named) -> None:
  """A slice each, NAME-<i>, with a local folder of its own; --reuse: all on the one slice."""
  given = any(a.startswith('--local_dir') for a in args.rest)
  for i, (_, run) in enumerate(named):
    if not run.reuse:
      run.name = f'{run.name}-{i}'
      run.local_dir = os.path.join(run.local_dir if given else os.path.dirname(run.local_dir),
                                   run.name)


def _refuse_tpu(args) -> str | None:
  if '--reuse' in args.rest and args.parallel > 1:
    return f'--parallel={args.parallel}: with --reuse the variants queue on the one slice'
  return None


def _distinct_slurm(args, named: Named) -> None:
  del args  # the job names alone
  for name, run in named:
    run.job_name = f'{run.job_name}-{name}'


def _refuse_slurm(args) -> str | None:
  if any(a.startswith('--script') for a in args.rest):
    return '--script: not in a sweep (each variant writes LOG_DIR/JOB_NAME-<variant>.sbatch)'
  return None


def _distinct_xpk(args, named: Named) -> None:
  del args  # the workload names alone
  for i, (_, run) in enumerate(named):
    run.workload = f'{run.workload}-{i}'
    if len(run.workload) > 40:
      raise SystemExit(f'--workload: {run.workload!r} is over 40 characters; shorten it')


@dataclasses.dataclass(frozen=True)
class Backend:
  """Where variants run: the launcher module (parse(argv) -> run args, plan(run) -> Plan), how
  the variants' runs get names and folders of their own, and the sweep flags it refuses (an
  error message, or None). A new backend is one entry of BACKENDS."""
  module: types.ModuleType
  distinct: Callable[[argparse.Namespace, Named], None]
  refuse: Callable[[argparse.Namespace], str | None] = lambda args: None


BACKENDS = {
    'local': Backend(local, _distinct_local),
    'tpu': Backend(tpu_pod, _distinct_tpu, _refuse_tpu),
    'slurm': Backend(gpu_slurm, _distinct_slurm, _refuse_slurm),
    'xpk': Backend(xpk, _distinct_xpk),
}


class Manifest:
  """WORKDIR/sweep.json, rewritten whole (atomically) at every change; thread-safe."""

  def __init__(self, args, names_overrides):
    local = '://' not in args.workdir
    self.path = workdir_lib.sweep_manifest_path(args.workdir) if local and not args.dry_run \
        else None
    old_manifest = workdir_lib.read_sweep_manifest(args.workdir) if self.path else None
    before = {r['name']: r for r in old_manifest['runs']} if old_manifest else {}
    self.lock = threading.Lock()
    self.data = dict(config=args.config, arg=args.config_arg, backend=args.backend,
                     overrides=args.overrides, runs=[])
    for name, overrides in names_overrides:
      old = before.get(name, {})
      done = old.get('status') == 'done' and old.get('overrides') == overrides
      self.data['runs'].append(
          dict(name=name, overrides=overrides, workdir=workdir_lib.variant_dir(args.workdir, name),
               status='done' if done else 'pending',
               returncode=old.get('returncode') if done else None))
    self.write()

  def done(self, name: str) -> bool:
    return self._run(name)['status'] == 'done'

  def _run(self, name):
    return next(r for r in self.data['runs'] if r['name'] == name)

  def set(self, name: str, status: str, returncode: int | None = None) -> None:
    with self.lock:
      self._run(name).update(status=status, returncode=returncode)
      self.write()

  def write(self):
    if not self.path:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    publish.file(self.path, json.dumps(self.data, indent=1).encode())


def _run_one(name, plan, manifest, dry_run) -> int:
  if common.STOP.is_set():  # an interrupted launch (tpu_pod handles its own signals)
    print(f'[sweep] variant {name}: not started (interrupted)', file=sys.stderr, flush=True)
    return 130
  if manifest.done(name):
    print(f'[sweep] variant {name}: done before, skipped', file=sys.stderr, flush=True)
    return 0
  if plan is None:
    print(f'[sweep] variant {name} refused by the launcher (above)', file=sys.stderr, flush=True)
    manifest.set(name, 'failed', 2)
    return 2
  if not dry_run:
    print(f'[sweep] variant {name}', file=sys.stderr, flush=True)
  manifest.set(name, 'running')
  try:
    rc = common.execute(plan, dry_run)
  except BaseException:
    manifest.set(name, 'failed', None)
    raise
  manifest.set(name, 'failed' if rc else 'done', rc)
  if rc:
    print(f'[sweep] variant {name} failed with exit status {rc}', file=sys.stderr, flush=True)
  return rc


def main(argv=None) -> int:
  args = parse(argv)
  named = runs(args)
  launcher = BACKENDS[args.backend].module
  plans = [(name, run and launcher.plan(run)) for name, run in named]  # checked before any runs
  manifest = Manifest(args, [(name, v) for (name, _), v in zip(named, args.variants)])
  if args.parallel == 1:  # in this thread: signals reach execute (a TPU slice's cleanup)
    codes = {name: _run_one(name, plan, manifest, args.dry_run) for name, plan in plans}
  else:
    codes = _run_parallel(plans, manifest, args)
  failed = [name for name, rc in codes.items() if rc]
  if failed:
    print(f'[sweep] failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


def _run_parallel(plans, manifest, args) -> dict[str, int]:
  """Up to args.parallel plans at once; SIGTERM/SIGHUP/Ctrl-C stop all of them."""
  handlers = common.exit_on_signals()
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    futures = {
        name: pool.submit(_run_one, name, plan, manifest, args.dry_run) for name, plan in plans
    }
    try:
      return {name: f.result() for name, f in futures.items()}
    except BaseException:  # Ctrl-C / SIGTERM: stop what runs, start nothing more
      common.STOP.set()
      for f in futures.values():
        f.cancel()
      raise
    finally:
      common.restore_signals(handlers)


if __name__ == '__main__':
  sys.exit(main())
