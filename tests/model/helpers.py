"""Tiny configs for model tests."""
import flax.linen as nn
import jax
import numpy as np

from yuanjax import config_lib


def tiny(**overrides):
  """The tiny M32 config with dotted-name overrides, e.g. tiny(**{'router.type': 'linear'})."""
  m = config_lib.tiny_model()
  m.update(
      dict(vocab_size=97, hidden_size=32, num_heads=2, head_dim=16, rotary_dims=8, num_experts=4,
           dense_ffn_size=48))
  m.moe.ffn_size = 24
  m.moe.dispatch = 'dropless'  # exact regardless of grouping (packing, batching)
  config_lib.override(m, overrides)
  config_lib.validate_model(m)
  return m


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel_err(a, b):
  la, lb = jax.tree_util.tree_leaves(nn.unbox(a)), jax.tree_util.tree_leaves(nn.unbox(b))
  assert len(la) == len(lb)
  return max(rel_err(x, y) for x, y in zip(la, lb))


def tiny_mixtral(**overrides):
  """`tiny` in Mixtral's shape: standard attention, 4 query heads on 2 key/value heads, rotary
  over the whole head (theta 1e6)."""
  return tiny(
      **{
          'attention_type': 'standard',
          'num_heads': 4,
          'num_kv_heads': 2,
          'head_dim': 8,
          'rotary_dims': 8,
          'rope_base': 1e6,
          **overrides
      })
