"""Submits yuanjax.train to a SLURM GPU cluster: writes an sbatch script, runs `sbatch`.

One process per node (srun --ntasks-per-node=1), each driving all of its node's GPUs:
one JAX process sees every local GPU, so one per node is the simplest layout, with the
fewest processes for the coordinator. The coordinator is the job's first node
(`scontrol show hostnames "$SLURM_JOB_NODELIST"`), its port 10000 + SLURM_JOB_ID % 20000:
below Linux's ephemeral range (32768-60999, net.ipv4.ip_local_port_range), where another
program's outgoing connection could hold it. Each task passes --process_id=$SLURM_PROCID.

Before the script is written, the pre-flight runs yuanjax.plan on the config for --nodes x
--gpus_per_node GPUs of --gpu and refuses a run that does not fit, with the fix it finds
(remat, grad_accum, mesh), unless --force.

The job script, in order: the --setup lines (module load, conda activate, source a venv);
the environment (GPU_ENV below, then each --env KEY=VALUE); a pre-flight `srun` on every node
that checks --python imports yuanjax and that jax sees --gpus_per_node GPUs (a compute node
without this machine's base interpreter fails here, in seconds, not after the queue wait);
the training step; then, when the trainer returned before train.num_steps (stopped by the
--signal before the time limit: it saves a checkpoint on SIGTERM and exits 0),
`scontrol requeue` (the job is --requeue) until launch/progress.py finds the newest
checkpoint at num_steps, at most --max_requeues times (SLURM_RESTART_COUNT).

CPUs: Slurm gives a task one CPU unless told (sbatch --cpus-per-task), and since Slurm 22.05
srun no longer inherits sbatch's --cpus-per-task (SRUN_CPUS_PER_TASK does it; see the srun
man page). --cpus_per_task defaults to the node's CPUs / tasks per node, read in the job
from SLURM_CPUS_ON_NODE, which is all of the node's CPUs with --exclusive (the default).

  python -m launch.gpu_slurm --nodes=4 --gpus_per_node=8 --time=24:00:00 --partition=gpu \\
      --account=my-proj --setup='source /shared/yuanjax/.venv/bin/activate' \\
      --config=configs/yuan_m32.py --workdir=/shared/runs/m32 --config.mesh.fsdp=4 \\
      --config.mesh.expert=8 --config.model.remat=full --config.train.grad_accum=16
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

from launch import common, progress

# XLA flags for H100/H200, each from where it is recommended; every one is checked to exist in
# the installed jaxlib by tests/launch/test_gpu_slurm.py (an unknown XLA flag is fatal).
GPU_XLA_FLAGS = [
    # Overlaps collectives with compute: the one XLA flag NVIDIA's JAX-Toolbox images set
    # (docs.nvidia.com/jax-toolbox/environment-variables); MaxText's GPU scripts set it too.
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    # cuBLAS rather than Triton GEMMs: MaxText's GPU scripts.
    '--xla_gpu_enable_triton_gemm=false',
    # Combine small collectives: MaxText's A3 (H100) scripts' thresholds, all-reduce 1 GiB,
    # all-gather and reduce-scatter 128 MiB.
    '--xla_gpu_all_reduce_combine_threshold_bytes=1073741824',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728',
    # FSDP communication pipelined with compute: an earlier revision of JAX-Toolbox's
    # GPU_performance.md (not checked against its current text here).
    '--xla_gpu_enable_pipelined_all_gather=true',
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',
]
GPU_ENV = {
    'XLA_FLAGS': ' '.join(GPU_XLA_FLAGS),
    # JAX-Toolbox's GPU performance guide: "We typically set it to 0.9" (JAX's default: 0.75).
    'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.9',
    # One hardware queue: XLA already orders its launches (JAX-Toolbox; not for Blackwell).
    'CUDA_DEVICE_MAX_CONNECTIONS': '1',
    # One process drives all of a node's GPUs: JAX-Toolbox's GPU performance guide recommends
    # NCCL_LAUNCH_MODE=GROUP (or one process per GPU) against multi-device single-process hangs.
    # NCCL's own protocol and buffer choices are left alone (forcing LL128 is unsafe on some
    # H100 topologies, per NCCL's notes; -2 buffer sizes were NCCL's default anyway).
    'NCCL_LAUNCH_MODE': 'GROUP',
}
# yuanjax.cost's GPUs with a memory figure (launch/ imports no jax: tests/test_cost.py checks).
GPU_KINDS = ('H100-80G', 'H200')
PREFLIGHT = ('import socket, sys, jax, yuanjax; n = len(jax.local_devices(backend="gpu")); '
             'print(socket.gethostname(), sys.executable, "jax", jax.__version__, n, "GPUs"); '
             'sys.exit(0 if n == int(sys.argv[1]) else 1)')

SCRIPT = """\
#!/bin/bash
{sbatch}
# Written by launch/gpu_slurm.py: one process per node, each using all of the node's GPUs.
set -euo pipefail
set +u  # the --setup lines (module load, conda activate) often read unset variables
# shellcheck disable=SC1090,SC1091  # what they source is the user's
{{
{setup}
}}
set -u
{env}
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
coordinator="${{nodes[0]}}:{port}"
cpus={cpus}
export SRUN_CPUS_PER_TASK="$cpus"  # srun does not inherit sbatch's --cpus-per-task (>= 22.05)
step=(srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$cpus"{mem} \\
  --kill-on-bad-exit=1 --label)
# shellcheck disable=SC2016  # a $ in a quoted value is meant literally
python=({python})
echo "[launch] pre-flight: ${{python[*]}} imports yuanjax and sees {gpus} GPUs on every node"
"${{step[@]}}" "${{python[@]}}" -c {preflight} {gpus}
# shellcheck disable=SC2016  # a $ in a quoted value is meant literally
args=({args})
# shellcheck disable=SC2016  # $SLURM_PROCID must expand in each task, not here
"${{step[@]}}" bash -c 'exec "$@" --process_id="$SLURM_PROCID"' bash \\
  "${{python[@]}}" -u -m yuanjax.train "${{args[@]}}" \\
  --coordinator_address="$coordinator" --num_processes="$SLURM_JOB_NUM_NODES"
"${{python[@]}}" {progress} "${{args[@]}}" && done=0 || done=$?
if ((done != 0 && done != {not_done})); then  # 2: bad input, 1: an error (a traceback)
  echo "[launch] launch/progress.py failed (exit $done): not requeueing" >&2
  exit "$done"
elif ((done == {not_done})); then
  if ((${{SLURM_RESTART_COUNT:-0}} >= {max_requeues})); then
    echo "[launch] not at train.num_steps after {max_requeues} requeues; giving up" >&2
    exit 1
  fi
  echo "[launch] not at train.num_steps: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
"""


def parse(argv=None):
  p = common.parser(__doc__)
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus_per_node', type=int, default=8)
  p.add_argument('--gpu', choices=GPU_KINDS, default='H100-80G',
                 help='the nodes\' GPUs, for the pre-flight (default H100-80G)')
  p.add_argument('--time', default=None,
                 help='time limit, e.g. 24:00:00 (default: the partition\'s)')
  p.add_argument('--partition', default=None)
  p.add_argument('--account', default=None)
  p.add_argument('--job_name', default='yuanjax')
  p.add_argument('--cpus_per_task', type=int, default=None,
                 help='CPUs for each node\'s process (default: all the node\'s CPUs / tasks)')
  p.add_argument('--exclusive', action=argparse.BooleanOptionalAction, default=True,
                 help='whole nodes (default; --no-exclusive to share them)')
  p.add_argument('--mem', default=None, help='memory per node, e.g. 0 (all of it) or 1800G')
  p.add_argument(
      '--setup', action='append', default=[],
      help='a shell line run before python (module load ..., conda activate ...); '
      'repeatable')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='environment for the trainers; repeatable; replaces a default of that KEY')
  p.add_argument('--no_gpu_env', action='store_true', help='leave out the XLA/NCCL defaults')
  p.add_argument(
      '--signal_s', type=int, default=300,
      help='SIGTERM the trainers this many seconds before the time limit (default '
      '300), so that they save a checkpoint; 0: no signal')
  p.add_argument('--max_requeues', type=int, default=20,
                 help='requeue until train.num_steps is reached, at most this often (default 20)')
  p.add_argument('--port', type=int, default=None,
                 help='coordinator port (default: 10000 + SLURM_JOB_ID %% 20000)')
  p.add_argument(
      '--log_dir', default='slurm_logs',
      help='where SLURM writes JOB_NAME-JOBID.out (srun --label: lines start with '
      'the task)')
  p.add_argument(
      '--script', default=None, help='where to write the sbatch script '
      '(default LOG_DIR/JOB_NAME.sbatch; written by --dry-run too, to read)')
  p.add_argument('--python', default='python3',
                 help='interpreter on the nodes, after --setup (default python3 from their PATH)')
  common.fit_flag(p)
  args = common.parse(p, argv)
  _check(p, args)
  common.preflight(
      p, args,
      common.Target(args.nodes * args.gpus_per_node, args.gpu, hosts=args.nodes, platform='gpu'))
  return args


def _check(p, args) -> None:
  for flag in ('nodes', 'gpus_per_node', 'cpus_per_task'):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      p.error(f'--{flag}={getattr(args, flag)}: must be at least 1')
  for flag in ('signal_s', 'max_requeues'):
    if getattr(args, flag) < 0:
      p.error(f'--{flag}={getattr(args, flag)}: must be >= 0')
  for flag in ('time', 'partition', 'account', 'job_name', 'log_dir', 'mem'):
    value = getattr(args, flag)
    if value is not None and not re.fullmatch(r'[^\s\'"#]+', value):
      p.error(f'--{flag}={value!r}: must be non-empty, without spaces, quotes or #')
  if args.port is not None and not 0 < args.port < 65536:
    p.error(f'--port={args.port}: must be in 1..65535')
  for item in args.env:
    if not re.fullmatch(r'[A-Za-z_]\w*=.*', item, re.DOTALL):
      p.error(f'--env={item!r}: must be KEY=VALUE')
  for line in args.setup:
    if '\n' in line:
      p.error(f'--setup={line!r}: one line per --setup')


def environment(args) -> dict[str, str]:
  env = {} if args.no_gpu_env else dict(GPU_ENV)
  env.update(item.split('=', 1) for item in args.env)
  return env


def script(args) -> str:
  """The sbatch script's text."""
  log_dir = os.path.abspath(args.log_dir)
  opts = [
      f'--job-name={args.job_name}', f'--nodes={args.nodes}', '--ntasks-per-node=1',
      f'--gpus-per-node={args.gpus_per_node}', f'--chdir={os.getcwd()}',
      f'--output={log_dir}/%x-%j.out', '--open-mode=append', '--requeue'
  ]
  opts += ['--exclusive'] if args.exclusive else []
  opts += [f'--signal=TERM@{args.signal_s}'] if args.signal_s else []
  opts += [
      f'--{k.replace("_", "-")}={v}'
      for k, v in (('cpus_per_task', args.cpus_per_task), ('mem', args.mem), ('time', args.time),
                   ('partition', args.partition), ('account', args.account))
      if v is not None
  ]
  train = common.train_argv(args.python, args.config, args.workdir, args.overrides)
  return SCRIPT.format(
      sbatch='\n'.join(f'#SBATCH {o}' for o in opts),
      setup='\n'.join(f'  {line}' for line in args.setup) or '  :  # no --setup',
      env='\n'.join(f'export {k}={_quote(v)}' for k, v in environment(args).items()) or
      '# (no env)', port=args.port or '$((10000 + SLURM_JOB_ID % 20000))',
      cpus=args.cpus_per_task or '$((SLURM_CPUS_ON_NODE / 1))  # the node\'s CPUs / tasks per node',
      mem=f' --mem={args.mem}' if args.mem is not None else '', python=_quote(
          args.python), gpus=args.gpus_per_node, preflight=_quote(PREFLIGHT), args=' '.join(
              map(_quote, train[4:])), max_requeues=args.max_requeues, not_done=progress.NOT_DONE,
      progress=_quote(os.path.join(common.REPO, 'launch', 'progress.py')))


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
