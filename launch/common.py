"""What the launchers share: the run flags, the training command, and running a plan.

A launcher turns its flags into a `Plan`: argv lists to run in order (plus teardown that
runs whatever happens). `execute` either prints every command, one per line with
`shlex.join` (--dry-run), or runs them: the same plan both ways, so the dry run shows
exactly what a real run does.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from yuanjax import publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MODULE = 'yuanjax.train'
_FIELD = r'[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*'
FIELD_RE = re.compile(_FIELD)
OVERRIDE_RE = re.compile(rf'--config\.({_FIELD})=(.*)', re.DOTALL)
GS_RE = re.compile(r'gs://[^/]+(/.*)?')
# Set (by a sweep running plans in threads) to stop every plan that runs: its processes
# are stopped and its cleanup runs, as after a signal.
STOP = threading.Event()


@dataclasses.dataclass
class Plan:
  """What a launcher does: every command is an argv list (no shell in between)."""
  steps: list[list[str]]  # in order; stops at the first failure
  cleanup: list[list[str]] = dataclasses.field(default_factory=list)  # always, once reached
  cleanup_from: int = 0  # cleanup runs once step `cleanup_from` has started
  together: bool = False  # steps are the processes of one job: run them at once
  log_dir: str | None = None  # with `together`: also write process_<i>.log here
  files: dict[str, str] = dataclasses.field(default_factory=dict)  # written first, dry run too
  # A launcher with control flow of its own (tpu_pod: polls, resubmits): call(dry_run) -> status
  # instead of the steps.
  call: Callable[[bool], int] | None = None

  def commands(self) -> list[list[str]]:
    return self.steps + self.cleanup


def parser(description: str) -> argparse.ArgumentParser:
  """The flags every launcher takes; config overrides (--config.KEY=VALUE) go through as is."""
  p = argparse.ArgumentParser(
      description=description, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='Config overrides: any number of --config.KEY=VALUE, passed on to yuanjax.train.')
  p.add_argument('--config', required=True,
                 help='config file, optionally with an argument: configs/demo.py[:variant]')
  p.add_argument('--workdir', required=True,
                 help='where the run writes checkpoints and logs: a path or gs://BUCKET/PATH')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                 help='print the commands, one per line, and run nothing')
  return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None,
          pass_through: bool = False) -> argparse.Namespace:
  """Parses argv; errors (exit 2) name the flag at fault.

  Sets args.overrides (the --config.KEY=VALUE flags, in order) and args.config_path. Other
  unknown flags are an error, or with pass_through go to args.rest.
  """
  args, rest = p.parse_known_args(argv)
  args.overrides = [a for a in rest if OVERRIDE_RE.fullmatch(a)]
  args.rest = [a for a in rest if not OVERRIDE_RE.fullmatch(a)]
  if args.rest and not pass_through:
    p.error(f'unrecognized argument {args.rest[0]!r} '
            '(config overrides are written --config.KEY=VALUE)')
  args.config_spec = args.config  # as given (a launcher may rewrite args.config)
  args.config_path = config_path(args.config)
  if not os.path.isfile(args.config_path):
    p.error(f'--config={args.config}: no such file {args.config_path!r}')
  if not args.workdir.strip():
    p.error('--workdir is empty')
  if '://' in args.workdir and not GS_RE.fullmatch(args.workdir):
    p.error(f'--workdir={args.workdir}: only local paths and gs://BUCKET/PATH are supported')
  return args


def config_path(spec: str) -> str:
  """'configs/x.py:variant' -> 'configs/x.py'."""
  return spec.partition(':')[0]


# --------------------------------------------------------------- pre-flight: does it fit?

# TPU generation -> (the planner's device kind, TensorCores per chip in the type's number:
# v5p-64 and v4-16 count TensorCores, two per chip; v5litepod-N and v6e-N count chips, the
# most chips one host of that generation holds; a larger slice has 4 per host).
# None: the planner has no memory figure for it (the mesh is still checked).
TPU_KINDS = {
    'v5p': ('TPU v5p', 2, 4),
    'v4': (None, 2, 4),
    'v5litepod': ('TPU v5e', 1, 8),
    'v6e': ('TPU v6e', 1, 8)
}
GIB = 2**30


@dataclasses.dataclass
class Target:
  """What a launch runs on, as the planner counts it."""
  devices: int  # JAX devices: GPUs, TPU chips, CPU devices
  device_kind: str | None  # the planner's name ('TPU v5p', 'H100-80G'); None: no memory check
  slices: int = 1  # must equal prod(config.mesh.dcn)
  hosts: int = 1  # JAX processes (one per host)
  platform: str = 'cpu'  # jax's platform name: 'cpu', 'gpu', 'tpu'


def tpu_target(accelerator_type: str, slices: int = 1) -> Target:
  """'v5p-64' -> 32 chips of 'TPU v5p' on 8 hosts per slice; ValueError for a type the table
  lacks."""
  generation, _, n = accelerator_type.rpartition('-')
  if generation not in TPU_KINDS or not n.isdigit():
    raise ValueError(f'{accelerator_type!r}: no chip count known for the pre-flight '
                     f'(known: {", ".join(f"{g}-N" for g in TPU_KINDS)})')
  kind, cores_per_chip, host_chips = TPU_KINDS[generation]
  chips = int(n) // cores_per_chip
  hosts = 1 if chips <= host_chips else chips // 4
  return Target(slices * chips, kind, slices, slices * hosts, 'tpu')


def fit_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument(
      '--force', action='store_true',
      help='launch even when the pre-flight (yuanjax.plan on the config, mesh and '
      'accelerator) says the run does not fit; its finding is printed as a warning')


def load_config(spec: str, overrides: list[str]):
  """The config the trainer will get: FILE[:arg] and its --config.KEY=VALUE overrides, parsed
  by ml_collections' config_flags as yuanjax.train parses them."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['launch', f'--config={spec}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def preflight(p: argparse.ArgumentParser, args: argparse.Namespace, target: Target) -> None:
  """Runs the planner before anything is created or submitted: exit 2 with the fix it finds
  (remat, grad_accum, mesh) when the run does not fit, unless --force."""
  try:
    problem = fit_problem(load_config(args.config_spec, args.overrides), target)
  except Exception as e:  # pylint: disable=broad-except  # reported: refused unless --force
    problem = f'cannot plan --config={args.config_spec}: {type(e).__name__}: {e}'
  if problem and args.force:
    say(f'pre-flight: {problem}; launching anyway (--force)')
  elif problem:
    p.error(f'pre-flight: {problem} (--force launches anyway)')


def fit_problem(config, target: Target) -> str | None:
  """None when the config fits target (and its mesh.dcn matches the slices, and a multi-host run
  names its data); else why not."""
  if 'mesh' not in getattr(config, 'keys', lambda: ())():
    raise ValueError(f'get_config() returned a {type(config).__name__} without a mesh')
  from yuanjax import plan, sharding  # pylint: disable=g-import-not-at-top  (jax: only here)
  dcn = dict(zip(sharding.MESH_AXES, sharding.dcn_shape(config.mesh)))
  if math.prod(dcn.values()) != target.slices:
    return (f'config.mesh.dcn={dcn}: its product is {math.prod(dcn.values())}, but the launch '
            f'has {target.slices} slice(s); e.g. --config.mesh.dcn.data={target.slices}')
  if problem := _data_problem(config, target):
    return problem
  r = plan.plan(config, target.devices, target.device_kind)
  where = (f'{target.devices} x {target.device_kind}'
           if target.device_kind else f'{target.devices} devices')
  if target.device_kind is None or r['fits'][target.device_kind]:
    say(f'pre-flight: {where}, mesh {r["mesh"]}: {r["per_device"]["total"] / GIB:.1f} GiB per '
        'device' + ('' if target.device_kind else ' (no memory figure for this device)'))
    return None
  fix = find_fix(config, target, r)
  usable = r['headroom'] * r['device_memory_gib'][target.device_kind]
  return (f'{r["per_device"]["total"] / GIB:.1f} GiB per device, {usable:.1f} GiB usable on '
          f'{where} (mesh {r["mesh"]}, remat={r["remat"]}, grad_accum='
          f'{config.train.grad_accum}): does not fit; ' +
          (f'it fits with {" ".join(fix)}'
           if fix else 'no remat, grad_accum or mesh change tried fits: use more devices'))


def _data_problem(config, target: Target) -> str | None:
  """Why the trainer would refuse the data of a run on more than one host (streams.check_source:
  no data.path on accelerators), found before anything is created."""
  if target.hosts == 1:
    return None
  from yuanjax.data import streams  # pylint: disable=g-import-not-at-top
  try:
    streams.check_source(config.data, target.hosts, target.platform)
  except ValueError as e:
    return str(e)
  return None


REMATS = ('none', 'dots_saveable', 'dots', 'full')  # most memory first


def find_fix(config, target: Target, r: dict) -> list[str] | None:
  """The first --config overrides that fit: the current mesh before data moved to fsdp, less
  remat before more, and the smallest grad_accum (a binary search: memory falls with it)."""
  dcn = dict(zip(r['mesh'], (config.mesh.dcn[a] for a in r['mesh'])))
  ici = {a: r['mesh'][a] // dcn[a] for a in r['mesh']}
  meshes = [{}]
  if ici['data'] > 1:
    meshes.append({'mesh.data': 1, 'mesh.fsdp': ici['data'] * ici['fsdp']})
  start = REMATS.index(config.model.remat) if config.model.remat in REMATS else 0
  per_dp = config.train.batch_size // (r['mesh']['data'] * r['mesh']['fsdp'] * r['mesh']['expert'])
  for mesh in meshes:
    for remat in REMATS[start:]:
      if fix := _smallest_accum(config, target, {**mesh, 'model.remat': remat}, per_dp):
        return [f'--config.{k}={v}' for k, v in fix.items() if _get(config, k) != v]
  return None


def _smallest_accum(config, target: Target, changes: dict, per_dp: int) -> dict | None:
  accums = [g for g in range(1, per_dp + 1) if per_dp % g == 0 and g >= config.train.grad_accum]
  lo, hi, best = 0, len(accums) - 1, None
  while lo <= hi:
    mid = (lo + hi) // 2
    trial = {**changes, 'train.grad_accum': accums[mid]}
    if _fits(config, target, trial):
      best, hi = trial, mid - 1
    else:
      lo = mid + 1
  return best


def _fits(config, target: Target, changes: dict) -> bool:
  from yuanjax import config_lib, plan  # pylint: disable=g-import-not-at-top
  trial = config.copy_and_resolve_references()
  config_lib.override(trial, changes)
  try:
    return plan.plan(trial, target.devices, target.device_kind)['fits'][target.device_kind]
  except ValueError:  # not a valid config on this mesh (e.g. the batch does not divide)
    return False


def _get(config, key: str):
  for k in key.split('.'):
    config = config[k]
  return config


def train_argv(python: str, config: str, workdir: str, overrides: list[str],
               module: str = TRAIN_MODULE) -> list[str]:
  """The training command (the contract with yuanjax.train); -u: logs arrive as they happen."""
  return [python, '-u', '-m', module, f'--config={config}', f'--workdir={workdir}', *overrides]


def free_ports(n: int = 1) -> list[int]:
  """n different TCP ports on 127.0.0.1 that nothing listens on now (the OS's pick: bind to
  port 0, all n sockets open at once so that they differ). A port is only reserved until
  it is returned, but the OS hands out ports in a random order, so another caller picking
  the same one before it is used is unlikely."""
  with contextlib.ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(n)]
    for s in socks:
      s.bind(('127.0.0.1', 0))
    return [s.getsockname()[1] for s in socks]


# ------------------------------------------------------------------------------- running


def say(msg: str) -> None:
  print(f'[launch] {msg}', file=sys.stderr, flush=True)


def execute(plan: Plan, dry_run: bool) -> int:
  """Prints the plan's commands (dry run) or runs them; returns the exit status."""
  for path, text in plan.files.items():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    publish.file(path, text.encode())
    say(f'wrote {path}')
  if plan.call:
    return plan.call(dry_run)
  if dry_run:
    for argv in plan.commands():
      print(shlex.join(argv), flush=True)
    return 0
  started = 0  # steps started so far
  handlers = exit_on_signals()
  try:
    if plan.together:
      started = len(plan.steps)
      return run_together(plan.steps, plan.log_dir)
    for argv in plan.steps:
      if STOP.is_set():
        return 128 + signal.SIGTERM
      started += 1
      say(f'+ {shlex.join(argv)}')
      rc = subprocess.call(argv)
      if rc:
        say(f'failed with exit status {rc}: {shlex.join(argv)}')
        return rc
    return 0
  finally:
    if plan.cleanup and started > plan.cleanup_from:
      for argv in plan.cleanup:
        say(f'+ {shlex.join(argv)}')
        if rc := subprocess.call(argv):
          say(f'cleanup step failed with exit status {rc}; going on')
    restore_signals(handlers)


def restore_signals(handlers: dict) -> None:
  for sig, handler in handlers.items():
    signal.signal(sig, handler)


@contextlib.contextmanager
def deferred_signals(why: str, act: bool = True):
  """SIGINT, SIGTERM and SIGHUP wait until the block is done: a child started in it is tracked
  and a create or a cleanup is not cut short. Then, with `act`, the first one acts as it
  would have (raised again); without, it is dropped (the caller is ending anyway)."""
  caught = []

  def defer(signum, frame):
    del frame
    caught.append(signum)
    say(f'signal {signum}: {why}')

  try:
    before = {s: signal.signal(s, defer) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
  except ValueError:  # not the main thread: signals reach only the main thread anyway
    yield
    return
  try:
    yield
  finally:
    restore_signals(before)
    if caught and act:
      signal.raise_signal(caught[0])


def exit_on_signals() -> dict:
  """SIGTERM/SIGHUP raise SystemExit like Ctrl-C raises KeyboardInterrupt, so that the
  cleanup (a TPU slice's deletion) and the stopping of child processes still happen."""

  def leave(signum, frame):
    del frame
    raise SystemExit(128 + signum)

  try:
    return {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
  except ValueError:  # not the main thread: leave the handlers alone
    return {}


def _pump(i: int, proc: subprocess.Popen, log_path: str | None, lock: threading.Lock) -> None:
  """Copies one process's output to stdout, each line prefixed with [i], and to its log."""
  log = open(log_path, 'wb') if log_path else None
  try:
    for line in proc.stdout:
      line = line if line.endswith(b'\n') else line + b'\n'
      with lock:
        sys.stdout.write(f'[{i}] ' + line.decode(errors='replace'))
        sys.stdout.flush()
      if log:
        log.write(line)
        log.flush()
  finally:
    if log:
      log.close()


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
  """SIGTERM to every running process group, SIGKILL to what is left after grace_s."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    running = [p for p in procs if p.poll() is None]
    for p in running:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    for p in running:
      try:
        p.wait(max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass


def run_together(cmds: list[list[str]], log_dir: str | None = None) -> int:
  """Starts every command at once; 0 when all succeed, else the first failure's status.

  When one fails the others are stopped (they would wait for it forever). Output is
  prefixed [i] on stdout and, with log_dir, also written to log_dir/process_<i>.log.
  """
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  lock = threading.Lock()
  procs, pumps = [], []
  try:
    for i, argv in enumerate(cmds):
      say(f'+ {shlex.join(argv)}')
      # Own process group, so that stopping a process stops whatever it started too; a signal
      # waits until it is in procs (Popen may return after the child exists, or not at all).
      with deferred_signals('after this process is tracked'):
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True))
      p = procs[-1]
      log = os.path.join(log_dir, f'process_{i}.log') if log_dir else None
      pumps.append(threading.Thread(target=_pump, args=(i, p, log, lock), daemon=True))
      pumps[-1].start()
    while True:
      if STOP.is_set():
        say('stopping (the sweep was interrupted)')
        return 128 + signal.SIGTERM
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        say(f'process {i} exited with status {codes[i]}; stopping the others')
        return codes[i] if codes[i] > 0 else 128 - codes[i]  # -SIG -> 128+SIG, like a shell
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.05)
  finally:
    _stop(procs)
    for t in pumps:
      t.join(timeout=5)
