import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yuanjax import config_lib
from yuanjax.model import grouped_matmul as gm
from tests.model.helpers import rel_err

KERNELS = ('megablox', 'tokamax')
TILING = (16, 128, 128)  # 16-row tiles: several tiles, groups that start mid-tile


def _value_and_grads(gmm, xs, w, sizes):
  """(output, (d xs, d w) of sum(sin(output))), one compile."""

  def loss(xs, w):
    y = gmm(xs, w, sizes)
    return jnp.sum(jnp.sin(y)), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(xs, w)
  return y, grads


@pytest.mark.parametrize('kind', KERNELS)
def test_kernel_equals_ragged_dot_and_rows_past_the_groups_are_zero(kind):
  """40 rows, 4 groups (one empty) covering 29 rows: megablox pads to 48 and leaves the rows
  past the groups uninitialised (NaN in interpret mode); they must come out zero, with zero
  gradient, and everything else must equal jax.lax.ragged_dot."""
  xs = jax.random.normal(jax.random.key(0), (40, 32))
  w = jax.random.normal(jax.random.key(1), (4, 32, 48))
  sizes = jnp.array([7, 0, 13, 9], jnp.int32)
  y, (dxs, dw) = _value_and_grads(gm.GroupedMatmul(kind, TILING), xs, w, sizes)
  y_ref, (dxs_ref, dw_ref) = _value_and_grads(gm.RAGGED_DOT, xs, w, sizes)
  np.testing.assert_array_equal(y[29:], 0.0)
  np.testing.assert_array_equal(dxs[29:], 0.0)
  assert rel_err(y, y_ref) < 1e-6
  assert rel_err(dxs, dxs_ref) < 1e-6 and rel_err(dw, dw_ref) < 1e-6


def test_megablox_tiles_clamp_to_the_problem():
  assert gm.megablox_tiles(40, 32, 48, (128, 128, 128)) == (48, 32, 48)
  assert gm.megablox_tiles(8192, 2048, 16384, (512, 1024, 1024)) == (512, 1024, 1024)
  assert gm.megablox_tiles(5, 2048, 8192, (16, 128, 256)) == (16, 128, 256)


@pytest.mark.parametrize('overrides,pattern', [
    ({
        'moe.grouped_matmul': 'cutlass'
    }, r'config\.model\.moe\.grouped_matmul=.cutlass.'),
    ({
        'moe.grouped_matmul': 'megablox',
        'dtype': 'float16'
    }, r'config\.model\.dtype=.float16.'),
    ({
        'moe.grouped_matmul': 'megablox',
        'moe.megablox_tiling': (8, 128, 128)
    }, r'config\.model\.moe\.megablox_tiling=\(8, 128, 128\).*tm a multiple of 16'),
    ({
        'moe.grouped_matmul': 'megablox',
        'moe.megablox_tiling': (16, 100, 128)
    }, r'config\.model\.moe\.megablox_tiling'),
])
def test_bad_grouped_matmul_config_names_the_field(overrides, pattern):
  m = config_lib.tiny_model()
  config_lib.override(m, overrides)
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate_model(m)


def test_missing_tokamax_names_the_extra(monkeypatch):
  """tokamax not installed (simulated: a None entry makes `import tokamax` fail): config
  validation and the layer itself say which field wants it and how to install it."""
  monkeypatch.setitem(sys.modules, 'tokamax', None)
  m = config_lib.tiny_model()
  m.moe.update(dispatch='dropless', grouped_matmul='tokamax')
  pattern = r"grouped_matmul='tokamax' needs .*pip install 'yuanjax\[tokamax\]'"
  with pytest.raises(ImportError, match=pattern):
    config_lib.validate_model(m)
  from yuanjax.model import moe
  x = jnp.zeros((1, 4, m.hidden_size))
  with pytest.raises(ImportError, match=pattern):
    jax.eval_shape(moe.MoE(m).init, jax.random.key(0), x)  # traced only: nothing compiles
