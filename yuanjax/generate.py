"""Text generation with a KV cache: prefill, then one jitted fixed-shape decode loop.

Command line (PATH: an HF dir, a converted `python -m yuanjax.convert from-hf` dir, or a
yuanjax training workdir, loaded by yuanjax.loader; Yuan's tokenizer writes newlines as `<n>`,
which is handled)::

    python -m yuanjax.generate --checkpoint PATH --prompt "def fib(n):" [--prompt ...] \\
        [--max_new_tokens 64] [--temperature 0.8 --top_k 50 --top_p 0.95 --seed 0] [--json]
    python -m yuanjax.generate --checkpoint PATH --chat --prompt "Write a haiku"
    python -m yuanjax.generate --checkpoint PATH --mesh data=2,tensor=2,expert=2 --prompt ...

--chat: the prompt as a fine-tuned model saw its instructions (yuanjax.data.sft.prompt_ids:
`<sep>` after it; `<n>` in it is a newline); the response alone is printed, up to `<eod>`,
with `<n>` turned back into newlines.

Python::

    from yuanjax import generate, loader
    model, params, tok = loader.load_checkpoint(path)   # HF, converted or workdir (yuanjax.loader)
    outs = generate.generate(model, params, [tok.encode('Hello'), tok.encode('def f(')],
                             max_new_tokens=32, temperature=0.7, top_p=0.9, eod_id=tok.eod_id)
    texts = [tok.decode(generate.strip_eod(o, tok.eod_id)) for o in outs]

    # Sharded: the checkpoint restored straight onto its shards, then the same call with mesh=.
    mesh = generate.make_mesh({'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 2})
    place = generate.Placement(mesh)                  # + rules=, default sharding.DEFAULT_RULES
    model, params, tok = loader.load_checkpoint(
        path, shardings=lambda m: generate.param_shardings(m, place))
    outs = generate.generate(model, params, prompts, max_new_tokens=32, mesh=mesh)

Sharded (--mesh NAME=SIZE,... over the config.mesh axes data, fsdp, expert, tensor; absent ones
1; the sizes multiply to the device count; checked against the checkpoint's config.model before
any weight is read): the params are split by the logical-axis rules (`yuanjax.sharding`: heads,
ffn and vocabulary over 'tensor', experts over 'expert', the MoE layers' tokens exchanged by
all_to_all as in training), the batch rows and the KV cache and LFA state over the 'act_batch'
axes (data x fsdp x expert; the batch is padded to a multiple of them, the padding rows done
from the start) with key/value heads over 'tensor'. Prefill and the decode loop run as one
jitted program with those in/out shardings; no param is gathered. The tokens are one device's.

How: the prompts are right-padded into one [B, P] batch; one cached forward (prefill) over it
fills every layer's KV cache and LFA state (`yuanjax.model.transformer`, decode=True) and
gives the first new token of each row from the logits at its last real position (only those
are computed); then a
`jax.lax.while_loop` feeds one token per row per step into the cache, for at most
`max_new_tokens - 1` steps, and stops early once every row has emitted `eod_id`. Shapes are
fixed ([B, P + max_new_tokens] cache, P the longest prompt rounded up to a multiple of 16),
so the loop compiles once per (batch size, P, max_new_tokens, mesh); sampling settings and the
seed are traced values (changing them does not recompile; greedy skips the sampler's sort).

Sampling: `temperature == 0` is greedy (argmax). Otherwise the logits are divided by the
temperature, cut to the `top_k` most likely tokens (0: no cut), then to the smallest set whose
probability reaches `top_p` (1.0: no cut), and sampled with `jax.random` from `seed`
(reproducible; rows draw independently).

Generation overrides two fields of `model.config` (the returned tokens are otherwise those of
the full forward pass): `moe.dispatch` becomes 'dropless' if it can drop token slots
(`yuanjax.model.moe.inference_dispatch`: `capacity` drops when few tokens are routed, as in a
one-token decode step, and would then disagree with the full forward), and `remat` becomes
'none'. The expert-choice router is refused: it is not causal.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from yuanjax import config_lib, loader, quantize, sharding, train_state
from yuanjax.data import sft
from yuanjax.model import Transformer, layers, moe, routers
from yuanjax.model.transformer import cache_axes, init_cache

f32 = jnp.float32
_NO_EOD = -1
PROMPT_BUCKET = 16

# ---------------------------------------------------------------- sampling


def sample_logits(logits_BxV, key, temperature, top_k, top_p):
  """One token per row [B] (int32): greedy when temperature <= 0, else temperature / top-k /
  top-p sampling. All settings may be traced scalars; greedy rows skip the sampler's full-
  vocabulary sort (`jax.lax.cond`), which costs a CPU more than the rest of a decode step."""
  logits_BxV = logits_BxV.astype(f32)
  greedy = lambda: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  sampled = lambda: _sample(logits_BxV, key, temperature, top_k, top_p)
  return jax.lax.cond(jnp.asarray(temperature) > 0, sampled, greedy)


def _sample(logits_BxV, key, temperature, top_k, top_p):
  """Temperature, then the top-k cut, then the top-p cut, then a draw from `key`."""
  V = logits_BxV.shape[-1]
  x = logits_BxV / jnp.maximum(temperature, 1e-6).astype(f32)
  sorted_BxV = -jnp.sort(-x, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V).astype(jnp.int32)
  in_top_k_BxV = jnp.arange(V) < k
  sorted_BxV = jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # Keep the i-th most likely token while the ones before it hold less than top_p (so the
  # most likely token is always kept).
  keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p
  keep_BxV = (keep_BxV | (top_p >= 1.0)) & in_top_k_BxV  # top_p 1: exactly no cut
  threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  x = jnp.where(x >= threshold_Bx1, x, -jnp.inf)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------- the decode loop


def generation_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.model as generation runs it: a dispatch that never drops, no remat."""
  m = ml_collections.ConfigDict(config.to_dict())
  if m.moe_every and not routers.router_class(m.router.type).causal:
    raise ValueError(
        f'config.model.router.type={m.router.type!r} is not causal (a token\'s routing '
        f'depends on later tokens); generation needs one of {routers.causal_routers()}')
  m.moe.dispatch = moe.inference_dispatch(m.moe.dispatch)
  m.remat = 'none'
  return m


def cached_forward(model: Transformer, params, cache, tokens_BxL, lengths_B=None):
  """One cached forward (`yuanjax.model.transformer`, decode=True): a chunk of L tokens per row
  after what `cache` holds. Returns (logits [B, L, V], aux, the new cache)."""
  (logits_BxLxV, aux), state = model.apply({
      'params': params,
      'cache': cache
  }, tokens_BxL, decode=True, lengths=lengths_B, mutable=['cache'])
  return logits_BxLxV, aux, state['cache']


def prefill(model: Transformer, params, cache, prompt_BxP, lengths_B):
  """The prompts' cached forward: (logits [B, V] at each row's last real token, the new cache).
  Only those rows of logits are computed (a [B, P, V] float32 array would be M32's largest)."""
  ((hidden_BxPxD, head_VxD), _), state = model.apply({
      'params': params,
      'cache': cache
  }, prompt_BxP, decode=True, lengths=lengths_B, hidden=True, mutable=['cache'])
  last_Bx1xD = jnp.take_along_axis(hidden_BxPxD, (lengths_B - 1)[:, None, None], axis=1)
  return layers.logits(last_Bx1xD, head_VxD)[:, 0], state['cache']


def _run(params, prompt_BxP, lengths_B, rows, key, temperature, top_k, top_p, eod_id, pad_id,
         vocab_limit, *, model: Transformer, max_new_tokens: int):
  """Prefill + while_loop decode into a zeroed cache of P + N slots (`decode_cache`, created
  here, so the device holds one); rows >= `rows` are padding (done from the start). Returns
  (tokens [B, N], number generated [B])."""
  B, N = prompt_BxP.shape[0], max_new_tokens
  cache = decode_cache(model, B, prompt_BxP.shape[1] + N)

  def sample(logits_BxV, key):
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_limit, logits_BxV, -jnp.inf)
    return sample_logits(logits_BxV, key, temperature, top_k, top_p)

  def forward(cache, tokens_BxL, lengths):
    logits, _, cache = cached_forward(model, params, cache, tokens_BxL, lengths)
    return logits, cache

  last_BxV, cache = prefill(model, params, cache, prompt_BxP, lengths_B)
  tok_B = sample(last_BxV, jax.random.fold_in(key, 0))
  out_BxN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok_B)
  done_B = (tok_B == eod_id) | (jnp.arange(B) >= rows)
  count_B = jnp.ones((B,), jnp.int32)

  def cond(carry):
    step, _, _, _, done_B, _ = carry
    return (step < N) & ~jnp.all(done_B)

  def body(carry):
    step, cache, tok_B, out_BxN, done_B, count_B = carry
    logits_Bx1xV, cache = forward(cache, tok_B[:, None], jnp.ones((B,), jnp.int32))
    new_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, step))
    new_B = jnp.where(done_B, pad_id, new_B)
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, new_B[:, None], (0, step))
    count_B = jnp.where(done_B, count_B, step + 1)
    return step + 1, cache, new_B, out_BxN, done_B | (new_B == eod_id), count_B

  carry = (jnp.asarray(1, jnp.int32), cache, tok_B, out_BxN, done_B, count_B)
  _, _, _, out_BxN, _, count_B = jax.lax.while_loop(cond, body, carry)
  return out_BxN, count_B


# ---------------------------------------------------------------- placement on a mesh


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where generation runs: a device mesh and the logical-axis rules (`yuanjax.sharding`) that
  map the model's logical axes onto it: the params (heads, ffn and vocab over 'tensor', experts
  over 'expert' with the default rules), the batch and the KV cache and LFA state (rows over
  the 'act_batch' axes, key/value heads over 'act_heads')."""
  mesh: jax.sharding.Mesh
  rules: tuple = sharding.DEFAULT_RULES

  def tree(self, logical_specs):
    """NamedShardings of a tree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

  def sharding(self, *logical_axes) -> NamedSharding:
    return NamedSharding(self.mesh, nn.logical_to_mesh_axes(logical_axes, self.rules))

  @property
  def rows(self) -> int:
    """Devices the batch is split over: the batch is padded to a multiple of it."""
    axes = nn.logical_to_mesh_axes(('act_batch',), self.rules)[0]
    return layers.mesh_axes_size(self.mesh, axes)

  def context(self) -> contextlib.ExitStack:
    """The mesh and the rules, for tracing the model."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack


def param_shardings(m: ml_collections.ConfigDict, place: Placement):
  """The params' NamedShardings for config.model `m` on `place` (for `loader.load`'s
  `shardings=`: the checkpoint is restored straight into them)."""
  return place.tree(nn.get_partition_spec(train_state.abstract_params(m, boxed=True)))


def load_shardings(mesh: jax.sharding.Mesh | None):
  """`loader.load`'s `shardings=` for `mesh` (default rules): the params restored straight onto
  it by `param_shardings`; None without a mesh (one device)."""
  return None if mesh is None else lambda m: param_shardings(m, Placement(mesh))


def decode_cache(model: Transformer, batch_size: int, max_len: int):
  """The zeroed cache (`init_cache`) for `batch_size` rows of `max_len` slots; traced under a
  `Placement.context()`, on its shards (`cache_axes`: rows over the batch axes, heads over
  tensor)."""
  cache = init_cache(model, batch_size, max_len)
  return nn.with_logical_constraint(cache, cache_axes(cache))


_COMPILED: dict[tuple, object] = {}


def _compiled_run(config: ml_collections.ConfigDict, place: Placement | None, max_new_tokens: int):
  """The jitted `_run` for a generation config, a placement and a number of new tokens (one per
  triple; jit caches shapes): on a mesh, the params in their own shardings (`param_shardings`,
  or int8 values and scales derived from them: `_check_on_mesh`), every other input in its
  sharding, the (small) outputs replicated, so that every process can read them."""
  key = (json.dumps(config.to_dict(), sort_keys=True, default=str), place, max_new_tokens)
  if key not in _COMPILED:
    if len(_COMPILED) >= 8:
      _COMPILED.clear()
    model = Transformer(config)
    shardings = {}
    if place is not None:
      rows, one = place.sharding('act_batch'), place.sharding()
      shardings = dict(
          in_shardings=(None, rows, rows, *(one,) * 8),  # params: as they lie
          out_shardings=(one, one))
    _COMPILED[key] = jax.jit(functools.partial(_run, model=model, max_new_tokens=max_new_tokens),
                             **shardings)
  return _COMPILED[key]


def _check_prompts(prompts, vocab_size: int, max_new_tokens: int, max_len: int) -> None:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens!r}: must be an integer >= 1')
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError('prompts: expected a non-empty list of prompts, each a non-empty list of '
                     f'token ids; got {type(prompts).__name__} {prompts!r:.80}')
  for i, p in enumerate(prompts):
    a = np.asarray(p)
    if a.ndim != 1 or a.size == 0:
      raise ValueError(f'prompts[{i}]: must be a non-empty list of token ids (got shape {a.shape})')
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f'prompts[{i}]: token ids must be integers (got {a.dtype})')
    bad = a[(a < 0) | (a >= vocab_size)]
    if bad.size:
      raise ValueError(f'prompts[{i}]: token id {int(bad[0])} is outside the vocabulary '
                       f'[0, config.model.vocab_size={vocab_size})')
    if a.size > max_len:
      raise ValueError(f'prompts[{i}]: {a.size} tokens is longer than max_len={max_len}')
    if a.size + max_new_tokens > max_len:
      raise ValueError(f'prompts[{i}] ({a.size} tokens) + max_new_tokens={max_new_tokens} = '
                       f'{a.size + max_new_tokens} is longer than max_len={max_len}')


def generate_padded(model: Transformer, params, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, eod_id: int | None = None,
                    max_len: int | None = None, vocab_limit: int | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    rules=None) -> tuple[np.ndarray, np.ndarray]:
  """Like `generate`, as arrays: (tokens [B, max_new_tokens] int32, counts [B]).

  Row b generated counts[b] tokens (its `<eod>` included when it stopped there); the rest of
  the row is padding (`eod_id`, or 0 without one).
  """
  m = model.config
  max_len = m.max_seq_len if max_len is None else max_len
  _check_prompts(prompts, m.vocab_size, max_new_tokens, max_len)
  if not 0.0 <= float(temperature):
    raise ValueError(f'temperature={temperature}: must be >= 0 (0: greedy)')
  if int(top_k) < 0:
    raise ValueError(f'top_k={top_k}: must be >= 0 (0: no top-k cut)')
  if not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f'top_p={top_p}: must be in (0, 1] (1: no top-p cut)')
  if eod_id is not None and not 0 <= eod_id < m.vocab_size:
    raise ValueError(f'eod_id={eod_id}: outside the vocabulary [0, {m.vocab_size})')
  vocab_limit = m.vocab_size if vocab_limit is None else int(vocab_limit)
  if not 1 <= vocab_limit <= m.vocab_size:
    raise ValueError(
        f'vocab_limit={vocab_limit}: must be in [1, config.model.vocab_size={m.vocab_size}]')
  place = None if mesh is None else Placement(
      mesh, sharding.DEFAULT_RULES if rules is None else tuple(rules))
  if place is not None:
    config_lib.validate_model_against_mesh(m, mesh)
    _check_on_mesh(params, mesh)
  batch, lengths = _batch(prompts, 1 if place is None else place.rows)
  gm = generation_config(m)
  run = _compiled_run(gm, place, int(max_new_tokens))
  eod = _NO_EOD if eod_id is None else int(eod_id)
  with place.context() if place is not None else contextlib.nullcontext():
    tokens, counts = run(params, batch, lengths, jnp.int32(len(prompts)), jax.random.key(seed),
                         jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                         jnp.int32(eod), jnp.int32(max(eod, 0)), jnp.int32(vocab_limit))
  return np.asarray(tokens)[:len(prompts)], np.asarray(counts)[:len(prompts)]


def _check_on_mesh(params, mesh: jax.sharding.Mesh) -> None:
  """ValueError naming the first param that is not a jax.Array on `mesh`'s devices."""
  devices = set(mesh.devices.flat)
  for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not isinstance(a, jax.Array) or not a.sharding.device_set <= devices:
      raise ValueError(f'params{jax.tree_util.keystr(path)}: not on the mesh; load the params onto '
                       'it: loader.load(path, shardings=lambda m: '
                       'generate.param_shardings(m, generate.Placement(mesh)))')


def _batch(prompts, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """(right-padded prompts [B, P], lengths [B]): B the number of prompts rounded up to
  `multiple` (extra rows: one token, done from the start), P the longest prompt rounded up to a
  multiple of PROMPT_BUCKET, so that prompts of similar lengths reuse one compiled program
  (padding is never attended to)."""
  B = -(-len(prompts) // multiple) * multiple
  lengths = np.ones((B,), np.int32)
  lengths[:len(prompts)] = [len(p) for p in prompts]
  P = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
  batch = np.zeros((B, P), np.int32)
  for b, p in enumerate(prompts):
    batch[b, :len(p)] = np.asarray(p)
  return batch, lengths


def generate(model: Transformer, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eod_id: int | None = None, max_len: int | None = None, vocab_limit: int | None = None,
             mesh: jax.sharding.Mesh | None = None, rules=None) -> list[list[int]]:
  """New tokens for each prompt (lists of token ids, of different lengths).

  Each row stops after emitting `eod_id` (kept as its last token) or after `max_new_tokens`.
  temperature 0: greedy; else temperature / top_k (0: off) / top_p (1.0: off) sampling from
  `seed`. max_len (default config.model.max_seq_len) bounds prompt + new tokens. vocab_limit:
  ids >= it are never generated (a model vocabulary padded beyond the tokenizer's).
  `model.config.moe.dispatch` 'capacity' runs as 'dropless' (see the module docstring).
  mesh: run on this device mesh (`make_mesh`), the params already on it (`param_shardings`,
  e.g. by `loader.load(..., shardings=...)`; a ValueError names one that is not), with `rules`
  (default `yuanjax.sharding.DEFAULT_RULES`); the batch is padded to a multiple of the devices
  it is split over. The tokens are one device's.
  Raises ValueError naming the argument for an empty or too long prompt, an id outside the
  vocabulary, a bad setting, or a mesh the model does not divide over.
  """
  tokens, counts = generate_padded(model, params, prompts, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                   eod_id=eod_id, max_len=max_len, vocab_limit=vocab_limit,
                                   mesh=mesh, rules=rules)
  return [row[:n].tolist() for row, n in zip(tokens, counts)]


def strip_eod(ids: Sequence[int], eod_id: int | None) -> list[int]:
  """The ids before the first `eod_id` (all of them without one)."""
  ids = list(ids)
  return ids[:ids.index(eod_id)] if eod_id is not None and eod_id in ids else ids


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,tensor=2,expert=2' -> {axis: size} over `yuanjax.sharding.MESH_AXES` (the
  config.mesh axes; absent ones 1). ValueError naming --mesh for an unknown axis or a size
  that is not a positive integer."""
  sizes = dict.fromkeys(sharding.MESH_AXES, 1)
  for part in text.split(','):
    name, _, size = part.partition('=')
    name = name.strip()
    if name not in sizes:
      raise ValueError(f'--mesh {text!r}: unknown axis {name!r} (expected NAME=SIZE,... with '
                       f'names from {sharding.MESH_AXES})')
    if not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f'--mesh {text!r}: {name}={size.strip()!r} must be a positive integer')
    sizes[name] = int(size)
  return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """The mesh of `parse_mesh`'s sizes over `devices` (default all); ValueError naming --mesh
  unless their product is the number of devices."""
  devices = jax.devices() if devices is None else devices
  if math.prod(sizes.values()) != len(devices):
    mesh = ','.join(f'{k}={v}' for k, v in sizes.items())
    raise ValueError(f'--mesh {mesh}: {math.prod(sizes.values())} devices, but there are '
                     f'{len(devices)} (the sizes must multiply to the device count)')
  cfg = sharding.mesh_config()
  cfg.update(sizes)
  return sharding.make_mesh(cfg, devices)


# ---------------------------------------------------------------- command line


def _parse(argv):
  p = argparse.ArgumentParser(prog='python -m yuanjax.generate', description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True,
                 help='HF dir, converted (from-hf) dir, or yuanjax training workdir')
  p.add_argument('--prompt', action='append', required=True,
                 help='prompt text (repeat for a batch); "\\n" is not unescaped')
  p.add_argument('--max_new_tokens', type=int, default=64)
  p.add_argument('--temperature', type=float, default=0.0, help='0: greedy')
  p.add_argument('--top_k', type=int, default=0, help='0: off')
  p.add_argument('--top_p', type=float, default=1.0, help='1.0: off')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no_eod_stop', action='store_true', help='do not stop at <eod>')
  p.add_argument('--exact_hf_rope', action='store_true',
                 help="HF runtime's bfloat16 rotary rounding (spec quirk 3)")
  p.add_argument('--dtype', default=None, choices=config_lib.DTYPES,
                 help='compute dtype override (default: the checkpoint\'s)')
  p.add_argument('--quantize', default='none', choices=quantize.MODES,
                 help='int8: int8 matmul weights, per-channel scales (yuanjax.quantize)')
  p.add_argument('--tokenizer', default=None,
                 help='a sentencepiece .model instead of the checkpoint\'s')
  p.add_argument('--chat', action='store_true',
                 help="Yuan's chat template: PROMPT<sep>, print the response (to <eod>)")
  p.add_argument('--json', action='store_true',
                 help='one JSON object per prompt: prompt, completion, tokens, stopped')
  p.add_argument(
      '--mesh', default=None,
      help='run sharded over all devices, e.g. data=2,tensor=2,expert=2 (axes of '
      'config.mesh; absent ones 1; the sizes multiply to the device count): the '
      'checkpoint is loaded straight onto its shards')
  return p.parse_args(argv)


def mesh_for(checkpoint: str, mesh: str) -> jax.sharding.Mesh:
  """The mesh of a --mesh value over all devices, checked against the checkpoint's config.model
  (no weight read): ValueError naming --mesh or the field it does not divide."""
  out = make_mesh(parse_mesh(mesh))
  config_lib.validate_model_against_mesh(loader.model_config(checkpoint), out)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  overrides = {'dtype': args.dtype} if args.dtype else {}
  try:
    mesh = None if args.mesh is None else mesh_for(args.checkpoint, args.mesh)
    model, params, tok = loader.load_checkpoint(
        args.checkpoint, exact_hf_rope=args.exact_hf_rope, overrides=overrides,
        tokenizer=args.tokenizer, quantize=args.quantize, shardings=load_shardings(mesh))
    eod_id = tok.eod_id
    prompts = [sft.prompt_ids(tok, p) if args.chat else tok.encode(p) for p in args.prompt]
    outs = generate(model, params, prompts, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, eod_id=None if args.no_eod_stop else eod_id, vocab_limit=min(
                        tok.vocab_size, model.config.vocab_size), mesh=mesh)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for text, ids in zip(args.prompt, outs):
    stopped = 'eod' if ids and ids[-1] == eod_id and not args.no_eod_stop else 'length'
    completion = tok.decode(strip_eod(ids, eod_id) if stopped == 'eod' else ids)
    if args.chat:
      completion = completion.replace('<n>', '\n')  # a tokenizer without newline_token
    if args.json:
      print(
          json.dumps({
              'prompt': text,
              'completion': completion,
              'tokens': ids,
              'stopped': stopped
          }, ensure_ascii=False))
    else:
      print(completion if args.chat else text + completion)
      if len(args.prompt) > 1:
        print('-' * 40)
  sys.stdout.flush()
  return 0


if __name__ == '__main__':
  sys.exit(main())
