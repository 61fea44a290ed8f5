"""yuanjax.checkpoint: workdir layout, checkpoints written before the step guard existed."""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from yuanjax import checkpoint, step_guard, workdir
from yuanjax.train_state import TrainState


def _iter():
  return iter(grain.MapDataset.range(10).to_iter_dataset())


def test_checkpoint_without_guard_restores_with_a_fresh_guard(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  old = {'step': jnp.int32(7), 'params': {'w': jnp.arange(3.0)}, 'opt_state': {'m': jnp.ones(3)}}
  it = _iter()
  next(it)
  with ocp.CheckpointManager(os.path.abspath('run/checkpoints')) as mngr:  # as older versions
    mngr.save(
        7, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                   data=grain.checkpoint.CheckpointSave(it),
                                   meta=ocp.args.JsonSave({'step': 7})))
  assert workdir.checkpoint_steps('run') == [7] and checkpoint.directory('run').startswith('/')
  guard = step_guard.init(4)
  abstract = jax.eval_shape(lambda: TrainState(old['step'], old['params'], old['opt_state'], guard))
  ckpt = checkpoint.for_workdir('run', keep=2)  # a relative workdir
  fresh = _iter()
  step, state, meta = ckpt.restore_latest(abstract, fresh, {'guard': guard})
  ckpt.close()
  assert step == 7 and meta == {'step': 7} and next(fresh) == 1  # the data state restored too
  np.testing.assert_array_equal(state.params['w'], [0.0, 1.0, 2.0])
  assert int(state.step) == 7 and state.guard['losses'].shape == (4,)
  assert sorted(os.listdir('run/checkpoints')) == ['7']  # nothing moved aside
