"""Times causal attention forward + backward per backend and prints useful TFLOP/s, as JSON.

  python benchmarks/attention.py                          # this platform's backends, M32's
                                                          # heads at seq 4096 and 16384
  python benchmarks/attention.py --backends=splash,xla --seq_lens=4096   # (TPU)
  python benchmarks/attention.py --interpret              # CPU: correctness only

M32's heads: 16 query and 16 key/value heads of 256, rotary on the first 128 dims (NTK base
40890 at 16K), one row of packed documents (segment ids, as training passes them), bfloat16.
The timed function is the model's own (`yuanjax.model.attention.causal_attention` after
`layers.apply_rotary`), under jit, with the gradient of q, k and v. Default backends: on TPU
splash, dot_product_attention and xla; on GPU cudnn, dot_product_attention and xla.

"Useful" FLOPs: the causal half of QK^T and PV, 2 x 2 B H L^2 K / 2 forward, x 3 for forward +
backward (what XLA's full square does twice over, and flash kernels recompute in part).

`--interpret` (any platform; splash in Pallas interpret mode): 2 heads at seq 256 in float32 with
128-blocks, each backend's output and gradients against 'xla' (rel_err); times are not
measurements. One JSON object per line: backend, seq_len, ms, useful_tflops, rel_err, device.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from yuanjax import config_lib
from yuanjax.model import attention, layers

PLATFORM_BACKENDS = {
    'tpu': 'splash,dot_product_attention,xla',
    'gpu': 'cudnn,dot_product_attention,xla',
    'cpu': 'dot_product_attention,xla',
}


def model_config(backend: str, seq_len: int, interpret: bool):
  """M32's attention at `seq_len` (2 heads, float32 and 128-blocks with `interpret`)."""
  m = config_lib.m32_model()
  m.update(
      dict(attention_backend=backend, max_seq_len=seq_len,
           rope_ntk_factor=4.0 if seq_len > 4096 else 1.0))
  if interpret:
    m.update(dict(num_heads=2, dtype='float32'))
    m.splash.update({b: 128 for b in attention.SPLASH_BLOCKS})
  config_lib.validate_model(m)
  return m


def useful_flops(batch: int, heads: int, seq_len: int, head_dim: int) -> float:
  """Forward + backward of the causal half: 3 x 2 matmuls x 2 B H L^2 K / 2."""
  return 3 * 2 * 2 * batch * heads * seq_len**2 * head_dim / 2


def grad_fn(cfg):
  """jit(d/d(q, k, v) of sum(o * w)) through rotary and the backend, and its output."""
  base = layers.rope_base(cfg.rope_base, cfg.rotary_dims, cfg.rope_ntk_factor)

  def loss(q, k, v, w, seg, pos):
    q, k = (layers.apply_rotary(x, pos, cfg.rotary_dims, base) for x in (q, k))
    o = attention.causal_attention(q, k, v, seg, cfg)
    return jnp.sum(o.astype(jnp.float32) * w), o

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def inputs(cfg, batch: int, seq_len: int):
  key = jax.random.split(jax.random.key(0), 4)
  dtype, H, K = jnp.dtype(cfg.dtype), cfg.num_heads, cfg.head_dim
  qkv = [jax.random.normal(k, (batch, seq_len, H, K), dtype) for k in key[:3]]
  w = jax.random.normal(key[3], (batch, seq_len, H, K), jnp.float32)
  seg = jnp.ones((batch, seq_len), jnp.int32)
  seg = seg.at[:, seq_len // 3:].set(2)  # two documents per row
  return (*qkv, w, seg, layers.positions_from_segments(seg))


def bench(backend: str, seq_len: int, batch: int, steps: int, interpret: bool) -> tuple:
  cfg = model_config(backend, seq_len, interpret)
  args, step = inputs(cfg, batch, seq_len), grad_fn(cfg)
  out = jax.block_until_ready(step(*args))
  t = time.perf_counter()
  for _ in range(steps):
    out = step(*args)
  jax.block_until_ready(out)
  sec = (time.perf_counter() - t) / steps
  flops = useful_flops(batch, cfg.num_heads, seq_len, cfg.head_dim)
  record = dict(backend=attention.resolve_backend(cfg, seq_len), seq_len=seq_len, batch=batch,
                heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.dtype, ms=1e3 * sec,
                useful_tflops=flops / sec / 1e12, device=jax.devices()[0].device_kind,
                measured=not interpret)
  return record, out


def rel_err(a, b) -> float:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  num = sum(
      float(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32))**2)) for x, y in zip(la, lb))
  den = sum(float(jnp.sum(y.astype(jnp.float32)**2)) for y in lb)
  return (num / den)**0.5


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--backends', default=None,
                  help='comma-separated; default: the platform\'s (module doc)')
  ap.add_argument('--seq_lens', default='4096,16384')
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--interpret', action='store_true',
                  help='small sizes, splash in interpret mode: correctness against xla only')
  a = ap.parse_args(argv)
  backends = (a.backends or ('splash,dot_product_attention' if a.interpret else
                             PLATFORM_BACKENDS[jax.default_backend()])).split(',')
  seq_lens = [256] if a.interpret else [int(s) for s in a.seq_lens.split(',')]
  for name in backends:
    if name not in attention.ATTENTION_BACKENDS:
      raise SystemExit(f'--backends: {name!r} is not one of {attention.ATTENTION_BACKENDS}')
  for seq_len in seq_lens:
    reference = bench('xla', seq_len, a.batch, 1, True)[1] if a.interpret else None
    for name in backends:
      record, out = bench(name, seq_len, a.batch, 1 if a.interpret else a.steps, a.interpret)
      if reference is not None:
        record['rel_err'] = rel_err(out, reference)
      print(json.dumps(record), flush=True)


if __name__ == '__main__':
  main()
