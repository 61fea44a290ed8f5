"""Shared by the 8-device worker and the 1-device reference: config, batch, and the cases.

A training case: the tiny M32 (LFA, Attention Router, 8 experts top-2) with ample capacity
(capacity_factor = E / k: no slot is ever dropped, whatever the grouping), the trainer's
`loss_fn` and `train_step`, state sharded by the logical-axis rules.
A capacity case: one MoE layer with tight capacity, where dropping depends on the grouping.
A grouped-matmul case: one MoE layer, dropless with an optional kernel (megablox in Pallas
interpret mode, tokamax), forward and gradients, compared with the dense dispatch.
"""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from yuanjax import config_lib, sharding, train_state, trainer
from yuanjax.model import moe

B, L, STEPS = 8, 16, 3
MESHES = (dict(data=8), dict(data=2, expert=4), dict(fsdp=2, expert=4),
          dict(data=2, expert=2, tensor=2), dict(expert=8))
CAPACITY_MESH = dict(data=2, expert=4)
GROUPED_KERNELS = ('megablox', 'tokamax')
GROUPED_MESHES = (dict(expert=8), dict(data=2, expert=2, tensor=2))
GROUPED_X_SHAPE = (B, 4, config_lib.tiny_model().hidden_size)  # 4 tokens per batch shard


def config(dispatch):
  c = config_lib.base_config()
  c.model = config_lib.tiny_model()
  c.model.moe.dispatch = dispatch
  c.model.moe.capacity_factor = c.model.num_experts / c.model.router.top_k
  c.train.update(num_steps=STEPS, batch_size=B, seq_len=L)
  c.optimizer.update(lr=1e-2, warmup_steps=0)
  return c


def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 500, (B, L + 1)).astype(np.int32)
  first = rng.integers(4, L, (B, 1))  # two documents per row
  seg = np.where(np.arange(L)[None] < first, 1, 2).astype(np.int32)
  pos = np.where(seg == 1, np.arange(L)[None], np.arange(L)[None] - first).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg, positions=pos,
              loss_mask=np.ones((B, L), np.int32))


def mesh_name(axes):
  return ','.join(f'{k}{v}' for k, v in axes.items())


def _mesh(axes):
  """(mesh, rules): `axes` None -> one device."""
  cfg = sharding.mesh_config()
  cfg.data = 1
  cfg.update(axes or {})
  devices = jax.devices() if axes else jax.devices()[:1]
  return sharding.make_mesh(cfg, devices), sharding.rules(cfg)


def initial_state(cfg):
  """The initial train state on one device, as numpy (shared by every mesh).

  The router weights are scaled up 10x: at init (std 0.02) the Attention Router's
  probabilities are all ~1/E, within ~1e-7 of each other, so float32 rounding (a different
  reduction order on another mesh) flips top-k choices and sends the runs down different,
  equally valid trajectories. Scaled, the top-2 margin stays above 1e-5 for these steps.
  """
  state = jax.device_get(jax.jit(train_state.build(cfg).init)(jax.random.key(1)))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 10.0 if "['router']" in jax.tree_util.keystr(p) else x, state.params)
  return state.replace(params=params)


def _spec(x):
  return json.dumps([list(a) if isinstance(a, tuple) else a for a in x.sharding.spec])


def run(cfg, axes, state0):
  """Loss and grads at state0, three train steps; flat dict of numpy results."""
  mesh, rules = _mesh(axes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    built = train_state.build(cfg, mesh)
    model, opt, schedule, shardings = built.model, built.optimizer, built.schedule, built.shardings
    state = jax.device_put(state0, shardings)
    data_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
    b = jax.device_put(batch(), data_sharding)
    step = functools.partial(trainer.train_step, model=model, optimizer=opt, schedule=schedule,
                             grad_accum=1, seed=0)

    def case(state, b):  # one compile per case: grads at state, then STEPS train steps
      loss0, grads = jax.value_and_grad(
          lambda p: trainer.loss_fn(p, model, b, jax.random.key(0))[0])(state.params)
      state, losses = jax.lax.scan(lambda s, _: (lambda s, m: (s, m['loss']))(*step(s, b)), state,
                                   length=STEPS)
      return loss0, grads, state, losses

    loss0, grads, state, losses = jax.jit(case, in_shardings=(shardings, data_sharding),
                                          out_shardings=(None, shardings.params, shardings,
                                                         None))(state, b)
  out = {'loss0': np.asarray(loss0), 'losses': np.asarray(jax.device_get(losses))}
  flat = lambda tree: {
      jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }
  out.update({f'grad:{k}': np.asarray(v) for k, v in flat(grads).items()})
  out.update({f'param:{k}': np.asarray(v) for k, v in flat(state.params).items()})
  out.update({f'spec:{k}': np.asarray(_spec(v)) for k, v in flat(state.params).items()})
  out.update({f'optspec:{k}': np.asarray(_spec(v)) for k, v in flat(state.opt_state).items()})
  return out


def capacity_case(x_BxLxD, axes):
  """One MoE layer (capacity dispatch, capacity_factor 0.5): output and dropped fraction."""
  cfg = config('capacity').model
  cfg.moe.capacity_factor = 0.5
  layer = moe.MoE(cfg)
  variables = jax.jit(layer.init)(jax.random.key(2), x_BxLxD[:1])
  variables = jax.tree_util.tree_map(lambda a: a * 4.0, variables)  # spread the router out
  mesh, rules = _mesh(axes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    x = jax.device_put(x_BxLxD, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    y, stats = jax.jit(layer.apply)(variables, x)
  return np.asarray(y), np.asarray(stats['dropped_fraction'])


def grouped_case(x_BxLxD, axes, dispatch, kernel='ragged_dot'):
  """One MoE layer (Attention Router): output and the gradients of sum(sin(y)) with respect to
  every param and x, flat, as numpy. Megablox tiles of 16 rows (several per device)."""
  cfg = config('dropless').model
  cfg.moe.update(dispatch=dispatch, grouped_matmul=kernel, megablox_tiling=(16, 128, 128))
  config_lib.validate_model(cfg)
  layer = moe.MoE(cfg)
  variables = jax.jit(layer.init)(jax.random.key(2), x_BxLxD[:1])
  variables = jax.tree_util.tree_map(lambda a: a * 4.0, variables)  # spread the router out

  def loss(v, x):
    y, _ = layer.apply(v, x)
    return jnp.sum(jnp.sin(y)), y

  mesh, rules = _mesh(axes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    x = jax.device_put(x_BxLxD, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    (_, y), (g_v, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables,
                                                                                         x)
  out = {'y': np.asarray(y), 'grad:x': np.asarray(g_x)}
  for k, v in jax.tree_util.tree_leaves_with_path(nn.unbox(g_v)):
    out[f'grad:{jax.tree_util.keystr(k)}'] = np.asarray(v)
  return out
