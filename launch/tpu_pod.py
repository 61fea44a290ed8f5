"""Runs yuanjax.train on a Cloud TPU slice: create, install, train, collect logs, delete.

  1. pack this working tree (tracked and untracked files git does not ignore, so
     uncommitted edits go too; .venv does not) into LOCAL_DIR/yuanjax.tgz;
  2. create the slice (`tpu-vm create`), or with --queued ask for it as a queued resource
     and wait until it is ACTIVE;
  3. copy the tarball to every worker, unpack it to ~/yuanjax and build ~/yuanjax/.venv
     (`make install`-style: REMOTE_PYTHON -m venv, pip install -c constraints.txt . jax[tpu]);
  4. run the SAME command on every worker (`ssh --worker=all`):
     .venv/bin/python -u -m yuanjax.train --config=... --workdir=gs://... [overrides];
     jax.distributed.initialize() finds the other workers by itself on TPU;
  5. always, once the slice was asked for: copy the per-worker logs (LOCAL_DIR/worker_logs/
     <worker>.log, written by gcloud as the run goes) to WORKDIR/worker_logs/, then delete
     the slice unless --keep.

--workdir must be gs://: all workers write there, and the VMs' disks go with the slice.

  python -m launch.tpu_pod --name=m32-a --zone=us-east5-a --accelerator_type=v5p-64 \\
      --config=configs/yuan_m32.py --workdir=gs://my-bucket/m32-a --config.mesh.expert=8
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile

from launch import common

# Default runtime (TPU software version) per generation, from the Cloud TPU docs.
RUNTIMES = {'v6e': 'v2-alpha-tpuv6e', 'v5p': 'v2-alpha-tpuv5', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v4': 'tpu-ubuntu2204-base'}
REMOTE_DIR = '"$HOME/yuanjax"'  # quoted for the remote shell; ~ would not expand inside quotes
TARBALL = 'yuanjax.tgz'         # in the remote home directory


def parse(argv=None):
  p = common.parser(__doc__)
  p.add_argument('--name', required=True, help='TPU (and queued resource) name')
  p.add_argument('--zone', required=True)
  p.add_argument('--accelerator_type', required=True, help='e.g. v5p-64, v6e-32, v4-16')
  p.add_argument('--version', default=None, help='TPU software version; default by generation: '
                 + ', '.join(f'{k}: {v}' for k, v in RUNTIMES.items()))
  p.add_argument('--project', default=None, help='GCP project (default: gcloud\'s)')
  p.add_argument('--queued', action='store_true',
                 help='ask for the slice with `queued-resources create` and wait for it')
  p.add_argument('--keep', action='store_true', help='do not delete the slice at the end')
  p.add_argument('--remote_python', default='python3.11',
                 help='python on the workers that builds the venv (jax needs >= 3.11); '
                      'installed with apt when it cannot make a venv')
  p.add_argument('--local_dir', default=None,
                 help='local folder for the tarball and the workers\' logs '
                      '(default: $TMPDIR/yuanjax-tpu/NAME)')
  args = common.parse(p, argv)
  if not args.workdir.startswith('gs://'):
    p.error(f'--workdir={args.workdir}: must be gs://BUCKET/PATH on a TPU pod (every worker '
            'writes there, and the workers\' disks are deleted with the slice)')
  if not re.fullmatch(r'[a-z]([-a-z0-9]*[a-z0-9])?', args.name):
    p.error(f'--name={args.name}: use lowercase letters, digits and hyphens, starting with a letter')
  generation = args.accelerator_type.rpartition('-')[0]
  if args.version is None:
    if generation not in RUNTIMES:
      p.error(f'--accelerator_type={args.accelerator_type}: no default runtime for '
              f'{generation!r}; give --version')
    args.version = RUNTIMES[generation]
  rel = os.path.relpath(os.path.abspath(args.config_path), common.REPO)
  if rel.startswith('..'):
    p.error(f'--config={args.config}: must be a file inside {common.REPO} (the repo is what '
            'is copied to the workers)')
  args.config = rel + args.config[len(args.config_path):]  # keep any :variant
  return args


def remote(*lines: str) -> str:
  """One line of shell for `ssh --command` (one line, so that the dry run is one per line)."""
  return '; '.join(('set -euo pipefail',) + lines)


def plan(args) -> common.Plan:
  name, q = args.name, shlex.quote
  local_dir = os.path.abspath(
      args.local_dir or os.path.join(tempfile.gettempdir(), 'yuanjax-tpu', name))
  tarball, logs = os.path.join(local_dir, TARBALL), os.path.join(local_dir, 'worker_logs')
  where = [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])
  tpus = ['gcloud', 'compute', 'tpus']

  pack = ['bash', '-c', f'set -euo pipefail; mkdir -p {q(logs)}; cd {q(common.REPO)}; '
          'git ls-files -z --cached --others --exclude-standard '
          f'| tar -czf {q(tarball)} --null --ignore-failed-read -T -']
  if args.queued:
    create = [*tpus, 'queued-resources', 'create', name, f'--node-id={name}',
              f'--accelerator-type={args.accelerator_type}',
              f'--runtime-version={args.version}', *where]
    state = shlex.join([*tpus, 'queued-resources', 'describe', name,
                        '--format=value(state.state)', *where])
    wait = ['bash', '-c', 'while true; do '
            f'state=$({state}); echo "queued resource {name}: ${{state:-?}}"; '
            'case $state in ACTIVE) exit 0 ;; FAILED|SUSPENDED) exit 1 ;; esac; '
            'sleep 60; done']
    create_steps = [create, wait]
    delete = [*tpus, 'queued-resources', 'delete', name, '--force', '--quiet', *where]
  else:
    create_steps = [[*tpus, 'tpu-vm', 'create', name, f'--accelerator-type={args.accelerator_type}',
                     f'--version={args.version}', *where]]
    delete = [*tpus, 'tpu-vm', 'delete', name, '--quiet', *where]

  py = q(args.remote_python)
  install = remote(
      f'rm -rf {REMOTE_DIR}', f'mkdir -p {REMOTE_DIR}', f'tar -xzf "$HOME/{TARBALL}" -C {REMOTE_DIR}',
      f'cd {REMOTE_DIR}',
      f'if ! {py} -m venv .venv; then sudo apt-get update -q; '
      f'sudo apt-get install -y -q {py} {q(args.remote_python + "-venv")}; '
      f'{py} -m venv --clear .venv; fi',
      '.venv/bin/python -m pip install -q --upgrade pip',
      ".venv/bin/python -m pip install -q -c constraints.txt . 'jax[tpu]'")
  train = common.train_argv('.venv/bin/python', args.config, args.workdir, args.overrides)
  run = remote(f'cd {REMOTE_DIR}', f'{shlex.join(train)} 2>&1')
  ssh = [*tpus, 'tpu-vm', 'ssh', name, '--worker=all']
  steps = [
      pack,
      *create_steps,
      [*tpus, 'tpu-vm', 'scp', tarball, f'{name}:{TARBALL}', '--worker=all', *where],
      [*ssh, f'--command={install}', *where],
      [*ssh, f'--output-directory={logs}', f'--command={run}', *where],
  ]
  cleanup = [['gcloud', 'storage', 'cp', '--recursive', logs, args.workdir.rstrip('/') + '/']]
  if not args.keep:
    cleanup.append(delete)
  return common.Plan(steps=steps, cleanup=cleanup, cleanup_from=1)


def main(argv=None) -> int:
  args = parse(argv)
  return common.execute(plan(args), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
