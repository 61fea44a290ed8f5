"""What every MoE layer's router decided, from one jitted forward.

  r = routing(model, params, tokens_BxL, segment_ids_BxL)
  r.experts_MxBxLxK[m, b, l]      the experts token (b, l) goes to in MoE layer m, by weight
  r.attention_MxExE[m]            the Attention Router's softmax(q kᵀ), mean over real tokens

Axis key: M MoE layers (model layer `r.layers_M[m]`), B rows, L positions, E routed experts,
K = router.top_k. The arrays come back as NumPy; `yuanjax.analysis.routing_stats` reads them.
The forward reads the model's sown 'intermediates' (router probabilities and combine weights
from `yuanjax.model.moe`, the Attention Router's E×E matrix from `yuanjax.model.routers`), so
it routes exactly as training and evaluation do.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from yuanjax.model import Transformer

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Routing:
  """Routing decisions of every MoE layer for one batch (NumPy arrays).

  experts_MxBxLxK / weights_MxBxLxK: the chosen experts, heaviest first, and their combine
  weights; -1 / 0 where a token has fewer than K experts (the expert-choice router).
  attention_MxExE: the Attention Router's row-softmax(q kᵀ) averaged over the real tokens
  (None for other routers); attention_MxBxLxExE per token when asked for.
  mask_BxL: real tokens (segment_ids != 0). layers_M: the model layer of each MoE layer.
  """
  probs_MxBxLxE: np.ndarray
  experts_MxBxLxK: np.ndarray
  weights_MxBxLxK: np.ndarray
  mask_BxL: np.ndarray
  layers_M: np.ndarray
  attention_MxExE: np.ndarray | None = None
  attention_MxBxLxExE: np.ndarray | None = None

  @property
  def num_experts(self) -> int:
    return self.probs_MxBxLxE.shape[-1]


def moe_intermediates(state: dict, moe_every: int) -> dict:
  """The sown 'intermediates' of the MoE layers: {name: [M, ...]} (scan stacks the layers)."""
  moe = state['intermediates']['blocks'][f'layer_{moe_every - 1}']['moe']
  out = {name: moe[name][0] for name in ('router_probs', 'combine_weights')}
  if 'expert_attention' in moe.get('router', {}):
    out['expert_attention'] = moe['router']['expert_attention'][0]  # [M, B*L, E, E]
  return out


def _forward(model: Transformer, per_token_attention: bool):
  cfg = model.config
  k = cfg.router.top_k

  def forward(params, tokens_BxL, segment_ids_BxL):
    _, state = model.apply({'params': params}, tokens_BxL, segment_ids=segment_ids_BxL,
                           mutable=['intermediates'])
    inter = moe_intermediates(state, cfg.moe_every)
    weights_MxBxLxK, experts_MxBxLxK = jax.lax.top_k(inter['combine_weights'], k)
    out = dict(probs=inter['router_probs'], weights=weights_MxBxLxK,
               experts=jnp.where(weights_MxBxLxK > 0, experts_MxBxLxK, -1))
    if 'expert_attention' in inter:
      B, L = tokens_BxL.shape
      attn_MxTxExE = inter['expert_attention']
      attn_MxBxLxExE = attn_MxTxExE.reshape(-1, B, L, *attn_MxTxExE.shape[-2:])
      mask_BxL = (segment_ids_BxL != 0).astype(f32)
      total = jnp.einsum('mblij,bl->mij', attn_MxBxLxExE, mask_BxL)
      out['attention_mean'] = total / jnp.maximum(mask_BxL.sum(), 1.0)
      if per_token_attention:
        out['attention'] = attn_MxBxLxExE
    return out

  return jax.jit(forward)


_COMPILED: dict = {}  # (model config JSON, per_token) -> jitted forward: models of the same
# config (checkpoints of one run) share their compilations


def _compiled(model: Transformer, per_token_attention: bool):
  key = (model.config.to_json_best_effort(sort_keys=True), per_token_attention)
  if key not in _COMPILED:
    _COMPILED[key] = _forward(model, per_token_attention)
  return _COMPILED[key]


def _check_inputs(cfg, tokens_BxL, segment_ids_BxL) -> None:
  if not cfg.moe_every:
    raise ValueError('routing: config.model.moe_every=0: the model has no MoE layer')
  if tokens_BxL.ndim != 2:
    raise ValueError(f'routing: tokens must be [batch, length], got shape {tokens_BxL.shape}')
  if segment_ids_BxL is not None and segment_ids_BxL.shape != tokens_BxL.shape:
    raise ValueError(f'routing: segment_ids shape {segment_ids_BxL.shape} != tokens shape '
                     f'{tokens_BxL.shape}')
  if tokens_BxL.size and (tokens_BxL.min() < 0 or tokens_BxL.max() >= cfg.vocab_size):
    raise ValueError(f'routing: token ids must lie in [0, {cfg.vocab_size}) '
                     f'(config.model.vocab_size), got [{tokens_BxL.min()}, {tokens_BxL.max()}]')


def routing(model: Transformer, params, tokens, segment_ids=None, *,
            per_token_attention: bool = False) -> Routing:
  """Routes `tokens` [B, L] through every MoE layer of `model` (one jitted forward).

  segment_ids: [B, L] as in training (packed documents; 0 marks padding, which is left out
  of `attention_MxExE` and flagged in `mask_BxL`). per_token_attention: also return the
  Attention Router's per-token E×E matrices (M·B·L·E² floats).
  """
  cfg = model.config
  tokens_BxL = np.asarray(tokens)
  segment_ids_BxL = None if segment_ids is None else np.asarray(segment_ids)
  _check_inputs(cfg, tokens_BxL, segment_ids_BxL)
  if segment_ids_BxL is None:
    segment_ids_BxL = np.ones_like(tokens_BxL, np.int32)
  out = jax.device_get(
      _compiled(model, per_token_attention)(params, jnp.asarray(tokens_BxL, jnp.int32),
                                            jnp.asarray(segment_ids_BxL, jnp.int32)))
  M = out['probs'].shape[0]
  return Routing(
      probs_MxBxLxE=out['probs'], experts_MxBxLxK=out['experts'], weights_MxBxLxK=out['weights'],
      mask_BxL=segment_ids_BxL != 0, layers_M=np.arange(M) * cfg.moe_every + cfg.moe_every - 1,
      attention_MxExE=out.get('attention_mean'), attention_MxBxLxExE=out.get('attention'))


def batch_texts(tokenizer, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N, seq_len], segment_ids [N, seq_len]): one text per row, cut at `seq_len`,
  right-padded with the tokenizer's pad id (segment id 0)."""
  if seq_len < 1:
    raise ValueError(f'batch_texts: seq_len must be >= 1, got {seq_len}')
  ids = [tokenizer.encode(t)[:seq_len] for t in texts]
  if not ids or not all(ids):
    raise ValueError('batch_texts: every text must give at least one token')
  tokens = np.full((len(ids), seq_len), tokenizer.pad_id, np.int32)
  segment_ids = np.zeros((len(ids), seq_len), np.int32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
    segment_ids[i, :len(row)] = 1
  return tokens, segment_ids
