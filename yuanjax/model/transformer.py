"""The Yuan 2.0 decoder: embeddings, scanned decoder layers, final norm, tied logits.

  h = x + Attention(RMSNorm(x))          (LFA attention, `yuanjax.model.attention`)
  y = h + FFN(RMSNorm(h))                (MoE, or a dense SwiGLU MLP)

Layers are grouped in blocks of `moe_every` layers (the last of each block is MoE, the
others dense; `moe_every=1`: every layer MoE as in M32; `moe_every=0`: all dense) and the
blocks run under `nn.scan`, so compile time does not grow with depth. Params of scanned
blocks carry a leading 'layers' axis.

Public API:
  model = Transformer(config.model)
  variables = model.init(key, tokens_BxL)
  logits_BxLxV, aux = model.apply(variables, tokens_BxL, segment_ids=None, positions=None)

`aux['aux_loss']` is the weighted router loss summed over layers (add it to the LM loss);
`aux['moe']` holds per-layer MoE statistics stacked on a leading [num_moe_layers] axis.
Pass `deterministic=False` (and an rng named 'router') to enable router noise/jitter.

Axis key: see `yuanjax.model.layers`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

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

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL):
    cfg = self.config
    dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype, pdtype, name=name)
    h = x_BxLxD + Attention(cfg, name='attention')(norm('input_norm')(x_BxLxD),
                                                  segment_ids_BxL, positions_BxL)
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

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL):
    n = self.config.moe_every
    kinds = [False] if n == 0 else [False] * (n - 1) + [True]
    stats = {}
    for i, use_moe in enumerate(kinds):
      x_BxLxD, s = DecoderLayer(self.config, use_moe, self.deterministic, name=f'layer_{i}')(
          x_BxLxD, segment_ids_BxL, positions_BxL)
      if s is not None:
        stats = s
    return x_BxLxD, stats


def num_blocks(cfg) -> int:
  return cfg.num_layers if cfg.moe_every == 0 else cfg.num_layers // cfg.moe_every


class Transformer(nn.Module):
  """Yuan 2.0 / 2.0-M32 decoder-only language model."""
  config: ml_collections.ConfigDict   # config.model

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids=None, positions=None, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    if positions is None:
      positions = (layers.positions_from_segments(segment_ids) if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape))
    embedding_VxD = layers.param_with_axes(
        self, 'embedding', nn.initializers.normal(cfg.init_std),
        (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'), pdtype)
    x_BxLxD = layers.constrain(jnp.take(embedding_VxD, tokens_BxL, axis=0).astype(dtype), ACT)

    block = Block
    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != 'none':
      block = nn.remat(block, policy=policy, prevent_cse=False)
    blocks = nn.scan(
        block, variable_axes={'params': 0, 'intermediates': 0},
        split_rngs={'params': True, 'router': True},
        in_axes=(nn.broadcast, nn.broadcast), length=num_blocks(cfg),
        metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BxLxD, stats = blocks(cfg, deterministic, name='blocks')(x_BxLxD, segment_ids, positions)

    x_BxLxD = layers.RMSNorm(cfg.norm_eps, dtype, pdtype, name='final_norm')(x_BxLxD)
    logits_BxLxV = jnp.einsum('bld,vd->blv', x_BxLxD, embedding_VxD.astype(dtype),
                              preferred_element_type=f32)
    logits_BxLxV = layers.constrain(logits_BxLxV, ('act_batch', 'act_len', 'act_vocab'))
    aux_loss = jnp.sum(stats['aux_loss']) if stats else jnp.zeros((), f32)
    return logits_BxLxV, {'aux_loss': aux_loss, 'moe': stats}
