"""Basic layers: RMSNorm, the SwiGLU feed-forward, rotary embeddings, the output logits, helpers.

Axis key (shape suffixes used throughout `yuanjax.model`):
  B batch, L sequence (query) length, S key length, D hidden size (embed),
  H attention heads, K head dim, R rotary dims, F ffn size, E routed experts,
  N shared experts, C expert capacity, T tokens in a routing group (B*L),
  A token-slots (T*top_k for token choice, E*C for expert choice), V vocab.

Logical axis names (mapped to mesh axes only by the config's rules):
  params: 'vocab', 'embed', 'heads', 'kv', 'mlp', 'expert', 'shared', 'router',
          'conv', 'norm', 'layers'
  activations: 'act_batch', 'act_len', 'act_embed', 'act_heads', 'act_kv',
               'act_vocab'
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def dtype_of(name) -> jnp.dtype:
  """'float32' / 'bfloat16' / a dtype -> a jnp dtype."""
  return jnp.dtype(name)


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  """Creates a parameter carrying logical axis names (one per dimension)."""
  assert len(shape) == len(axes), (name, shape, axes)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def mesh_axes_of(logical: str):
  """The mesh axis (or axes, or None) the active rules map a logical axis to."""
  return nn.logical_to_mesh_axes((logical,))[0]


def mesh_axes_size(mesh, axes) -> int:
  """Devices along `axes` (a mesh axis name, a tuple of them, or None: 1) of `mesh`."""
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def constrain(x, axes):
  """Logical sharding constraint on an activation (a no-op without rules)."""
  return nn.with_logical_constraint(x, axes)


def logits(hidden_BxLxD, head_VxD):
  """Float32 logits of hidden states against the head matrix (the model's output layer)."""
  logits_BxLxV = jnp.einsum('bld,vd->blv', hidden_BxLxD, head_VxD, preferred_element_type=f32)
  return constrain(logits_BxLxV, ('act_batch', 'act_len', 'act_vocab'))


class RMSNorm(nn.Module):
  """y = w * x / sqrt(mean(x^2) + eps), the statistics in float32 (Yuan's RMSNorm)."""
  eps: float = 1e-6
  dtype: jnp.dtype = f32
  param_dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, x_BxLxD):
    scale_D = param_with_axes(self, 'scale', nn.initializers.ones, (x_BxLxD.shape[-1],), ('norm',),
                              self.param_dtype)
    x32 = x_BxLxD.astype(f32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale_D.astype(self.dtype)


def swiglu(h_Xx2F):
  """silu(gate) * up, where the first half of the last axis is the gate (Yuan's w1)."""
  gate, up = jnp.split(h_Xx2F, 2, axis=-1)
  return nn.silu(gate) * up


class MLP(nn.Module):
  """Dense SwiGLU feed-forward (for the non-MoE layers): w2(silu(g) * up), [g, up] = w1 x."""
  hidden_size: int
  ffn_size: int
  init_std: float
  out_init_std: float
  dtype: jnp.dtype = f32
  param_dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, x_BxLxD):
    w1_Dx2F = param_with_axes(self, 'w1', nn.initializers.normal(self.init_std),
                              (self.hidden_size, 2 * self.ffn_size), ('embed', 'mlp'),
                              self.param_dtype)
    w2_FxD = param_with_axes(self, 'w2', nn.initializers.normal(self.out_init_std),
                             (self.ffn_size, self.hidden_size), ('mlp', 'embed'), self.param_dtype)
    h = jnp.einsum('bld,df->blf', x_BxLxD, w1_Dx2F.astype(self.dtype))
    return jnp.einsum('blf,fd->bld', swiglu(h), w2_FxD.astype(self.dtype))


# ---------------------------------------------------------------- rotary


def rope_base(base: float, rotary_dims: int, ntk_factor: float = 1.0) -> float:
  """NTK-aware base: b' = b * s^(R / (R - 2)) (Yuan's 16K extension: s=4 -> 40890)."""
  if ntk_factor == 1.0:
    return float(base)
  return float(base) * float(ntk_factor)**(rotary_dims / (rotary_dims - 2))


def rope_inv_freq(rotary_dims: int, base: float) -> np.ndarray:
  """inv_freq_j = base^(-2j/R), j < R/2, computed in float64, returned as float32."""
  exponent = np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims
  return (1.0 / base**exponent).astype(np.float32)


def rotary_angles(positions_BxL, rotary_dims: int, base: float, hf_bf16: bool = False):
  """(cos, sin) [B, L, R/2] in float32 for the given positions.

  Default: angle = position * inv_freq in float32 (exact integer positions).
  hf_bf16 reproduces Yuan's HF runtime (spec, quirk 3): inv_freq and the positions are rounded
  to bfloat16, so is their product, and cos/sin come out rounded to bfloat16 (positions above
  256 are then not even exact).
  """
  inv_freq_R2 = jnp.asarray(rope_inv_freq(rotary_dims, base))
  if not hf_bf16:
    angles_BxLxR2 = positions_BxL.astype(f32)[..., None] * inv_freq_R2
    return jnp.cos(angles_BxLxR2), jnp.sin(angles_BxLxR2)
  bf16 = lambda a: a.astype(jnp.bfloat16).astype(f32)
  # The product of two bfloat16 values is exact in float32; rounding it once to bfloat16 is
  # what a bfloat16 multiply gives.
  angles_BxLxR2 = bf16(bf16(positions_BxL.astype(f32))[..., None] * bf16(inv_freq_R2))
  return bf16(jnp.cos(angles_BxLxR2)), bf16(jnp.sin(angles_BxLxR2))


def apply_rotary(x_BxLxHxK, positions_BxL, rotary_dims: int, base: float, hf_bf16: bool = False):
  """Rotate-half rotary on the first `rotary_dims` dims of each head; the rest pass through.

  Angles as in `rotary_angles` (exact float32 unless `hf_bf16`); the rotation itself is done
  in float32 and cast back to the input dtype.
  """
  if rotary_dims == 0:
    return x_BxLxHxK
  half = rotary_dims // 2
  cos, sin = rotary_angles(positions_BxL, rotary_dims, base, hf_bf16)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x_BxLxHxK.astype(f32)
  x1, x2, rest = x32[..., :half], x32[..., half:rotary_dims], x32[..., rotary_dims:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def positions_from_segments(segment_ids_BxL):
  """Positions that restart at 0 wherever the segment id changes."""
  L = segment_ids_BxL.shape[1]
  idx_BxL = jnp.broadcast_to(jnp.arange(L), segment_ids_BxL.shape)
  starts = jnp.concatenate([
      jnp.ones_like(segment_ids_BxL[:, :1], bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
  ], axis=1)
  start_idx_BxL = jax.lax.cummax(jnp.where(starts, idx_BxL, 0), axis=1)
  return idx_BxL - start_idx_BxL


def scaled_init_std(init_std: float, num_layers: int) -> float:
  """Megatron's scaled init for output projections: std / sqrt(2 * layers)."""
  return init_std / math.sqrt(2.0 * num_layers)
