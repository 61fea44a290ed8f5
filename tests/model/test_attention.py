import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yuanjax.model import attention
from tests.model.helpers import rel_err, tiny, tiny_mixtral

# The backends that run at these tiny lengths on the CPU ('splash' and 'cudnn':
# tests/model/test_attention_backends.py); 'auto' is 'dot_product_attention' here.
CPU_BACKENDS = ('xla', 'dot_product_attention', 'auto')


def _lfa_loop(p, u, eps):
  """Plain per-position loop of the spec's LFA equations (float64)."""
  u = u.astype(np.float64)
  A, a = p['conv1_kernel'].astype(np.float64), p['conv1_bias'].astype(np.float64)
  Bk, b = p['conv2_kernel'].astype(np.float64), p['conv2_bias'].astype(np.float64)
  Bsz, L, D = u.shape
  c1 = np.zeros((Bsz, L, D // 2))
  c2 = np.zeros((Bsz, L, D))
  for t in range(L):
    prev_u = u[:, t - 1] if t > 0 else np.zeros_like(u[:, 0])
    c1[:, t] = prev_u @ A[0] + u[:, t] @ A[1] + a
  for t in range(L):
    prev_c = c1[:, t - 1] if t > 0 else np.zeros_like(c1[:, 0])
    c2[:, t] = prev_c @ Bk[0] + c1[:, t] @ Bk[1] + b
  z = c2 + u
  return z / np.sqrt((z**2).mean(-1, keepdims=True) + eps) * p['norm']['scale']


def test_lfa_matches_plain_loop():
  cfg = tiny()
  lf = attention.LocalizedFiltering(cfg)
  u = np.random.RandomState(0).randn(2, 9, cfg.hidden_size).astype(np.float32)
  v = nn.unbox(lf.init(jax.random.key(0), u))
  v = jax.tree_util.tree_map(
      lambda x: x + 0.1 * np.random.RandomState(1).randn(*x.shape).astype(np.float32), v)
  assert rel_err(lf.apply(v, u), _lfa_loop(jax.device_get(v['params']), u, cfg.norm_eps)) < 1e-5


def test_lfa_does_not_cross_segments():
  cfg = tiny()
  lf = attention.LocalizedFiltering(cfg)
  u = np.random.RandomState(0).randn(1, 10, cfg.hidden_size).astype(np.float32)
  v = lf.init(jax.random.key(0), u)
  seg = jnp.array([[1] * 4 + [2] * 6])
  packed = lf.apply(v, u, seg)
  assert rel_err(packed[:, :4], lf.apply(v, u[:, :4])) < 1e-6
  assert rel_err(packed[:, 4:], lf.apply(v, u[:, 4:])) < 1e-6


def test_attention_backends_agree():
  x = np.random.RandomState(0).randn(2, 11, tiny().hidden_size).astype(np.float32)
  seg = jnp.array([[1] * 5 + [2] * 6, [1] * 11])
  pos = jnp.array([list(range(5)) + list(range(6)), list(range(11))])
  mod = attention.Attention(tiny())
  v = mod.init(jax.random.key(0), x, seg, pos)
  outs = [
      attention.Attention(tiny(attention_backend=b)).apply(v, x, s, pos)
      for b in CPU_BACKENDS
      for s in (seg, None)
  ]
  for i in (2, 4):
    assert rel_err(outs[i], outs[0]) < 1e-5 and rel_err(outs[i + 1], outs[1]) < 1e-5


def test_attention_mask_block_causal():
  seg = jnp.array([[1, 1, 2, 2, 2]])
  m = np.asarray(attention.attention_mask(seg, 5, 5))[0, 0]
  want = np.array(
      [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], bool)
  np.testing.assert_array_equal(m, want)


def test_lfa_decode_state_matches_full_pass():
  """decode=True: chunks of different lengths per row (right-padded), carried by the LFA
  state (the last two LF inputs), give the full pass's outputs."""
  cfg = tiny()
  u = np.random.RandomState(0).randn(2, 9, cfg.hidden_size).astype(np.float32)
  v = nn.unbox(attention.LocalizedFiltering(cfg).init(jax.random.key(0), u))
  v = jax.tree_util.tree_map(
      lambda x: x + 0.1 * np.random.RandomState(1).randn(*x.shape).astype(np.float32), v)
  full = np.asarray(attention.LocalizedFiltering(cfg).apply(v, u))
  dec = attention.LocalizedFiltering(cfg, decode=True)
  cache = {'u_prev': jnp.zeros((2, 2, cfg.hidden_size))}
  starts = np.array([0, 0])
  for lengths, L in (((4, 1), 4), ((1, 3), 3), ((4, 5), 5)):  # row 0: 4+1+4, row 1: 1+3+5
    chunk = np.zeros((2, L, cfg.hidden_size), np.float32)
    for b in range(2):
      chunk[b, :lengths[b]] = u[b, starts[b]:starts[b] + lengths[b]]
    pos = starts[:, None] + np.arange(L)
    out, state = dec.apply({
        **v, 'cache': cache
    }, chunk, None, pos, jnp.array(lengths), mutable=['cache'])
    cache = state['cache']
    for b in range(2):
      assert rel_err(out[b, :lengths[b]], full[b, starts[b]:starts[b] + lengths[b]]) < 1e-6
      np.testing.assert_array_equal(cache['u_prev'][b, 1], u[b, starts[b] + lengths[b] - 1])
    starts = starts + np.array(lengths)


def test_blocked_causal_attention_equals_the_full_square_for_less():
  """Query blocks (uneven: 11 queries in 3 blocks; with and without two documents) give the
  full square's result; with 4 blocks of 8 the compiled dots do (4+1)/(2*4) of its FLOPs."""
  from yuanjax import step_cost
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.randn(2, 11, 2, 8), jnp.float32) for _ in range(3))
  seg = jnp.array([[1] * 5 + [2] * 6, [1] * 11])

  @jax.jit
  def both(q, k, v, seg):
    full = lambda s: attention.xla_attention(q, k, v, attention.attention_mask(s, 11, 11), 0.3)
    blocked = lambda s: attention.blocked_causal_attention(q, k, v, s, 0.3, blocks=3)
    return (full(seg), full(None)), (blocked(seg), blocked(None))

  for want, got in zip(*both(q, k, v, seg)):
    assert rel_err(got, want) < 1e-6
  x = jax.ShapeDtypeStruct((1, 32, 2, 8), jnp.float32)
  flops = lambda n: sum(f for _, f in step_cost.dot_flops(
      jax.jit(lambda q, k, v: attention.blocked_causal_attention(q, k, v, None, 0.3, n)).lower(
          x, x, x).compile().as_text()))
  assert flops(4) == flops(1) * 5 / 8


def _standard_gqa_reference(p, u, pos, G, theta):
  """Standard attention with G key/value heads, float64 NumPy: q, k, v = u W, rotate-half
  rotary over the whole head, query head h reads kv head h // (H / G), causal softmax."""
  f64 = lambda x: np.asarray(x, np.float64)
  q, k, v = (np.einsum('bld,dhk->blhk', f64(u), f64(p[w])) for w in ('wq', 'wk', 'wv'))
  K = q.shape[-1]
  inv = 1.0 / theta**(np.arange(0, K, 2) / K)
  ang = pos[..., None].astype(np.float64) * inv  # [B, L, K/2]
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  rot = lambda x: np.concatenate([
      x[..., :K // 2] * cos - x[..., K // 2:] * sin, x[..., K // 2:] * cos + x[..., :K // 2] * sin
  ], -1)
  q, k = rot(q), rot(k)
  rep = q.shape[2] // G
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum('blhk,bshk->bhls', q, k) / np.sqrt(K)
  L = u.shape[1]
  s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  return np.einsum('blhk,hkd->bld', np.einsum('bhls,bshk->blhk', a, v), f64(p['wo']))


def test_standard_grouped_query_attention_matches_numpy():
  """Mixtral's attention: no LF, 4 query heads on 2 key/value heads, full rotary (theta 1e6),
  with both backends; no 'lf' params; wk, wv have G heads."""
  cfg = tiny_mixtral()
  u = np.random.RandomState(0).randn(2, 9, cfg.hidden_size).astype(np.float32)
  pos = np.broadcast_to(np.arange(9), (2, 9)) * 50  # large positions: the rotary matters
  v = nn.unbox(attention.Attention(cfg).init(jax.random.key(0), u, None, pos))
  p = jax.tree_util.tree_map(lambda x: 4 * x, v['params'])
  assert set(p) == {'wq', 'wk', 'wv', 'wo'} and p['wk'].shape == (cfg.hidden_size, 2, 8)
  want = _standard_gqa_reference(p, u, pos, G=2, theta=1e6)
  for backend in CPU_BACKENDS:
    got = attention.Attention(tiny_mixtral(attention_backend=backend)).apply({'params': p}, u, None,
                                                                             pos)
    assert rel_err(got, want) < 1e-5, backend


def test_grouped_kv_heads_equal_repeated_full_heads():
  """LFA with G=2 key/value heads equals LFA with 4 heads whose k/v weights repeat each of
  the 2 heads twice (head h reads kv head h // 2), in the full pass and the cached decode."""
  gqa, mha = tiny(num_heads=4, num_kv_heads=2), tiny(num_heads=4)
  u = np.random.RandomState(0).randn(2, 7, gqa.hidden_size).astype(np.float32)
  pos = np.broadcast_to(np.arange(7), (2, 7))
  p = nn.unbox(attention.Attention(gqa).init(jax.random.key(0), u, None, pos))['params']
  p_mha = {**p, 'wk': np.repeat(p['wk'], 2, axis=1), 'wv': np.repeat(p['wv'], 2, axis=1)}
  want = attention.Attention(mha).apply({'params': p_mha}, u, None, pos)
  assert rel_err(attention.Attention(gqa).apply({'params': p}, u, None, pos), want) < 1e-6
  dec = attention.Attention(gqa, decode=True)
  cache = jax.eval_shape(lambda: dec.init(jax.random.key(0), u, None, pos, jnp.array([7, 7])))
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache['cache'])
  assert cache['k'].shape == (2, 2, 7, gqa.head_dim)  # [B, G, S, K]
  out, _ = dec.apply({
      'params': p,
      'cache': cache
  }, u, None, pos, jnp.array([7, 7]), mutable=['cache'])
  assert rel_err(out, want) < 1e-6
