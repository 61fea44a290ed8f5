"""What a compiled train step executes: FLOPs counted right and attributed to model parts.

  report = step_cost.analyse(config, mesh)   # compiles; allocates nothing

XLA's `cost_analysis()` counts the body of a while loop once, whatever its trip count, so the
decoder's layer scan (and the trainer's micro-batch scan) would be counted once. `analyse`
therefore compiles an analysis variant of the real step (`trainer.jit_train_step`): the layer
scan fully unrolled (`config.model.scan_unroll`, which changes how the model compiles, never
what it computes), so are the tiled loss's chunks (`config.model.loss_unroll`), and one
micro-batch (`train.grad_accum` = 1); the optimizer update is
compiled on its own, so that its FLOPs are counted once per step, not per micro-batch.

Attribution is measured, not modelled: every `dot` of the optimized HLO is counted (2 x output
elements x contracted size, as XLA's cost analysis does) and assigned to a part by the
`op_name` metadata JAX writes from the Flax module path and the einsum spec (`PARTS`). What
cost analysis counts beyond the dots (softmax, norms, rotary, the loss, the routing
bookkeeping) is `elementwise`; the optimizer's own compile gives `optimizer`.

`model_parts` is the same breakdown from the model alone (`yuanjax.cost.train_flops_by_part`:
the FLOPs a step must do, each matmul of the active params forward + backward, attention
causal), so that part by part the executed/model ratio shows what is waste: capacity padding
(experts, capacity_factor), full-square attention (what XLA computes for a causal mask).
"""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from yuanjax import cost, sharding, train_state, trainer
from yuanjax.data import pipeline
from yuanjax.model import transformer

# (part, test on a dot's op_name), first match wins; the parts of `cost.forward_flops_by_part`.
# Backward dots keep the forward's name under transpose(jvp(...)).
PARTS = (
    ('router', lambda n: '/router/' in n),
    ('experts', lambda n: '/moe/' in n),
    ('dense_ffn', lambda n: '/mlp/' in n),
    ('lf_conv', lambda n: '/attention/lf/' in n),
    ('qkvo_proj', lambda n: '/attention/' in n and any(s in n for s in ('dhk', 'dgk', 'hkd'))),
    ('attention', lambda n: '/attention/' in n),
    # The logits, and the tiled loss's gradient matmuls (yuanjax.loss: done in its forward).
    ('lm_head',
     lambda n: any(s in n for s in ('vd->blv', 'bcv,vd->bcd', 'bcv,bcd->vd', 'sbcv,sbcd->svd'))),
)
_DEF = re.compile(r'%([\w.\-]+) = \w+\[([\d,]*)\]')
_DOT = re.compile(r'%[\w.\-]+ = \w+\[([\d,]*)\][^ ]* dot\(%([\w.\-]+), %[\w.\-]+\)(.*)$')
_CONTRACT = re.compile(r'lhs_contracting_dims=\{([\d,]*)\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(',') if d]


def dot_flops(hlo_text: str) -> list[tuple[str, float]]:
  """(op_name, FLOPs) of every dot in an HLO module's text: 2 x output x contracted size."""
  shapes = {m.group(1): _dims(m.group(2)) for m in _DEF.finditer(hlo_text)}
  out = []
  for line in hlo_text.splitlines():
    m = _DOT.search(line)
    if m is None:
      continue
    lhs = shapes[m.group(2)]
    contracted = math.prod(lhs[i] for i in _dims(_CONTRACT.search(m.group(3)).group(1)))
    name = _OP_NAME.search(m.group(3))
    out.append((name.group(1) if name else '', 2.0 * math.prod(_dims(m.group(1))) * contracted))
  return out


def part_of(op_name: str) -> str:
  for part, test in PARTS:
    if test(op_name):
      return part
  return 'other_dots'


def attribute(hlo_text: str) -> dict[str, float]:
  """FLOPs of the module's dots per part (`PARTS`, else 'other_dots')."""
  parts = dict.fromkeys([p for p, _ in PARTS] + ['other_dots'], 0.0)
  for name, flops in dot_flops(hlo_text):
    parts[part_of(name)] += flops
  return parts


def analysis_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the analysis compile: layers and loss chunks unrolled, one micro-batch."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.scan_unroll = transformer.num_blocks(c.model)
  c.model.loss_unroll = True
  c.train.batch_size = config.train.batch_size // config.train.grad_accum
  c.train.grad_accum = 1
  return c


def abstract_batch(config: ml_collections.ConfigDict, mesh):
  """ShapeDtypeStructs of a [batch, seq] training batch, sharded as the trainer's."""
  shape, s = (config.train.batch_size, config.train.seq_len), trainer.batch_sharding(mesh)
  dtype = lambda k: jnp.float32 if k == 'loss_mask' else jnp.int32
  return {k: jax.ShapeDtypeStruct(shape, dtype(k), sharding=s) for k in pipeline.BATCH_KEYS}


def compile_step(config: ml_collections.ConfigDict, mesh, built=None):
  """The trainer's jitted step lowered and compiled for abstract inputs (nothing allocated)."""
  built = built or train_state.build(config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    return trainer.jit_train_step(config, built, mesh).lower(built.abstract,
                                                             abstract_batch(config,
                                                                            mesh)).compile()


def optimizer_flops(built: train_state.Built, mesh) -> float:
  """FLOPs of one optimizer update + apply on all devices (its own compile)."""

  def update(params, opt_state):
    updates, opt_state = built.optimizer.update(params, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  a = built.abstract
  with jax.set_mesh(mesh):
    compiled = jax.jit(update).lower(a.params, a.opt_state).compile()
  return compiled.cost_analysis()['flops'] * mesh.size


def is_analysis_config(config: ml_collections.ConfigDict) -> bool:
  """True when the real step is its own analysis variant (no loop to unroll)."""
  m = config.model
  loss_loop = 0 < m.loss_chunk_len < config.train.seq_len and not m.loss_unroll
  return (config.train.grad_accum == 1 and not loss_loop and
          m.scan_unroll >= transformer.num_blocks(m))


def analyse(config: ml_collections.ConfigDict, mesh, compiled=None, built=None) -> dict:
  """Executed FLOPs per token of the train step (total and by part) against the model's.

  `compiled`, `built`: the real step's compile and train state (`train_state.build(config,
  mesh)`), reused when the real step is its own analysis variant (`is_analysis_config`)."""
  c = analysis_config(config)
  if compiled is None or built is None or not is_analysis_config(config):
    built = train_state.build(c, mesh)
    compiled = compile_step(c, mesh, built)
  hlo = compiled.as_text()
  micro_tokens = c.train.batch_size * c.train.seq_len
  tokens = config.train.batch_size * config.train.seq_len
  total = compiled.cost_analysis()['flops'] * mesh.size  # cost analysis is per device
  optimizer = optimizer_flops(built, mesh)
  dots = {k: v * mesh.size / micro_tokens for k, v in attribute(hlo).items()}
  elementwise = (total - optimizer) / micro_tokens - sum(dots.values())
  executed = dict(dots, elementwise=elementwise, optimizer=optimizer / tokens)
  model = cost.train_flops_by_part(config)
  model_total = sum(model.values())
  return dict(executed_flops_per_token=sum(executed.values()), model_flops_per_token=model_total,
              flops_ratio=sum(executed.values()) / model_total, executed_parts=executed,
              model_parts=model, analysis_loops=hlo.count(' while('))
