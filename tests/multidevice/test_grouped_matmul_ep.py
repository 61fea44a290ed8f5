"""The dropless dispatch's optional grouped-matmul kernels under expert parallelism.

On 8 virtual CPU devices (`ep_worker.py grouped`, a process of its own), one MoE layer with
`moe.grouped_matmul` = megablox (Pallas interpret mode) or tokamax (its XLA reference) on the
meshes {expert 8} (one expert per device) and {data 2, expert 2, tensor 2} (ffn split, partial
sums): output and gradients (every param, and x) equal one device's dense dispatch.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.multidevice import ep_cases as cases

CASES = [(k, cases.mesh_name(m)) for k in cases.GROUPED_KERNELS for m in cases.GROUPED_MESHES]


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  """Starts the 8-device worker, computes the dense reference meanwhile, returns both."""
  out = tmp_path_factory.mktemp('gmm') / 'grouped.npz'
  worker = os.path.join(os.path.dirname(__file__), 'ep_worker.py')
  proc = subprocess.Popen([sys.executable, worker, 'grouped',
                           str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    x = np.random.default_rng(4).normal(size=cases.GROUPED_X_SHAPE).astype(np.float32)
    reference = cases.grouped_case(x, None, 'dense')
    log, _ = proc.communicate(timeout=900)
  finally:
    proc.kill()
  assert proc.returncode == 0, f'ep_worker.py grouped failed:\n{log[-4000:]}'
  return dict(np.load(out)), reference


@pytest.mark.parametrize('kernel,mesh', CASES)
def test_forward_and_gradients_equal_one_device_dense(sharded, kernel, mesh):
  results, ref = sharded
  got = {
      k[len(f'{kernel}/{mesh}/'):]: v
      for k, v in results.items()
      if k.startswith(f'{kernel}/{mesh}/')
  }
  assert set(got) == set(ref) and len(ref) > 5  # y, x, w1, w2 and the router's params
  assert rel(got['y'], ref['y']) < 1e-5
  grads = sorted(k for k in ref if k.startswith('grad:'))
  flat = lambda r: np.concatenate([r[k].ravel() for k in grads])
  assert rel(flat(got), flat(ref)) < 1e-5
  for k in grads:
    assert rel(got[k], ref[k]) < 1e-4, k
