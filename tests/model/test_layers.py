import chex
import jax
import jax.numpy as jnp
import numpy as np

from yuanjax.model import layers
from tests.model.helpers import rel_err


def test_rmsnorm_matches_numpy():
  x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  norm = layers.RMSNorm(eps=1e-6)
  v = norm.init(jax.random.key(0), x)
  v = jax.tree_util.tree_map(lambda s: s * 0 + np.arange(1, 9, dtype=np.float32), v)
  want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * np.arange(1, 9)
  assert rel_err(norm.apply(v, x), want) < 1e-6


def test_rotary_matches_formula_and_passes_rest_through():
  B, L, H, K, R, base = 1, 7, 2, 12, 8, 10000.0
  x = np.random.RandomState(1).randn(B, L, H, K).astype(np.float32)
  pos = np.array([[0, 1, 2, 300, 4097, 5, 6]])
  out = np.asarray(layers.apply_rotary(jnp.asarray(x), jnp.asarray(pos), R, base))
  want = x.astype(np.float64).copy()
  for t in range(L):
    for j in range(R // 2):
      theta = pos[0, t] * base ** (-2.0 * j / R)
      a, b = x[0, t, :, j].astype(np.float64), x[0, t, :, j + R // 2].astype(np.float64)
      want[0, t, :, j] = a * np.cos(theta) - b * np.sin(theta)
      want[0, t, :, j + R // 2] = b * np.cos(theta) + a * np.sin(theta)
  np.testing.assert_array_equal(out[..., R:], x[..., R:])   # pass-through dims untouched
  assert rel_err(out, want) < 1e-5


def test_ntk_base_matches_yuan_16k():
  assert abs(layers.rope_base(10000.0, 128, 4.0) - 40890) < 1.0
  assert layers.rope_base(10000.0, 128, 1.0) == 10000.0


def test_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3]])
  chex.assert_trees_all_equal(layers.positions_from_segments(seg),
                              jnp.array([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
