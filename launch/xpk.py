"""Submits yuanjax.train to an existing GKE cluster with `xpk workload create` (MaxText's engine).

xpk (github.com/AI-Hypercomputer/xpk) runs the command in a container on every host of
--num_slices TPU slices of --tpu_type, as a JobSet queued by Kueue: the cluster's capacity is
made once (`xpk cluster create`, not here), and workloads queue for it, so a sweep's variants
wait side by side on the cluster rather than each for a slice of its own. jax finds the other
hosts by itself, as on a TPU VM.

The image: --docker_image is used as it is (it must hold this repo's dependencies with
jax[tpu], and start in the repo's folder); or --base_docker_image, on which xpk builds an
image holding --script_dir (default: this repo; xpk copies it in, so it must have a
.dockerignore that leaves out .venv and .git; xpk's build only copies, it runs nothing), and
the command first runs `pip install -c constraints.txt . 'jax[tpu]'` there, on every pod start,
restarts included, unless the base image already holds those dependencies: one built with
launch/xpk-base.Dockerfile records the sha256 of the setup.py and constraints.txt it installed
from in DEPS_STAMP, and while the repo's two files hash the same the install is skipped.

Before anything is submitted the pre-flight runs yuanjax.plan on the config for
--num_slices x --tpu_type (and checks prod(config.mesh.dcn) == --num_slices); a run that does
not fit is refused with the fix the planner finds, unless --force.

Preemption or a host failure: the pods get SIGTERM and --stop_grace_s (passed as
--termination-grace-period-seconds; xpk's default is 30 s) to save a checkpoint; the trainer
then exits 0, and the command turns that into exit status 42 when launch/progress.py finds the
newest checkpoint short of train.num_steps (its exit 3): xpk restarts a JobSet only on exit
statuses 42 and 127-255, up to --max_restarts times, and the trainer resumes from the newest
checkpoint in --workdir (gs://). A trainer failure keeps its own status, and so does any other
failure of progress.py (bad input, a traceback, an unreadable workdir: no restart). Follow
and end it with xpk: `xpk workload list --cluster=C`,
`xpk workload delete --cluster=C --workload=NAME`.

  python -m launch.xpk --cluster=my-v5p --workload=m32-a --tpu_type=v5p-64 \\
      --docker_image=gcr.io/my-project/yuanjax:latest --zone=us-east5-a --project=my-project \\
      --config=configs/yuan_m32.py --workdir=gs://my-bucket/m32-a --config.mesh.fsdp=4 \\
      --config.mesh.expert=8 --config.model.remat=full --config.train.grad_accum=16

Flags as in `xpk workload create --help` (--cluster, --workload, --tpu-type, --num-slices,
--docker-image / --base-docker-image with --script-dir, --command, --env, --max-restarts,
--termination-grace-period-seconds, --zone, --project).
"""
from __future__ import annotations

import os
import re
import shlex
import sys

from launch import common
from launch import progress

RESTART_STATUS = 42  # one of the exit statuses xpk restarts a JobSet on (42, 127-255)
DEPS_STAMP = '/opt/yuanjax-deps.sha256'  # written by launch/xpk-base.Dockerfile
INSTALL = "pip install -q -c constraints.txt . 'jax[tpu]'"


def parse(argv=None):
  p = common.parser(__doc__)
  p.add_argument('--cluster', required=True, help='the GKE cluster (made by `xpk cluster create`)')
  p.add_argument('--workload', required=True, help='workload name (lowercase, digits, hyphens)')
  p.add_argument('--tpu_type', required=True, help='e.g. v5p-64')
  p.add_argument('--num_slices', type=int, default=1)
  p.add_argument('--docker_image', default=None, help='an image holding the installed repo')
  p.add_argument('--base_docker_image', default=None,
                 help='xpk builds on it, copying --script_dir in; the command installs the repo')
  p.add_argument('--script_dir', default=common.REPO, help='with --base_docker_image (default: '
                 'this repo)')
  p.add_argument('--zone', default=None)
  p.add_argument('--project', default=None)
  p.add_argument('--max_restarts', type=int, default=3,
                 help='JobSet restarts after a preemption or failure (default 3)')
  p.add_argument(
      '--stop_grace_s', type=int, default=300,
      help='seconds a preempted or deleted pod gets to save its checkpoint (default '
      '300; xpk --termination-grace-period-seconds)')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='environment for the trainers; repeatable')
  p.add_argument('--libtpu_init_args', default=None, help='LIBTPU_INIT_ARGS for the trainers')
  common.fit_flag(p)
  args = common.parse(p, argv)
  _check(p, args)
  try:
    target = common.tpu_target(args.tpu_type, args.num_slices)
  except ValueError as e:
    p.error(f'--tpu_type={e}')
  common.preflight(p, args, target)
  return args


def _check(p, args) -> None:
  if not args.workdir.startswith('gs://'):
    p.error(f'--workdir={args.workdir}: must be gs://BUCKET/PATH (the pods\' disks are not kept)')
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,38}[a-z0-9])?', args.workload):
    p.error(f'--workload={args.workload}: 1-40 lowercase letters, digits and hyphens, starting '
            'with a letter')
  if (args.docker_image is None) == (args.base_docker_image is None):
    p.error('give one of --docker_image and --base_docker_image')
  for flag in ('num_slices', 'max_restarts', 'stop_grace_s'):
    if getattr(args, flag) < (1 if flag == 'num_slices' else 0):
      p.error(f'--{flag}={getattr(args, flag)}: too small')
  ignore = os.path.join(args.script_dir, '.dockerignore')
  if args.base_docker_image and not _ignores(ignore, ('.venv', '.git')):
    p.error(f'--base_docker_image: {ignore} must leave out .venv and .git (else they are baked '
            'into the image xpk builds from --script_dir)')
  for item in args.env:
    if not re.fullmatch(r'[A-Za-z_]\w*=.*', item, re.DOTALL):
      p.error(f'--env={item!r}: must be KEY=VALUE')
  rel = os.path.relpath(os.path.abspath(args.config_path), args.script_dir)
  if rel.startswith('..'):
    p.error(f'--config={args.config}: must be a file inside {args.script_dir} (the image\'s repo)')
  args.config = rel + args.config[len(args.config_path):]  # relative, as inside the image


def _ignores(path: str, names: tuple[str, ...]) -> bool:
  try:
    with open(path) as f:
      lines = {line.strip().strip('/') for line in f}
  except FileNotFoundError:
    return False
  return all(n in lines for n in names)


def command(args) -> str:
  """The shell command xpk runs in the container on every host: the trainer; its exit 0 short
  of train.num_steps (a SIGTERM saved a checkpoint: progress.py says NOT_DONE) becomes
  RESTART_STATUS. Any other failure of progress.py (bad input, a traceback, an unreadable
  workdir) is the command's status, never a restart."""
  train = shlex.join(common.train_argv('python3', args.config, args.workdir, args.overrides))
  check = shlex.join([
      'python3', '-m', 'launch.progress', f'--config={args.config}', f'--workdir={args.workdir}',
      *args.overrides
  ])
  run = (f'{train}; rc=$?; if [ "$rc" -ne 0 ]; then exit "$rc"; fi; {check}; rc=$?; '
         f'if [ "$rc" -eq {progress.NOT_DONE} ]; then exit {RESTART_STATUS}; fi; exit "$rc"')
  return install() + run if args.base_docker_image else run


def install() -> str:
  """The dependencies, unless the image's DEPS_STAMP is the hash of this setup.py and
  constraints.txt (YUANJAX_DEPS_STAMP overrides its path, for the tests). The trainer and
  progress.py run with `python3 -m` from the working folder: its yuanjax is the one imported,
  installed or not."""
  stamp = f'"${{YUANJAX_DEPS_STAMP:-{DEPS_STAMP}}}"'
  return (f'if [ "$(cat setup.py constraints.txt | sha256sum)" = "$(cat {stamp} 2>/dev/null)" ]; '
          f'then echo "dependencies from the image"; else {INSTALL}; fi && ')


def create_argv(args) -> list[str]:
  image = ([f'--docker-image={args.docker_image}'] if args.docker_image else
           [f'--base-docker-image={args.base_docker_image}', f'--script-dir={args.script_dir}'])
  env = list(args.env)
  if args.libtpu_init_args:
    env.insert(0, f'LIBTPU_INIT_ARGS={args.libtpu_init_args}')
  return [
      'xpk', 'workload', 'create', f'--cluster={args.cluster}', f'--workload={args.workload}',
      f'--tpu-type={args.tpu_type}', f'--num-slices={args.num_slices}', *image,
      f'--max-restarts={args.max_restarts}',
      f'--termination-grace-period-seconds={args.stop_grace_s}',
      *[f'--{k}={v}' for k in ('zone', 'project') if (v := getattr(args, k))],
      *[f'--env={e}' for e in env], f'--command={command(args)}'
  ]


def plan(args) -> common.Plan:
  return common.Plan(steps=[create_argv(args)])


def main(argv=None) -> int:
  args = parse(argv)
  return common.execute(plan(args), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
