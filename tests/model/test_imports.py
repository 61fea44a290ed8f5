"""`yuanjax.model` is a leaf package: it imports nothing from yuanjax but itself and sharding."""
import ast
import pathlib

import pytest

import yuanjax.model

MODEL_DIR = pathlib.Path(yuanjax.model.__file__).parent
ALLOWED = ('yuanjax.model', 'yuanjax.sharding')


def yuanjax_imports(source: str) -> set[str]:
  """The yuanjax modules a `yuanjax/model/*.py` source imports (anywhere in it), dotted."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative to yuanjax.model (level 1), yuanjax (2), ...
        parent = ['yuanjax', 'model'][:3 - node.level]
        base = '.'.join(parent + ([base] if base else []))
      found.update(f'{base}.{a.name}' for a in node.names)
  return {m for m in found if m == 'yuanjax' or m.startswith('yuanjax.')}


def outside(modules) -> set[str]:
  return {m for m in modules if not any(m == a or m.startswith(a + '.') for a in ALLOWED)}


def test_checker_sees_upward_imports():
  source = ('import jax\nfrom yuanjax import loss\nfrom yuanjax.model import layers\n'
            'def f():\n  import yuanjax.config_lib\n  from .. import stats\n  from . import moe\n'
            'from yuanjax import sharding\n')
  assert outside(yuanjax_imports(source)) == {'yuanjax.loss', 'yuanjax.config_lib', 'yuanjax.stats'}


@pytest.mark.parametrize('path', sorted(MODEL_DIR.glob('*.py')), ids=lambda p: p.name)
def test_model_imports_only_model_and_sharding(path):
  assert not outside(yuanjax_imports(path.read_text())), path
