"""Self-attention: Localized Filtering-based Attention (LFA, Yuan 2.0) or standard attention.

  v = u Wv                                     (no filtering on the value path)
  c1[t] = A0 u[t-1] + A1 u[t] + a              (d -> d/2, causal conv, kernel 2)
  c2[t] = B0 c1[t-1] + B1 c1[t] + b            (d/2 -> d)
  f = RMSNorm_lf(c2 + u);  q = f Wq;  k = f Wk
  partial rotary on q, k; causal softmax(q k^T / sqrt(K)) v; o Wo

`config.model.attention_type`: 'lfa' (above) or 'standard' (q = u Wq, k = u Wk: no
filtering; Mixtral, XVERSE). `config.model.num_kv_heads` (G <= H, dividing H): grouped-query
attention, query head h reads key/value head h // (H / G) (HF's `repeat_kv` order); G = H is
plain multi-head attention. Wk, Wv and the KV cache are [.., G, K].

Axis key: see `yuanjax.model.layers` (G: key/value heads). Packed rows: `segment_ids_BxL` make the attention
mask block-diagonal causal, and the convolutions never look across a document boundary
(u[t-1] counts as zero at the first token of a segment), so every packed document gives
exactly its stand-alone result.

Decoding (`decode=True`; one sequence per row, no segments). State in the 'cache' collection,
created by `yuanjax.model.transformer.init_cache`:
  attention/k, attention/v   [B, G, S, K] (compute dtype): keys (after rotary) and values of
                             cache slots 0..S-1; slot = the token's position in its row. Heads
                             before slots: the attention's batched dots (over rows and heads)
                             read them as they lie (in [B, S, G, K] a CPU copied the whole
                             cache into that order at every step)
  attention/lf/u_prev        [B, 2, D]: the last two LF inputs u[p-2], u[p-1] of each row
                             (zeros before the row's start: u[-2] = u[-1] = 0); LFA only
A call feeds a chunk of L tokens per row at positions p..p+L-1 (p differs per row): the chunk's
keys/values are written into their slots, and query p+t attends to slots <= p+t, so stale
slots past a row's end are never seen. The convolution needs u[p-1] for c1[p] and c1[p-1]
(= A0 u[p-2] + A1 u[p-1] + a, or 0 at p = 0) for c2[p]; both come from u_prev. `lengths_B`
(how many of the chunk's tokens are real in each row; right padding) picks the new u_prev.
A full prompt (prefill) and a one-token step are the same call. Decoding always uses the
reference einsum attention (`xla_attention`) over the cache, whatever `attention_backend` says.

Backends (`config.model.attention_backend`; the training path only):
  'auto'        (the default) 'splash' on TPU, 'cudnn' on GPU, 'dot_product_attention' (XLA)
                elsewhere, and 'dot_product_attention' where the platform's cannot run: cuDNN
                without a dtype it takes, splash on a length its blocks do not tile (as
                MaxText's 'autoselected' takes dot-product attention below one 128 block);
                logged once per platform, dtype and choice (`resolve_backend`).
  'splash'      Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`):
                a causal mask with segment ids, tiled by `config.model.splash` (the kernel's
                BlockSizes; each block clamped to the sequence length, as MaxText does); keeps
                no scores. TPU only; on the CPU it runs in Pallas interpret mode (slow; for
                tests), elsewhere it is an error (`splash_interpret`). Under a
                mesh it runs in `jax.shard_map`, batch over the 'act_batch' mesh axes, heads
                over the 'act_heads' (and key/value heads over the same) axes.
  'cudnn'       `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN flash attention
                (GPU only, bfloat16/float16), causal; packed rows pass the segments as a boolean
                [B, 1, L, L] mask (cuDNN adds it as a bias: one L x L per row, not per head).
  'dot_product_attention'  `jax.nn.dot_product_attention` with its default implementation,
                which in this JAX is XLA's (the full square of scores) on every platform.
  'xla'         the einsum reference; it computes the full L x L square for a causal mask,
                twice the causal FLOPs, unless `attention_query_blocks` = n > 1 splits the
                queries into n blocks that see only the keys up to their end
                (`blocked_causal_attention`: (n+1)/(2n) of the square, the same result).
"""
from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from yuanjax.model import layers

f32 = jnp.float32
ATTENTION_BACKENDS = ('auto', 'splash', 'cudnn', 'dot_product_attention', 'xla')
AUTO_BACKENDS = {'tpu': 'splash', 'gpu': 'cudnn'}  # other platforms: 'dot_product_attention'
CUDNN_DTYPES = ('bfloat16', 'float16')  # what cuDNN flash attention takes
# config.model.splash: splash_attention_kernel.BlockSizes' fields (the kernel's tiles).
SPLASH_BLOCKS = ('block_q', 'block_kv', 'block_kv_compute', 'block_q_dkv', 'block_kv_dkv',
                 'block_kv_dkv_compute', 'block_q_dq', 'block_kv_dq')
SPLASH_LANES = 128  # every splash block is a multiple of this (the TPU's lane width)
ATTENTION_TYPES = ('lfa', 'standard')


def _shift_right(x_BxLxC, same_segment_BxL):
  """x[t-1] (zero at t = 0 and at the first token of each segment)."""
  prev = jnp.pad(x_BxLxC, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  if same_segment_BxL is not None:
    prev = prev * same_segment_BxL[..., None].astype(prev.dtype)
  return prev


class LocalizedFiltering(nn.Module):
  """Two causal kernel-2 convolutions with bias (d -> d/2 -> d), residual, RMSNorm."""
  config: ml_collections.ConfigDict
  decode: bool = False

  @nn.compact
  def __call__(self, u_BxLxD, segment_ids_BxL=None, positions_BxL=None, lengths_B=None, block=None):
    cfg = self.config
    D, dtype, pdtype = cfg.hidden_size, layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    # Kernel index 0 multiplies the previous position, index 1 the current one.
    a_2xDxM = layers.param_with_axes(self, 'conv1_kernel', init, (2, D, D // 2),
                                     ('conv', 'embed', 'mlp'), pdtype)
    a_M = layers.param_with_axes(self, 'conv1_bias', nn.initializers.zeros, (D // 2,), ('mlp',),
                                 pdtype)
    b_2xMxD = layers.param_with_axes(self, 'conv2_kernel', init, (2, D // 2, D),
                                     ('conv', 'mlp', 'embed'), pdtype)
    b_D = layers.param_with_axes(self, 'conv2_bias', nn.initializers.zeros, (D,), ('embed',),
                                 pdtype)

    def conv(x, x_prev, kernel, bias):
      """kernel[0] x[t-1] + kernel[1] x[t] + bias."""
      kernel = kernel.astype(dtype)
      return (jnp.einsum('blc,cm->blm', x_prev, kernel[0]) +
              jnp.einsum('blc,cm->blm', x, kernel[1]) + bias.astype(dtype))

    if not self.decode:
      same = None
      if segment_ids_BxL is not None:
        same = jnp.pad(segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1], ((0, 0), (1, 0)))
      c1_BxLxM = conv(u_BxLxD, _shift_right(u_BxLxD, same), a_2xDxM, a_M)
      c2_BxLxD = conv(c1_BxLxM, _shift_right(c1_BxLxM, same), b_2xMxD, b_D)
    else:
      B, L, _ = u_BxLxD.shape
      u_prev = self.variable('cache', 'u_prev', jnp.zeros, (B, 2, D), dtype)
      u_ext = jnp.concatenate([cache_block(u_prev, block), u_BxLxD], axis=1)  # u[p-2]..u[p+L-1]
      c1_ext = conv(u_ext[:, 1:], u_ext[:, :-1], a_2xDxM, a_M)  # c1[p-1] .. c1[p+L-1]
      c1_ext = c1_ext.at[:, 0].multiply((positions_BxL[:, 0] > 0)[:,
                                                                  None].astype(dtype))  # c1[-1] = 0
      c2_BxLxD = conv(c1_ext[:, 1:], c1_ext[:, :-1], b_2xMxD, b_D)
      last_two_Bx2 = lengths_B[:, None] + jnp.arange(2)  # u[p+n-2], u[p+n-1] in u_ext
      set_cache_block(u_prev, block, jnp.take_along_axis(u_ext, last_two_Bx2[..., None], axis=1))
    return layers.RMSNorm(cfg.norm_eps, dtype, pdtype, name='norm')(c2_BxLxD + u_BxLxD)


def attention_mask(segment_ids_BxL, q_len: int, kv_len: int):
  """Boolean [B, 1, L, S] causal mask, block-diagonal over segments when given."""
  causal_LxS = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
  if segment_ids_BxL is None:
    return causal_LxS[None, None]
  same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_LxS[None, None] & same_BxLxS[:, None]


def xla_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS, scale: float,
                  heads_first: bool = False):
  """Reference attention: einsum, float32 logits and softmax. G (key/value heads) divides H;
  query head h reads key/value head h // R (R = H / G) without repeating the keys/values
  (for G = H, plain multi-head einsums: the same ops as before GQA existed, bit for bit).
  heads_first: the keys and values come as [B, G, S, K] (the decode cache's layout)."""
  (B, L, H, K), G = q_BxLxHxK.shape, k_BxSxGxK.shape[1 if heads_first else 2]
  q, mask = q_BxLxHxK, mask_Bx1xLxS
  q_axes, k_axes, logit_axes = 'blhk', 'bhsk' if heads_first else 'bshk', 'bhls'
  if G < H:
    q, mask = q.reshape(B, L, G, H // G, K), mask[:, :, None]
    q_axes, k_axes, logit_axes = 'blgrk', 'bgsk' if heads_first else 'bsgk', 'bgrls'
  logits = jnp.einsum(f'{q_axes},{k_axes}->{logit_axes}', q, k_BxSxGxK,
                      preferred_element_type=f32) * scale
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(f32).min), axis=-1)
  o = jnp.einsum(f'{logit_axes},{k_axes}->{q_axes}', probs.astype(v_BxSxGxK.dtype), v_BxSxGxK)
  return o.reshape(B, L, H, K)


def blocked_causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, scale: float,
                             blocks: int):
  """`xla_attention` with a causal mask, the queries split into `blocks` blocks, each
  attending only to the keys up to its own end: the same result for (n+1)/(2n) of the
  full square's FLOPs (block i sees keys [0, end_i); no online softmax is needed, since
  each query row still sees all the keys it may attend to at once)."""
  L = q_BxLxHxK.shape[1]
  bounds = [L * i // blocks for i in range(blocks + 1)]
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    if hi == lo:
      continue
    mask = jnp.tril(jnp.ones((hi - lo, hi), bool), k=lo)[None, None]
    if segment_ids_BxL is not None:
      mask = mask & (segment_ids_BxL[:, lo:hi, None] == segment_ids_BxL[:, None, :hi])[:, None]
    outs.append(
        xla_attention(q_BxLxHxK[:, lo:hi], k_BxLxGxK[:, :hi], v_BxLxGxK[:, :hi], mask, scale))
  return jnp.concatenate(outs, axis=1)


def resolve_backend(cfg, seq_len: int, platform: str | None = None) -> str:
  """The backend that runs `cfg.attention_backend` (config.model) at `seq_len` on `platform`
  (default: JAX's): that backend ('splash' only where `splash_interpret` allows), or for
  'auto' the platform's (`AUTO_BACKENDS`), 'dot_product_attention' where that cannot run
  (module doc); logged once per choice."""
  platform = platform or jax.default_backend()
  if cfg.attention_backend == 'splash':
    splash_interpret(platform)
  if cfg.attention_backend != 'auto':
    return cfg.attention_backend
  chosen = AUTO_BACKENDS.get(platform, 'dot_product_attention')
  why = ''
  if chosen == 'cudnn' and str(cfg.dtype) not in CUDNN_DTYPES:
    chosen = 'dot_product_attention'
  elif chosen == 'splash':
    why = _splash_untiled(cfg.splash, seq_len)
    chosen = 'dot_product_attention' if why else chosen
  _log_choice(platform, str(cfg.dtype), chosen, why)
  return chosen


@functools.cache
def _log_choice(platform: str, dtype: str, chosen: str, why: str) -> None:
  logging.log(logging.WARNING if why else logging.INFO,
              "attention_backend='auto' on %s with %s compute: %r%s", platform, dtype, chosen,
              f' ({why})' if why else '')


def splash_interpret(platform: str) -> bool:
  """Whether splash runs in Pallas interpret mode on `platform`: on the CPU (slow; for tests),
  not on a TPU; ValueError elsewhere (a TPU kernel: interpret mode on a GPU is no backend)."""
  if platform not in ('tpu', 'cpu'):
    raise ValueError(f"config.model.attention_backend='splash': a TPU kernel, not for {platform} "
                     "(the CPU runs it in interpret mode, for tests); use 'auto' or 'cudnn'")
  return platform == 'cpu'


def _splash_untiled(blocks, seq_len: int) -> str:
  """Why `blocks` (config.model.splash) cannot tile `seq_len` ('' when they can)."""
  try:
    splash_block_sizes(blocks, seq_len)
  except ValueError as e:
    return str(e)
  return ''


def splash_block_sizes(blocks, seq_len: int | None = None) -> dict:
  """`blocks` (config.model.splash) checked, each clamped to `seq_len` when given (MaxText's
  min(block, length)); ValueError naming the field for a block that is not a positive
  multiple of 128, a compute block not dividing its block, or a length it does not tile."""
  out = {}
  for name in SPLASH_BLOCKS:
    b = blocks[name]
    if type(b) is not int or b < 1 or b % SPLASH_LANES:
      raise ValueError(f'config.model.splash.{name}={b!r}: must be a positive multiple of '
                       f'{SPLASH_LANES}')
    out[name] = b if seq_len is None else min(b, seq_len)
    if seq_len is not None and (seq_len % out[name] or out[name] % SPLASH_LANES):
      raise ValueError(f'config.model.splash.{name}={b!r}: splash needs a sequence length '
                       f'({seq_len}) that is a multiple of {SPLASH_LANES} and of the block')
  for block, compute in (('block_kv', 'block_kv_compute'), ('block_kv_dkv',
                                                            'block_kv_dkv_compute')):
    if out[block] % out[compute]:
      raise ValueError(f'config.model.splash.{compute}={blocks[compute]!r}: must divide '
                       f'{block}={blocks[block]!r}')
  return out


def _splash_kernel(seq_len: int, heads: int, blocks: dict, interpret: bool):
  """A causal multi-head splash kernel for [H, L, K] queries and [G, L, K] keys/values."""
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * heads)
  return splash.make_splash_mha(mask=mask, block_sizes=splash.BlockSizes(**blocks), head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, scale: float, blocks):
  """Splash attention on one device's shard (interpret mode on the CPU); the kernel does not
  scale, so q is scaled first (as MaxText does)."""
  (_, L, H, _) = q_BxLxHxK.shape
  interpret = splash_interpret(jax.default_backend())
  kernel = _splash_kernel(L, H, splash_block_sizes(blocks, L), interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  q = heads_first(q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype))
  segments = None
  if segment_ids_BxL is not None:
    ids = segment_ids_BxL.astype(jnp.int32)
    segments = splash.SegmentIds(q=ids, kv=ids)
  o_BxHxLxK = jax.vmap(kernel)(q, heads_first(k_BxLxGxK), heads_first(v_BxLxGxK), segments)
  return heads_first(o_BxHxLxK)


def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, scale: float, blocks):
  """Causal splash attention within segments. Under a mesh of more than one device it runs
  in `jax.shard_map` (as MaxText's): rows split over the 'act_batch' mesh axes, query and
  key/value heads over the 'act_heads' axes, the sequence whole on each device."""
  mesh = jax.sharding.get_abstract_mesh()
  local = functools.partial(_splash_local, scale=scale, blocks=blocks)
  if mesh.empty or mesh.size == 1:
    return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  batch, heads = layers.mesh_axes_of('act_batch'), layers.mesh_axes_of('act_heads')
  qkv, rows = P(batch, None, heads, None), P(batch, None)
  if segment_ids_BxL is None:
    fn = lambda q, k, v: local(q, k, v, None)
    args, specs = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK), (qkv,) * 3
  else:
    fn, args = local, (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    specs = (qkv,) * 3 + (rows,)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def fused_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, scale: float,
                    implementation: str | None):
  """`jax.nn.dot_product_attention`, causal, document boundaries as a boolean [B, 1, L, L]
  segment mask; G < H key/value heads natively. `implementation`: 'cudnn' or None (XLA)."""
  mask = None
  if segment_ids_BxL is not None:
    mask = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask, is_causal=True,
                                      scale=scale, implementation=implementation)


def causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, cfg):
  """Causal attention within segments, scaled by 1/sqrt(head_dim), by `cfg.attention_backend`
  (module doc); q, k, v after rotary."""
  scale = cfg.head_dim**-0.5
  backend = resolve_backend(cfg, q_BxLxHxK.shape[1])
  qkv = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, scale)
  if backend == 'xla':
    return blocked_causal_attention(*qkv, cfg.attention_query_blocks)
  if backend == 'splash':
    return splash_attention(*qkv, cfg.splash)
  if backend in ('dot_product_attention', 'cudnn'):
    return fused_attention(*qkv, 'cudnn' if backend == 'cudnn' else None)
  raise ValueError(f'config.model.attention_backend={cfg.attention_backend!r}: '
                   f'expected one of {ATTENTION_BACKENDS}')


def num_kv_heads(cfg) -> int:
  """G, the key/value heads: `num_kv_heads`, or H when it is 0."""
  return cfg.num_kv_heads or cfg.num_heads


class Attention(nn.Module):
  """Self-attention (LFA or standard) over packed rows (or, with `decode`, the rows' KV cache)."""
  config: ml_collections.ConfigDict
  decode: bool = False

  @nn.compact
  def __call__(self, u_BxLxD, segment_ids_BxL, positions_BxL, lengths_B=None, block=None):
    cfg = self.config
    D, H, G, K = cfg.hidden_size, cfg.num_heads, num_kv_heads(cfg), cfg.head_dim
    dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(layers.scaled_init_std(cfg.init_std, cfg.num_layers))
    w = lambda name, heads: layers.param_with_axes(self, name, init, (D, heads, K),
                                                   ('embed', 'heads', 'kv'), pdtype)
    wq_DxHxK, wk_DxGxK, wv_DxGxK = w('wq', H), w('wk', G), w('wv', G)
    wo_HxKxD = layers.param_with_axes(self, 'wo', out_init, (H, K, D), ('heads', 'kv', 'embed'),
                                      pdtype)
    heads = ('act_batch', 'act_len', 'act_heads', 'act_kv')

    v = jnp.einsum('bld,dgk->blgk', u_BxLxD, wv_DxGxK.astype(dtype))
    f_BxLxD = u_BxLxD
    if cfg.attention_type == 'lfa':
      f_BxLxD = LocalizedFiltering(cfg, self.decode, name='lf')(u_BxLxD, segment_ids_BxL,
                                                                positions_BxL, lengths_B, block)
    q = jnp.einsum('bld,dhk->blhk', f_BxLxD, wq_DxHxK.astype(dtype))
    k = jnp.einsum('bld,dgk->blgk', f_BxLxD, wk_DxGxK.astype(dtype))
    base = layers.rope_base(cfg.rope_base, cfg.rotary_dims, cfg.rope_ntk_factor)
    hf_bf16 = cfg.rope_hf_bf16  # spec quirk 3 (layers.rotary_angles)
    q = layers.apply_rotary(q, positions_BxL, cfg.rotary_dims, base, hf_bf16)
    k = layers.apply_rotary(k, positions_BxL, cfg.rotary_dims, base, hf_bf16)
    q, k, v = (layers.constrain(t, heads) for t in (q, k, v))
    if self.decode:
      o_BxLxHxK = self._attend_cache(q, k, v, positions_BxL, block)
    else:
      o_BxLxHxK = causal_attention(q, k, v, segment_ids_BxL, cfg)
    o_BxLxHxK = layers.constrain(o_BxLxHxK, heads)
    return jnp.einsum('blhk,hkd->bld', o_BxLxHxK, wo_HxKxD.astype(dtype))

  def _attend_cache(self, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, block=None):
    """Writes the chunk's keys/values into their cache slots; attends over slots <= position.
    The cache is created by init_cache with the maximum length as L (see the module doc)."""
    B, L, G, K = k_BxLxGxK.shape
    dtype = layers.dtype_of(self.config.dtype)
    cached_k = self.variable('cache', 'k', jnp.zeros, (B, G, L, K), dtype)
    cached_v = self.variable('cache', 'v', jnp.zeros, (B, G, L, K), dtype)
    # [rows, :, positions]: the indexed dims come first, so the update is [B, L, G, K].
    slots = (jnp.arange(B)[:, None], slice(None), positions_BxL)
    for var, new_BxLxGxK in ((cached_k, k_BxLxGxK), (cached_v, v_BxLxGxK)):
      var.value = var.value.at[slots if block is None else
                               (block, *slots)].set(new_BxLxGxK, mode='drop')
    k_BxGxSxK, v_BxGxSxK = cache_block(cached_k, block), cache_block(cached_v, block)
    mask_Bx1xLxS = (jnp.arange(k_BxGxSxK.shape[2]) <= positions_BxL[:, :, None])[:, None]
    return xla_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, mask_Bx1xLxS, self.config.head_dim**-0.5,
                         heads_first=True)


def cache_block(var, block):
  """A decode cache variable's value, or its block `block` when the layer loop carries the
  cache stacked over blocks (`yuanjax.model.transformer`)."""
  return var.value if block is None else var.value[block]


def set_cache_block(var, block, value):
  """Sets what `cache_block` reads (in place in the stacked cache)."""
  var.value = value if block is None else var.value.at[block].set(value)
