"""The LM loss: token cross-entropy (float32) of the final hidden states against the LM head.

  ce_sum = loss.cross_entropy_sum(hidden_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len)
  total, out = loss.loss_fn(params, model, batch, rng)   # a batch through the model

In one piece (`chunk_len` 0, or >= L) it is optax's cross-entropy of the full float32 logits
[B, L, V]. Tiled (`0 < chunk_len < L`, `config.model.loss_chunk_len`), the sequence is cut into
chunks of `chunk_len` positions (every row in each chunk, so a batch sharded over devices stays
balanced; a ragged last chunk is padded with masked positions) and a `lax.scan` scores one
chunk at a time under a custom VJP. The loss is a sum, so its gradients do not depend on
anything downstream but a scalar: when differentiated, the scan computes each chunk's gradients
right away, while its logits exist (softmax - one-hot, masked, times the head: the chunk's
hidden-state gradient; times the hidden states: added to a float32 head-gradient accumulator),
and the backward only scales them by the cotangent. So neither the [B, L, V] float32 logits nor
their gradient exist in one piece, only [B, chunk_len, V] at a time, and the FLOPs are exactly
the one-piece loss's (no logits recomputed: MaxText's vocab tiling recomputes them). What it
keeps for the backward, the hidden-state gradient [B, L, D] and the head gradient [V, D] in
float32, the one-piece loss holds through the backward too. Without differentiation (eval)
it computes only the log-sum-exps.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from yuanjax.model import layers

f32 = jnp.float32


def cross_entropy_sum(hidden_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len: int = 0,
                      unroll: bool = False):
  """Sum over tokens of mask x cross-entropy (float32), in one piece or in chunks of
  `chunk_len` positions (module docstring); the same value and gradients either way. `unroll`:
  the chunks in straight-line code instead of a loop (what the FLOP analysis compiles)."""
  mask_BxL = mask_BxL.astype(f32)
  L = hidden_BxLxD.shape[1]
  if chunk_len < 0:
    raise ValueError(f'loss chunk_len={chunk_len}: must be >= 0 (0: one piece)')
  if not chunk_len or chunk_len >= L:
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(layers.logits(hidden_BxLxD, head_VxD),
                                                             targets_BxL)
    return jnp.sum(ce_BxL * mask_BxL)
  pad = -L % chunk_len
  if pad:  # ragged last chunk: padded positions carry mask 0
    widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
    hidden_BxLxD, targets_BxL, mask_BxL = (
        jnp.pad(a, widths(a)) for a in (hidden_BxLxD, targets_BxL, mask_BxL))
  return _chunked_ce_sum(hidden_BxLxD, head_VxD, targets_BxL, mask_BxL, (chunk_len, unroll))


def _split(a_BxL, c):
  """[B, L, ...] -> [L / c, B, c, ...]: the chunks along the sequence, scanned over."""
  B, L = a_BxL.shape[:2]
  return jnp.moveaxis(a_BxL.reshape(B, L // c, c, *a_BxL.shape[2:]), 1, 0)


def _merge(a_NxBxC):
  """The inverse of _split."""
  a = jnp.moveaxis(a_NxBxC, 0, 1)
  return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _batch_shards(B: int) -> int:
  """Devices the batch is split over (the mesh axes of 'act_batch'; 1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  n = 1 if mesh.empty else layers.mesh_axes_size(mesh, layers.mesh_axes_of('act_batch'))
  return n if B % n == 0 else 1


def _lse_and_target(x_BxCxD, head_VxD, t_BxC):
  logits_BxCxV = layers.logits(x_BxCxD, head_VxD)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
  return logits_BxCxV, lse_BxC, target_BxC


def _head_grad(dlogits_BxCxV, x_BxCxD, S: int):
  """[S, V, D] float32: the head gradient of each of the S batch shards."""
  if S == 1:  # (the plain einsum: XLA:CPU fuses the reshaped one where op names get lost)
    return jnp.einsum('bcv,bcd->vd', dlogits_BxCxV, x_BxCxD, preferred_element_type=f32)[None]
  split = lambda a: a.reshape(S, a.shape[0] // S, *a.shape[1:])
  return jnp.einsum('sbcv,sbcd->svd', split(dlogits_BxCxV), split(x_BxCxD),
                    preferred_element_type=f32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce_sum(x_BxLxD, head_VxD, targets_BxL, mask_BxL, tiling):
  """Without differentiation (eval): only each chunk's log-sum-exp and target logit."""

  def chunk(total, xs):
    x_BxCxD, t_BxC, m_BxC = xs
    _, lse_BxC, target_BxC = _lse_and_target(x_BxCxD, head_VxD, t_BxC)
    return total + jnp.sum((lse_BxC - target_BxC) * m_BxC), None

  chunk_len, unroll = tiling
  xs = tuple(_split(a, chunk_len) for a in (x_BxLxD, targets_BxL, mask_BxL))
  return jax.lax.scan(chunk, jnp.zeros((), f32), xs, unroll=unroll)[0]


def _chunked_fwd(x_BxLxD, head_VxD, targets_BxL, mask_BxL, tiling):
  """Under differentiation: each chunk's loss AND its gradients, while its logits exist.

  The head gradient and the loss are accumulated per batch shard ([S, V, D] and [S], split
  over the devices that split the batch) and summed once after the loop: no collective per
  chunk.
  """
  dtype = x_BxLxD.dtype
  S, D, V = _batch_shards(x_BxLxD.shape[0]), x_BxLxD.shape[2], head_VxD.shape[0]
  per_shard = lambda a: nn.with_logical_constraint(a, ('act_batch', None, None))

  def chunk(carry, xs):
    total_S, dhead_SxVxD = carry
    x_BxCxD, t_BxC, m_BxC = xs
    logits_BxCxV, lse_BxC, target_BxC = _lse_and_target(x_BxCxD, head_VxD, t_BxC)
    probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    onehot_BxCxV = jax.nn.one_hot(t_BxC, V, dtype=f32)
    dlogits_BxCxV = ((probs_BxCxV - onehot_BxCxV) * m_BxC[..., None]).astype(dtype)
    dx_BxCxD = jnp.einsum('bcv,vd->bcd', dlogits_BxCxV, head_VxD, preferred_element_type=f32)
    dhead_SxVxD += per_shard(_head_grad(dlogits_BxCxV, x_BxCxD, S))
    ce_SxbC = ((lse_BxC - target_BxC) * m_BxC).reshape(S, -1)
    total_S += nn.with_logical_constraint(ce_SxbC.sum(1), ('act_batch',))
    return (total_S, per_shard(dhead_SxVxD)), dx_BxCxD.astype(dtype)

  chunk_len, unroll = tiling
  xs = tuple(_split(a, chunk_len) for a in (x_BxLxD, targets_BxL, mask_BxL))
  init = (jnp.zeros((S,), f32), per_shard(jnp.zeros((S, V, D), f32)))
  (total_S, dhead_SxVxD), dx_NxBxCxD = jax.lax.scan(chunk, init, xs, unroll=unroll)
  # The empty array only carries the head's dtype (its gradient's) to the backward.
  return total_S.sum(), (_merge(dx_NxBxCxD), dhead_SxVxD.sum(0), jnp.zeros((0,), head_VxD.dtype))


def _chunked_bwd(tiling, residuals, g):
  """The loss is a sum: its gradients, computed in the forward, times the cotangent g (the
  head's in float32, rounded once)."""
  del tiling
  dx_BxLxD, dhead_VxD, head_dtype = residuals
  return ((g * dx_BxLxD).astype(dx_BxLxD.dtype), (g * dhead_VxD).astype(head_dtype.dtype), None,
          None)


_chunked_ce_sum.defvjp(_chunked_fwd, _chunked_bwd)


def loss_fn(params, model, batch, rng, aux_in_loss=True):
  """The model's training loss on a batch (inputs, targets, loss_mask, segment_ids, positions):
  mean token cross-entropy (float32) over loss_mask, plus the routers' aux losses; scored in
  chunks of config.model.loss_chunk_len positions (0: the logits in one piece). The trainer's
  step and the held-out eval loss (yuanjax.evals.loss) both take it."""
  (hidden, head), aux = model.apply({'params': params}, batch['inputs'],
                                    segment_ids=batch['segment_ids'], positions=batch['positions'],
                                    deterministic=False, rngs={'router': rng}, hidden=True)
  mask = batch['loss_mask'].astype(f32)
  n = jnp.maximum(mask.sum(), 1.0)
  m = model.config
  lm_loss = cross_entropy_sum(hidden, head, batch['targets'], mask, m.loss_chunk_len,
                              m.loss_unroll) / n
  total = lm_loss + aux['aux_loss'] if aux_in_loss else lm_loss
  return total, dict(lm_loss=lm_loss, aux=aux, tokens=mask.sum())
