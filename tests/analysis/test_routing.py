"""yuanjax.analysis.routing: the jitted forward returns the model's own routing."""
import functools

import jax
import numpy as np
import pytest

from yuanjax.analysis import routing as routing_lib
from yuanjax.analysis import routing_stats
from yuanjax.model import Transformer
from tests.model.helpers import tiny

B, L = 2, 10


@functools.lru_cache(maxsize=None)
def _setup(rtype='attention', moe_every=1):
  cfg = tiny(**{'router.type': rtype, 'num_layers': 2, 'moe_every': moe_every})
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, cfg.vocab_size)
  params = jax.jit(model.init)(jax.random.key(1), tokens)['params']
  params = jax.tree_util.tree_map(lambda a: a * 3.0, params)  # bolder routing
  return cfg, model, params, np.asarray(tokens)


def _sown(model, params, tokens, segment_ids):
  _, state = jax.jit(functools.partial(model.apply, mutable=['intermediates']))({
      'params': params
  }, tokens, segment_ids=segment_ids)
  return jax.device_get(routing_lib.moe_intermediates(state, model.config.moe_every))


@pytest.mark.parametrize('rtype,moe_every', [('attention', 1), ('linear', 2)])
def test_routing_equals_sown_intermediates(rtype, moe_every):
  cfg, model, params, tokens = _setup(rtype, moe_every)
  segment_ids = np.ones((B, L), np.int32)
  segment_ids[1, 7:] = 0  # padding at the end of row 1
  r = routing_lib.routing(model, params, tokens, segment_ids, per_token_attention=True)
  sown = _sown(model, params, tokens, segment_ids)
  M, E, k = 2 // moe_every, cfg.num_experts, cfg.router.top_k
  np.testing.assert_array_equal(r.layers_M, np.arange(M) * moe_every + moe_every - 1)
  np.testing.assert_array_equal(r.probs_MxBxLxE, sown['router_probs'])
  np.testing.assert_array_equal(r.mask_BxL, segment_ids != 0)
  # The chosen experts and weights rebuild the combine weights, heaviest first.
  combine = np.zeros((M, B, L, E), np.float32)
  np.put_along_axis(combine, r.experts_MxBxLxK, r.weights_MxBxLxK, axis=-1)
  np.testing.assert_array_equal(combine, sown['combine_weights'])
  assert (np.diff(r.weights_MxBxLxK, axis=-1) <= 0).all() and r.experts_MxBxLxK.shape[-1] == k
  # Token-choice: the chosen experts are the top-k of the router probabilities.
  top = np.sort(np.argsort(-r.probs_MxBxLxE, axis=-1, kind='stable')[..., :k], -1)
  np.testing.assert_array_equal(np.sort(r.experts_MxBxLxK, -1), top)
  if rtype == 'attention':
    per_token = sown['expert_attention'].reshape(M, B, L, E, E)
    np.testing.assert_array_equal(r.attention_MxBxLxExE, per_token)
    want = per_token[:, segment_ids != 0].mean(axis=1)  # real tokens only
    np.testing.assert_allclose(r.attention_MxExE, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.attention_MxExE.sum(-1), 1.0, rtol=1e-5)
  else:
    assert r.attention_MxExE is None


def test_routing_load_matches_the_models_own_statistics():
  cfg, model, params, tokens = _setup()
  r = routing_lib.routing(model, params, tokens, per_token_attention=True)  # compiled above
  _, aux = jax.jit(model.apply)({'params': params}, tokens)
  np.testing.assert_allclose(routing_stats.expert_load(r.experts_MxBxLxK, cfg.num_experts),
                             aux['moe']['load'], atol=1e-6)
  np.testing.assert_allclose(routing_stats.router_entropy(r.probs_MxBxLxE), aux['moe']['entropy'],
                             rtol=1e-5)


def test_routing_rejects_bad_input():
  cfg, model, params, tokens = _setup()
  with pytest.raises(ValueError, match='vocab_size'):
    routing_lib.routing(model, params, tokens + cfg.vocab_size)
  with pytest.raises(ValueError, match='segment_ids shape'):
    routing_lib.routing(model, params, tokens, np.ones((B, L + 1)))
  with pytest.raises(ValueError, match=r'\[batch, length\]'):
    routing_lib.routing(model, params, tokens[0])


class _CharTokenizer:
  pad_id = 0

  def encode(self, text):
    return [ord(c) for c in text]


def test_batch_texts_pads_and_cuts():
  tokens, seg = routing_lib.batch_texts(_CharTokenizer(), ['abc', 'abcdefgh'], 5)
  np.testing.assert_array_equal(tokens, [[97, 98, 99, 0, 0], [97, 98, 99, 100, 101]])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match='at least one token'):
    routing_lib.batch_texts(_CharTokenizer(), ['a', ''], 5)
