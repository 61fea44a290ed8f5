"""The trainer, top to bottom: mesh, data, model and optimizer, state and shardings, the
pure jitted step, checkpoints, the loop, eval and a greedy sample.

  python -m yuanjax.train --config=configs/demo.py --workdir=/tmp/demo

Writes WORKDIR/metrics.jsonl (one JSON object per logged step, eval lines with
"kind": "eval"), WORKDIR/tb/ (TensorBoard) and WORKDIR/checkpoints/. Started again with the
same workdir it resumes from the newest readable checkpoint, data iterator included, and
continues with exactly the losses of an uninterrupted run. SIGTERM/SIGINT save the current
step and exit 0.

Multi-process (after `yuanjax.distributed.initialize`): every process runs this same
function. The batch is made of `train.data_shards` input streams (default one per process);
each process reads only its own streams and hands its rows to
`jax.make_array_from_process_local_data`, so the global batch is the same for any number of
processes with the same streams. Process 0 alone writes metrics, TensorBoard and the console;
all processes save and restore checkpoints together (Orbax), each with its own data-iterator
state; a preemption stops all of them at the same step (`_Preemption`).
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from yuanjax import checkpoint as ckpt_lib
from yuanjax import config_lib, metrics as metrics_lib, optim, sample as sample_lib, sharding, stats
from yuanjax.data import pipeline as data_lib
from yuanjax.model import Transformer

f32 = jnp.float32


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def loss_fn(params, model, batch, rng, aux_in_loss=True):
  """Mean token cross-entropy (float32) over loss_mask, plus the routers' aux losses."""
  logits, aux = model.apply({'params': params}, batch['inputs'], segment_ids=batch['segment_ids'],
                            positions=batch['positions'], deterministic=False, rngs={'router': rng})
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(f32), batch['targets'])
  mask = batch['loss_mask'].astype(f32)
  n = jnp.maximum(mask.sum(), 1.0)
  lm_loss = jnp.sum(ce * mask) / n
  total = lm_loss + aux['aux_loss'] if aux_in_loss else lm_loss
  return total, dict(lm_loss=lm_loss, aux=aux, tokens=mask.sum())


def train_step(state: TrainState, batch, *, model, optimizer, schedule, grad_accum, seed):
  """One optimizer step; gradients averaged over `grad_accum` micro-batches (lax.scan)."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(carry, xs):
    mb, i = xs
    (_, out), g = grad_fn(state.params, model, mb, jax.random.fold_in(rng, i))
    acc_g, acc_loss, acc_aux = carry
    acc_g = jax.tree_util.tree_map(lambda a, b: a + b / grad_accum, acc_g, g)
    return (acc_g, acc_loss + out['lm_loss'] / grad_accum,
            jax.tree_util.tree_map(lambda a, b: a + b / grad_accum, acc_aux, out['aux'])), None

  split = lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
  micro_batches = jax.tree_util.tree_map(split, batch)
  aux_shape = jax.eval_shape(lambda: grad_fn(state.params, model,
                                             jax.tree_util.tree_map(lambda x: x[0], micro_batches),
                                             rng)[0][1]['aux'])
  zeros = lambda t: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  init = (jax.tree_util.tree_map(jnp.zeros_like, state.params), jnp.zeros((), f32), zeros(aux_shape))
  (grads, loss, aux), _ = jax.lax.scan(micro, init, (micro_batches, jnp.arange(grad_accum)))

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  moe = aux['moe']
  metrics = dict(loss=loss, aux_loss=aux['aux_loss'], grad_norm=optax.global_norm(grads),
                 learning_rate=schedule(state.step))
  if moe:
    metrics['moe'] = dict(load=moe['load'], entropy=moe['entropy'].mean(),
                          max_load=moe['max_load'].max(), dropped_fraction=moe['dropped_fraction'].mean(),
                          load_balance_loss=moe['load_balance_loss'].mean(), z_loss=moe['z_loss'].mean())
  return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch, *, model):
  _, out = loss_fn(params, model, batch, jax.random.key(0), aux_in_loss=False)
  return out['lm_loss'] * out['tokens'], out['tokens']


def _strip_boxes(tree):
  """Boxed (logically partitioned) leaves -> their values, without sharding constraints."""
  return jax.tree_util.tree_map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x, tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def model_and_state(config: ml_collections.ConfigDict):
  """(model, optimizer, schedule, init_boxed): `init_boxed(key)` builds the TrainState with
  every leaf boxed with its logical axis names. Evaluate it abstractly (jax.eval_shape) under
  the mesh and axis rules to get shapes and shardings; `yuanjax.plan` does exactly that."""
  tcfg = config.train
  model = Transformer(config.model)
  init_params = lambda key: model.init(key, jnp.zeros((1, tcfg.seq_len), jnp.int32))['params']
  boxed = jax.eval_shape(init_params, jax.random.key(0))
  optimizer = optim.make_optimizer(config.optimizer, tcfg.num_steps, boxed)
  schedule = optim.schedule(config.optimizer, tcfg.num_steps)

  def init_boxed(key):
    params = init_params(key)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

  return model, optimizer, schedule, init_boxed


class _ShardedIterator(grain.DatasetIterator):
  """Several input streams of one process as one checkpointable iterator: their batches
  concatenated row-wise, in shard order (the rows this process's devices hold)."""

  def __init__(self, iterators):
    super().__init__(iterators)

  def __next__(self):
    batches = [next(it) for it in self._parents]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {'shards': [it.get_state() for it in self._parents]}

  def set_state(self, state):
    for it, s in zip(self._parents, state['shards'], strict=True):
      it.set_state(s)


def make_data(config: ml_collections.ConfigDict):
  """(train_iter, make_eval_iter, tokenizer) of this process's input streams.

  Stream s of S (S = train.data_shards, or the process count) is `make_datasets` with
  process_index=s, process_count=S; process p of n reads streams [p S/n, (p+1) S/n).
  """
  tcfg, n, p = config.train, jax.process_count(), jax.process_index()
  S = tcfg.data_shards or n
  make = lambda s: data_lib.make_datasets(config.data, global_batch_size=tcfg.batch_size,
                                          seq_len=tcfg.seq_len, process_index=s, process_count=S)
  streams = [make(s) for s in range(p * S // n, (p + 1) * S // n)]
  tokenizer = streams[0][2]
  if len(streams) == 1:
    return streams[0]
  return (_ShardedIterator([t for t, _, _ in streams]),
          lambda: _ShardedIterator([e() for _, e, _ in streams]), tokenizer)


class _Preemption:
  """When to stop for SIGTERM/SIGINT: `reached(step)`, asked at every step.

  One process: a signal handler sets a flag. Several processes: all of them must save the same
  step, wherever the signal arrived. JAX's preemption sync manager (started by
  jax.distributed.initialize) catches SIGTERM in any process, and
  `multihost_utils.reached_preemption_sync_point(step)` turns true on every process at the same
  step (the coordination service picks it: host-side, no device work, cheap every step).
  SIGINT is re-raised as SIGTERM so that it takes the same path.
  """

  def __init__(self):
    self.signum = None
    self.multi = jax.process_count() > 1
    if self.multi:
      signal.signal(signal.SIGINT, lambda *_: signal.raise_signal(signal.SIGTERM))
    else:
      for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def reached(self, step: int) -> bool:
    if not self.multi:
      return self.signum is not None
    try:
      hit = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:   # jax_enable_preemption_service=False: no coordinated stop
      return False
    if hit:
      self.signum = signal.SIGTERM
    return hit

  def __bool__(self):
    return self.signum is not None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.train.num_steps steps into workdir; returns the final summary."""
  config_lib.validate(config)                                  # before any compile or write
  tcfg = config.train
  is_main = jax.process_index() == 0
  preempted = _Preemption()

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  config_lib.validate_against_mesh(config, mesh)
  data_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
  replicated = NamedSharding(mesh, P())

  # --- Data.
  train_iter, make_eval_iter, tokenizer = make_data(config)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'config.model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({tokenizer.vocab_size})')

  # --- Model and optimizer; state built abstractly, then initialised sharded.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model, optimizer, schedule, init_boxed = model_and_state(config)
    init_state = lambda key: nn.unbox(init_boxed(key))
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      _strip_boxes(abstract_boxed), state_shardings)

    # --- Checkpoints: resume from the newest readable one, else initialise.
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    restored = ckpt.restore_latest(abstract, train_iter)
    if restored is None:
      state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(tcfg.seed))
      start = 0
    else:
      start, state, _ = restored
      writer.truncate_after(start)
      logging.info('resumed from step %d', start)

    # Metrics come back replicated: every process can read them (process 0 writes them).
    step_fn = jax.jit(
        functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule,
                          grad_accum=tcfg.grad_accum, seed=tcfg.seed),
        in_shardings=(state_shardings, data_sharding), out_shardings=(state_shardings, replicated),
        donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, model=model),
                      in_shardings=(state_shardings.params, data_sharding), out_shardings=replicated)

    facts = stats.model_facts(config.model)
    flops_per_token = 3 * (facts['forward_flops_per_token'] + facts['attention_flops_per_token']
                           * tcfg.seq_len / config.model.max_seq_len)
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len

    def to_device(batch):   # this process's rows -> the global batch array
      return jax.tree_util.tree_map(
          lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)

    saved = {'step': None if restored is None else start}

    def save(step):
      if saved['step'] != step:
        ckpt.save(step, state, train_iter, {'step': step, 'config': config.to_json()})
        saved['step'] = step

    clock = {'step': start, 'time': time.time()}

    def log(step, m):
      m = jax.device_get(m)          # waits for step `step` only
      now = time.time()              # tokens/s over the steps since the last log (the first
      scalars = metrics_lib.flatten(m)   # interval includes compilation)
      scalars['perplexity'] = float(np.exp(min(scalars['loss'], 50.0)))
      scalars['tokens_per_sec'] = (tokens_per_step * (step - clock['step'])
                                   / max(now - clock['time'], 1e-9))
      clock.update(step=step, time=now)
      if peak:
        scalars['mfu'] = scalars['tokens_per_sec'] * flops_per_token / (peak * jax.device_count())
      if 'moe' in m:
        bad = metrics_lib.log_collapse(step, m['moe']['load'], tcfg.collapse_threshold)
        scalars['moe/collapsed_layers'] = float(len(bad))
      writer.write(step, scalars)
      if is_main:
        tqdm.tqdm.write(metrics_lib.summary_line(step, tcfg.num_steps, scalars))
      return scalars

    def evaluate(step):
      total = count = 0.0
      for i, batch in enumerate(make_eval_iter()):
        if i >= tcfg.eval_steps:
          break
        s, n = eval_fn(state.params, to_device(batch))
        total, count = total + float(s), count + float(n)
      loss = total / max(count, 1.0)
      writer.write(step, {'loss': loss, 'perplexity': float(np.exp(min(loss, 50.0))),
                          'tokens': count}, kind='eval')     # tokens: the eval tokens scored
      if is_main:
        tqdm.tqdm.write(f'step {step}/{tcfg.num_steps} | eval loss {loss:.4f}')
      return loss

    # --- Loop. Metrics are fetched one step late, so the host never waits on the device.
    last = {}
    pending = None
    bar = tqdm.tqdm(total=tcfg.num_steps, initial=start, disable=not is_main or not tcfg.progress,
                    dynamic_ncols=True, desc='train')
    step = start
    while step < tcfg.num_steps:
      if preempted.reached(step):
        logging.warning('signal %d: saving step %d and exiting', preempted.signum, step)
        break
      batch = to_device(next(train_iter))
      state, m = step_fn(state, batch)
      step += 1
      bar.update(1)
      if pending is not None:
        last = log(*pending)
        pending = None
      if step % tcfg.log_every == 0 or step == tcfg.num_steps:
        pending = (step, m)
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.num_steps:
        evaluate(step)
      if step % config.checkpoint.every == 0 and step < tcfg.num_steps:
        save(step)
    if pending is not None:
      last = log(*pending)
    bar.close()
    save(step)
    ckpt.close()
    summary = {'step': step, 'train_loss': last.get('loss')}
    if preempted:
      writer.close()
      return {**summary, 'preempted': True}

    summary['eval_loss'] = evaluate(step)

  # The sample runs outside the mesh, on this process's devices (parameters gathered first
  # when they span processes): one short sequence has nothing to split over a mesh.
  if tcfg.sample_tokens:
    prompt = tcfg.sample_prompt
    params = state.params
    if jax.process_count() > 1:
      params = multihost_utils.process_allgather(params, tiled=True)
    ids = sample_lib.greedy(model, params, tokenizer.encode(prompt), tcfg.sample_tokens,
                            eod_id=tokenizer.eod_id)
    summary['sample'] = prompt + tokenizer.decode(ids)
    if is_main:
      print(f'--- greedy sample ({tcfg.sample_tokens} tokens) ---\n{summary["sample"]}\n---')
  writer.close()
  return summary
