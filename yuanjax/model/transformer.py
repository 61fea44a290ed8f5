"""The decoder: embeddings, scanned decoder layers, final norm, logits.

  h = x + Attention(RMSNorm(x))          (LFA or standard, `yuanjax.model.attention`)
  y = h + FFN(RMSNorm(h))                (MoE, or a dense SwiGLU MLP)

Yuan 2.0 (LFA, tied embeddings) by default; `attention_type='standard'`, `num_kv_heads` and
`tie_embeddings=False` (a separate `lm_head` [V, D] param) give the Mixtral / XVERSE-MoE
baselines (`configs/mixtral_8x7b.py`, `configs/xverse_moe_a4b.py`).

Layers are grouped in blocks of `moe_every` layers (the last of each block is MoE, the
others dense; `moe_every=1`: every layer MoE as in M32; `moe_every=0`: all dense) and the
blocks run under `nn.scan`, so compile time does not grow with depth. Params of scanned
blocks carry a leading 'layers' axis. `config.model.scan_unroll` (default 1) unrolls that
many blocks per loop iteration (`lax.scan`'s `unroll`; >= the block count: no loop at all,
what `benchmarks/train_step.py` compiles to count FLOPs, as XLA's cost analysis counts a
loop body once). It changes how the model is compiled, never what it computes.

Public API:
  model = Transformer(config.model)
  variables = model.init(key, tokens_BxL)
  logits_BxLxV, aux = model.apply(variables, tokens_BxL, segment_ids=None, positions=None)
  (hidden_BxLxD, head_VxD), aux = model.apply(variables, tokens_BxL, hidden=True)

`hidden=True` returns the final-norm hidden states and the LM head matrix (compute dtype)
instead of the logits: what the training loss scores, in chunks (`yuanjax.loss`), so that the
[B, L, V] float32 logits need not exist whole.

`aux['aux_loss']` is the weighted router loss summed over layers (add it to the LM loss);
`aux['moe']` holds per-layer MoE statistics stacked on a leading [num_moe_layers] axis.
Pass `deterministic=False` (and an rng named 'router') to enable router noise/jitter.

Cached decoding (what `yuanjax.generate` uses; one sequence per row, right-padded):
  cache = init_cache(model, batch_size, max_len)        # the 'cache' collection, zeros
  (logits, _), vars = model.apply({'params': p, 'cache': cache}, tokens_BxL, decode=True,
                                 lengths=lengths_B, mutable=['cache'])
Each call appends a chunk of L tokens to every row at positions index..index+L-1 (index [B]
lives in the cache and starts at 0), of which the first lengths_B (default L) are real; the
row's index then advances by its length. Prefill is one call with the padded prompts, each
decode step a call with L = 1. The cache holds, per layer, keys/values [B, G, max_len, K] and,
for LFA, its state (the last two LF inputs; `yuanjax.model.attention`). Logits at padded places
are meaningless. Routing must be per token and must not drop (a causal router with the
`dropless` or `dense` dispatch) for decoding to reproduce the full forward; `capacity`
dispatch can drop slots of a small decode batch (`yuanjax.generate` switches to `dropless`).

Axis key: see `yuanjax.model.layers`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from yuanjax.model import layers
from yuanjax.model.attention import Attention
from yuanjax.model.moe import MoE

f32 = jnp.float32
ACT = ('act_batch', 'act_len', 'act_embed')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}


class DecoderLayer(nn.Module):
  config: ml_collections.ConfigDict
  use_moe: bool
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, lengths_B=None, block=None):
    cfg = self.config
    dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype, pdtype, name=name)
    h = x_BxLxD + Attention(cfg, self.decode, name='attention')(
        norm('input_norm')(x_BxLxD), segment_ids_BxL, positions_BxL, lengths_B, block)
    h = layers.constrain(h, ACT)
    u = norm('post_attention_norm')(h)
    if self.use_moe:
      y, stats = MoE(cfg, self.deterministic, name='moe')(u)
    else:
      y = layers.MLP(cfg.hidden_size, cfg.dense_ffn_size, cfg.init_std,
                     layers.scaled_init_std(cfg.init_std, cfg.num_layers), dtype, pdtype,
                     name='mlp')(u)
      stats = None
    return layers.constrain(h + y, ACT), stats


class Block(nn.Module):
  """`moe_every` layers, the last one MoE (or one dense layer when moe_every == 0)."""
  config: ml_collections.ConfigDict
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, lengths_B=None, block=None):
    n = self.config.moe_every
    kinds = [False] if n == 0 else [False] * (n - 1) + [True]
    stats = {}
    for i, use_moe in enumerate(kinds):
      x_BxLxD, s = DecoderLayer(self.config, use_moe, self.deterministic, self.decode,
                                name=f'layer_{i}')(x_BxLxD, segment_ids_BxL, positions_BxL,
                                                   lengths_B, block)
      if s is not None:
        stats = s
    return x_BxLxD, stats


def num_blocks(cfg) -> int:
  return cfg.num_layers if cfg.moe_every == 0 else cfg.num_layers // cfg.moe_every


class Transformer(nn.Module):
  """Yuan 2.0 / 2.0-M32 decoder-only language model (and the Mixtral / XVERSE baselines)."""
  config: ml_collections.ConfigDict  # config.model

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids=None, positions=None, deterministic: bool = True,
               decode: bool = False, lengths=None, hidden: bool = False):
    cfg = self.config
    dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    if decode:
      positions, lengths = self._decode_positions(tokens_BxL, segment_ids, positions, lengths)
    elif lengths is not None:
      raise ValueError('lengths is only for decode=True (use segment_ids for padding/packing)')
    if positions is None:
      positions = (layers.positions_from_segments(segment_ids) if segment_ids is not None else
                   jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape))
    embedding_VxD = layers.param_with_axes(self, 'embedding', nn.initializers.normal(cfg.init_std),
                                           (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'),
                                           pdtype)
    # `.take`, not jnp.take: an int8 table (yuanjax.quantize.QInt8) reads only the looked-up rows.
    x_BxLxD = layers.constrain(embedding_VxD.take(tokens_BxL, axis=0).astype(dtype), ACT)

    block = Block
    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != 'none' and not decode:  # remat only matters for gradients
      block = nn.remat(block, policy=policy, prevent_cse=False)
    # A decode step carries the whole stacked cache through the layer loop and updates block
    # i's slots in place (`block` = i); scanning it as per-block slices would copy every
    # block's cache in and out of the loop at every step. init creates it sliced, [blocks, ...].
    carry_cache = decode and not self.is_initializing()
    scanned = ({
        'params': 0,
        'intermediates': 0
    } if carry_cache else {
        'params': 0,
        'intermediates': 0,
        'cache': 0
    })
    blocks = nn.scan(block, variable_axes=scanned, variable_carry='cache' if carry_cache else False,
                     split_rngs={
                         'params': True,
                         'router': True
                     }, in_axes=(nn.broadcast, nn.broadcast, nn.broadcast) + (0,) * carry_cache,
                     length=num_blocks(cfg), unroll=cfg.scan_unroll,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
    block_index = (jnp.arange(num_blocks(cfg)),) if carry_cache else ()
    x_BxLxD, stats = blocks(cfg, deterministic, decode,
                            name='blocks')(x_BxLxD, segment_ids, positions, lengths, *block_index)

    x_BxLxD = layers.RMSNorm(cfg.norm_eps, dtype, pdtype, name='final_norm')(x_BxLxD)
    head_VxD = embedding_VxD  # the one place that names the LM head: tied, or its own param
    if not cfg.tie_embeddings:
      head_VxD = layers.param_with_axes(self, 'lm_head', nn.initializers.normal(cfg.init_std),
                                        (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'),
                                        pdtype)
    aux_loss = jnp.sum(stats['aux_loss']) if stats else jnp.zeros((), f32)
    aux = {'aux_loss': aux_loss, 'moe': stats}
    if hidden:
      return (x_BxLxD, head_VxD.astype(dtype)), aux
    return layers.logits(x_BxLxD, head_VxD.astype(dtype)), aux

  def _decode_positions(self, tokens_BxL, segment_ids, positions, lengths):
    """(positions [B, L], lengths [B]) of a decode chunk; advances the cache index."""
    if segment_ids is not None or positions is not None:
      raise ValueError('decode=True takes neither segment_ids nor positions: every row is one '
                       'sequence, placed after what its cache already holds')
    if not self.is_initializing() and not self.has_variable('cache', 'index'):
      raise ValueError("decode=True needs a cache: apply({'params': ..., 'cache': "
                       "init_cache(model, batch_size, max_len)}, ..., mutable=['cache'])")
    B, L = tokens_BxL.shape
    index = self.variable('cache', 'index', jnp.zeros, (B,), jnp.int32)
    lengths = (jnp.full(
        (B,), L, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32).reshape(B))
    positions = index.value[:, None] + jnp.arange(L, dtype=jnp.int32)
    index.value = index.value + lengths
    return positions, lengths


# The logical axes of each cache leaf (by name; 'layers' is the stacked blocks' axis).
CACHE_AXES = {
    'k': ('layers', 'act_batch', 'act_heads', 'act_len', 'act_kv'),
    'v': ('layers', 'act_batch', 'act_heads', 'act_len', 'act_kv'),
    'u_prev': ('layers', 'act_batch', None, 'act_embed'),
    'index': ('act_batch',),
}


def cache_axes(cache):
  """The tree of `init_cache`'s leaves' logical axes (PartitionSpecs of logical names)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: P(*CACHE_AXES[path[-1].key]), cache)


def init_cache(model: Transformer, batch_size: int, max_len: int):
  """The zeroed 'cache' collection for decoding `batch_size` rows of up to `max_len` tokens."""
  tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, decode=True), tokens)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
