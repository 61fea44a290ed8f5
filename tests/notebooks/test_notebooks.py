"""notebooks/: every jupytext source is paired with its .ipynb, names the one repository, and
runs in smoke mode where yuanjax is pip-installed from a wheel (as in Colab), not the checkout."""
import os
import shutil
import subprocess
import sys

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
  assert notebook.colab_url(os.path.basename(source)[:-3]) in first
  assert any(c.cell_type == 'code' and c.outputs for c in ipynb.cells), \
      f'{source[:-3]}.ipynb carries no outputs; {FIX}'


@pytest.mark.parametrize('source', SOURCES, ids=os.path.basename)
def test_badge_and_install_cell_name_the_repository(source):
  with open(source, encoding='utf-8') as f:
    text = f.read()
  assert notebook.stamp(text, os.path.basename(source)[:-3]) == text, \
      f'{source} names another repository than notebook.REPOSITORY; {FIX}'
  assert f"'yuanjax[notebooks] @ git+{notebook.REPOSITORY}'" in text


def test_stamp_replaces_another_repository():
  text = ('[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
          '(https://colab.research.google.com/github/me/fork/blob/dev/notebooks/02_x.ipynb)\n'
          "pip install 'yuanjax @ git+https://gitlab.com/me/fork.git'\n")
  assert notebook.stamp(
      text,
      '02_x') == ('[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
                  f'({notebook.colab_url("02_x")})\n'
                  f"pip install 'yuanjax @ git+{notebook.REPOSITORY}'\n")
  assert notebook.colab_url('02_x') == ('https://colab.research.google.com/github/'
                                        f"{notebook.REPOSITORY.removeprefix('https://github.com/')}"
                                        '/blob/main/notebooks/02_x.ipynb')


def test_source_tree_is_the_checkout_else_a_clone(tmp_path, monkeypatch):
  checkout = notebook.CHECKOUT
  assert notebook.source_tree() == checkout  # the tests run from a checkout
  monkeypatch.setattr(notebook, 'CHECKOUT', str(tmp_path / 'site-packages'))  # pip-installed
  monkeypatch.setattr(notebook, 'REPOSITORY', 'file://' + checkout)
  monkeypatch.setenv('YUANJAX_NOTEBOOK_DIR', str(tmp_path / 'nb'))
  clone = notebook.source_tree()
  assert clone == str(tmp_path / 'nb' / 'yuanjax-source')
  for name in ('launch/sweep.py', 'configs/router_ablation.py'):
    assert os.path.isfile(os.path.join(clone, name)), name
  os.remove(os.path.join(clone, 'launch', 'sweep.py'))
  assert notebook.source_tree() == clone  # cloned once: the second call reuses it
  assert not os.path.exists(os.path.join(clone, 'launch', 'sweep.py'))


@pytest.fixture(scope='module')
def wheel_site(tmp_path_factory):
  """A folder holding only yuanjax, pip-installed from a wheel built of setup.py and yuanjax/
  (copied, so no build/ is left in the checkout; its dependencies come from the venv)."""
  tmp = tmp_path_factory.mktemp('wheel')
  shutil.copytree(os.path.join(notebook.CHECKOUT, 'yuanjax'), tmp / 'src' / 'yuanjax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(notebook.CHECKOUT, 'setup.py'), tmp / 'src')
  pip = [sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check']
  subprocess.run(pip + ['wheel', '--no-deps', f'{tmp / "src"}', '-w', f'{tmp / "dist"}'],
                 check=True, timeout=600)
  (wheel,) = (tmp / 'dist').glob('yuanjax-*.whl')
  subprocess.run(pip + ['install', '--no-deps', '--target', f'{tmp / "site"}', f'{wheel}'],
                 check=True, timeout=600)
  return tmp / 'site'


@pytest.fixture(scope='module')
def smoke_env(tmp_path_factory, smoke_study, wheel_site):
  """Smoke mode; yuanjax from the wheel only (the kernels inherit PYTHONPATH); one notebook dir
  for the module, so 02 opens the workdir 01 trained; 03 reads the session's smoke study
  (tests/conftest.py: one failed run among them) instead of running its own."""
  env = {
      'YUANJAX_NOTEBOOK_SMOKE': '1',
      'YUANJAX_NOTEBOOK_DIR': str(tmp_path_factory.mktemp('notebooks')),
      'YUANJAX_SWEEP_DIRS': str(smoke_study),
      'PYTHONPATH': str(wheel_site),
  }
  saved = {
      k: os.environ.get(k) for k in list(env) +
      ['YUANJAX_CHECKPOINT', 'YUANJAX_WORKDIR', 'YUANJAX_TEXT_SETS', 'YUANJAX_SWEEP_DIRS']
  }
  for k in saved:
    os.environ.pop(k, None)
  os.environ.update(env)  # the kernel inherits this process's environment (XLA_FLAGS too)
  yield wheel_site
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


# Appended to each notebook: where yuanjax came from, and whether the checkout's launch/ shows.
WHERE = "import importlib.util, yuanjax\nprint(yuanjax.__file__, importlib.util.find_spec('launch'))"


def _as_in_colab(source: str, folder) -> str:
  """A copy of `source` in `folder` without its install cell (in Colab, `import yuanjax` fails
  there and pip installs it: nothing is bound), with WHERE as its last cell."""
  nb = jupytext.read(source)
  cells = [c for c in nb.cells if 'except ImportError:' not in c.source]
  assert len(cells) == len(nb.cells) - 1, f'{source}: one install cell expected'
  nb.cells = cells + [nbformat.v4.new_code_cell(WHERE)]
  path = str(folder / os.path.basename(source))
  jupytext.write(nb, path, fmt='py:percent')
  return path


@pytest.mark.parametrize('source', SOURCES, ids=os.path.basename)
def test_runs_in_smoke_mode_from_a_wheel(source, smoke_env, tmp_path):
  """In a folder outside the checkout, as Colab runs it; raises on any cell error."""
  nb = notebook.execute(_as_in_colab(source, tmp_path), timeout=300)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count for c in code)
  assert any('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  where = code[-1].outputs[0]['text'].split()
  assert where == [str(smoke_env / 'yuanjax' / '__init__.py'), 'None'], where
