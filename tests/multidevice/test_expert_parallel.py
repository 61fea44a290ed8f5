"""Expert parallelism and sharding rules on 8 virtual CPU devices, against one device.

The 8-device side runs in a process of its own (`ep_worker.py`, which sets XLA_FLAGS
before JAX starts); this file runs the same cases on one device and compares: loss and
gradients, three AdamW steps (losses and params), for the capacity and dropless
dispatches on five meshes; the PartitionSpec of every param and optimizer-state leaf; and,
with tight capacity, that each device drops exactly what one device would drop for its
own group of tokens (GShard groups).
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.multidevice import ep_cases as cases
from tests.multidevice.ep_cases import CAPACITY_MESH, MESHES
from yuanjax.model import Transformer

DISPATCHES = ('capacity', 'dropless')
CASES = [(d, cases.mesh_name(m)) for d in DISPATCHES for m in MESHES]
# The rules by hand (sharding.DEFAULT_RULES for params): logical axis -> mesh axis.
BY_HAND = {
    'vocab': 'tensor',
    'embed': 'fsdp',
    'heads': 'tensor',
    'mlp': 'tensor',
    'expert': 'expert'
}


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope='module')
def workers(tmp_path_factory):
  """One 8-device worker per dispatch, started first so that they run side by side (and
  beside the 1-device reference) on the cores that pytest leaves idle."""
  tmp = tmp_path_factory.mktemp('ep')
  env = dict(os.environ)  # ep_worker.py adds the 8-device flag
  worker = os.path.join(os.path.dirname(__file__), 'ep_worker.py')
  procs = {
      d:
          subprocess.Popen([sys.executable, worker, d,
                            str(tmp / f'{d}.npz')], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for d in DISPATCHES
  }
  yield tmp, procs
  for p in procs.values():
    p.kill()


@pytest.fixture(scope='module')
def reference(workers):
  out = {}
  for d in DISPATCHES:
    cfg = cases.config(d)
    out[d] = cases.run(cfg, None, cases.initial_state(cfg))
  return out


@pytest.fixture(scope='module')
def sharded(workers, reference):
  tmp, procs = workers
  results = {}
  for d, p in procs.items():
    log, _ = p.communicate(timeout=1200)
    assert p.returncode == 0, f'ep_worker.py {d} failed:\n{log[-4000:]}'
    results.update(np.load(tmp / f'{d}.npz'))
  return results


def _get(results, dispatch, mesh):
  prefix = f'{dispatch}/{mesh}/'
  return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


@pytest.mark.parametrize('dispatch,mesh', CASES)
def test_loss_and_gradients_match_one_device(sharded, reference, dispatch, mesh):
  got, ref = _get(sharded, dispatch, mesh), reference[dispatch]
  np.testing.assert_allclose(got['loss0'], ref['loss0'], rtol=1e-6)
  grads = [k for k in ref if k.startswith('grad:')]
  assert len(grads) > 15 and all(k in got for k in grads)
  flat = lambda r: np.concatenate([r[k].ravel() for k in grads])
  assert rel(flat(got), flat(ref)) < 1e-5
  for k in grads:
    assert rel(got[k], ref[k]) < 1e-4, k


@pytest.mark.parametrize('dispatch,mesh', CASES)
def test_three_optimizer_steps_match_one_device(sharded, reference, dispatch, mesh):
  got, ref = _get(sharded, dispatch, mesh), reference[dispatch]
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=1e-5)
  assert ref['losses'][-1] < ref['losses'][0] - 0.5  # the steps did something
  for k in (k for k in ref if k.startswith('param:')):
    assert rel(got[k], ref[k]) < 1e-4, k


def _logical_names():
  cfg = cases.config('capacity')
  boxed = jax.eval_shape(
      Transformer(cfg.model).init, jax.random.key(0), jnp.zeros((1, cases.L), jnp.int32))['params']
  specs = nn.get_partition_spec(boxed)
  return {
      jax.tree_util.keystr(k): tuple(v) for k, v in jax.tree_util.tree_leaves_with_path(
          specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  }


@pytest.mark.parametrize('mesh', [cases.mesh_name(m) for m in MESHES])
def test_partition_specs_are_what_the_rules_say(sharded, mesh):
  got = _get(sharded, 'capacity', mesh)
  names = _logical_names()
  assert len(names) > 15
  for path, logical in names.items():
    want = [BY_HAND.get(n) for n in logical]
    assert json.loads(str(got[f'spec:{path}'])) == want, (path, logical)
    # AdamW moments are sharded like their param.
    moments = [k for k in got if k.startswith('optspec:') and k.endswith(path)]
    assert len(moments) == 2, (path, moments)
    for k in moments:
      assert json.loads(str(got[k])) == want, k
  assert json.loads(str(got["spec:['blocks']['layer_0']['moe']['w1']"])) == [
      None, 'expert', 'fsdp', 'tensor'
  ]
  assert json.loads(str(got["spec:['embedding']"])) == ['tensor', 'fsdp']


def test_tight_capacity_drops_per_device_group(sharded):
  """With capacity per device, the 8-device layer equals one device run on each group."""
  D = cases.config('capacity').model.hidden_size
  x = np.random.default_rng(3).normal(size=(cases.B, cases.L, D)).astype(np.float32)
  groups = cases.B // (CAPACITY_MESH['data'] * CAPACITY_MESH['expert'])
  ys, dropped = zip(
      *(cases.capacity_case(x[i:i + groups], None) for i in range(0, cases.B, groups)))
  assert 0.05 < np.mean(dropped) < 0.9  # the case really drops
  np.testing.assert_allclose(sharded['tight/dropped'], np.mean(dropped), rtol=1e-6)
  assert rel(sharded['tight/y'], np.concatenate(ys)) < 1e-5
  whole, _ = cases.capacity_case(x, None)  # one group of all tokens differs
  assert rel(whole, np.concatenate(ys)) > 1e-3
