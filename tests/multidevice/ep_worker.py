"""Runs the expert-parallel cases on 8 virtual CPU devices and saves the raw results.

  python tests/multidevice/ep_worker.py DISPATCH OUT.npz
  python tests/multidevice/ep_worker.py grouped OUT.npz   # the grouped-matmul kernels

XLA_FLAGS is set here, in a process of its own; `test_expert_parallel.py` runs this and
compares everything with a 1-device run of the same cases (`ep_cases.py`).
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.multidevice import ep_cases as cases  # noqa: E402


def grouped(out):
  x = np.random.default_rng(4).normal(size=cases.GROUPED_X_SHAPE).astype(np.float32)
  results = {}
  for kernel in cases.GROUPED_KERNELS:
    for axes in cases.GROUPED_MESHES:
      for k, v in cases.grouped_case(x, axes, 'dropless', kernel).items():
        results[f'{kernel}/{cases.mesh_name(axes)}/{k}'] = v
  np.savez(out, **results)


def main(dispatch, out):
  if jax.device_count() != 8:
    raise SystemExit(f'expected 8 CPU devices, got {jax.devices()}')
  if dispatch == 'grouped':
    return grouped(out)
  results = {}
  cfg = cases.config(dispatch)
  state0 = cases.initial_state(cfg)
  for axes in cases.MESHES:
    for k, v in cases.run(cfg, axes, state0).items():
      results[f'{dispatch}/{cases.mesh_name(axes)}/{k}'] = v
  if dispatch == 'capacity':
    D = cases.config('capacity').model.hidden_size
    x = np.random.default_rng(3).normal(size=(cases.B, cases.L, D)).astype(np.float32)
    results['tight/y'], results['tight/dropped'] = cases.capacity_case(x, cases.CAPACITY_MESH)
  np.savez(out, **results)


if __name__ == '__main__':
  main(*sys.argv[1:])
