"""Splash attention inside meshes: on 8 virtual CPU devices (`splash_worker.py`, a process of
its own; Pallas interpret mode), one attention layer with 'splash' under the expert-parallel
mesh {expert 8} (rows split over devices) and {data 2, expert 2, tensor 2} (rows and heads
split; the kernel runs in shard_map) gives one device's 'xla' output and gradients (input and
every param) on packed and padded rows.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.model.helpers import rel_err
from tests.multidevice import splash_cases as cases


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """Starts the 8-device worker, computes the 1-device reference meanwhile, returns both."""
  out = tmp_path_factory.mktemp('splash') / 'splash.npz'
  worker = os.path.join(os.path.dirname(__file__), 'splash_worker.py')
  proc = subprocess.Popen([sys.executable, worker, str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    reference = cases.run('xla')
    log, _ = proc.communicate(timeout=900)
  finally:
    proc.kill()
  assert proc.returncode == 0, f'splash_worker.py failed:\n{log[-4000:]}'
  return dict(np.load(out)), reference


@pytest.mark.parametrize('mesh', [cases.mesh_name(m) for m in cases.MESHES])
def test_splash_in_mesh_equals_one_device_xla(results, mesh):
  sharded, reference = results
  assert len(reference) > 8  # out, dx and the layer's params (LF convolutions, norm, q k v o)
  for k, want in reference.items():
    assert rel_err(sharded[f'{mesh}/{k}'], want) < 1e-5, k
