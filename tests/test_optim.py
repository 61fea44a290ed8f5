import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yuanjax import optim


def _cfg():
  return ml_collections.ConfigDict(
      dict(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
           clip_norm=1.0))


def test_schedule_shape():
  s = optim.schedule(_cfg(), 100)
  lr = np.array([float(s(i)) for i in range(101)])
  assert lr[0] == 0.0
  np.testing.assert_allclose(lr[:11], np.linspace(0, 1e-3, 11), rtol=1e-5)  # linear warm-up
  assert np.all(np.diff(lr[10:]) <= 1e-12)  # then only down
  np.testing.assert_allclose(lr[100], 1e-4, rtol=1e-5)  # to the floor
  mid = 10 + 45  # cosine midpoint
  np.testing.assert_allclose(lr[mid], 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-4)


def test_weight_decay_skips_norms_and_biases():
  boxed = {
      'w': nn.LogicallyPartitioned(jnp.ones((3, 4)), ('embed', 'mlp')),
      'scale': nn.LogicallyPartitioned(jnp.ones((2, 4)), ('layers', 'norm')),
      'stacked': nn.LogicallyPartitioned(jnp.ones((2, 3, 4)), ('layers', 'embed', 'mlp'))
  }
  mask = optim.decay_mask(boxed)
  assert mask == {'w': True, 'scale': False, 'stacked': True}
  cfg = _cfg()
  cfg.lr, cfg.warmup_steps = 1.0, 0
  opt = optim.make_optimizer(cfg, 10, boxed)
  params = nn.unbox(boxed)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, opt.init(params), params)
  assert float(jnp.abs(updates['scale']).max()) == 0.0  # no decay on the norm scale
  assert float(jnp.abs(updates['w']).max()) > 0.0  # decay on the matrix
