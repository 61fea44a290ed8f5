"""The step guard's decisions, on numbers (no model)."""
import jax.numpy as jnp
import numpy as np
import pytest

from yuanjax import config_lib, step_guard


def _cfg(**kw):
  c = step_guard.defaults()
  c.update(kw)
  return c


def _run(cfg, values, window=4):
  """Feeds (loss, grad norm) pairs for steps 1, 2, ...; returns (apply flags, last guard)."""
  guard, applied = step_guard.init(window), []
  for i, (loss, gnorm) in enumerate(values, 1):
    guard, apply, _ = step_guard.update(guard, jnp.int32(i), jnp.float32(loss), jnp.float32(gnorm),
                                        cfg)
    applied.append(bool(apply))
  return applied, guard


def test_halt_on_first_nonfinite_and_apply_nothing_after():
  applied, g = _run(_cfg(), [(2.0, 1.0), (np.nan, 1.0), (2.0, 1.0)])
  assert applied == [True, False, False]
  assert int(g['halted_at']) == 2 and np.isnan(g['halt_loss']) and float(g['halt_grad_norm']) == 1


def test_skip_counts_and_halts_after_max_in_a_row():
  cfg = _cfg(on_nonfinite='skip', max_skipped_in_a_row=2)
  applied, g = _run(cfg, [(2.0, 1.0), (np.inf, 1.0), (2.0, np.nan), (2.0, 1.0), (np.nan, 1.0)])
  assert applied == [True, False, False, True, False] and int(g['halted_at']) == 0
  assert int(g['skipped']) == 3 and int(g['in_a_row']) == 1
  applied, g = _run(cfg, [(2.0, 1.0)] + [(np.nan, 1.0)] * 3)
  assert applied == [True, False, False, False] and int(g['halted_at']) == 4


def test_spikes_skipped_once_the_window_is_full():
  cfg = _cfg(skip_spikes=True, spike_std=6.0)
  calm = [(2.0 + 0.01 * (i % 2), 1.0 + 0.01 * (i % 2)) for i in range(4)]
  applied, g = _run(cfg, [(50.0, 1.0)] + calm + [(50.0, 1.0), (2.0, 50.0), (2.02, 1.0)])
  # Step 1's 50 is not a spike (empty window); it sits in the window until 4 calm steps push it
  # out, so the window is calm when the later spikes come.
  assert applied == [True] * 5 + [False, False, True]
  assert int(g['skipped']) == 2 and int(g['halted_at']) == 0
  assert _run(_cfg(), [(2.0, 1.0)] * 4 + [(50.0, 1.0)])[0][-1]  # off by default


@pytest.mark.parametrize('field, value, message',
                         [('on_nonfinite', 'ignore', 'on_nonfinite'),
                          ('max_skipped_in_a_row', 0, 'max_skipped_in_a_row'),
                          ('spike_window', 0, 'spike_window'), ('spike_std', 0.0, 'spike_std')])
def test_bad_config_names_the_field(field, value, message):
  config = config_lib.base_config()
  config.model = config_lib.tiny_model()
  config.train[field] = value
  with pytest.raises(ValueError, match=f'config.train.{message}'):
    config_lib.validate(config)
