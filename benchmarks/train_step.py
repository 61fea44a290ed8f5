"""Times the real train step (the trainer's `jit_train_step`: optimizer, step guard, shardings
and donation included) on a synthetic batch, and says what it executes.

  python benchmarks/train_step.py --config=configs/tiny.py --steps=10
  python benchmarks/train_step.py --config=configs/yuan_m32.py:slice --compile_only
  python benchmarks/train_step.py --config=configs/yuan_m32.py:slice \
      --config.model.attention_backend=xla --steps=20          # on an accelerator

Prints a few human lines, then (last line) one JSON object:
  tokens_per_s, step_s (mean of --steps timed steps after --warmup), step_s_min, compile_s
  model_flops_per_token     6 x active params + causal attention (cost.train_flops_per_token)
  mfu                       null where the device kind's peak is unknown (CPU)
  executed_flops_per_token  XLA's cost analysis of the compiled step, layers unrolled
  flops_ratio               executed / model (< 1 would mean uncounted FLOPs)
  executed_parts, model_parts  both per token, by part (yuanjax.step_cost)
  temp_bytes, argument_bytes   memory_analysis() of the real (scanned) step, per device
  device_kind, num_devices, analysis_loops (while loops left in the analysis compile: 0)
  scanned_flops_per_token   the real step's own cost analysis, layer loop counted once: what
                            a naive count reports (for comparison only)
`--compile_only` compiles and analyses without allocating or running (the M32 slice fits no
CPU): the timing fields are then null.
"""
from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from yuanjax import config_lib, cost, sharding, step_cost, train_state, trainer


def synthetic_batch(config, mesh, seed: int = 0):
  """Random tokens [batch, seq], one document per row, placed as the trainer places batches."""
  B, L = config.train.batch_size, config.train.seq_len
  n, p = jax.process_count(), jax.process_index()
  rng = np.random.default_rng([seed, p])
  tokens = rng.integers(0, config.model.vocab_size, (B // n, L + 1), dtype=np.int32)
  rows = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones(
      (B // n, L), np.int32), positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B // n, L)),
              loss_mask=np.ones((B // n, L), np.float32))
  s = trainer.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(s, v) for k, v in rows.items()}


def time_steps(compiled, built, config, mesh, steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` steps of the compiled step, after `warmup` untimed ones."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    state = jax.jit(built.init, out_shardings=built.shardings)(jax.random.key(0))
  batch = synthetic_batch(config, mesh)
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return times


def run(config, steps: int, warmup: int, compile_only: bool) -> dict:
  config_lib.validate(config)  # before any compile
  mesh = sharding.make_mesh(config.mesh)
  config_lib.validate_against_mesh(config, mesh)
  built = train_state.build(config, mesh)
  t = time.perf_counter()
  compiled = step_cost.compile_step(config, mesh, built)
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  out = dict(tokens_per_s=None, step_s=None, step_s_min=None, compile_s=compile_s, mfu=None)
  out.update(step_cost.analyse(config, mesh, compiled, built))
  kind = jax.devices()[0].device_kind
  tokens = config.train.batch_size * config.train.seq_len
  out.update(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
             device_kind=kind, num_devices=mesh.size,
             scanned_flops_per_token=compiled.cost_analysis()['flops'] * mesh.size / tokens)
  if not compile_only:
    times = time_steps(compiled, built, config, mesh, steps, warmup)
    step_s = float(np.mean(times))
    tokens_per_s = tokens / step_s
    out.update(tokens_per_s=tokens_per_s, step_s=step_s, step_s_min=float(np.min(times)),
               mfu=cost.mfu(tokens_per_s, out['model_flops_per_token'], kind, mesh.size))
  return out


def summary(out: dict) -> str:
  """Human lines: the totals, then executed vs model FLOPs per token by part."""
  lines = [
      f"{out['device_kind']} x{out['num_devices']}: compile {out['compile_s']:.1f} s, temp "
      f"{out['temp_bytes'] / 2**30:.2f} GiB, arguments {out['argument_bytes'] / 2**30:.2f} GiB"
  ]
  if out['step_s'] is not None:
    mfu = 'n/a' if out['mfu'] is None else f"{100 * out['mfu']:.1f}%"
    lines.append(f"step {1e3 * out['step_s']:.1f} ms, {out['tokens_per_s']:.0f} tokens/s, "
                 f"MFU {mfu}")
  unit, scale = ('GFLOP', 1e9) if out['model_flops_per_token'] > 1e8 else ('MFLOP', 1e6)
  lines.append(f"{unit + '/token':<12}{'executed':>10}{'model':>10}{'ratio':>8}")
  ex, mo = out['executed_parts'], out['model_parts']
  for part in ex:
    ratio = f'{ex[part] / mo[part]:8.2f}' if mo.get(part) else ''
    lines.append(f'{part:<12}{ex[part] / scale:10.4f}{mo.get(part, 0.0) / scale:10.4f}{ratio}')
  lines.append(f"{'total':<12}{out['executed_flops_per_token'] / scale:10.4f}"
               f"{out['model_flops_per_token'] / scale:10.4f}{out['flops_ratio']:8.2f}")
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  out = run(f.config, f.steps, f.warmup, f.compile_only)
  print(summary(out))
  print(json.dumps(out))


if __name__ == '__main__':
  # Flags are defined here, not at import, so that tests can import `run`.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps before them.')
  flags.DEFINE_bool('compile_only', False, 'Compile and analyse; run nothing.')
  flags.mark_flag_as_required('config')
  app.run(main)
