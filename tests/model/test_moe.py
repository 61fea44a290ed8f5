import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yuanjax.model import moe, routers
from tests.model.helpers import rel_err, tiny, tree_rel_err


def _run(cfg, x, v=None):
  mod = moe.MoE(cfg)
  if v is None:
    v = mod.init(jax.random.key(0), x)
    v = jax.tree_util.tree_map(lambda a: a * 5.0, v)  # spread the router out

  def loss(v, x):
    y, stats = mod.apply(v, x)
    return jnp.sum(jnp.sin(y)), (y, stats)

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v, x)
  return v, y, stats, grads


@pytest.mark.parametrize('rtype', sorted(routers.ROUTERS))
def test_dispatches_agree_with_ample_capacity(rtype):
  base = {'router.type': rtype, 'router.num_shared_experts': 1 if rtype == 'shared' else 0}
  x = jax.random.normal(jax.random.key(1), (2, 10, tiny().hidden_size))
  ample = 1.0 if rtype == 'expert_choice' else 4.0 / 2  # C = T for token choice (E/k)
  v, y_ref, s_ref, g_ref = _run(
      tiny(**base, **{
          'moe.dispatch': 'dense',
          'moe.capacity_factor': ample
      }), x)
  for d in ('dropless', 'capacity'):
    _, y, s, g = _run(tiny(**base, **{'moe.dispatch': d, 'moe.capacity_factor': ample}), x, v)
    assert rel_err(y, y_ref) < 1e-5, d
    assert tree_rel_err(g, g_ref) < 1e-5, d
    assert float(s['dropped_fraction']) == 0.0
    np.testing.assert_allclose(s['load'], s_ref['load'])


@pytest.fixture(scope='module')
def dense_reference():
  """The Attention Router layer with the dense dispatch: (variables, x, y, grads)."""
  x = jax.random.normal(jax.random.key(1), (2, 10, tiny().hidden_size))
  v, y, _, grads = _run(tiny(**{'moe.dispatch': 'dense'}), x)
  return v, x, y, grads


@pytest.mark.parametrize('kernel', ['megablox', 'tokamax'])
def test_dropless_grouped_matmul_kernels_equal_dense(dense_reference, kernel):
  """Forward and gradients (inputs, expert weights, router) of dropless with each optional
  kernel equal the dense dispatch. Megablox in interpret mode with 16-row tiles: 40 slots
  padded to 48, groups starting mid-tile."""
  v, x, y_ref, g_ref = dense_reference
  cfg = tiny(**{
      'moe.dispatch': 'dropless',
      'moe.grouped_matmul': kernel,
      'moe.megablox_tiling': (16, 128, 128)
  })
  _, y, stats, g = _run(cfg, x, v)
  assert rel_err(y, y_ref) < 1e-5
  assert tree_rel_err(g, g_ref) < 1e-5  # params (w1, w2, router) and x
  assert float(stats['dropped_fraction']) == 0.0


def test_capacity_drops_counted_exactly():
  """Hand-made overload: 5 tokens, top-1, all to expert 0, capacity 2."""
  T, D, E, F = 5, 3, 2, 4
  x = jax.random.normal(jax.random.key(0), (T, D))
  w1 = jax.random.normal(jax.random.key(1), (E, D, 2 * F))
  w2 = jax.random.normal(jax.random.key(2), (E, F, D))
  r = routers.Routing(token_A=jnp.arange(T), expert_A=jnp.array([0, 0, 1, 0, 0]),
                      weight_A=jnp.ones(T), valid_A=jnp.ones(T, bool), probs_TxE=jnp.full(
                          (T, E), 0.5), aux={})
  y, dropped = moe.capacity_dispatch(x, r, w1, w2, capacity=2)
  assert float(dropped) == pytest.approx(2 / 5)  # tokens 3 and 4 overflow expert 0
  full, _ = moe.dense_dispatch(x, r, w1, w2)
  np.testing.assert_allclose(y[:3], full[:3], rtol=1e-5)
  np.testing.assert_array_equal(y[3:], 0.0)  # dropped: only the residual remains


def test_capacity_drop_fraction_in_stats():
  cfg = tiny(**{'moe.dispatch': 'capacity', 'moe.capacity_factor': 0.25})
  x = jax.random.normal(jax.random.key(1), (1, 16, cfg.hidden_size))
  _, _, stats, _ = _run(cfg, x)
  C = routers.expert_capacity(16, cfg.num_experts, 2, 0.25)
  load = np.asarray(stats['load']) * 32
  np.testing.assert_allclose(float(stats['dropped_fraction']),
                             np.maximum(load - C, 0).sum() / 32, rtol=1e-6)


def test_shared_experts_always_on():
  cfg = tiny(**{'router.type': 'shared', 'router.num_shared_experts': 2, 'moe.dispatch': 'dense'})
  x = jax.random.normal(jax.random.key(1), (1, 6, cfg.hidden_size))
  mod = moe.MoE(cfg)
  v = mod.init(jax.random.key(0), x)
  y, _ = mod.apply(v, x)
  p = nn.unbox(v)['params']
  routed = jax.tree_util.tree_map(lambda a: a, v)
  routed['params']['shared_w2'] = nn.LogicallyPartitioned(jnp.zeros_like(p['shared_w2']),
                                                          ('shared', 'mlp', 'embed'))
  y_routed, _ = mod.apply(routed, x)
  xs = x.reshape(6, -1)
  h = jnp.einsum('td,ndf->tnf', xs, p['shared_w1'])
  g, u = jnp.split(h, 2, -1)
  shared = jnp.einsum('tnf,nfd->td', jax.nn.silu(g) * u, p['shared_w2']).reshape(y.shape)
  assert rel_err(y - y_routed, shared) < 1e-5


def test_stats_values():
  cfg = tiny(**{'moe.dispatch': 'dropless'})
  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.hidden_size))
  _, _, s, _ = _run(cfg, x)
  np.testing.assert_allclose(np.sum(s['load']), 1.0, rtol=1e-6)
  assert float(s['max_load']) == pytest.approx(float(np.max(s['load']) * cfg.num_experts))
  assert 0.0 < float(s['entropy']) <= np.log(cfg.num_experts) + 1e-6
