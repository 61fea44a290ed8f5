"""Runs yuanjax.train on a Cloud TPU slice, detached on the workers; follow, stop, clean up.

  1. check that WORKDIR (gs://) is writable, before anything is created;
     and that the config fits the slice(s) (the pre-flight: yuanjax.plan, and prod(mesh.dcn)
     == --num_slices; refused with the fix it finds unless --force);
  2. pack this working tree (tracked files as they are on disk, so uncommitted edits go too;
     untracked ones only with --include_untracked) into LOCAL_DIR/yuanjax.tgz;
  3. create the slice (`tpu-vm create`), or with --queued ask for it as a queued resource and
     wait until it is ACTIVE (at most --queue_timeout_s); --num_slices=N asks for N slices in
     one queued resource (--node-count, --node-prefix: nodes NAME-0 ... NAME-<N-1>); with
     --reuse use an existing slice (one kept with --keep, or made elsewhere) instead, and
     never delete it. The create runs in its own session and Ctrl-C waits for it to return,
     so that what it made is recorded and deleted, not left billing;
  4. check from every worker that its service account can write WORKDIR, copy the tarball,
     unpack it to ~/yuanjax and build ~/yuanjax/.venv (launch/tpu_worker.sh install: waits
     for the dpkg lock that first-boot apt holds);
  5. start the SAME command on every worker, detached (launch/tpu_worker.sh start: a
     supervisor in its own session; the ssh call returns at once):
     [env LIBTPU_INIT_ARGS=...] .venv/bin/python -u -m yuanjax.train --config=... --workdir=gs://...
     Each worker copies its log to WORKDIR/worker_logs/worker-I-of-N.log (with several slices
     slice-S-of-M-worker-I-of-N.log; those get MEGASCALE_* set) as it goes and writes
     ...exit-RC there at the end;
  6. follow: poll those exit files (and the slice's state) every --poll_s seconds. A
     preempted Spot slice (queued resource SUSPENDED, TPU PREEMPTED), or one that cannot be
     read three polls in a row (gone), is deleted and asked for again, then installed and
     started again: the trainer resumes from the newest checkpoint in WORKDIR; a READY slice
     whose trainers are gone without an exit file (a maintenance reboot; checked over ssh
     every CHECK_EVERY polls) is started again; at most --max_restarts times in all;
  7. at the end, or on a failure, Ctrl-C or SIGTERM: SIGTERM to every trainer (they save a
     checkpoint; SIGKILL after --stop_grace_s), then delete the slice, but only if this launch
     created it (its create succeeded) and not --keep. Further signals wait for that cleanup.

A dropped ssh or scp connection (exit 255) is retried (--ssh_retries), never taken for a
failure; every gcloud call has a timeout.
With --detach the launcher returns once the run has started; a created slice is then deleted
by worker 0 when every trainer has exited. Follow and end a run from any machine:

  python -m launch.tpu_pod status --name=m32-a --zone=us-east5-a
  python -m launch.tpu_pod logs --workdir=gs://my-bucket/m32-a [--worker=0]
  python -m launch.tpu_pod stop --name=m32-a --zone=us-east5-a  # deletes it if made from here

  python -m launch.tpu_pod --name=m32-a --zone=us-east5-a --accelerator_type=v5p-64 \\
      --queued --spot --config=configs/yuan_m32.py --workdir=gs://my-bucket/m32-a \\
      --config.mesh.fsdp=4 --config.mesh.expert=8 --config.model.remat=full \\
      --config.train.grad_accum=16

Flags follow `gcloud compute tpus tpu-vm create` and `gcloud compute tpus queued-resources
create` (cloud.google.com/sdk/gcloud/reference/compute/tpus/...): --spot, --reserved,
--valid-until-duration, --service-account are passed through as they are; --scopes short
names (cloud-platform) become full https://www.googleapis.com/auth/... URIs.
"""
from __future__ import annotations

import argparse
import contextlib
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
from yuanjax import publish

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
# worker-I-of-N.exit-RC, or with several slices slice-S-of-M-worker-I-of-N.exit-RC
EXIT_RE = re.compile(r'(?:slice-(\d+)-of-(\d+)-)?worker-(\d+)-of-(\d+)\.exit-(\d+)$')
PREEMPTED = {'SUSPENDING', 'SUSPENDED', 'PREEMPTED', 'TERMINATED'}  # QR / TPU node states
GONE = {'DELETING', ''}  # being deleted, or cannot be read (NOT_FOUND)
GONE_AFTER = 3  # polls in a row that cannot read the slice before it counts as gone
CHECK_EVERY = 10  # polls between ssh checks that the trainers still run (a reboot kills them)
SSH_DROPPED = 255  # ssh's own status for a lost connection
MEGASCALE_PORT = 8080  # MaxText's multihost_runner and Ray's TPU support use 8080
EXIT_MARGIN_S = 120  # worker 0 waits stop_grace_s + this for the other workers' exit files
TIMEOUT_S = 600  # any gcloud call but these:
LONG_TIMEOUT_S = {'create': 3600, 'install': 3 * 3600}
SCOPES_URI = 'https://www.googleapis.com/auth/'

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
  _slice_flags(p)
  _lifetime_flags(p)
  _capacity_flags(p)
  _run_flags(p)
  common.fit_flag(p)
  args = common.parse(p, argv)
  _check(p, args)
  _preflight(p, args)
  return args


def _slice_flags(p: argparse.ArgumentParser) -> None:
  """What is created: the slice(s) and their software."""
  p.add_argument('--accelerator_type', default=None, help='e.g. v5p-64, v6e-32, v4-16')
  p.add_argument(
      '--version', default=None, help='TPU software version; default by generation: ' +
      ', '.join(f'{k}: {v}' for k, v in RUNTIMES.items()))
  p.add_argument('--queued', action='store_true',
                 help='ask for the slice with `queued-resources create` and wait for it')
  p.add_argument(
      '--num_slices', type=int, default=1,
      help='slices joined over DCN (multi-slice; needs --queued and '
      'prod(config.mesh.dcn) == N)')


def _lifetime_flags(p: argparse.ArgumentParser) -> None:
  """What is packed, and whose slice it is at the end."""
  p.add_argument('--include_untracked', action='store_true',
                 help='also pack untracked files git does not ignore (they may hold secrets)')
  p.add_argument('--reuse', action='store_true',
                 help='run on the existing slice NAME (kept, or made elsewhere); never delete it')
  p.add_argument('--keep', action='store_true', help='do not delete the slice at the end')
  p.add_argument(
      '--detach', action='store_true',
      help='return once the run has started (worker 0 deletes a created slice at '
      'the end)')


def _capacity_flags(p: argparse.ArgumentParser) -> None:
  """How the slice is paid for, and the workers' identity."""
  p.add_argument('--spot', action='store_true', help='Spot capacity (cheaper; can be preempted)')
  p.add_argument('--reserved', action='store_true', help='use the project\'s reservation')
  p.add_argument('--valid_until_duration', default=None,
                 help='with --queued: the request expires if not filled by then, e.g. 6h')
  p.add_argument('--service_account', default=None, help='the workers\' service account')
  p.add_argument('--scopes', default=None, help='the workers\' access scopes, comma-separated')


def _run_flags(p: argparse.ArgumentParser) -> None:
  """How the launch runs, follows, restarts and stops the trainers."""
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


def _preflight(p, args) -> None:
  if args.accelerator_type:  # with --reuse: give it for the pre-flight
    try:
      target = common.tpu_target(args.accelerator_type, args.num_slices)
    except ValueError as e:
      p.error(f'--accelerator_type={e}')
    common.preflight(p, args, target)
  else:
    common.say('pre-flight skipped: --reuse without --accelerator_type')


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
  if args.num_slices < 1:
    p.error(f'--num_slices={args.num_slices}: must be at least 1')
  if args.num_slices > 1 and (args.reuse or not args.queued):
    p.error(f'--num_slices={args.num_slices}: needs --queued (one queued resource holds the '
            'slices), not --reuse')
  if args.scopes:
    args.scopes = ','.join(s if '://' in s else SCOPES_URI + s for s in args.scopes.split(','))
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
  slices: int = 1  # > 1: one queued resource NAME holding nodes NAME-0 ... NAME-<slices-1>

  @property
  def where(self) -> list[str]:
    return [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])

  @property
  def nodes(self) -> list[str]:
    return [f'{self.name}-{i}' for i in range(self.slices)] if self.slices > 1 else [self.name]

  def tpus(self, *words: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', *words]

  def run(self, argv: list[str], capture: bool = False, timeout: float = TIMEOUT_S,
          own_session: bool = False, echo: bool = False) -> tuple[int, str]:
    """(exit status, stdout if captured); 124 after `timeout` seconds (the call is killed).
    own_session: Ctrl-C at the terminal does not reach it (a create or delete carries on
    server-side whatever happens to gcloud, so gcloud must live to report it). echo: stdout
    and stderr captured together (to read an error code in them), then printed to stderr."""
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return 0, ''
    common.say(f'+ {shlex.join(argv)}')
    try:
      r = subprocess.run(argv, stdout=subprocess.PIPE if capture or echo else None,
                         stderr=subprocess.STDOUT if echo else None, text=True, timeout=timeout,
                         start_new_session=own_session)
    except subprocess.TimeoutExpired:
      common.say(f'timed out after {timeout:g} s: {shlex.join(argv)}')
      return 124, ''
    if echo:
      sys.stderr.write(r.stdout)
    return r.returncode, r.stdout or ''

  def must(self, argv: list[str], what: str, **kw) -> str:
    rc, out = self.run(argv, capture=True, **kw)
    if rc:
      raise Failed(rc, f'{what} failed with exit status {rc}: {shlex.join(argv)}')
    return out

  def retried(self, argv: list[str], what: str, **kw) -> str:
    """Runs argv; a dropped connection (255) is retried, other failures raise."""
    for attempt in range(self.ssh_retries + 1):
      rc, out = self.run(argv, **kw)
      if rc != SSH_DROPPED:
        break
      common.say(f'{what}: connection dropped (exit 255); retry {attempt + 1} of '
                 f'{self.ssh_retries}')
      time.sleep(self.poll_s)
    if rc:
      raise Failed(rc, f'{what} failed with exit status {rc}')
    return out

  def ssh_argv(self, command: str, node: str | None = None) -> list[str]:
    """On every worker: of the slice (one slice, or `node`), or of every node (several)."""
    if self.slices > 1 and node is None:
      return [
          *self.tpus('queued-resources', 'ssh', self.name), '--node=all', '--worker=all',
          f'--command={command}', *self.where
      ]
    return [
        *self.tpus('tpu-vm', 'ssh', node or self.name), '--worker=all', f'--command={command}',
        *self.where
    ]

  def ssh(self, command: str, what: str, node: str | None = None, **kw) -> str:
    return self.retried(self.ssh_argv(command, node), what, **kw)

  def scp(self, src: str, dst: str, what: str) -> None:
    kind, nodes = ('queued-resources', ['--node=all']) if self.slices > 1 else ('tpu-vm', [])
    self.retried(
        [*self.tpus(kind, 'scp', src, f'{self.name}:{dst}'), *nodes, '--worker=all', *self.where],
        what)

  def describe(self, queued: bool, field: str, name: str | None = None) -> str:
    """One field of the queued resource (queued) or TPU node; '' when it cannot be read."""
    kind = 'queued-resources' if queued else 'tpu-vm'
    argv = self.tpus(kind, 'describe', name or self.name, f'--format=value({field})')
    rc, out = self.run(argv + self.where, capture=True)
    return out.strip() if rc == 0 else ''

  def state(self, queued: bool) -> str:
    return self.describe(queued, 'state.state' if queued else 'state')

  def delete_argv(self, queued: bool) -> list[str]:
    if queued:
      return [
          *self.tpus('queued-resources', 'delete', self.name, '--force', '--quiet'), *self.where
      ]
    return [*self.tpus('tpu-vm', 'delete', self.name, '--quiet'), *self.where]


def gcloud_for(args) -> Gcloud:
  return Gcloud(args.name, args.zone, args.project, getattr(args, 'dry_run', False),
                getattr(args, 'poll_s', 60), getattr(args, 'ssh_retries', 5),
                getattr(args, 'num_slices', 1))


# -------------------------------------------------------------------- what this machine owns


def _owned_path(args) -> str:
  return os.path.join(args.local_dir, 'created.json')


def record_created(args, create_time: str) -> None:
  """Written the moment this launch's create made the slice: only then may a cleanup or `stop`
  delete. It names the resource fully (project, zone, name) and by its createTime, so that a
  later slice of the same name is never taken for it."""
  os.makedirs(args.local_dir, exist_ok=True)
  record = dict(name=args.name, zone=args.zone, project=args.project, queued=args.queued,
                slices=args.num_slices, create_time=create_time)
  publish.file(_owned_path(args), json.dumps(record).encode())


def created_here(args) -> dict | None:
  try:
    with open(_owned_path(args)) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  same = (record['name'], record['zone'], record.get('project')) == (args.name, args.zone,
                                                                     args.project)
  return record if same else None


def forget(args) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(_owned_path(args))


def delete(args, g: Gcloud, queued: bool) -> None:
  rc, _ = g.run(g.delete_argv(queued), own_session=True)
  if rc and g.state(queued) in GONE:  # worker 0's delete got there first
    common.say(f'{args.name} is already gone or being deleted')
  elif rc:
    common.say(f'deleting {args.name} failed with exit status {rc}; delete it by hand: ' +
               shlex.join(g.delete_argv(queued)))
    return
  if not g.dry_run:
    forget(args)


# ------------------------------------------------------------------------------- the steps


def check_bucket(args, g: Gcloud) -> None:
  """Can WORKDIR be written? Checked with this machine's credentials, before any create."""
  probe = os.path.join(args.local_dir, 'write_check')
  if not g.dry_run:
    os.makedirs(args.local_dir, exist_ok=True)
    publish.file(probe, b'yuanjax launch write check\n')
  url = f'{args.workdir.rstrip("/")}/.write_check/launcher'
  g.must(['gcloud', 'storage', 'cp', probe, url], f'writing to --workdir={args.workdir}')
  g.run(['gcloud', 'storage', 'rm', url])


def pack(args, g: Gcloud) -> None:
  q, tarball = shlex.quote, os.path.join(args.local_dir, TARBALL)
  others = ' --others --exclude-standard' if args.include_untracked else ''
  g.must([
      'bash', '-c', f'set -euo pipefail; mkdir -p {q(args.local_dir)}; cd {q(common.REPO)}; '
      f'git ls-files -z --cached{others} '
      f'| tar -czf {q(tarball)} --null --ignore-failed-read -T -'
  ], 'packing the repo')


def create_argv(args, g: Gcloud) -> list[str]:
  capacity = [f for f, on in (('--spot', args.spot), ('--reserved', args.reserved)) if on]
  capacity += [
      f'--{k.replace("_", "-")}={v}' for k in ('valid_until_duration', 'service_account', 'scopes')
      if (v := getattr(args, k))
  ]
  if args.queued:
    nodes = ([f'--node-count={args.num_slices}', f'--node-prefix={args.name}']
             if args.num_slices > 1 else [f'--node-id={args.name}'])
    return [
        *g.tpus('queued-resources', 'create', args.name), *nodes,
        f'--accelerator-type={args.accelerator_type}', f'--runtime-version={args.version}',
        *capacity, *g.where
    ]
  return [
      *g.tpus('tpu-vm', 'create', args.name), f'--accelerator-type={args.accelerator_type}',
      f'--version={args.version}', *capacity, *g.where
  ]


def create(args, g: Gcloud) -> None:
  """Creates the slice and records it as this launch's. A slice of that name already there is
  refused (it is not ours to delete). A create that fails or times out once the server has
  begun it (anything but ALREADY_EXISTS) can leave the slice all the same, billing: if it is
  there afterwards, it is recorded and deleted before the failure is raised. gcloud runs in a
  session of its own, so that a Ctrl-C at the terminal leaves it to return (the launch defers
  signals meanwhile and then deletes what it made)."""
  if not g.dry_run and g.describe(args.queued, 'createTime'):
    raise Failed(
        1, f'{args.name} already exists in {args.zone}: not created, and not deleted '
        '(not this launch\'s); choose another --name')
  rc, out = g.run(create_argv(args, g), own_session=True, timeout=LONG_TIMEOUT_S['create'],
                  echo=True)
  if g.dry_run:
    return
  made = '' if 'ALREADY_EXISTS' in out else g.describe(args.queued, 'createTime')
  if made:
    record_created(args, made)
  if rc:
    failed_create(args, g, rc, made)


def failed_create(args, g: Gcloud, rc: int, made: str) -> None:
  if made:
    common.say(f'{args.name} exists all the same (createTime {made}): deleting it')
    delete(args, g, args.queued)
  raise Failed(rc, f'creating {args.name} failed with exit status {rc}')


def wait_active(args, g: Gcloud) -> None:
  deadline = time.monotonic() + args.queue_timeout_s
  while True:
    state = g.state(queued=True)
    common.say(f'queued resource {args.name}: {state or "?"}')
    if state == 'ACTIVE' or g.dry_run:
      return
    if state in ('FAILED', 'SUSPENDED'):
      why = g.describe(True, 'state.failedData.error') if state == 'FAILED' else ''
      raise Failed(1, f'queued resource {args.name} is {state}' + (f': {why}' if why else ''))
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


# A run is going when the pid file's boot id is this boot's and its process lives (after a
# reboot the pid may belong to another process). tpu_worker.sh's alive() checks the same.
BUSY = ('if read -r pid boot <"$HOME/yuanjax-run/pid" 2>/dev/null && '
        '[[ $boot == "$(cat /proc/sys/kernel/random/boot_id)" ]] && kill -0 "$pid" 2>/dev/null; '
        'then echo "$(hostname): a run is going (pid $pid); stop it first" >&2; exit 3; fi')


def install(args, g: Gcloud) -> None:
  """Checks the workers can write WORKDIR, copies the repo, builds the venv (keeps a venv)."""
  url = shlex.quote(f'{args.workdir.rstrip("/")}/.write_check/')
  g.ssh(remote(f'echo ok | gcloud storage cp - {url}"$(hostname)"'),
        'the workers\' write check of --workdir (their service account and scopes)')
  g.scp(os.path.join(args.local_dir, TARBALL), TARBALL, 'copying the repo')
  g.ssh(
      remote(BUSY, f'mkdir -p {REMOTE_DIR}',
             f'find {REMOTE_DIR} -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +',
             f'tar -xzf "$HOME/{TARBALL}" -C {REMOTE_DIR}', f'cd {REMOTE_DIR}',
             f'bash launch/tpu_worker.sh install {shlex.quote(args.remote_python)}'), 'installing',
      timeout=LONG_TIMEOUT_S['install'])


def train_argv(args) -> list[str]:
  env = ['env', f'LIBTPU_INIT_ARGS={args.libtpu_init_args}'] if args.libtpu_init_args else []
  return env + common.train_argv('.venv/bin/python', args.config, args.workdir, args.overrides)


def megascale_env(args, g: Gcloud, slice_id: int, coordinator: str) -> list[str]:
  """MaxText's multihost_runner settings for slice `slice_id` of several; none for one."""
  if args.num_slices == 1:
    return []
  return [
      f'MEGASCALE_COORDINATOR_ADDRESS={coordinator}:{MEGASCALE_PORT}',
      f'MEGASCALE_NUM_SLICES={args.num_slices}', f'MEGASCALE_PORT={MEGASCALE_PORT}',
      f'MEGASCALE_SLICE_ID={slice_id}'
  ]


def coordinator_ip(args, g: Gcloud) -> str:
  """Worker 0 of slice 0: the MEGASCALE coordinator."""
  if args.num_slices == 1:
    return ''
  ip = g.describe(False, 'networkEndpoints[0].ipAddress', name=g.nodes[0])
  if not ip and not g.dry_run:
    raise Failed(1, f'cannot read the address of {g.nodes[0]} worker 0 (the coordinator)')
  return ip or 'IP_OF_SLICE_0_WORKER_0'


def start(args, g: Gcloud, created: bool) -> None:
  g.run(['gcloud', 'storage', 'rm', f'{log_url(args)}/*.exit-*'])  # a previous attempt's
  on_exit = ''
  if created and not args.keep:  # worker 0 deletes the slice when every trainer has exited
    on_exit = shlex.join(g.delete_argv(args.queued) + ['--async'])
  coordinator = coordinator_ip(args, g)
  for i, node in enumerate(g.nodes):
    env = [
        f'YUANJAX_EXIT_WAIT_S={args.stop_grace_s + EXIT_MARGIN_S}',
        *megascale_env(args, g, i, coordinator)
    ]
    g.ssh(
        remote(f'env {" ".join(env)} {WORKER} start {shlex.quote(log_url(args))} '
               f'{shlex.quote(on_exit)} -- ' + shlex.join(train_argv(args))),
        f'starting the run on {node}', node=node)


def exits(args, g: Gcloud) -> tuple[dict[tuple[int, int], int], int]:
  """{(slice, worker): exit status} of the workers that have finished, and the number of
  workers in all."""
  _, out = g.run(['gcloud', 'storage', 'ls', f'{log_url(args)}/'], capture=True)
  found, count = {}, 0
  for line in out.splitlines():
    if m := EXIT_RE.search(line.strip()):
      found[int(m[1] or 0), int(m[3])] = int(m[5])
      count = int(m[2] or 1) * int(m[4])
  return found, count


def follow(args, g: Gcloud) -> str:
  """Until the run ends: 'done', 'failed', 'preempted' (or gone), or 'lost' (the slice is up
  but its trainers are gone with no exit file: a maintenance reboot)."""
  unreadable = polls = 0
  while True:
    found, count = exits(args, g)
    if failed := {w: rc for w, rc in found.items() if rc}:
      common.say(f'(slice, worker)s failed: {failed}; logs in {log_url(args)}/')
      return 'failed'
    if count and len(found) == count:
      return 'done'
    state = g.state(queued=args.queued)
    unreadable = unreadable + 1 if state in GONE else 0
    if state in PREEMPTED or unreadable >= GONE_AFTER:
      common.say(f'{args.name} is {state or "gone"}: preempted')
      return 'preempted'
    if g.dry_run:
      return 'done'
    polls += 1
    if polls % CHECK_EVERY == 0 and state in ('READY', 'ACTIVE') and not trainers_there(args, g):
      return 'lost'
    stopping()
    time.sleep(args.poll_s)


def trainers_there(args, g: Gcloud) -> bool:
  """False when some worker has neither a running trainer nor an exit status."""
  try:
    out = g.ssh(f'{WORKER} status', 'checking the trainers', capture=True)
  except Failed as e:
    common.say(f'{e}; taken for running')
    return True
  if ': no run' in out:
    common.say(f'{args.name} is up, but a trainer is gone without an exit status (a reboot?)')
    return False
  return True


def stopping() -> None:
  """A sweep running this launch in a thread was interrupted: stop like after Ctrl-C."""
  if common.STOP.is_set():
    raise KeyboardInterrupt


def stop_trainers(args, g: Gcloud, keep: bool = False) -> None:
  """SIGTERM to every trainer; each gets stop_grace_s to save its checkpoint. keep: worker 0
  does not delete the slice afterwards."""
  try:
    g.ssh(f'{WORKER} stop {args.stop_grace_s}' + (' keep' if keep else ''), 'stopping the trainers',
          timeout=args.stop_grace_s + TIMEOUT_S)
  except Failed as e:
    common.say(f'{e}; going on')


# ------------------------------------------------------------------------------- launch


@dataclasses.dataclass
class Run:
  """What the cleanup needs to know of a launch under way."""
  ours: bool = False  # this launch created the slice (and it is not yet deleted)
  running: bool = False  # trainers were started and have not ended
  outcome: str | None = None  # follow()'s last answer
  restarts: int = 0


def launch(args) -> int:
  g, run = gcloud_for(args), Run()
  handlers = common.exit_on_signals()
  try:
    return run_to_end(args, g, run)
  except Failed as e:
    common.say(str(e))
    return e.rc
  except KeyboardInterrupt:
    common.say('interrupted')
    common.STOP.set()  # a sweep running variants one after another starts no more
    return 130
  except SystemExit as e:
    common.say(f'signal: exit status {e.code}')
    common.STOP.set()
    return e.code if isinstance(e.code, int) else 1
  finally:
    with common.deferred_signals('cleaning up first (trainers, then the slice)', act=False):
      clean_up(args, g, run)
    common.restore_signals(handlers)


def run_to_end(args, g: Gcloud, run: Run) -> int:
  check_bucket(args, g)
  pack(args, g)
  if args.reuse:
    check_reusable(args, g)
  fresh = True
  while True:
    if fresh:
      provision(args, g, run)
    stopping()
    run.running = True
    start(args, g, created=run.ours)
    if args.detach:
      common.say(f'started; follow with: python -m launch.tpu_pod logs --workdir={args.workdir}')
      run.ours = run.running = False  # worker 0 deletes it at the end
      return 0
    run.outcome = follow(args, g)
    if run.outcome in ('done', 'failed'):
      return 0 if run.outcome == 'done' else 1
    run.running = False
    fresh = next_attempt(args, g, run)


def provision(args, g: Gcloud, run: Run) -> None:
  """A slice to run on (created, unless --reuse), with the repo installed."""
  if not args.reuse:
    with common.deferred_signals(f'waiting for the create of {args.name} to return, so '
                                 'that what it made is deleted'):
      create(args, g)
      run.ours = True
    if args.queued:
      wait_active(args, g)
  stopping()
  install(args, g)


def next_attempt(args, g: Gcloud, run: Run) -> bool:
  """After a preemption (True: a fresh slice, this one deleted) or trainers lost on a slice
  still up (False: start them again there); raises once the restarts are used up."""
  if (args.reuse and run.outcome == 'preempted') or run.restarts >= args.max_restarts:
    raise Failed(
        1, f'{run.outcome}, and {run.restarts} of --max_restarts={args.max_restarts} '
        'restarts used' + (' (--reuse: not resubmitted)' if args.reuse else ''))
  run.restarts += 1
  fresh = run.outcome == 'preempted'
  common.say(f'{"resubmitting" if fresh else "restarting on"} {args.name} (restart '
             f'{run.restarts} of {args.max_restarts})')
  if fresh:
    delete(args, g, args.queued)
    run.ours = False
  return fresh


def clean_up(args, g: Gcloud, run: Run) -> None:
  if run.running and run.outcome != 'done':
    stop_trainers(args, g)
  if run.ours and not args.keep:
    delete(args, g, args.queued)


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
        'gcloud', 'storage', 'cat', f'{log_url(args)}/*worker-{args.worker}-of-*.log'
    ])
  args.local_dir = local_dir(args)
  g = gcloud_for(args)
  record = created_here(args)
  g.slices = record.get('slices', 1) if record else 1  # several: every node of the request
  if command == 'status':
    print(g.state(queued=g.slices > 1) or 'no such slice', flush=True)
    return g.run(g.ssh_argv(f'{WORKER} status'))[0]
  stop_trainers(args, g, keep=args.keep)
  if args.keep:
    return 0
  if not record:
    common.say(f'{args.name} was not created from this machine ({_owned_path(args)}): not deleted')
    return 0
  now = g.describe(record['queued'], 'createTime')
  if now != record['create_time']:  # gone, or another slice of the same name since
    common.say(f'{args.name} now (createTime {now or "none: gone"}) is not the one this machine '
               f'created ({record["create_time"]}): not deleted; record dropped')
    forget(args)
    return 0
  delete(args, g, record['queued'])
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
