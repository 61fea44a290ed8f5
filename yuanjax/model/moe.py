"""Mixture-of-Experts feed-forward: a router, E stacked SwiGLU experts, three dispatches.

Experts are stored stacked: w1_ExDx2F (first F columns the gate), w2_ExFxD.
`config.model.moe.dispatch` picks how token-slots reach their experts:

  dense     every expert computes every token, masked by the combine weights. The
            readable reference (T * E expert FLOPs); used by tests.
  dropless  sort slots by expert, grouped matmul (`jax.lax.ragged_dot`), nothing dropped.
  capacity  GShard-style: each expert has C = ceil(capacity_factor * T * k / E) slots;
            slots are placed by index scatter into an [E, C, D] buffer, the experts run
            as one batched einsum, results come back by index gather. Slots past an
            expert's capacity are dropped (counted in `dropped_fraction`): they add
            nothing, so the token keeps only its residual path.

With ample capacity the three agree to float32 rounding, forward and gradients.
Placement uses index scatter/gather, not GShard's one-hot dispatch einsum: at M32 sizes
that einsum ([T, E, C] x [T, D]) costs more FLOPs than the experts themselves.

Statistics (in the returned dict, float32): `load` (fraction of routed slots per expert,
[E]), `max_load` (max over mean expert load), `entropy` (mean router entropy, nats),
`dropped_fraction`, `load_balance_loss`, `z_loss`, and `aux_loss` (their weighted sum,
which the trainer adds to the loss). The router's probabilities and chosen experts are
also sown into 'intermediates' for inspection.

Axis key: see `yuanjax.model.layers`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from yuanjax.model import layers, routers

f32 = jnp.float32
DISPATCHES = ('dense', 'dropless', 'capacity')


def _experts(x_ExCxD, w1_ExDx2F, w2_ExFxD):
  h_ExCx2F = jnp.einsum('ecd,edf->ecf', x_ExCxD, w1_ExDx2F)
  return jnp.einsum('ecf,efd->ecd', layers.swiglu(h_ExCx2F), w2_ExFxD)


def combine_weights(r: routers.Routing, T: int, E: int):
  """[T, E] float32: the weight token t gives expert e (0 where not routed)."""
  return jnp.zeros((T, E), f32).at[r.token_A, r.expert_A].add(jnp.where(r.valid_A, r.weight_A, 0.0))


def dense_dispatch(x_TxD, r: routers.Routing, w1_ExDx2F, w2_ExFxD):
  """Reference: all experts on all tokens, combined with a [T, E] weight matrix."""
  T, E = x_TxD.shape[0], w1_ExDx2F.shape[0]
  combine_TxE = combine_weights(r, T, E)
  h_TxEx2F = jnp.einsum('td,edf->tef', x_TxD, w1_ExDx2F)
  y_TxExD = jnp.einsum('tef,efd->ted', layers.swiglu(h_TxEx2F), w2_ExFxD)
  y_TxD = jnp.einsum('ted,te->td', y_TxExD, combine_TxE.astype(x_TxD.dtype))
  return y_TxD, jnp.zeros((), f32)


def dropless_dispatch(x_TxD, r: routers.Routing, w1_ExDx2F, w2_ExFxD):
  """Sort slots by expert; grouped matmuls over the sorted rows; nothing dropped."""
  E = w1_ExDx2F.shape[0]
  key_A = jnp.where(r.valid_A, r.expert_A, E)         # invalid slots sort last
  order_A = jnp.argsort(key_A, stable=True)
  group_sizes_E = jnp.zeros((E,), jnp.int32).at[r.expert_A].add(r.valid_A.astype(jnp.int32))
  token_A = r.token_A[order_A]
  xs_AxD = x_TxD[token_A]
  h_Ax2F = jax.lax.ragged_dot(xs_AxD, w1_ExDx2F, group_sizes_E)
  ys_AxD = jax.lax.ragged_dot(layers.swiglu(h_Ax2F), w2_ExFxD, group_sizes_E)
  w_A = jnp.where(r.valid_A, r.weight_A, 0.0)[order_A].astype(x_TxD.dtype)
  y_TxD = jnp.zeros_like(x_TxD).at[token_A].add(ys_AxD * w_A[:, None])
  return y_TxD, jnp.zeros((), f32)


def capacity_dispatch(x_TxD, r: routers.Routing, w1_ExDx2F, w2_ExFxD, capacity: int):
  """GShard capacity: scatter into [E, C, D], batched einsum, gather back; overflow dropped."""
  T, E = x_TxD.shape[0], w1_ExDx2F.shape[0]
  onehot_AxE = jax.nn.one_hot(r.expert_A, E, dtype=jnp.int32) * r.valid_A[:, None]
  # Position of each slot in its expert's buffer, in slot order (token-major: causal).
  pos_A = jnp.take_along_axis(jnp.cumsum(onehot_AxE, axis=0), r.expert_A[:, None], axis=1)[:, 0] - 1
  kept_A = r.valid_A & (pos_A < capacity)
  slot_A = jnp.where(kept_A, pos_A, capacity)          # out of range -> dropped by the scatter
  x_ExCxD = jnp.zeros((E, capacity, x_TxD.shape[1]), x_TxD.dtype).at[r.expert_A, slot_A].set(
      x_TxD[r.token_A], mode='drop')
  x_ExCxD = layers.constrain(x_ExCxD, ('act_expert', 'act_capacity', 'act_embed'))
  y_ExCxD = _experts(x_ExCxD, w1_ExDx2F, w2_ExFxD)
  y_ExCxD = layers.constrain(y_ExCxD, ('act_expert', 'act_capacity', 'act_embed'))
  ys_AxD = y_ExCxD.at[r.expert_A, slot_A].get(mode='fill', fill_value=0)
  w_A = jnp.where(kept_A, r.weight_A, 0.0).astype(x_TxD.dtype)
  y_TxD = jnp.zeros_like(x_TxD).at[r.token_A].add(ys_AxD * w_A[:, None])
  dropped = jnp.sum(r.valid_A & ~kept_A) / jnp.maximum(jnp.sum(r.valid_A), 1)
  return y_TxD, dropped.astype(f32)


class MoE(nn.Module):
  """Routed SwiGLU experts (+ optional shared experts), any router, any dispatch."""
  config: ml_collections.ConfigDict   # config.model
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    B, L, D = x_BxLxD.shape
    E, F, k = cfg.num_experts, cfg.moe.ffn_size, cfg.router.top_k
    dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(layers.scaled_init_std(cfg.init_std, cfg.num_layers))
    w1_ExDx2F = layers.param_with_axes(self, 'w1', init, (E, D, 2 * F), ('expert', 'embed', 'mlp'), pdtype)
    w2_ExFxD = layers.param_with_axes(self, 'w2', out_init, (E, F, D), ('expert', 'mlp', 'embed'), pdtype)

    x_TxD = x_BxLxD.reshape(B * L, D)
    r = routers.make_router(cfg)(x_TxD, deterministic=self.deterministic)
    # For inspection (dead code unless 'intermediates' is mutable): probabilities and
    # the combine weight each token gives each expert (non-zero where the expert fires).
    self.sow('intermediates', 'router_probs', r.probs_TxE.reshape(B, L, E))
    self.sow('intermediates', 'combine_weights', combine_weights(r, B * L, E).reshape(B, L, E))
    w1, w2 = w1_ExDx2F.astype(dtype), w2_ExFxD.astype(dtype)
    dispatch = cfg.moe.dispatch
    if dispatch == 'dense':
      y_TxD, dropped = dense_dispatch(x_TxD, r, w1, w2)
    elif dispatch == 'dropless':
      y_TxD, dropped = dropless_dispatch(x_TxD, r, w1, w2)
    elif dispatch == 'capacity':
      C = routers.expert_capacity(B * L, E, k, cfg.moe.capacity_factor)
      y_TxD, dropped = capacity_dispatch(x_TxD, r, w1, w2, C)
    else:
      raise ValueError(f'config.model.moe.dispatch={dispatch!r}: expected one of {DISPATCHES}')

    N = cfg.router.num_shared_experts
    if N:
      s1_NxDx2F = layers.param_with_axes(self, 'shared_w1', init, (N, D, 2 * F),
                                         ('shared', 'embed', 'mlp'), pdtype)
      s2_NxFxD = layers.param_with_axes(self, 'shared_w2', out_init, (N, F, D),
                                        ('shared', 'mlp', 'embed'), pdtype)
      h_TxNx2F = jnp.einsum('td,ndf->tnf', x_TxD, s1_NxDx2F.astype(dtype))
      y_TxD = y_TxD + jnp.einsum('tnf,nfd->td', layers.swiglu(h_TxNx2F), s2_NxFxD.astype(dtype))

    stats = moe_stats(r, dropped)
    return y_TxD.reshape(B, L, D).astype(dtype), stats


def moe_stats(r: routers.Routing, dropped_fraction):
  E = r.probs_TxE.shape[-1]
  counts_E = jnp.zeros((E,), f32).at[r.expert_A].add(r.valid_A.astype(f32))
  load_E = counts_E / jnp.maximum(counts_E.sum(), 1.0)
  p = r.probs_TxE
  entropy = -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))
  return dict(load=load_E, max_load=jnp.max(load_E) * E, entropy=entropy,
              dropped_fraction=dropped_fraction, **r.aux)
