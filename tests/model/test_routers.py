import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yuanjax.model import routers
from tests.model.helpers import rel_err, tiny

TOKEN_CHOICE = routers.causal_routers()


def _init(rtype, T=24, **kw):
  cfg = tiny(**{
      'router.type': rtype,
      'router.num_shared_experts': 1 if rtype == 'shared' else 0,
      **kw
  })
  router = routers.make_router(cfg)
  u = jax.random.normal(jax.random.key(3), (T, cfg.hidden_size))
  v = router.init(jax.random.key(0), u)
  # Larger weights than init so the choice is not near-uniform.
  v = jax.tree_util.tree_map(lambda x: x * 10.0, v)
  return cfg, router, v, u


@pytest.mark.parametrize('rtype', TOKEN_CHOICE)
@pytest.mark.parametrize('norm', [True, False])
def test_token_choice_weights_and_topk(rtype, norm):
  cfg, router, v, u = _init(rtype, **{'router.norm_topk_prob': norm})
  r = router.apply(v, u)
  k, T = cfg.router.top_k, u.shape[0]
  w = np.asarray(r.weight_A).reshape(T, k)
  assert (w >= 0).all()
  if norm:
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  probs = np.asarray(r.probs_TxE)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  brute = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  np.testing.assert_array_equal(np.sort(np.asarray(r.expert_A).reshape(T, k), -1),
                                np.sort(brute, -1))
  np.testing.assert_array_equal(
      np.asarray(r.token_A).reshape(T, k), np.repeat(np.arange(T)[:, None], k, 1))


def _attention_router_numpy(params, u):
  """The paper's equation, token by token, float64; W' in R^{N x d}."""
  Wq, Wk, Wv = (np.asarray(params[n], np.float64).T for n in ('wq', 'wk', 'wv'))
  out = []
  for x in np.asarray(u, np.float64):
    q, k, v = Wq @ x, Wk @ x, Wv @ x
    s = np.outer(q, k)
    A = np.exp(s - s.max(1, keepdims=True))
    A /= A.sum(1, keepdims=True)
    logits = A @ v
    p = np.exp(logits - logits.max())
    out.append(p / p.sum())
  return np.stack(out)


def test_attention_router_matches_numpy_equation():
  cfg, router, v, u = _init('attention')
  r = router.apply(v, u)
  assert rel_err(r.probs_TxE, _attention_router_numpy(nn.unbox(v)['params'], u)) < 1e-5


def test_attention_router_sows_its_expert_matrix():
  """The sown E×E matrix is the equation's softmax_row(q kᵀ), token by token."""
  cfg, router, v, u = _init('attention', T=6)
  p = {n: np.asarray(w, np.float64) for n, w in nn.unbox(v)['params'].items()}
  r_plain = router.apply(v, u)
  r, state = router.apply(v, u, mutable=['intermediates'])
  (attn_TxExE,) = state['intermediates']['expert_attention']
  u64 = np.asarray(u, np.float64)
  s_TxExE = (u64 @ p['wq'])[:, :, None] * (u64 @ p['wk'])[:, None, :]
  want = np.exp(s_TxExE - s_TxExE.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  assert attn_TxExE.shape == (6, cfg.num_experts, cfg.num_experts)
  assert rel_err(attn_TxExE, want) < 1e-5
  np.testing.assert_array_equal(r.probs_TxE, r_plain.probs_TxE)  # sowing changes nothing


@pytest.mark.parametrize('rtype', sorted(routers.ROUTERS))
def test_gradients_reach_router_params(rtype):
  cfg, router, v, u = _init(rtype)
  target = jax.random.normal(jax.random.key(9), (u.shape[0], cfg.num_experts))

  def loss(v):
    r = router.apply(v, u)
    combine = jnp.zeros((u.shape[0], cfg.num_experts)).at[r.token_A, r.expert_A].add(r.weight_A)
    return jnp.sum(combine * target) + jnp.sum(r.probs_TxE * target)

  grads = nn.unbox(jax.grad(loss)(v))['params']
  for name, g in grads.items():
    assert np.abs(np.asarray(g)).max() > 0, name


def test_expert_choice_each_expert_takes_top_c_tokens():
  cfg, router, v, u = _init('expert_choice', **{'moe.capacity_factor': 1.0})
  r = router.apply(v, u)
  T, E = u.shape[0], cfg.num_experts
  C = routers.expert_capacity(T, E, cfg.router.top_k, 1.0)
  tok = np.asarray(r.token_A).reshape(E, C)
  probs = np.asarray(r.probs_TxE)
  for e in range(E):
    assert set(tok[e]) == set(np.argsort(-probs[:, e], kind='stable')[:C])
  np.testing.assert_allclose(
      np.asarray(r.weight_A).reshape(E, C), np.take_along_axis(probs.T, tok, 1))


def test_aux_losses():
  probs = jnp.full((8, 4), 0.25)
  experts = jnp.arange(16) % 4
  assert abs(float(routers.load_balance_loss(probs, experts, jnp.ones(16, bool))) - 1.0) < 1e-6
  skew = jnp.zeros(16, jnp.int32)  # everything to expert 0 with p_0 = 1 -> loss E
  p0 = jnp.zeros((8, 4)).at[:, 0].set(1.0)
  assert abs(float(routers.load_balance_loss(p0, skew, jnp.ones(16, bool))) - 4.0) < 1e-6
  logits = np.random.RandomState(0).randn(5, 4)
  want = np.mean(np.log(np.exp(logits).sum(-1))**2)
  assert abs(float(routers.z_loss(jnp.asarray(logits))) - want) < 1e-5
  cfg, router, v, u = _init('linear', **{
      'router.load_balance_weight': 0.5,
      'router.z_loss_weight': 0.1
  })
  aux = router.apply(v, u).aux
  np.testing.assert_allclose(aux['aux_loss'], 0.5 * aux['load_balance_loss'] + 0.1 * aux['z_loss'],
                             rtol=1e-6)


@pytest.mark.parametrize('opt', [{'router.jitter_eps': 0.1}, {'router.noisy_topk': True}])
def test_router_noise_only_in_training_and_seeded(opt):
  cfg, router, v, u = _init('linear', **opt)
  clean = router.apply(v, u).probs_TxE
  det = router.apply(v, u, deterministic=True, rngs={'router': jax.random.key(1)}).probs_TxE
  n1 = router.apply(v, u, deterministic=False, rngs={'router': jax.random.key(1)}).probs_TxE
  n1b = router.apply(v, u, deterministic=False, rngs={'router': jax.random.key(1)}).probs_TxE
  n2 = router.apply(v, u, deterministic=False, rngs={'router': jax.random.key(2)}).probs_TxE
  np.testing.assert_array_equal(clean, det)
  np.testing.assert_array_equal(n1, n1b)
  assert rel_err(n1, clean) > 1e-4 and rel_err(n1, n2) > 1e-4


def test_unknown_router_is_named():
  cfg = tiny()
  cfg.router.type = 'nope'
  with pytest.raises(ValueError, match='router.type'):
    routers.make_router(cfg)
