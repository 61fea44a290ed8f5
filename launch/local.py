"""Runs a multi-process job on this machine: N processes of yuanjax.train on CPU.

Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
(PORT: --port, or a free one the OS picks, so that jobs side by side never collide)
and JAX_PLATFORMS=cpu (set through `env`, so the dry run shows it); JAX's distributed
runtime connects them. First the pre-flight runs yuanjax.plan on the config for
N x --host_device_count CPU devices (the mesh must match them; no memory check on CPU).
Output is prefixed [i]; if one process fails the others are stopped and the launcher exits
with its status.

  python -m launch.local --config=configs/tiny.py --workdir=/tmp/run \\
      --num_processes=2 --host_device_count=4 --config.mesh.data=8
"""
from __future__ import annotations

import sys

from launch import common


def parse(argv=None):
  p = common.parser(__doc__)
  p.add_argument('--num_processes', type=int, default=2, help='processes to start (default 2)')
  p.add_argument('--port', type=int, default=None,
                 help='coordinator port on 127.0.0.1 (default: a free one, picked by the OS)')
  p.add_argument('--host_device_count', type=int, default=None,
                 help='CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count)')
  p.add_argument('--log_dir', default=None, help='also write each process\'s output to '
                 'LOG_DIR/process_<i>.log')
  p.add_argument('--python', default=sys.executable, help='interpreter (default: this one)')
  p.add_argument('--module', default=common.TRAIN_MODULE,
                 help='module to run with python -m (default yuanjax.train; tests use a fake)')
  common.fit_flag(p)
  args = common.parse(p, argv)
  if args.num_processes < 1:
    p.error(f'--num_processes={args.num_processes}: must be at least 1')
  if args.port is not None and not 0 < args.port < 65536:
    p.error(f'--port={args.port}: must be in 1..65535')
  if args.host_device_count is not None and args.host_device_count < 1:
    p.error(f'--host_device_count={args.host_device_count}: must be at least 1')
  # CPU devices: the planner checks the config and its mesh (no memory figure for a CPU).
  common.preflight(p, args, common.Target(args.num_processes * (args.host_device_count or 1), None))
  return args


def plan(args) -> common.Plan:
  env = ['env', 'JAX_PLATFORMS=cpu']
  if args.host_device_count:
    env.append(f'XLA_FLAGS=--xla_force_host_platform_device_count={args.host_device_count}')
  train = common.train_argv(args.python, args.config, args.workdir, args.overrides, args.module)
  port = args.port or common.free_ports()[0]
  procs = [
      env + train + [
          f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={args.num_processes}',
          f'--process_id={i}'
      ] for i in range(args.num_processes)
  ]
  return common.Plan(steps=procs, together=True, log_dir=args.log_dir)


def main(argv=None) -> int:
  args = parse(argv)
  return common.execute(plan(args), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
