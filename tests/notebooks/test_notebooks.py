"""notebooks/: every jupytext source is paired with its .ipynb, and runs in smoke mode."""
import os

import jupytext
import nbformat
import pytest

from yuanjax.analysis import notebook

SOURCES = notebook.sources()
FIX = 'run `make notebooks` (or `jupytext --sync notebooks/*.py`)'


def _cells(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_notebooks_and_no_orphans():
  names = [os.path.basename(s)[:-3] for s in SOURCES]
  assert names == ['01_quickstart', '02_router_inspection', '03_ablation_results', '04_scale_out']
  ipynbs = [f[:-6] for f in os.listdir(notebook.NOTEBOOKS_DIR) if f.endswith('.ipynb')]
  assert sorted(ipynbs) == sorted(names), f'.ipynb without a .py source (or the reverse); {FIX}'


@pytest.mark.parametrize('source', SOURCES, ids=os.path.basename)
def test_pair_in_sync(source):
  ipynb = nbformat.read(source[:-3] + '.ipynb', as_version=4)
  assert _cells(ipynb) == _cells(jupytext.read(source)), f'{source} and its .ipynb differ; {FIX}'
  assert 'py:percent' in ipynb.metadata['jupytext']['formats']
  first = ipynb.cells[0].source
  assert 'colab.research.google.com/github/' in first and os.path.basename(source)[:-3] in first
  assert any(c.cell_type == 'code' and c.outputs for c in ipynb.cells), \
      f'{source[:-3]}.ipynb carries no outputs; {FIX}'


@pytest.fixture(scope='module')
def smoke_env(tmp_path_factory, smoke_study):
  """Smoke mode; one notebook dir for the module, so 02 opens the workdir 01 trained; 03 reads
  the session's smoke study (tests/conftest.py: one failed run among them) instead of running
  its own."""
  env = {
      'YUANJAX_NOTEBOOK_SMOKE': '1',
      'YUANJAX_NOTEBOOK_DIR': str(tmp_path_factory.mktemp('notebooks')),
      'YUANJAX_SWEEP_DIRS': str(smoke_study)
  }
  saved = {
      k: os.environ.get(k) for k in list(env) +
      ['YUANJAX_CHECKPOINT', 'YUANJAX_WORKDIR', 'YUANJAX_TEXT_SETS', 'YUANJAX_SWEEP_DIRS']
  }
  for k in saved:
    os.environ.pop(k, None)
  os.environ.update(env)  # the kernel inherits this process's environment (XLA_FLAGS too)
  yield
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.mark.parametrize('source', SOURCES, ids=os.path.basename)
def test_runs_in_smoke_mode(source, smoke_env):
  nb = notebook.execute(source, timeout=300)  # raises on any cell error
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count for c in code)
  assert any('image/png' in o.get('data', {}) for c in code for o in c.outputs)
