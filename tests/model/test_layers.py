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
  want = x / np.sqrt((x.astype(np.float64)**2).mean(-1, keepdims=True) + 1e-6) * np.arange(1, 9)
  assert rel_err(norm.apply(v, x), want) < 1e-6


def test_rotary_matches_formula_and_passes_rest_through():
  B, L, H, K, R, base = 1, 7, 2, 12, 8, 10000.0
  x = np.random.RandomState(1).randn(B, L, H, K).astype(np.float32)
  pos = np.array([[0, 1, 2, 300, 4097, 5, 6]])
  out = np.asarray(layers.apply_rotary(jnp.asarray(x), jnp.asarray(pos), R, base))
  want = x.astype(np.float64).copy()
  for t in range(L):
    for j in range(R // 2):
      theta = pos[0, t] * base**(-2.0 * j / R)
      a, b = x[0, t, :, j].astype(np.float64), x[0, t, :, j + R // 2].astype(np.float64)
      want[0, t, :, j] = a * np.cos(theta) - b * np.sin(theta)
      want[0, t, :, j + R // 2] = b * np.cos(theta) + a * np.sin(theta)
  np.testing.assert_array_equal(out[..., R:], x[..., R:])  # pass-through dims untouched
  assert rel_err(out, want) < 1e-5


def test_ntk_base_matches_yuan_16k():
  assert abs(layers.rope_base(10000.0, 128, 4.0) - 40890) < 1.0
  assert layers.rope_base(10000.0, 128, 1.0) == 10000.0


def test_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3]])
  chex.assert_trees_all_equal(layers.positions_from_segments(seg),
                              jnp.array([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))


def test_rotary_hf_bf16_rounds_like_the_hf_runtime():
  """Spec quirk 3: inv_freq, positions, angles and cos/sin in bfloat16."""
  import ml_dtypes
  bf = lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
  R, base = 8, 10000.0
  pos = np.array([[0, 1, 7, 255, 256, 257, 300, 4097]])
  cos, sin = layers.rotary_angles(jnp.asarray(pos), R, base, hf_bf16=True)
  inv = 1.0 / base**(np.arange(0, R, 2, dtype=np.float32) / R)
  angles = bf(bf(pos)[..., None] * bf(inv))
  np.testing.assert_allclose(cos, bf(np.cos(angles)), atol=2**-8, rtol=0)
  np.testing.assert_allclose(sin, bf(np.sin(angles)), atol=2**-8, rtol=0)
  np.testing.assert_array_equal(cos[0, 4], cos[0, 5])  # 257 rounds to 256
  exact_cos, _ = layers.rotary_angles(jnp.asarray(pos), R, base)
  assert np.abs(np.asarray(exact_cos[0, 4]) - np.asarray(exact_cos[0, 5])).max() > 1e-3
  assert np.abs(np.asarray(cos) - np.asarray(exact_cos)).max() > 1e-3
  x = jnp.asarray(np.random.RandomState(0).randn(1, 8, 2, 12).astype(np.float32))
  assert np.abs(
      np.asarray(
          layers.apply_rotary(x, jnp.asarray(pos), R, base, hf_bf16=True) -
          layers.apply_rotary(x, jnp.asarray(pos), R, base))).max() > 1e-3
