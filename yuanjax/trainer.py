"""The trainer: the pure jitted step and the loop (mesh, data, state, checkpoints, logging,
evaluations and a greedy sample, each owned by its own module: the loss by yuanjax.loss, what
runs every train.eval_every steps by config.evals and yuanjax.evals).

  python -m yuanjax.train --config=configs/demo.py --workdir=/tmp/demo

Writes WORKDIR/metrics.jsonl (one JSON object per logged step, eval lines with
"kind": "eval": yuanjax.evals.in_training), WORKDIR/tb/ (TensorBoard) and WORKDIR/checkpoints/. Started again with the
same workdir it resumes from the newest readable checkpoint, data iterator included, and
continues with exactly the losses of an uninterrupted run. SIGTERM/SIGINT save the current
step and exit 0. A step whose loss or grad norm is not finite halts the run (a HaltError, exit
non-zero) without saving at or after it, or is skipped (config.train.on_nonfinite; see
yuanjax.step_guard); a failed checkpoint write is a checkpoint.SaveError.

Multi-process (after `yuanjax.distributed.initialize`): every process runs this same
function. The batch is made of `train.data_shards` input streams (default one per process);
each process reads only its own streams and hands its rows to
`jax.make_array_from_process_local_data`, so the global batch is the same for any number of
processes with the same streams. Process 0 alone writes metrics, TensorBoard and the console;
all processes save and restore checkpoints together (Orbax), each with its own data-iterator
state; a preemption stops all of them at the same step (`distributed.Preemption`).
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from yuanjax import checkpoint as ckpt_lib
from yuanjax import config_lib, cost, distributed, finetune
from yuanjax import metrics as metrics_lib
from yuanjax import sharding, step_guard, train_state
from yuanjax.data import pipeline as data_pipeline
from yuanjax.data import streams
from yuanjax.evals import evaluator, in_training, sample
from yuanjax.loss import loss_fn
from yuanjax.train_state import TrainState

f32 = jnp.float32


def train_step(state: TrainState, batch, *, model, optimizer, schedule, grad_accum, seed,
               guard_cfg=None):
  """One optimizer step; gradients averaged over `grad_accum` micro-batches (lax.scan). The
  update is applied unless the step guard (guard_cfg: config.train's guard fields, default
  step_guard.defaults()) skips it or the run has halted."""
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
  aux_shape = jax.eval_shape(lambda: grad_fn(
      state.params, model, jax.tree_util.tree_map(lambda x: x[0], micro_batches), rng)[0][1]['aux'])
  zeros = lambda t: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  init = (jax.tree_util.tree_map(jnp.zeros_like, state.params), jnp.zeros((),
                                                                          f32), zeros(aux_shape))
  (grads, loss, aux), _ = jax.lax.scan(micro, init, (micro_batches, jnp.arange(grad_accum)))

  grad_norm = optax.global_norm(grads)
  guard, apply, guard_metrics = step_guard.update(
      state.guard, state.step + 1, loss, grad_norm,
      step_guard.defaults() if guard_cfg is None else guard_cfg)
  params, opt_state = step_guard.apply_if(apply, functools.partial(_update, optimizer, grads),
                                          state.params, state.opt_state)
  moe = aux['moe']
  metrics = dict(loss=loss, aux_loss=aux['aux_loss'], grad_norm=grad_norm,
                 learning_rate=schedule(state.step), loss_tokens=batch['loss_mask'].sum(),
                 **guard_metrics)
  if moe:
    metrics['moe'] = dict(
        load=moe['load'], entropy=moe['entropy'].mean(), max_load=moe['max_load'].max(),
        dropped_fraction=moe['dropped_fraction'].mean(),
        load_balance_loss=moe['load_balance_loss'].mean(), z_loss=moe['z_loss'].mean())
  return TrainState(state.step + 1, params, opt_state, guard), metrics


def jit_train_step(config: ml_collections.ConfigDict, built: train_state.Built, mesh):
  """The trainer's jitted step: state and batch sharded over `mesh` (`built` with it), the
  metrics replicated (every process can read them), the state donated. The benchmark
  (benchmarks/train_step.py) times and analyses exactly this function."""
  step = functools.partial(train_step, model=built.model, optimizer=built.optimizer,
                           schedule=built.schedule, grad_accum=config.train.grad_accum,
                           seed=config.train.seed, guard_cfg=config.train)
  return jax.jit(step, in_shardings=(built.shardings, batch_sharding(mesh)),
                 out_shardings=(built.shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def batch_sharding(mesh) -> NamedSharding:
  """Batches are split over the data-parallel mesh axes (sharding.BATCH_AXES)."""
  return NamedSharding(mesh, P(sharding.BATCH_AXES))


def _update(optimizer, grads, params, opt_state):
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def check_workdir(workdir: str) -> None:
  """Creates workdir if needed and checks that it can be written, before any compile."""
  if '://' in workdir:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: not a writable directory ({e.strerror or e})') from e


class _Logger:
  """Turns fetched step metrics into scalars (tokens/s since the previous log, MFU, router
  collapse), writes them (metrics.jsonl, TensorBoard, console) and remembers the last."""

  def __init__(self, config, writer, start: int, is_main: bool):
    self.tcfg, self.writer, self.is_main = config.train, writer, is_main
    self.top_k = config.model.router.top_k
    self.tokens_per_step = config.train.batch_size * config.train.seq_len
    self.flops_per_token = cost.train_flops_per_token(config)  # arithmetic on the config
    self.device_kind, self.num_devices = jax.devices()[0].device_kind, jax.device_count()
    self.last_step, self.last_time, self.last = start, time.time(), {}
    self.sources = [m['name'] for m in data_pipeline.mixture_sources(config.data)]
    self.source_rows = np.zeros(len(self.sources))

  def count_sources(self, source_ids) -> None:
    """Counts this process's rows by mixture source (their realised token shares)."""
    if source_ids is not None:
      self.source_rows += np.bincount(source_ids, minlength=len(self.sources))

  def scalars(self, step: int, m) -> dict:
    """The line of step `step` (m fetched to host); the first interval includes compilation."""
    m = dict(m)
    for k in ('halted_at', 'halt_loss', 'halt_grad_norm'):
      m.pop(k, None)
    now = time.time()
    s = metrics_lib.flatten(m)
    s.update(nonfinite=bool(m['nonfinite']), spike=bool(m['spike']),
             skipped_steps=int(m['skipped_steps']))
    s['perplexity'] = float(np.exp(min(s['loss'], 50.0)))
    s['tokens_per_sec'] = (self.tokens_per_step * (step - self.last_step) /
                           max(now - self.last_time, 1e-9))
    self.last_step, self.last_time = step, now
    mfu = cost.mfu(s['tokens_per_sec'], self.flops_per_token, self.device_kind, self.num_devices)
    if mfu is not None:
      s['mfu'] = mfu
    for name, rows in zip(self.sources, self.source_rows):
      s[f'data/share/{name}'] = float(rows / max(self.source_rows.sum(), 1))
    if 'moe' in m:
      bad = metrics_lib.log_collapse(step, m['moe']['load'], self.top_k,
                                     self.tcfg.collapse_top_k_share)
      s['moe/collapsed_layers'] = float(len(bad))
    return s

  def write(self, step: int, s: dict) -> None:
    self.writer.write(step, s)
    if self.is_main:
      tqdm.tqdm.write(metrics_lib.summary_line(step, self.tcfg.num_steps, s))
    self.last = s


VOCAB_MULTIPLE = 128  # the error's suggested model.vocab_size is rounded up to a multiple of this


def check_vocab(vocab_size: int, tokenizer) -> None:
  """The model's embedding must have a row for every token id the tokenizer gives. The config
  sets model.vocab_size (the trainer never changes it: the model that trained is the one its
  config file and overrides rebuild, for generate, report, plan and stats alike)."""
  n = tokenizer.vocab_size
  if n > vocab_size:
    fit = -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    raise ValueError(f'config.model.vocab_size={vocab_size} is smaller than the tokenizer '
                     f'vocabulary ({n}, {tokenizer.model_path}): add '
                     f'--config.model.vocab_size={fit} (a multiple of {VOCAB_MULTIPLE} that '
                     f'holds it)')
  logging.info('config.model.vocab_size=%d for a tokenizer of %d pieces (%s): %d rows unused',
               vocab_size, n, tokenizer.model_path, vocab_size - n)


def _initial_state(config: ml_collections.ConfigDict, built: train_state.Built) -> TrainState:
  """Step 0: the init_from source's params with a fresh optimizer (yuanjax.finetune), else a
  random init from config.train.seed."""
  if config.train.init_from:
    logging.info('initialising the params from train.init_from=%s', config.train.init_from)
    return finetune.init_state(config, built)
  return jax.jit(built.init, out_shardings=built.shardings)(jax.random.key(config.train.seed))


def _halted(m) -> tuple[int, float, float] | None:
  """(step, loss, grad norm) of the step that halted the run, from fetched metrics/guard."""
  step = int(m['halted_at'])
  return (step, float(m['halt_loss']), float(m['halt_grad_norm'])) if step else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.train.num_steps steps into workdir; returns the final summary."""
  if config.train.init_from:
    finetune.resolve_model(config)  # the source's model; before any compile or write
  config_lib.validate(config)
  eval_specs = in_training.specs(config)
  tcfg = config.train
  is_main = jax.process_index() == 0
  check_workdir(workdir)
  preempted = distributed.Preemption()

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  config_lib.validate_against_mesh(config, mesh)
  data_sharding = batch_sharding(mesh)

  # --- Data.
  train_iter, make_eval_iter, tokenizer = streams.make_data(config)
  if tcfg.init_from:
    finetune.check_tokenizer(config, tokenizer)
  check_vocab(config.model.vocab_size, tokenizer)

  # --- Model, optimizer and state: built abstractly, then initialised sharded.
  built = train_state.build(config, mesh)
  model, shardings = built.model, built.shardings
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # --- Checkpoints: resume from the newest readable one, else initialise.
    ckpt = ckpt_lib.for_workdir(workdir, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    guard0 = jax.device_put(step_guard.init(tcfg.spike_window), shardings.guard)
    restored = ckpt.restore_latest(built.abstract, train_iter, {'guard': guard0})  # older ckpts
    if restored is None:
      start, state = 0, _initial_state(config, built)
    else:
      start, state, _ = restored
      writer.truncate_after(start)
      logging.info('resumed from step %d', start)
      if tcfg.init_from:
        logging.info('train.init_from=%s is ignored: the run resumes from its own checkpoint',
                     tcfg.init_from)

    step_fn = jit_train_step(config, built, mesh)

    def to_device(batch):  # this process's rows -> the global batch array
      return jax.tree_util.tree_map(
          lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)

    logger = _Logger(config, writer, start, is_main)
    evaluators = in_training.build(
        evaluator.Context(config, model, tokenizer, mesh, shardings.params, data_sharding,
                          make_eval_iter, to_device, logger.sources), eval_specs)
    last_saved = None if restored is None else start

    def halt(info, pending):
      """Writes the halted step's line (after a pending good one), waits for saves, raises."""
      bad_step, loss, gnorm = info
      if pending is not None and pending[0] < bad_step:
        logger.write(pending[0], logger.scalars(*pending))
      line = dict(loss=loss, grad_norm=gnorm, **step_guard.nonfinite_fields(loss, gnorm))
      if pending is not None and pending[0] == bad_step:
        line = {**logger.scalars(*pending), **line}
      writer.write(bad_step, {**line, 'halted': True})
      ckpt.close()
      writer.close()
      raise step_guard.HaltError(step_guard.halt_message(bad_step, loss, gnorm, tcfg, last_saved))

    def check(pending):
      """Halts if any step so far did (the guard of the current state: one small fetch)."""
      info = _halted(
          jax.device_get({k: state.guard[k] for k in ('halted_at', 'halt_loss', 'halt_grad_norm')}))
      if info is not None:
        halt(info, pending)

    def save(step):
      nonlocal last_saved
      if last_saved != step:
        ckpt.save(step, state, train_iter, {'step': step, 'config': config.to_json()})
        last_saved = step

    def evaluate(step):
      return in_training.run(evaluators, state.params, step, writer, is_main, tcfg.num_steps)

    def flush(pending):
      """Logs the pending step (fetched now: it is done or nearly) unless it halted."""
      m = jax.device_get(pending[1])
      info = _halted(m)
      if info is not None:
        halt(info, (pending[0], m))
      logger.write(pending[0], logger.scalars(pending[0], m))

    # --- Loop. Metrics are fetched one step late, so the host never waits on the device.
    pending = None
    bar = tqdm.tqdm(total=tcfg.num_steps, initial=start, disable=not is_main or not tcfg.progress,
                    dynamic_ncols=True, desc='train')
    step = start
    while step < tcfg.num_steps:
      if preempted.reached(step):
        logging.warning('signal %d: saving step %d and exiting', preempted.signum, step)
        break
      batch = next(train_iter)
      logger.count_sources(batch.pop('source', None))
      state, m = step_fn(state, to_device(batch))
      step += 1
      bar.update(1)
      if pending is not None:
        flush(pending)
        pending = None
      if step % tcfg.log_every == 0 or step == tcfg.num_steps:
        pending = (step, m)
      due_eval = tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.num_steps
      due_save = step % config.checkpoint.every == 0 and step < tcfg.num_steps
      if due_eval or due_save:
        check(pending)
      if due_eval:
        evaluate(step)
      if due_save and pending is not None:  # the line before its checkpoint: a kill between
        flush(pending)  # the two would lose it (the run resumes after the checkpoint's step)
        pending = None
      if due_save:
        save(step)
    if pending is not None:
      flush(pending)
    bar.close()
    check(None)
    save(step)
    ckpt.close()
    summary = {'step': step, 'train_loss': logger.last.get('loss')}
    if preempted:
      writer.close()
      return {**summary, 'preempted': True}

    summary.update(evaluate(step))

    # The sample: decoded on the training mesh, on every process (yuanjax.evals.sample).
    if tcfg.sample_tokens:
      summary['sample'] = sample.end_of_run(model, state.params, tokenizer, tcfg.sample_prompt,
                                            tcfg.sample_tokens, mesh=mesh, rules=rules)
      if is_main:
        print(f'--- greedy sample ({tcfg.sample_tokens} tokens) ---\n{summary["sample"]}\n---')
  writer.close()
  return summary
