"""Times cached decoding of a checkpoint: tokens/s and the fraction of the memory-bandwidth roofline.

  python benchmarks/decode.py --checkpoint WORKDIR_OR_DIR [--step S] [--batch 1,4,16,64] \\
      --context N [--new_tokens M] [--dtype bfloat16] [--param_dtype bfloat16] [--quantize int8]

Loads the checkpoint as `yuanjax.generate` does (an HF dir, a converted dir or a training
workdir; `--step` picks a workdir's checkpoint) and runs the model as generation runs it
(`generate.generation_config`: a dispatch that never drops), at each batch size B of --batch
(default 1, 4, 16 and 64; each compiled apart). B rows of N random prompt tokens
fill a [B, N + M] KV cache in one prefill (timed apart, compile excluded); then M greedy one-token
decode steps run in one jitted loop, after a warm-up step on a copy of the cache, and are timed
up to `block_until_ready`. One device (the default one).

Per batch size, a line of text and then one of JSON: tokens_per_s (B x M / s), step_ms,
prefill_s, compile_s, device_kind, experts_per_layer (distinct routed experts per MoE layer per
step, measured in the timed steps), bytes_per_step and its parts
(`yuanjax.cost.decode_bytes_per_step`: params + those experts + the KV cache at the mean attended
context N + (M + 1) / 2 + the LFA state; with
--quantize int8 the weights at `yuanjax.quantize.bytes_per_param`, about 1 byte, not 2 or 4),
bandwidth (bytes/s of the device kind, `yuanjax.cost.DEVICES`; null where unknown)
and roofline_fraction = bytes_per_step / step_s / bandwidth (null on the CPU). Decoding here
uses the reference einsum attention over all B x (N + M) cache slots (masked), so with M much
smaller than N it reads about what is counted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from yuanjax import config_lib, cost, loader
from yuanjax import quantize as quantize_lib
from yuanjax import generate as gen
from yuanjax.model import Transformer
from yuanjax.model.transformer import init_cache, num_blocks

DTYPES = ('float32', 'bfloat16', 'float16')
COUNTS = (
    'non-expert params (param_dtype; with --quantize int8: int8 + scales) + experts_per_layer '
    'routed experts per MoE layer (the same) + KV cache at the mean attended context (dtype) '
    '+ LFA state (dtype); reads only')


def _programs(model: Transformer):
  """(prefill, decode) functions of (params, ...) for jax.jit."""

  def prefill(params, cache, prompt_BxN):
    logits_BxNxV, _, cache = gen.cached_forward(model, params, cache, prompt_BxN)
    return cache, jnp.argmax(logits_BxNxV[:, -1], axis=-1).astype(jnp.int32)

  def decode(params, cache, tok_B, num_steps):
    """num_steps greedy steps; also the distinct experts each MoE layer used, summed."""

    def step(_, carry):
      cache, tok_B, experts_X = carry
      logits_Bx1xV, aux, cache = gen.cached_forward(model, params, cache, tok_B[:, None])
      used_X = jnp.sum(aux['moe']['load'] > 0, axis=-1) if aux['moe'] else experts_X
      return cache, jnp.argmax(logits_Bx1xV[:, 0], axis=-1).astype(jnp.int32), experts_X + used_X

    num_moe = num_blocks(model.config) if model.config.moe_every else 0
    carry = (cache, tok_B, jnp.zeros((num_moe,), jnp.int32))
    return jax.lax.fori_loop(0, num_steps, step, carry)

  return prefill, decode


def _timed(fn, *args):
  """(seconds, result) of one call, up to block_until_ready."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - t, out


def measure(model: Transformer, params, batch: int, context: int, new_tokens: int,
            seed: int = 0) -> dict:
  """Compiles and times prefill and decoding (see the module docstring); the timings."""
  prefill, decode = _programs(model)
  cache = init_cache(model, batch, context + new_tokens)
  prompt_BxN = jax.random.randint(jax.random.key(seed), (batch, context), 0,
                                  model.config.vocab_size, jnp.int32)
  t = time.perf_counter()
  prefill_c = jax.jit(prefill).lower(params, cache, prompt_BxN).compile()
  tok_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
  decode_c = jax.jit(decode, donate_argnums=1).lower(params, cache, tok_B, 1).compile()
  compile_s = time.perf_counter() - t
  _timed(prefill_c, params, cache, prompt_BxN)  # warm-up
  prefill_s, (cache, tok_B) = _timed(prefill_c, params, cache, prompt_BxN)
  _timed(decode_c, params, jax.tree.map(jnp.copy, cache), tok_B, 1)  # warm-up, on a copy
  decode_s, (_, _, experts_X) = _timed(decode_c, params, cache, tok_B, new_tokens)
  experts = float(np.mean(np.asarray(experts_X))) / new_tokens if experts_X.size else 0.0
  return dict(compile_s=compile_s, prefill_s=prefill_s, decode_s=decode_s,
              experts_per_layer=experts)


def report(model_cfg, batch: int, context: int, new_tokens: int, timing: dict, device_kind: str,
           quantize: str = 'none') -> dict:
  """The JSON record: throughput, bytes per step and the roofline fraction."""
  step_s = timing['decode_s'] / new_tokens
  mean_context = context + (new_tokens + 1) / 2  # step i attends N + i + 1 positions
  weight_bytes = None if quantize == 'none' else quantize_lib.bytes_per_param(model_cfg, quantize)
  bytes_ = cost.decode_bytes_per_step(model_cfg, batch, mean_context, timing['experts_per_layer'],
                                      weight_bytes)
  return dict(batch=batch, context=context, new_tokens=new_tokens, dtype=model_cfg.dtype,
              param_dtype=model_cfg.param_dtype, device_kind=device_kind, tokens_per_s=batch *
              new_tokens / timing['decode_s'], step_ms=1e3 * step_s, prefill_s=timing['prefill_s'],
              compile_s=timing['compile_s'], experts_per_layer=timing['experts_per_layer'],
              bytes_per_step=bytes_['total'], bytes=bytes_, bytes_per_step_counts=COUNTS,
              bandwidth=cost.memory_bandwidth(device_kind),
              roofline_fraction=cost.roofline_fraction(bytes_['total'] / step_s, device_kind))


def _parse(argv):
  p = argparse.ArgumentParser(prog='python benchmarks/decode.py',
                              description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True,
                 help='HF dir, converted (from-hf) dir, or yuanjax training workdir')
  p.add_argument('--step', type=int, default=None, help="a workdir's checkpoint (default newest)")
  p.add_argument(
      '--batch', type=_batches, default=(1, 4, 16, 64),
      help='rows decoded together (B), or several sizes, comma-separated (each timed '
      'apart); default 1,4,16,64')
  p.add_argument('--context', type=int, required=True, help='prompt tokens in the cache (N)')
  p.add_argument('--new_tokens', type=int, default=32, help='timed decode steps (M)')
  p.add_argument('--dtype', default=None, help='compute dtype override (cache dtype too)')
  p.add_argument('--param_dtype', default=None, help='params dtype override, e.g. bfloat16')
  p.add_argument('--quantize', default='none', choices=quantize_lib.MODES,
                 help='int8: int8 matmul weights, per-channel scales (yuanjax.quantize)')
  p.add_argument('--dispatch', default=None, choices=('dropless', 'dense'),
                 help="MoE dispatch (default: generation's, dropless unless the config says dense)")
  p.add_argument('--seed', type=int, default=0, help='of the random prompt tokens')
  return p.parse_args(argv)


def _batches(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(b) for b in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: expected B or B1,B2,... (integers)') from None


def _check_args(args) -> None:
  for b in args.batch:
    if b < 1:
      raise ValueError(f'--batch={",".join(map(str, args.batch))}: must be >= 1')
  for name in ('context', 'new_tokens'):
    if getattr(args, name) < 1:
      raise ValueError(f'--{name}={getattr(args, name)}: must be >= 1')
  for name in ('dtype', 'param_dtype'):
    if getattr(args, name) not in (None, *DTYPES):
      raise ValueError(f'--{name}={getattr(args, name)!r}: expected one of {DTYPES}')


def _load(args):
  """(model as generation runs it, params); errors name the argument or field at fault."""
  overrides = {
      k: v for k, v in (('dtype', args.dtype), ('param_dtype', args.param_dtype),
                        ('moe.dispatch', args.dispatch)) if v
  }
  model, params = loader.load_model(args.checkpoint, overrides=overrides, step=args.step,
                                    quantize=args.quantize)
  m = gen.generation_config(model.config)
  config_lib.validate_model(m)
  if args.context + args.new_tokens > m.max_seq_len:
    raise ValueError(f'--context={args.context} + --new_tokens={args.new_tokens} is longer than '
                     f'config.model.max_seq_len={m.max_seq_len}')
  return Transformer(m), params


def main(argv=None) -> int:
  args = _parse(argv)
  try:
    _check_args(args)
    model, params = _load(args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for batch in args.batch:
    timing = measure(model, params, batch, args.context, args.new_tokens, args.seed)
    rec = report(model.config, batch, args.context, args.new_tokens, timing,
                 jax.devices()[0].device_kind, args.quantize)
    rec = dict(checkpoint=args.checkpoint, step=args.step, quantize=args.quantize, **rec)
    print(
        f"{rec['device_kind']}, batch {batch}: {rec['tokens_per_s']:.1f} tokens/s, "
        f"{rec['step_ms']:.2f} ms/step, {rec['bytes_per_step'] / 1e6:.2f} MB read/step (weights "
        f"{(rec['bytes']['params'] + rec['bytes']['experts']) / 1e6:.2f} MB, {args.quantize}), "
        f"prefill {rec['prefill_s']:.3f} s", flush=True)
    print(json.dumps(rec), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
