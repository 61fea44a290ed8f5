"""Runs yuanjax.train on a Cloud TPU slice, detached on the workers; follow, stop, clean up.

  1. check that WORKDIR (gs://) is writable, before anything is created;
  2. pack this working tree (tracked and untracked files git does not ignore, so uncommitted
     edits go too; .venv does not) into LOCAL_DIR/yuanjax.tgz;
  3. create the slice (`tpu-vm create`), or with --queued ask for it as a queued resource and
     wait until it is ACTIVE (at most --queue_timeout_s); with --reuse use an existing slice
     (one kept with --keep, or made elsewhere) instead, and never delete it;
  4. check from every worker that its service account can write WORKDIR, copy the tarball,
     unpack it to ~/yuanjax and build ~/yuanjax/.venv (launch/tpu_worker.sh install: waits
     for the dpkg lock that first-boot apt holds);
  5. start the SAME command on every worker, detached (launch/tpu_worker.sh start: a
     supervisor in its own session; the ssh call returns at once):
     [env LIBTPU_INIT_ARGS=...] .venv/bin/python -u -m yuanjax.train --config=... --workdir=gs://...
     Each worker copies its log to WORKDIR/worker_logs/worker-I-of-N.log as it goes and writes
     worker-I-of-N.exit-RC there at the end;
  6. follow: poll those exit files (and the slice's state) every --poll_s seconds, without
     ssh. A preempted Spot slice (queued resource SUSPENDED, TPU PREEMPTED) is deleted and
     asked for again, then installed and started again: the trainer resumes from the newest
     checkpoint in WORKDIR; at most --max_restarts times;
  7. at the end, or on a failure, Ctrl-C or SIGTERM: SIGTERM to every trainer (they save a
     checkpoint; SIGKILL after --stop_grace_s), then delete the slice, but only if this launch
     created it (its create succeeded) and not --keep.

A dropped ssh connection (exit 255) is retried (--ssh_retries), never taken for a failure.
With --detach the launcher returns once the run has started; a created slice is then deleted
by worker 0 when every trainer has exited. Follow and end a run from any machine:

  python -m launch.tpu_pod status --name=m32-a --zone=us-east5-a
  python -m launch.tpu_pod logs --workdir=gs://my-bucket/m32-a [--worker=0]
  python -m launch.tpu_pod stop --name=m32-a --zone=us-east5-a  # deletes it if made from here

  python -m launch.tpu_pod --name=m32-a --zone=us-east5-a --accelerator_type=v5p-64 \\
      --queued --spot --config=configs/yuan_m32.py --workdir=gs://my-bucket/m32-a \\
      --config.mesh.expert=8

Flags follow `gcloud compute tpus tpu-vm create` and `gcloud compute tpus queued-resources
create` (cloud.google.com/sdk/gcloud/reference/compute/tpus/...): --spot, --reserved,
--valid-until-duration, --service-account, --scopes are passed through as they are.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from launch import common

# Default runtime (TPU software version) per generation, from the Cloud TPU docs.
RUNTIMES = {
    'v6e': 'v2-alpha-tpuv6e',
    'v5p': 'v2-alpha-tpuv5',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v4': 'tpu-ubuntu2204-base'
}
REMOTE_DIR = '"$HOME/yuanjax"'  # quoted for the remote shell; ~ would not expand inside quotes
TARBALL = 'yuanjax.tgz'  # in the remote home directory
WORKER = 'bash "$HOME/yuanjax/launch/tpu_worker.sh"'
EXIT_RE = re.compile(r'worker-(\d+)-of-(\d+)\.exit-(\d+)$')
PREEMPTED = {'SUSPENDING', 'SUSPENDED', 'PREEMPTED', 'TERMINATED'}  # QR / TPU node states
SSH_DROPPED = 255  # ssh's own status for a lost connection
COMMANDS = ('status', 'logs', 'stop')


class Failed(Exception):

  def __init__(self, rc: int, message: str):
    super().__init__(message)
    self.rc = rc


# ------------------------------------------------------------------------------- flags


def _where_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument('--name', required=True, help='TPU (and queued resource) name')
  p.add_argument('--zone', required=True)
  p.add_argument('--project', default=None, help='GCP project (default: gcloud\'s)')
  p.add_argument(
      '--local_dir', default=None, help='local folder for the tarball and the record '
      'of what this machine created (default: $TMPDIR/yuanjax-tpu/NAME)')


def parse(argv=None):
  p = common.parser(__doc__)
  _where_flags(p)
  p.add_argument('--accelerator_type', default=None, help='e.g. v5p-64, v6e-32, v4-16')
  p.add_argument(
      '--version', default=None, help='TPU software version; default by generation: ' +
      ', '.join(f'{k}: {v}' for k, v in RUNTIMES.items()))
  p.add_argument('--queued', action='store_true',
                 help='ask for the slice with `queued-resources create` and wait for it')
  p.add_argument('--reuse', action='store_true',
                 help='run on the existing slice NAME (kept, or made elsewhere); never delete it')
  p.add_argument('--keep', action='store_true', help='do not delete the slice at the end')
  p.add_argument(
      '--detach', action='store_true',
      help='return once the run has started (worker 0 deletes a created slice at '
      'the end)')
  p.add_argument('--spot', action='store_true', help='Spot capacity (cheaper; can be preempted)')
  p.add_argument('--reserved', action='store_true', help='use the project\'s reservation')
  p.add_argument('--valid_until_duration', default=None,
                 help='with --queued: the request expires if not filled by then, e.g. 6h')
  p.add_argument('--service_account', default=None, help='the workers\' service account')
  p.add_argument('--scopes', default=None, help='the workers\' access scopes, comma-separated')
  p.add_argument('--libtpu_init_args', default=None, help='LIBTPU_INIT_ARGS for the trainers')
  p.add_argument('--max_restarts', type=int, default=3,
                 help='resubmissions after a preemption (default 3)')
  p.add_argument('--queue_timeout_s', type=float, default=6 * 3600,
                 help='give up (and delete the request) after waiting this long (default 6 h)')
  p.add_argument('--stop_grace_s', type=int, default=300,
                 help='how long a stopped trainer gets to save its checkpoint (default 300)')
  p.add_argument('--poll_s', type=float, default=60, help='seconds between polls (default 60)')
  p.add_argument('--ssh_retries', type=int, default=5,
                 help='retries of an ssh call whose connection dropped (default 5)')
  p.add_argument(
      '--remote_python', default='python3.11',
      help='python on the workers that builds the venv (jax needs >= 3.11); '
      'installed with apt when it cannot make a venv')
  args = common.parse(p, argv)
  _check(p, args)
  return args


def _check(p, args) -> None:
  if not args.workdir.startswith('gs://'):
    p.error(f'--workdir={args.workdir}: must be gs://BUCKET/PATH on a TPU pod (every worker '
            'writes there, and the workers\' disks are deleted with the slice)')
  if not re.fullmatch(r'[a-z]([-a-z0-9]*[a-z0-9])?', args.name):
    p.error(f'--name={args.name}: use lowercase letters, digits and hyphens, starting with a '
            'letter')
  if args.reuse:
    for flag in ('queued', 'spot', 'reserved', 'valid_until_duration', 'service_account', 'scopes'):
      if getattr(args, flag):
        p.error(f'--{flag}: not with --reuse (it only applies to a slice this launch creates)')
  elif not args.accelerator_type:
    p.error('--accelerator_type is required (unless --reuse)')
  if args.spot and args.reserved:
    p.error('--spot and --reserved: choose one')
  if args.valid_until_duration and not args.queued:
    p.error('--valid_until_duration: only with --queued')
  for flag in ('max_restarts', 'ssh_retries', 'stop_grace_s'):
    if getattr(args, flag) < 0:
      p.error(f'--{flag}={getattr(args, flag)}: must be >= 0')
  if args.version is None and not args.reuse:
    generation = args.accelerator_type.rpartition('-')[0]
    if generation not in RUNTIMES:
      p.error(f'--accelerator_type={args.accelerator_type}: no default runtime for '
              f'{generation!r}; give --version')
    args.version = RUNTIMES[generation]
  rel = os.path.relpath(os.path.abspath(args.config_path), common.REPO)
  if rel.startswith('..'):
    p.error(f'--config={args.config}: must be a file inside {common.REPO} (the repo is what '
            'is copied to the workers)')
  args.config = rel + args.config[len(args.config_path):]  # keep any :variant
  args.local_dir = local_dir(args)


def local_dir(args) -> str:
  return os.path.abspath(args.local_dir or
                         os.path.join(tempfile.gettempdir(), 'yuanjax-tpu', args.name))


def remote(*lines: str) -> str:
  """One line of shell for `ssh --command` (one line, so that the dry run is one per line)."""
  return '; '.join(('set -euo pipefail',) + lines)


def log_url(args) -> str:
  return args.workdir.rstrip('/') + '/worker_logs'


# ------------------------------------------------------------------------------- gcloud


@dataclasses.dataclass
class Gcloud:
  """Runs gcloud (or, dry, prints each command, one per line, and runs nothing)."""
  name: str
  zone: str
  project: str | None = None
  dry_run: bool = False
  poll_s: float = 60
  ssh_retries: int = 5

  @property
  def where(self) -> list[str]:
    return [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])

  def tpus(self, *words: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', *words]

  def run(self, argv: list[str], capture: bool = False) -> tuple[int, str]:
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return 0, ''
    common.say(f'+ {shlex.join(argv)}')
    if not capture:
      return subprocess.call(argv), ''
    r = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    return r.returncode, r.stdout

  def must(self, argv: list[str], what: str) -> str:
    rc, out = self.run(argv, capture=True)
    if rc:
      raise Failed(rc, f'{what} failed with exit status {rc}: {shlex.join(argv)}')
    return out

  def ssh(self, command: str, what: str, worker: str = 'all') -> None:
    """ssh on the workers; a dropped connection (255) is retried, other failures raise."""
    argv = [
        *self.tpus('tpu-vm', 'ssh', self.name), f'--worker={worker}', f'--command={command}',
        *self.where
    ]
    for attempt in range(self.ssh_retries + 1):
      rc, _ = self.run(argv)
      if rc != SSH_DROPPED:
        break
      common.say(f'{what}: ssh connection dropped (exit 255); retry {attempt + 1} of '
                 f'{self.ssh_retries}')
      time.sleep(self.poll_s)
    if rc:
      raise Failed(rc, f'{what} failed with exit status {rc}')

  def state(self, queued: bool) -> str:
    """The queued resource's state (queued) or the TPU node's; '' when it cannot be read."""
    if queued:
      argv = self.tpus('queued-resources', 'describe', self.name, '--format=value(state.state)')
    else:
      argv = self.tpus('tpu-vm', 'describe', self.name, '--format=value(state)')
    rc, out = self.run(argv + self.where, capture=True)
    return out.strip() if rc == 0 else ''

  def delete_argv(self, queued: bool) -> list[str]:
    if queued:
      return [
          *self.tpus('queued-resources', 'delete', self.name, '--force', '--quiet'), *self.where
      ]
    return [*self.tpus('tpu-vm', 'delete', self.name, '--quiet'), *self.where]


def gcloud_for(args) -> Gcloud:
  return Gcloud(args.name, args.zone, args.project, getattr(args, 'dry_run', False),
                getattr(args, 'poll_s', 60), getattr(args, 'ssh_retries', 5))


# -------------------------------------------------------------------- what this machine owns


def _owned_path(args) -> str:
  return os.path.join(args.local_dir, 'created.json')


def record_created(args, queued: bool) -> None:
  """Written the moment a create succeeded: only then may a cleanup or `stop` delete."""
  os.makedirs(args.local_dir, exist_ok=True)
  with open(_owned_path(args), 'w') as f:
    json.dump({'name': args.name, 'zone': args.zone, 'queued': queued}, f)


def created_here(args) -> dict | None:
  try:
    with open(_owned_path(args)) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  return record if (record['name'], record['zone']) == (args.name, args.zone) else None


def delete(args, g: Gcloud, queued: bool) -> None:
  rc, _ = g.run(g.delete_argv(queued))
  if rc:
    common.say(f'deleting {args.name} failed with exit status {rc}; delete it by hand: ' +
               shlex.join(g.delete_argv(queued)))
  elif not g.dry_run:
    os.remove(_owned_path(args))


# ------------------------------------------------------------------------------- the steps


def check_bucket(args, g: Gcloud) -> None:
  """Can WORKDIR be written? Checked with this machine's credentials, before any create."""
  probe = os.path.join(args.local_dir, 'write_check')
  if not g.dry_run:
    os.makedirs(args.local_dir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('yuanjax launch write check\n')
  url = f'{args.workdir.rstrip("/")}/.write_check/launcher'
  g.must(['gcloud', 'storage', 'cp', probe, url], f'writing to --workdir={args.workdir}')
  g.run(['gcloud', 'storage', 'rm', url])


def pack(args, g: Gcloud) -> None:
  q, tarball = shlex.quote, os.path.join(args.local_dir, TARBALL)
  g.must([
      'bash', '-c', f'set -euo pipefail; mkdir -p {q(args.local_dir)}; cd {q(common.REPO)}; '
      'git ls-files -z --cached --others --exclude-standard '
      f'| tar -czf {q(tarball)} --null --ignore-failed-read -T -'
  ], 'packing the repo')


def create_argv(args, g: Gcloud) -> list[str]:
  capacity = [f for f, on in (('--spot', args.spot), ('--reserved', args.reserved)) if on]
  capacity += [
      f'--{k.replace("_", "-")}={v}' for k in ('valid_until_duration', 'service_account', 'scopes')
      if (v := getattr(args, k))
  ]
  if args.queued:
    return [
        *g.tpus('queued-resources', 'create', args.name), f'--node-id={args.name}',
        f'--accelerator-type={args.accelerator_type}', f'--runtime-version={args.version}',
        *capacity, *g.where
    ]
  return [
      *g.tpus('tpu-vm', 'create', args.name), f'--accelerator-type={args.accelerator_type}',
      f'--version={args.version}', *capacity, *g.where
  ]


def create(args, g: Gcloud) -> None:
  """Creates the slice; ALREADY_EXISTS (or any failure) raises, and nothing is ours to delete."""
  g.must(create_argv(args, g), f'creating {args.name}')
  if not g.dry_run:
    record_created(args, args.queued)


def wait_active(args, g: Gcloud) -> None:
  deadline = time.monotonic() + args.queue_timeout_s
  while True:
    state = g.state(queued=True)
    common.say(f'queued resource {args.name}: {state or "?"}')
    if state == 'ACTIVE' or g.dry_run:
      return
    if state in ('FAILED', 'SUSPENDED'):
      raise Failed(1, f'queued resource {args.name} is {state}')
    if time.monotonic() > deadline:
      raise Failed(
          1, f'queued resource {args.name} not ACTIVE after {args.queue_timeout_s:g} s '
          '(--queue_timeout_s)')
    stopping()
    time.sleep(args.poll_s)


def check_reusable(args, g: Gcloud) -> None:
  state = g.state(queued=False)
  if not g.dry_run and state != 'READY':
    raise Failed(1, f'--reuse: no READY slice {args.name} in {args.zone} (state {state or "none"})')


def install(args, g: Gcloud) -> None:
  """Checks the workers can write WORKDIR, copies the repo, builds the venv (keeps a venv)."""
  url = shlex.quote(f'{args.workdir.rstrip("/")}/.write_check/')
  g.ssh(remote(f'echo ok | gcloud storage cp - {url}"$(hostname)"'),
        'the workers\' write check of --workdir (their service account and scopes)')
  g.must([
      *g.tpus('tpu-vm', 'scp', os.path.join(args.local_dir, TARBALL), f'{args.name}:{TARBALL}'),
      '--worker=all', *g.where
  ], 'copying the repo')
  busy = ('if pid=$(cat "$HOME/yuanjax-run/pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; '
          'then echo "$(hostname): a run is going (pid $pid); stop it first" >&2; exit 3; fi')
  g.ssh(
      remote(busy, f'mkdir -p {REMOTE_DIR}',
             f'find {REMOTE_DIR} -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +',
             f'tar -xzf "$HOME/{TARBALL}" -C {REMOTE_DIR}', f'cd {REMOTE_DIR}',
             f'bash launch/tpu_worker.sh install {shlex.quote(args.remote_python)}'), 'installing')


def train_argv(args) -> list[str]:
  env = ['env', f'LIBTPU_INIT_ARGS={args.libtpu_init_args}'] if args.libtpu_init_args else []
  return env + common.train_argv('.venv/bin/python', args.config, args.workdir, args.overrides)


def start(args, g: Gcloud, created: bool) -> None:
  g.run(['gcloud', 'storage', 'rm', f'{log_url(args)}/*.exit-*'])  # a previous attempt's
  on_exit = ''
  if created and not args.keep:  # worker 0 deletes the slice when every trainer has exited
    on_exit = shlex.join(g.delete_argv(args.queued) + ['--async'])
  g.ssh(
      remote(f'{WORKER} start {shlex.quote(log_url(args))} {shlex.quote(on_exit)} -- ' +
             shlex.join(train_argv(args))), 'starting the run')


def exits(args, g: Gcloud) -> tuple[dict[int, int], int]:
  """{worker: exit status} of the workers that have finished, and the number of workers."""
  _, out = g.run(['gcloud', 'storage', 'ls', f'{log_url(args)}/'], capture=True)
  found, count = {}, 0
  for line in out.splitlines():
    if m := EXIT_RE.search(line.strip()):
      found[int(m[1])], count = int(m[3]), int(m[2])
  return found, count


def follow(args, g: Gcloud) -> str:
  """Until the run ends: 'done', 'failed' or 'preempted'."""
  while True:
    found, count = exits(args, g)
    if failed := {w: rc for w, rc in found.items() if rc}:
      common.say(f'worker(s) failed: {failed}; logs in {log_url(args)}/')
      return 'failed'
    if count and len(found) == count:
      return 'done'
    state = g.state(queued=args.queued)
    if state in PREEMPTED:
      common.say(f'{args.name} is {state}: preempted')
      return 'preempted'
    if g.dry_run:
      return 'done'
    stopping()
    time.sleep(args.poll_s)


def stopping() -> None:
  """A sweep running this launch in a thread was interrupted: stop like after Ctrl-C."""
  if common.STOP.is_set():
    raise KeyboardInterrupt


def stop_trainers(args, g: Gcloud) -> None:
  """SIGTERM to every trainer; each gets stop_grace_s to save its checkpoint."""
  try:
    g.ssh(f'{WORKER} stop {args.stop_grace_s}', 'stopping the trainers')
  except Failed as e:
    common.say(f'{e}; going on')


# ------------------------------------------------------------------------------- launch


def launch(args) -> int:
  g = gcloud_for(args)
  ours, running, outcome, restarts = False, False, None, 0
  handlers = common.exit_on_signals()
  try:
    check_bucket(args, g)
    pack(args, g)
    if args.reuse:
      check_reusable(args, g)
    while True:
      if not args.reuse:
        create(args, g)
        ours = True
        if args.queued:
          wait_active(args, g)
      stopping()
      install(args, g)
      stopping()
      running = True
      start(args, g, created=ours)
      if args.detach:
        common.say(f'started; follow with: python -m launch.tpu_pod logs --workdir={args.workdir}')
        ours = running = False  # worker 0 deletes it at the end
        return 0
      outcome = follow(args, g)
      if outcome != 'preempted':
        return 0 if outcome == 'done' else 1
      running = False
      if args.reuse or restarts >= args.max_restarts:
        raise Failed(
            1, f'preempted, and {restarts} of --max_restarts={args.max_restarts} '
            'restarts used' + (' (--reuse: not resubmitted)' if args.reuse else ''))
      restarts += 1
      common.say(f'resubmitting {args.name} (restart {restarts} of {args.max_restarts})')
      delete(args, g, args.queued)
      ours = False
  except Failed as e:
    common.say(str(e))
    return e.rc
  except KeyboardInterrupt:
    common.say('interrupted')
    return 130
  except SystemExit as e:
    common.say(f'signal: exit status {e.code}')
    return e.code if isinstance(e.code, int) else 1
  finally:
    if running and outcome != 'done':
      stop_trainers(args, g)
    if ours and not args.keep:
      delete(args, g, args.queued)
    common.restore_signals(handlers)


# ------------------------------------------------------------------------- status/logs/stop


def control(command: str, argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog=f'python -m launch.tpu_pod {command}', allow_abbrev=False)
  if command == 'logs':
    p.add_argument('--workdir', required=True, help='the run\'s gs://BUCKET/PATH')
    p.add_argument('--worker', default='*', help='worker number (default: all)')
  else:
    _where_flags(p)
  if command == 'stop':
    p.add_argument('--stop_grace_s', type=int, default=300)
    p.add_argument('--keep', action='store_true', help='stop the run, keep the slice')
  args = p.parse_args(argv)
  if command == 'logs':
    return subprocess.call([
        'gcloud', 'storage', 'cat', f'{log_url(args)}/worker-{args.worker}-of-*.log'
    ])
  args.local_dir = local_dir(args)
  g = gcloud_for(args)
  if command == 'status':
    g.run([*g.tpus('tpu-vm', 'describe', args.name, '--format=value(state)'), *g.where])
    return subprocess.call([
        *g.tpus('tpu-vm', 'ssh', args.name), '--worker=all', f'--command={WORKER} status', *g.where
    ])
  stop_trainers(args, g)
  record = created_here(args)
  if record and not args.keep:
    delete(args, g, record['queued'])
  elif not args.keep:
    common.say(f'{args.name} was not created from this machine ({_owned_path(args)}): not deleted')
  return 0


def plan(args) -> common.Plan:
  """For launch.sweep: the launch as a plan that common.execute runs (in a thread, too)."""

  def call(dry_run: bool) -> int:
    args.dry_run = dry_run
    return launch(args)

  return common.Plan(steps=[], call=call)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] in COMMANDS:
    return control(argv[0], argv[1:])
  return launch(parse(argv))


if __name__ == '__main__':
  sys.exit(main())
