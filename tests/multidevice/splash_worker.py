"""Runs the splash cases on 8 virtual CPU devices and saves the raw results.

  python tests/multidevice/splash_worker.py OUT.npz

XLA_FLAGS is set here, in a process of its own; `test_splash_mesh.py` runs this and compares
with one device's 'xla' attention (`splash_cases.py`).
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.multidevice import splash_cases as cases  # noqa: E402


def main(out):
  if jax.device_count() != 8:
    raise SystemExit(f'expected 8 CPU devices, got {jax.devices()}')
  results = {}
  for axes in cases.MESHES:
    for k, v in cases.run('splash', axes).items():
      results[f'{cases.mesh_name(axes)}/{k}'] = np.asarray(v)
  np.savez(out, **results)


if __name__ == '__main__':
  main(*sys.argv[1:])
