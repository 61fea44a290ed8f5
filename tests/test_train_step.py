"""The jitted train step in process: gradient accumulation, learning, and the step guard."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yuanjax import config_lib, train_state, trainer

B, L = 4, 16


def _config():
  config = config_lib.base_config()
  config.model = config_lib.tiny_model()
  config.model.moe.dispatch = 'dense'  # no capacity: the same tokens reach the same experts
  config.train.update(dict(batch_size=B, seq_len=L, num_steps=100, on_nonfinite='skip'))
  # eps 1e-3: Adam's first step is ~lr * sign(g) for gradients far below eps=1e-8, which would
  # turn float rounding in tiny gradients into lr-sized differences between the two runs.
  config.optimizer.update(dict(lr=3e-3, warmup_steps=0, eps=1e-3))
  return config


@functools.lru_cache(maxsize=None)
def _step(grad_accum):
  config = _config()
  built = train_state.build(config)
  fn = jax.jit(
      functools.partial(trainer.train_step, model=built.model, optimizer=built.optimizer,
                        schedule=built.schedule, grad_accum=grad_accum, seed=0,
                        guard_cfg=config.train))
  return built, fn


def _batch(seed=0):
  tokens = np.random.default_rng(seed).integers(0, 512, (B, L + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((B, L), np.int32),
              positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)), loss_mask=np.ones(
                  (B, L), np.float32))


@pytest.fixture(scope='module')
def state0():
  built, _ = _step(1)
  return jax.jit(built.init)(jax.random.key(0))


def test_grad_accum_2_equals_grad_accum_1(state0):
  batch = _batch()
  s1, m1 = _step(1)[1](state0, batch)
  s2, m2 = _step(2)[1](state0, batch)
  np.testing.assert_allclose(m2['loss'], m1['loss'], rtol=1e-6)
  np.testing.assert_allclose(m2['grad_norm'], m1['grad_norm'], rtol=1e-4)
  delta = lambda s: jax.tree_util.tree_map(lambda a, b: a - b, s.params, state0.params)
  chex.assert_trees_all_close(delta(s2), delta(s1), rtol=1e-3, atol=3e-3 * 1e-3)
  assert int(s1.step) == int(s2.step) == 1


def test_loss_falls(state0):
  state, step = state0, _step(1)[1]
  losses = []
  for _ in range(6):
    state, m = step(state, _batch())
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 0.5, losses
  assert int(m['skipped_steps']) == 0 and not bool(m['nonfinite'])


def test_nonfinite_step_is_skipped_without_touching_params_or_optimizer(state0):
  step = _step(1)[1]
  state, _ = step(state0, _batch())  # one real update: Adam's count is 1
  norm = state.params['final_norm']['scale']
  poisoned = state.replace(params={
      **state.params, 'final_norm': {
          'scale': norm.at[0].set(jnp.nan)
      }
  })
  after, m = step(poisoned, _batch(1))
  assert bool(m['nonfinite']) and int(m['skipped_steps']) == 1 and int(m['halted_at']) == 0
  assert int(after.step) == 2 and int(after.guard['in_a_row']) == 1
  chex.assert_trees_all_equal(after.opt_state, poisoned.opt_state)
  chex.assert_trees_all_equal(after.params, poisoned.params)
