import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from yuanjax import config_lib
from yuanjax.model import Transformer, routers
from tests.model.helpers import rel_err, tiny, tree_rel_err

L = 12


def _model(**kw):
  cfg = tiny(**kw)
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(0), (1, L), 0, cfg.vocab_size)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  variables = jax.tree_util.tree_map(lambda a: a * 3.0, variables)  # bolder routing
  return cfg, model, variables, tokens


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
@pytest.mark.parametrize('rtype', routers.causal_routers())
def test_causal(rtype, dispatch):
  """Changing token t never changes logits before t (through LFA convs and routing)."""
  cfg, model, v, tokens = _model(
      **{
          'router.type': rtype,
          'moe.dispatch': dispatch,
          'moe.capacity_factor': 0.75,  # drops happen; still causal
          'router.num_shared_experts': 1 if rtype == 'shared' else 0
      })
  apply = jax.jit(model.apply)
  base, _ = apply(v, tokens)
  for t in (1, 5, L - 1):
    other = tokens.at[0, t].set((tokens[0, t] + 1 + t) % cfg.vocab_size)
    out, _ = apply(v, other)
    np.testing.assert_array_equal(out[0, :t], base[0, :t])
    assert np.abs(np.asarray(out[0, t:] - base[0, t:])).max() > 0  # and t itself does change


@pytest.mark.parametrize('backend', ['xla', 'dot_product_attention'])
def test_packed_documents_equal_standalone(backend):
  cfg, model, v, _ = _model(attention_backend=backend)
  a = jax.random.randint(jax.random.key(5), (1, 5), 0, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(6), (1, 7), 0, cfg.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 7])
  apply = jax.jit(model.apply)
  out, _ = apply(v, packed, segment_ids=seg)  # positions derived from segments
  pos = jnp.array([list(range(5)) + list(range(7))])
  out_explicit, _ = apply(v, packed, segment_ids=seg, positions=pos)
  np.testing.assert_array_equal(out, out_explicit)
  assert rel_err(out[:, :5], apply(v, a)[0]) < 1e-5
  assert rel_err(out[:, 5:], apply(v, b)[0]) < 1e-5


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    cfg, model, v, tokens = _model()
    ref, _ = jax.jit(model.apply)(v, tokens)
    out, aux = self.variant(model.apply)(v, tokens)
    assert rel_err(out, ref) < 1e-5
    chex.assert_shape(out, (1, L, cfg.vocab_size))
    chex.assert_shape(aux['moe']['load'], (cfg.num_layers, cfg.num_experts))
    chex.assert_trees_all_equal_dtypes(out, jnp.zeros((), jnp.float32))


def test_bfloat16_close_to_float32():
  cfg, model, v, tokens = _model()
  ref, _ = jax.jit(model.apply)(v, tokens)
  out, _ = jax.jit(Transformer(tiny(dtype='bfloat16')).apply)(v, tokens)
  assert out.dtype == jnp.float32  # logits for the loss are float32
  assert rel_err(out, ref) < 3e-2


@pytest.mark.parametrize('moe_every,n_moe', [(0, 0), (2, 2)])
def test_dense_and_interleaved_layers(moe_every, n_moe):
  cfg = tiny(num_layers=4, moe_every=moe_every)
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  v = jax.jit(model.init)(jax.random.key(0), tokens)
  out, aux = jax.jit(model.apply)(v, tokens)
  chex.assert_shape(out, (1, 4, cfg.vocab_size))
  if n_moe:
    chex.assert_shape(aux['moe']['load'], (n_moe, cfg.num_experts))
    assert 'mlp' in v['params']['blocks']['layer_0'] and 'moe' in v['params']['blocks']['layer_1']
  else:
    assert aux['moe'] == {} and float(aux['aux_loss']) == 0.0


def test_remat_gives_same_loss_and_grads():
  cfg, model, v, tokens = _model()

  def loss(model, v):
    logits, _ = model.apply(v, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  g_ref = jax.jit(jax.grad(functools.partial(loss, model)))(v)
  g = jax.jit(jax.grad(functools.partial(loss, Transformer(tiny(remat='full')))))(v)
  assert tree_rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize(
    'cfg', [config_lib.m32_model(), config_lib.mixtral_model()], ids=['m32', 'mixtral'])
def test_every_param_has_logical_axes(cfg):
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  leaves = jax.tree_util.tree_leaves(abstract,
                                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(
      isinstance(x, nn.LogicallyPartitioned) and None not in x.names for x in leaves)
  assert all(x.value.dtype == jnp.float32 for x in leaves)


def test_aux_loss_sums_layers():
  cfg, model, v, tokens = _model(**{
      'router.load_balance_weight': 0.01,
      'router.z_loss_weight': 0.001
  })
  _, aux = jax.jit(model.apply)(v, tokens)
  want = np.sum(0.01 * aux['moe']['load_balance_loss'] + 0.001 * aux['moe']['z_loss'])
  np.testing.assert_allclose(aux['aux_loss'], want, rtol=1e-5)


def test_intermediates_show_which_experts_fire():
  cfg, model, v, tokens = _model()
  _, state = jax.jit(functools.partial(model.apply, mutable=['intermediates']))(v, tokens)
  inter = state['intermediates']['blocks']['layer_0']['moe']
  cw = np.asarray(inter['combine_weights'][0])  # [layers, B, L, E]
  assert cw.shape == (cfg.num_layers, 1, L, cfg.num_experts)
  np.testing.assert_array_equal((cw > 0).sum(-1), cfg.router.top_k)


def test_config_validation_names_field():
  m = tiny()
  m.router.top_k = m.num_experts + 1
  with pytest.raises(ValueError, match=r'config\.model\.router\.top_k'):
    config_lib.validate_model(m)
  m = tiny(num_layers=3)
  m.moe_every = 2
  with pytest.raises(ValueError, match=r'config\.model\.moe_every'):
    config_lib.validate_model(m)


def test_untied_lm_head_scores_the_final_hidden_states():
  """tie_embeddings=False: a separate lm_head [V, D] gives the logits (the embedding only
  embeds); the default ties them (no lm_head param, as in M32)."""
  cfg, model, v, tokens = _model(tie_embeddings=False, attention_type='standard')
  p = v['params']
  assert 'lm_head' in p and 'lf' not in p['blocks']['layer_0']['attention']
  assert 'lm_head' not in _model()[2]['params']
  logits, _ = model.apply(v, tokens)
  (hidden, head), _ = model.apply(v, tokens, hidden=True)
  np.testing.assert_array_equal(head, nn.unbox(p['lm_head']))
  assert rel_err(logits, np.einsum('bld,vd->blv', hidden, head)) < 1e-6
  p2 = {**p, 'lm_head': jax.tree_util.tree_map(lambda a: -a, p['lm_head'])}
  assert rel_err(model.apply({'params': p2}, tokens)[0], -logits) < 1e-6


def test_baseline_options_validated_by_name():
  for field, value, rule in (('attention_type', 'mla', 'expected one of'), ('num_kv_heads', 3,
                                                                            'dividing num_heads=2'),
                             ('num_kv_heads', -1, 'dividing'), ('num_kv_heads', True, 'must be 0'),
                             ('num_kv_heads', None, 'must be 0'), ('tie_embeddings', 'no', 'True')):
    m = ml_collections.ConfigDict({**tiny().to_dict(), field: value})  # as from a JSON file
    with pytest.raises(ValueError, match=rf'config\.model\.{field}=.*{rule}'):
      config_lib.validate_model(m)
  m = tiny(attention_type='standard')
  m.hidden_size = 33  # odd is fine without the LFA convolution (d -> d/2)
  config_lib.validate_model(m)
  with pytest.raises(ValueError, match=r'config\.model\.hidden_size=33.*LFA'):
    config_lib.validate_model(tiny(**{'hidden_size': 33}))


def test_unrolled_layer_scan_computes_the_scanned_model():
  """scan_unroll (what the FLOP analysis compiles) changes the compiled loop, not the model:
  the same params give the same logits (random params, one compile holds both models)."""
  scanned, unrolled = (Transformer(tiny(num_layers=2, scan_unroll=n)) for n in (1, 2))
  tokens = jax.random.randint(jax.random.key(0), (1, L), 0, scanned.config.vocab_size)
  shapes = jax.eval_shape(scanned.init, jax.random.key(1), tokens)
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype),
                             nn.unbox(shapes))
  both = jax.jit(lambda v: (scanned.apply(v, tokens)[0], unrolled.apply(v, tokens)[0]))
  logits_scanned, logits_unrolled = both(v)
  assert rel_err(logits_unrolled, logits_scanned) < 1e-6
