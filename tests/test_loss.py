"""The tiled LM loss: the same value and gradients as the logits in one piece (masked, ragged
last chunk, bfloat16 hidden states), through the model and the trainer's loss too."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests.conftest import rel_err
from jax.flatten_util import ravel_pytree

from yuanjax import config_lib, loss, train_state, trainer
from yuanjax.model import layers

B, L, D, V = 2, 13, 16, 50


def _inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, L, D)).astype(dtype)
  head = (0.3 * jax.random.normal(k[1], (V, D))).astype(dtype)
  targets = jax.random.randint(k[2], (B, L), 0, V)
  mask = (jax.random.uniform(k[3], (B, L)) > 0.3).astype(jnp.float32)
  return x, head, targets, mask


def _reference(x, head, targets, mask):
  """optax on the float32 logits, written independently of yuanjax.loss."""
  logits = jnp.einsum('bld,vd->blv', x.astype(jnp.float32), head.astype(jnp.float32))
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)


@pytest.mark.parametrize('chunk_len', [4, 13])  # ragged (13 = 3 x 4 + 1), one piece
def test_tiled_loss_and_gradients_equal_the_one_piece_loss(chunk_len):
  x, head, targets, mask = _inputs()
  grad = jax.value_and_grad(loss.cross_entropy_sum, argnums=(0, 1))
  value, (dx, dhead) = jax.jit(grad, static_argnums=4)(x, head, targets, mask, chunk_len)
  ref, (rdx, rdhead) = jax.value_and_grad(_reference, argnums=(0, 1))(x, head, targets, mask)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, ref, rtol=1e-6)
  assert rel_err(dx, rdx) < 1e-5 and rel_err(dhead, rdhead) < 1e-5
  assert np.all(np.asarray(dx)[np.asarray(mask) == 0] == 0)  # masked tokens get no gradient


def test_tiled_loss_scales_by_the_cotangent_and_evaluates_without_gradients():
  x, head, targets, mask = _inputs()
  scaled = lambda x, head: 0.37 * loss.cross_entropy_sum(x, head, targets, mask, 4)
  dx, dhead = jax.jit(jax.grad(scaled, argnums=(0, 1)))(x, head)
  rdx, rdhead = jax.grad(lambda x, head: 0.37 * _reference(x, head, targets, mask),
                         argnums=(0, 1))(x, head)
  assert rel_err(dx, rdx) < 1e-5 and rel_err(dhead, rdhead) < 1e-5
  # Not differentiated (eval): the primal path, log-sum-exps only.
  np.testing.assert_allclose(loss.cross_entropy_sum(x, head, targets, mask, 4),
                             _reference(x, head, targets, mask), rtol=1e-6)


def test_bfloat16_hidden_states_keep_float32_loss_and_their_own_dtype_gradients():
  x, head, targets, mask = _inputs(jnp.bfloat16)
  grad = jax.jit(jax.value_and_grad(loss.cross_entropy_sum, argnums=(0, 1)), static_argnums=4)
  value, (dx, dhead) = grad(x, head, targets, mask, 4)
  ref, (rdx, rdhead) = jax.value_and_grad(_reference, argnums=(0, 1))(x, head, targets, mask)
  assert value.dtype == jnp.float32 and dx.dtype == dhead.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  assert rel_err(dx, rdx) < 1e-2 and rel_err(dhead, rdhead) < 1e-2


def test_negative_chunk_len_is_an_error():
  with pytest.raises(ValueError, match='chunk_len=-1'):
    loss.cross_entropy_sum(*_inputs(), -1)
  m = config_lib.tiny_model()
  m.loss_chunk_len = -2
  with pytest.raises(ValueError, match=r'config\.model\.loss_chunk_len=-2'):
    config_lib.validate_model(m)


def test_model_hidden_output_and_trainer_loss_tiled_or_not_agree():
  """The model's hidden-state output scored by yuanjax.loss gives its logits, and the trainer's
  loss is the same tiled (ragged: 24 = 3 x 7 + 3) or in one piece (one compile)."""
  config = config_lib.base_config()
  config.model = config_lib.tiny_model()
  config.train.update(dict(batch_size=2, seq_len=24))
  built = train_state.build(config)
  params = jax.jit(built.init)(jax.random.key(0)).params
  tokens = np.random.default_rng(0).integers(0, 512, (2, 25)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones(
      (2, 24), np.int32), positions=np.broadcast_to(np.arange(24, dtype=np.int32), (2, 24)),
               loss_mask=(np.arange(24) < 20).astype(np.int32)[None].repeat(2, 0))

  def model_with(chunk_len):
    m = config.model.copy_and_resolve_references()
    m.loss_chunk_len = chunk_len
    return type(built.model)(m)

  @jax.jit
  def run(params):
    kw = dict(segment_ids=batch['segment_ids'], positions=batch['positions'])
    logits, _ = built.model.apply({'params': params}, batch['inputs'], **kw)
    (hidden, head), _ = built.model.apply({'params': params}, batch['inputs'], hidden=True, **kw)
    losses = [
        trainer.loss_fn(params, model_with(c), batch, jax.random.key(1))[1]['lm_loss']
        for c in (0, 7)
    ]
    return logits, layers.logits(hidden, head), losses

  logits, scored, (one_piece, tiled) = run(params)
  chex.assert_trees_all_equal(scored, logits)
  np.testing.assert_allclose(tiled, one_piece, rtol=1e-6)
