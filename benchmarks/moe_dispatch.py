"""Times the MoE layer's dispatches (forward + backward) and prints useful TFLOP/s.

  python benchmarks/moe_dispatch.py                       # CPU-sized problem
  python benchmarks/moe_dispatch.py --m32                 # M32 expert FFN: 8192 tokens,
                                                          # 32 experts, d 2048, ffn 8192 (GPU)
  python benchmarks/moe_dispatch.py --m32 --dispatch=dropless \
      --grouped_matmul=ragged_dot,tokamax                 # dropless with each kernel (GPU)
  python benchmarks/moe_dispatch.py --m32 --dispatch=dropless \
      --grouped_matmul=megablox --megablox_tiling=512,1024,1024   # (TPU)

`--grouped_matmul` (comma-separated) picks dropless's kernels (`yuanjax.model.grouped_matmul`);
megablox off TPU runs in Pallas interpret mode: correct, far too slow to time.

"Useful" FLOPs count only the routed experts' matmuls: 3 matmuls x 2 x tokens x top_k x d x
ffn, times 3 for forward + backward. The dense dispatch does E/top_k times that work.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from yuanjax import config_lib
from yuanjax.model import moe


def bench(cfg, tokens: int, steps: int) -> dict:
  mod = moe.MoE(cfg)
  x = jax.random.normal(jax.random.key(0), (1, tokens, cfg.hidden_size), jnp.dtype(cfg.dtype))
  v = jax.jit(mod.init)(jax.random.key(1), x)

  @jax.jit
  def step(v, x):
    return jax.grad(lambda v, x: jnp.sum(mod.apply(v, x)[0].astype(jnp.float32)**2),
                    argnums=(0, 1))(v, x)

  jax.block_until_ready(step(v, x))
  t = time.perf_counter()
  for _ in range(steps):
    out = step(v, x)
  jax.block_until_ready(out)
  sec = (time.perf_counter() - t) / steps
  useful = 3 * 3 * 2 * tokens * cfg.router.top_k * cfg.hidden_size * cfg.moe.ffn_size
  out = dict(dispatch=cfg.moe.dispatch, ms=1e3 * sec, useful_tflops=useful / sec / 1e12)
  if cfg.moe.dispatch == 'dropless':
    out['grouped_matmul'] = cfg.moe.grouped_matmul
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--m32', action='store_true')
  ap.add_argument('--tokens', type=int, default=None)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--dispatch', default='dense,dropless,capacity')
  ap.add_argument('--grouped_matmul', default='ragged_dot',
                  help='dropless kernels, comma-separated: ragged_dot, megablox, tokamax')
  ap.add_argument('--megablox_tiling', default='128,128,128', help='tm,tk,tn')
  args = ap.parse_args()
  if args.m32:
    cfg, tokens = config_lib.m32_model(), args.tokens or 8192
  else:  # the demo config's MoE layer, one batch of 16 x 128 tokens
    cfg, tokens = config_lib.tiny_model(), args.tokens or 2048
    cfg.hidden_size, cfg.moe.ffn_size = 128, 192
  print(f'device: {jax.devices()[0].device_kind}, tokens {tokens}, d {cfg.hidden_size}, '
        f'ffn {cfg.moe.ffn_size}, experts {cfg.num_experts}, top-{cfg.router.top_k}, {cfg.dtype}')
  cfg.moe.megablox_tiling = tuple(int(t) for t in args.megablox_tiling.split(','))
  for d in args.dispatch.split(','):
    for kernel in args.grouped_matmul.split(',') if d == 'dropless' else ['ragged_dot']:
      cfg.moe.update(dispatch=d, grouped_matmul=kernel)
      config_lib.validate_model(cfg)  # e.g. a missing tokamax, before any compile
      print(json.dumps(bench(cfg, tokens, args.steps)))


if __name__ == '__main__':
  main()
