"""The train state and its shardings, built abstractly in one place.

  built = train_state.build(config, mesh)   # model, optimizer, schedule, init,
                                            # abstract state, mesh specs, shardings
  state = jax.jit(built.init, out_shardings=built.shardings)(key)
  state = jax.jit(built.init_with, out_shardings=built.shardings)(params)  # given params

`build` evaluates the model's and optimizer's init with jax.eval_shape (nothing allocated),
maps each leaf's logical axis names to mesh axes with `config.mesh`'s rules, and, given a
mesh, gives every leaf a NamedSharding. The trainer, `yuanjax.plan` (without a mesh: specs
only), the multi-device tests, `yuanjax.stats`, `yuanjax.loader` and the converted format
(`abstract_params`) all build their abstract trees here.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from yuanjax import optim, sharding, step_guard
from yuanjax.model import Transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  guard: Any  # yuanjax.step_guard state: skipped steps, spike window, halt


@dataclasses.dataclass(frozen=True)
class Built:
  model: Transformer
  optimizer: optax.GradientTransformation
  schedule: Callable
  init: Callable  # key -> TrainState (unboxed; call under the mesh and the rules)
  init_with: Callable  # params (unboxed) -> TrainState at step 0 with a fresh optimizer state
  abstract: TrainState  # ShapeDtypeStructs (with shardings when built with a mesh)
  mesh_specs: TrainState  # PartitionSpecs over mesh axes
  shardings: TrainState | None  # NamedShardings (None without a mesh)


def strip_boxes(tree):
  """Boxed (logically partitioned) leaves -> their values, without sharding constraints."""
  return jax.tree_util.tree_map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x, tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_params(m: ml_collections.ConfigDict, boxed: bool = False):
  """ShapeDtypeStructs of `Transformer(m).init(...)['params']` (boxed: with logical names)."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  params = jax.eval_shape(Transformer(m).init, jax.random.key(0), tokens)['params']
  return params if boxed else strip_boxes(params)


def _parts(config: ml_collections.ConfigDict):
  """(model, optimizer, schedule, init_boxed, state_of): init_boxed(key) -> TrainState, leaves
  boxed; state_of(params) -> the step-0 TrainState of those params (boxed or not)."""
  tcfg = config.train
  model = Transformer(config.model)
  init_params = lambda key: model.init(key, jnp.zeros((1, tcfg.seq_len), jnp.int32))['params']
  optimizer = optim.make_optimizer(config.optimizer, tcfg.num_steps,
                                   jax.eval_shape(init_params, jax.random.key(0)))
  schedule = optim.schedule(config.optimizer, tcfg.num_steps)

  def state_of(params):
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      step_guard.init(tcfg.spike_window))

  return model, optimizer, schedule, lambda key: state_of(init_params(key)), state_of


def build(config: ml_collections.ConfigDict, mesh=None) -> Built:
  """Everything about the train state, abstractly; with `mesh`, its shardings too."""
  rules = sharding.rules(config.mesh)
  ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with ctx, nn.logical_axis_rules(rules):
    model, optimizer, schedule, init_boxed, state_of = _parts(config)
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  logical = nn.get_partition_spec(boxed)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  abstract, shardings = strip_boxes(boxed), None
  if mesh is not None:
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  init = lambda key: nn.unbox(init_boxed(key))
  return Built(model, optimizer, schedule, init, state_of, abstract, mesh_specs, shardings)
