"""Non-finite and spike guard of the train step: decides, inside the jitted step, whether a
step's update is applied, skipped, or halts the run.

  config.train.on_nonfinite          'halt' (default) or 'skip'
  config.train.max_skipped_in_a_row  'skip' halts after this many skipped steps in a row (10)
  config.train.skip_spikes           skip a step whose loss or grad norm exceeds the mean of
                                     the last `spike_window` (128) accepted steps by
                                     `spike_std` (6) standard deviations (as MaxText and
                                     Levanter do); off by default; active once the window is full

The guard's state is a few replicated scalars and two `spike_window` ring buffers, carried
in the TrainState (so it is checkpointed and a resumed run decides exactly as an
uninterrupted one). Once a step halts, `halted_at` holds its number and no later update is
applied; the host reads it when it logs and before every checkpoint save, so a halted run
never saves at or after the step that halted it (yuanjax.trainer).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

f32, i32 = jnp.float32, jnp.int32
MODES = ('halt', 'skip')


def defaults() -> ml_collections.ConfigDict:
  """The guard's fields of config.train, with their defaults."""
  return ml_collections.ConfigDict(
      dict(on_nonfinite='halt', max_skipped_in_a_row=10, skip_spikes=False, spike_window=128,
           spike_std=6.0))


def init(window: int) -> dict:
  """The guard state before step 1."""
  return dict(losses=jnp.zeros((window,), f32), grad_norms=jnp.zeros(
      (window,), f32), accepted=jnp.zeros((), i32), skipped=jnp.zeros((), i32), in_a_row=jnp.zeros(
          (), i32), halted_at=jnp.zeros((), i32), halt_loss=jnp.zeros((), f32),
              halt_grad_norm=jnp.zeros((), f32))


def _spike(values_W, accepted, x, num_std):
  """True when the window is full and x > mean + num_std * std of the window."""
  full = accepted >= values_W.shape[0]
  return full & (x > values_W.mean() + num_std * values_W.std())


def update(guard: dict, step, loss, grad_norm, tcfg: ml_collections.ConfigDict):
  """(new guard, apply, metrics) for the step numbered `step` (1-based) with this loss and
  global grad norm. `apply` is False when the update must not be applied."""
  loss, grad_norm = loss.astype(f32), grad_norm.astype(f32)
  nonfinite_loss, nonfinite_grad = ~jnp.isfinite(loss), ~jnp.isfinite(grad_norm)
  nonfinite = nonfinite_loss | nonfinite_grad
  spike = jnp.zeros((), bool)
  if tcfg.skip_spikes:
    spike = (_spike(guard['losses'], guard['accepted'], loss, tcfg.spike_std) |
             _spike(guard['grad_norms'], guard['accepted'], grad_norm, tcfg.spike_std))
  skip = nonfinite | spike
  in_a_row = jnp.where(skip, guard['in_a_row'] + 1, 0)
  halt = in_a_row > tcfg.max_skipped_in_a_row
  if tcfg.on_nonfinite == 'halt':
    halt = halt | nonfinite
  first_halt = halt & (guard['halted_at'] == 0)
  halted_at = jnp.where(first_halt, step, guard['halted_at'])
  apply = ~skip & (halted_at == 0)
  slot = guard['accepted'] % guard['losses'].shape[0]
  keep = lambda buf, x: jnp.where(apply, buf.at[slot].set(x), buf)
  new = dict(losses=keep(guard['losses'], loss), grad_norms=keep(guard['grad_norms'], grad_norm),
             accepted=guard['accepted'] + apply.astype(i32),
             skipped=guard['skipped'] + (skip & (halted_at == 0)).astype(i32), in_a_row=in_a_row,
             halted_at=halted_at, halt_loss=jnp.where(first_halt, loss, guard['halt_loss']),
             halt_grad_norm=jnp.where(first_halt, grad_norm, guard['halt_grad_norm']))
  metrics = dict(skipped_steps=new['skipped'], nonfinite=nonfinite, spike=spike,
                 halted_at=halted_at, halt_loss=new['halt_loss'],
                 halt_grad_norm=new['halt_grad_norm'])
  return new, apply, metrics


def apply_if(apply, update, params, opt_state):
  """update(params, opt_state) where apply, else both unchanged: a lax.cond, not a select of
  new and old, which made XLA keep a copy of the whole optimizer state alive through the step
  (13 GB of the M32 slice's temp memory; docs/scale_out.md, Memory)."""
  return jax.lax.cond(apply, update, lambda p, o: (p, o), params, opt_state)


class HaltError(RuntimeError):
  """The run stopped at a step whose loss or grad norm was not finite (or too many skips)."""


def nonfinite_fields(loss: float, grad_norm: float) -> dict:
  """The flags of a halted step's metrics line."""
  bad = lambda v: not math.isfinite(v)
  return dict(nonfinite=bad(loss) or bad(grad_norm), nonfinite_loss=bad(loss),
              nonfinite_grad_norm=bad(grad_norm))


def halt_message(step: int, loss: float, grad_norm: float, tcfg, last_saved) -> str:
  values = f'loss={loss}, grad_norm={grad_norm}'
  if tcfg.on_nonfinite == 'halt':
    flags = nonfinite_fields(loss, grad_norm)
    what = [n for n in ('loss', 'grad_norm') if flags[f'nonfinite_{n}']]
    why = f'{" and ".join(what)} not finite ({values})'
  else:
    why = (f'{tcfg.max_skipped_in_a_row + 1} steps in a row skipped (train.max_skipped_in_a_row='
           f'{tcfg.max_skipped_in_a_row}; the last: {values})')
  resume = (f'the newest checkpoint is step {last_saved}'
            if last_saved is not None else 'no checkpoint was written')
  return (f'step {step}: {why}; halted (train.on_nonfinite={tcfg.on_nonfinite!r}) without '
          f'saving at or after it: {resume}. Lower optimizer.lr (or set '
          f'train.on_nonfinite=skip) and run the same command again to resume.')


def check_config(tcfg) -> None:
  """Raises ValueError naming the bad train.* field."""
  if tcfg.on_nonfinite not in MODES:
    raise ValueError(f'config.train.on_nonfinite={tcfg.on_nonfinite!r}: expected one of {MODES}')
  for f in ('max_skipped_in_a_row', 'spike_window'):
    if not isinstance(tcfg[f], int) or tcfg[f] < 1:
      raise ValueError(f'config.train.{f}={tcfg[f]!r}: must be a positive integer')
  if not tcfg.spike_std > 0:
    raise ValueError(f'config.train.spike_std={tcfg.spike_std!r}: must be > 0')
