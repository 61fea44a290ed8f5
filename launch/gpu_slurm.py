"""Submits yuanjax.train to a SLURM GPU cluster: writes an sbatch script, runs `sbatch`.

One process per node (srun --ntasks-per-node=1), each driving all of its node's GPUs:
one JAX process sees every local GPU, so one per node is the simplest layout, with the
fewest processes for the coordinator. The coordinator is the job's first node
(`scontrol show hostnames "$SLURM_JOB_NODELIST"`), its port derived from the job id;
each task passes --process_id=$SLURM_PROCID.

The cluster is assumed to share the filesystem with this machine: the job runs in the
current directory with this interpreter (--python), so build the venv once with
`make install` and `.venv/bin/pip install -c constraints.txt 'jax[cuda12]'`.

  python -m launch.gpu_slurm --nodes=4 --gpus_per_node=8 --time=24:00:00 --partition=gpu \\
      --account=my-proj --config=configs/yuan_m32.py --workdir=/shared/runs/m32 \\
      --config.mesh.data=4 --config.mesh.expert=8
"""
from __future__ import annotations

import os
import re
import shlex
import sys

from launch import common

SCRIPT = """\
#!/bin/bash
{sbatch}
# Written by launch/gpu_slurm.py: one process per node, each using all of the node's GPUs.
set -euo pipefail
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
coordinator="${{nodes[0]}}:{port}"
# shellcheck disable=SC2016  # a $ in a quoted value is meant literally
train=({train})
# shellcheck disable=SC2016  # $SLURM_PROCID must expand in each task, not here
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label \\
  bash -c 'exec "$@" --process_id="$SLURM_PROCID"' bash "${{train[@]}}" \\
  --coordinator_address="$coordinator" --num_processes="$SLURM_JOB_NUM_NODES"
"""


def parse(argv=None):
  p = common.parser(__doc__)
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus_per_node', type=int, default=8)
  p.add_argument('--time', default=None, help='time limit, e.g. 24:00:00 (default: the partition\'s)')
  p.add_argument('--partition', default=None)
  p.add_argument('--account', default=None)
  p.add_argument('--job_name', default='yuanjax')
  p.add_argument('--port', type=int, default=None,
                 help='coordinator port (default: 20000 + SLURM_JOB_ID %% 20000)')
  p.add_argument('--log_dir', default='slurm_logs',
                 help='where SLURM writes JOB_NAME-JOBID.out (srun --label: lines start with the task)')
  p.add_argument('--script', default=None, help='where to write the sbatch script '
                 '(default LOG_DIR/JOB_NAME.sbatch; written by --dry-run too, to read)')
  p.add_argument('--python', default=sys.executable, help='interpreter on the nodes (default: this one)')
  args = common.parse(p, argv)
  for flag in ('nodes', 'gpus_per_node'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag}={getattr(args, flag)}: must be at least 1')
  for flag in ('time', 'partition', 'account', 'job_name', 'log_dir'):
    value = getattr(args, flag)
    if value is not None and not re.fullmatch(r'[^\s\'"#]+', value):
      p.error(f'--{flag}={value!r}: must be non-empty, without spaces, quotes or #')
  if args.port is not None and not 0 < args.port < 65536:
    p.error(f'--port={args.port}: must be in 1..65535')
  return args


def script(args) -> str:
  """The sbatch script's text."""
  log_dir = os.path.abspath(args.log_dir)
  opts = [f'--job-name={args.job_name}', f'--nodes={args.nodes}', '--ntasks-per-node=1',
          f'--gpus-per-node={args.gpus_per_node}', f'--chdir={os.getcwd()}',
          f'--output={log_dir}/%x-%j.out']
  opts += [f'--{k}={v}' for k, v in (('time', args.time), ('partition', args.partition),
                                     ('account', args.account)) if v]
  port = args.port or '$((20000 + SLURM_JOB_ID % 20000))'
  train = common.train_argv(args.python, args.config, args.workdir, args.overrides)
  return SCRIPT.format(sbatch='\n'.join(f'#SBATCH {o}' for o in opts), port=port,
                       train=' '.join(map(_quote, train)))


def _quote(arg: str) -> str:
  """shlex.quote, but quotes commas too: bash would take a,b in an array for a typo."""
  return shlex.quote(arg) if ',' not in arg else "'" + arg.replace("'", "'\"'\"'") + "'"


def plan(args) -> common.Plan:
  path = os.path.abspath(args.script or os.path.join(args.log_dir, f'{args.job_name}.sbatch'))
  return common.Plan(steps=[['mkdir', '-p', os.path.abspath(args.log_dir)], ['sbatch', path]],
                     files={path: script(args)})


def main(argv=None) -> int:
  args = parse(argv)
  return common.execute(plan(args), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
