"""The LM loss: token cross-entropy (float32) of the final hidden states against the LM head.

  ce_sum = loss.cross_entropy_sum(hidden_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len)

In one piece (`chunk_len` 0, or >= L) it is optax's cross-entropy of the full float32 logits
[B, L, V]. Tiled (`0 < chunk_len < L`, `config.model.loss_chunk_len`), the sequence is cut into
chunks of `chunk_len` positions (every row in each chunk, so a batch sharded over devices stays
balanced; a ragged last chunk is padded with masked positions) and a `lax.scan` scores one
chunk at a time under a custom VJP: the forward keeps only each token's log-sum-exp, the
backward recomputes one chunk's logits, turns them into that chunk's hidden-state gradient and
adds its head gradient to a float32 accumulator. So neither the [B, L, V] float32 logits nor
their gradient exist in one piece: [B, chunk_len, V] at a time (MaxText's vocab tiling does the
same over token tiles). The price is the logits matmul once more in the backward pass (+1/3 of
the LM head's FLOPs).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

f32 = jnp.float32
LOGITS_AXES = ('act_batch', 'act_len', 'act_vocab')


def logits(hidden_BxLxD, head_VxD):
  """Float32 logits of hidden states against the head matrix (the model's output layer)."""
  logits_BxLxV = jnp.einsum('bld,vd->blv', hidden_BxLxD, head_VxD, preferred_element_type=f32)
  return nn.with_logical_constraint(logits_BxLxV, LOGITS_AXES)


def cross_entropy_sum(hidden_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len: int = 0):
  """Sum over tokens of mask x cross-entropy (float32), in one piece or in chunks of
  `chunk_len` positions (module docstring); the same value and gradients either way."""
  mask_BxL = mask_BxL.astype(f32)
  L = hidden_BxLxD.shape[1]
  if chunk_len < 0:
    raise ValueError(f'loss chunk_len={chunk_len}: must be >= 0 (0: one piece)')
  if not chunk_len or chunk_len >= L:
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits(hidden_BxLxD, head_VxD),
                                                             targets_BxL)
    return jnp.sum(ce_BxL * mask_BxL)
  pad = -L % chunk_len
  if pad:  # ragged last chunk: padded positions carry mask 0
    widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
    hidden_BxLxD, targets_BxL, mask_BxL = (
        jnp.pad(a, widths(a)) for a in (hidden_BxLxD, targets_BxL, mask_BxL))
  return _chunked_ce_sum(hidden_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len)


def _split(a_BxL, c):
  """[B, L, ...] -> [L / c, B, c, ...]: the chunks along the sequence, scanned over."""
  B, L = a_BxL.shape[:2]
  return jnp.moveaxis(a_BxL.reshape(B, L // c, c, *a_BxL.shape[2:]), 1, 0)


def _merge(a_NxBxC):
  """The inverse of _split."""
  a = jnp.moveaxis(a_NxBxC, 0, 1)
  return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _lse_and_target(x_BxCxD, head_VxD, t_BxC):
  logits_BxCxV = logits(x_BxCxD, head_VxD)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
  return logits_BxCxV, lse_BxC, target_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce_sum(x_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len):
  return _chunked_fwd(x_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len)[0]


def _chunked_fwd(x_BxLxD, head_VxD, targets_BxL, mask_BxL, chunk_len):

  def chunk(total, xs):
    x_BxCxD, t_BxC, m_BxC = xs
    _, lse_BxC, target_BxC = _lse_and_target(x_BxCxD, head_VxD, t_BxC)
    return total + jnp.sum((lse_BxC - target_BxC) * m_BxC), lse_BxC

  xs = tuple(_split(a, chunk_len) for a in (x_BxLxD, targets_BxL, mask_BxL))
  total, lse_NxBxC = jax.lax.scan(chunk, jnp.zeros((), f32), xs)
  return total, (x_BxLxD, head_VxD, targets_BxL, mask_BxL, lse_NxBxC)


def _chunked_bwd(chunk_len, residuals, g):
  x_BxLxD, head_VxD, targets_BxL, mask_BxL, lse_NxBxC = residuals
  dtype = x_BxLxD.dtype

  def chunk(dhead_VxD, xs):
    x_BxCxD, t_BxC, m_BxC, lse_BxC = xs
    logits_BxCxV = logits(x_BxCxD, head_VxD)
    probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    onehot_BxCxV = jax.nn.one_hot(t_BxC, head_VxD.shape[0], dtype=f32)
    dlogits_BxCxV = ((probs_BxCxV - onehot_BxCxV) * (g * m_BxC)[..., None]).astype(dtype)
    dx_BxCxD = jnp.einsum('bcv,vd->bcd', dlogits_BxCxV, head_VxD, preferred_element_type=f32)
    dhead_VxD += jnp.einsum('bcv,bcd->vd', dlogits_BxCxV, x_BxCxD, preferred_element_type=f32)
    return dhead_VxD, dx_BxCxD.astype(dtype)

  xs = tuple(_split(a, chunk_len) for a in (x_BxLxD, targets_BxL, mask_BxL)) + (lse_NxBxC,)
  dhead_VxD, dx_NxBxCxD = jax.lax.scan(chunk, jnp.zeros(head_VxD.shape, f32), xs)
  return _merge(dx_NxBxCxD), dhead_VxD.astype(head_VxD.dtype), None, None


_chunked_ce_sum.defvjp(_chunked_fwd, _chunked_bwd)
