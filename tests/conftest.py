"""Shared test helpers: a relative-norm comparison, and the smoke ablation study that
tests/test_report.py and the notebook tests (03) both read (run once per session, also under
pytest-xdist)."""
import os
import shutil
import subprocess
import sys
import textwrap

import filelock
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
    from yuanjax import workdir
    base = workdir.load_config_module({os.path.join(REPO, 'configs', 'router_ablation.py')!r})
    get_config = base.get_config


    def sweep(arg=None):
      return base.sweep(arg) + [{{'model.router.type': 'linear', 'train.seed': 'bad'}}]
    ''')


def session_dir(tmp_path_factory):
  """This session's temporary folder, the same one in every pytest-xdist worker."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='session')
def smoke_study(tmp_path_factory):
  """launch.sweep of configs/router_ablation.py:smoke (2 routers x 2 seeds) + one failing run.

  Run once per session: under pytest-xdist the first worker that asks runs it, under a file
  lock, and the others wait for it and read the same folder."""
  tmp = session_dir(tmp_path_factory) / 'smoke_study'
  with filelock.FileLock(f'{tmp}.lock'):
    if not (tmp / 'ok').exists():
      _run_smoke_study(tmp)
  return tmp / 'sw'


def _run_smoke_study(tmp):
  shutil.rmtree(tmp, ignore_errors=True)  # a worker that failed at it before left this
  tmp.mkdir()
  cfg = tmp / 'study.py'
  cfg.write_text(CONFIG)
  argv = [
      sys.executable, '-m', 'launch.sweep', '--backend=local', '--parallel=2', '--num_processes=1',
      f'--config={cfg}:smoke', f'--workdir={tmp / "sw"}'
  ]
  r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]  # the bad run failed, the others did not
  (tmp / 'ok').touch()
