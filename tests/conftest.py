"""Shared test helpers: a relative-norm comparison, and the smoke ablation study that
tests/test_report.py and the notebook tests (03) both read (run once per session)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite is compile-bound (tiny shapes, many programs): XLA:CPU's backend optimisations
# roughly halve compile time when off and cost little at these sizes. Subprocesses inherit.
_FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FAST_COMPILE).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel_err(a, b):
  """||a - b|| / ||b||, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smoke study plus a linear-router run whose seed is not an int: it fails at config
# parsing (exit status != 0), in the `linear` variant's group.
CONFIG = textwrap.dedent(f'''\
    import importlib.util
    _spec = importlib.util.spec_from_file_location(
        'router_ablation', {os.path.join(REPO, 'configs', 'router_ablation.py')!r})
    base = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(base)
    get_config = base.get_config


    def sweep(arg=None):
      return base.sweep(arg) + [{{'model.router.type': 'linear', 'train.seed': 'bad'}}]
    ''')


@pytest.fixture(scope='session')
def smoke_study(tmp_path_factory):
  """launch.sweep of configs/router_ablation.py:smoke (2 routers x 2 seeds) + one failing run."""
  tmp = tmp_path_factory.mktemp('study')
  cfg = tmp / 'study.py'
  cfg.write_text(CONFIG)
  argv = [
      sys.executable, '-m', 'launch.sweep', '--backend=local', '--parallel=2', '--num_processes=1',
      f'--config={cfg}:smoke', f'--workdir={tmp / "sw"}'
  ]
  r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]  # the bad run failed, the others did not
  return tmp / 'sw'
