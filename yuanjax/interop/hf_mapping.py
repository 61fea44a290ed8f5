"""Yuan2-M32-hf <-> yuanjax: the config fields and the tensor layout (pure NumPy, no IO).

Config (HF config.json -> config.model), see `model_config_from_hf`:
  hidden_size -> hidden_size            num_attention_heads -> num_heads
  num_hidden_layers -> num_layers       vocab_size -> vocab_size
  attention_projection_size (default hidden_size) / num_attention_heads -> head_dim
  hidden_size // num_attention_heads -> rotary_dims           (quirk 2)
  rms_norm_eps (1e-6) -> norm_eps       max_position_embeddings (4096) -> max_seq_len
  rotary_base or rope_theta (10000) -> rope_base  (the released HF code ignores both: 10000)
  moe_config.moe_num_experts -> num_experts      moe_config.moe_top_k -> router.top_k
  moe_config.ffn_hidden_size -> moe.ffn_size     moe_config.norm_topk_prob -> router.norm_topk_prob
  and the rest of `config_lib.m32_model()`, with moe.dispatch='dropless' (drops no token, as HF).
Checked, and refused with one error listing every problem: no MoE (use_moe false or no
moe_config: a dense Yuan 2.0), moe_config.gated_linear_unit false, hidden_act other than
silu, use_shareqk, num_key_value_heads != num_attention_heads, a router_type that is not the
attention router, head_dim inconsistent with attention_projection_size, rotary dims > head_dim.

Tensors (`tensor_groups`): HF layer i is block i of `blocks/layer_0` (moe_every = 1).
  HF linears are [out, in]; yuanjax kernels are [in, ...out].
  q_proj, k_proj [H*K, D] -> wq, wk [D, H, K]: quirk 1, HF views [q_proj; k_proj] (stacked
      rows) as [H, 2K, D], so head h's query is rows [2hK, 2hK+K) and its key the next K.
  v_proj [H*K, D] -> wv [D, H, K];  o_proj [D, H*K] -> wo [H, K, D]
  lf_gate.convN.weight [out, in, 2, 1] -> lf/convN_kernel [2, in, out], kernel[j] = W[:, :, j, 0].T
      (j = 0 multiplies the previous position, 1 the current one)
  mlp.gate.{query,key,value}.weight [E, D] -> moe/router/{wq,wk,wv} [D, E]
  mlp.experts.e.w1.weight [2F, D] -> moe/w1[e] [D, 2F] (first F = gate); w2 [D, F] -> moe/w2[e] [F, D]
  model.embed_tokens.weight -> embedding; lm_head.weight must equal it (tied); it may be absent.
Every map is a transpose/reshape/permutation, so HF -> yuanjax -> HF is bit-exact.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

import ml_collections
import numpy as np

from yuanjax import config_lib
from yuanjax.model import attention, layers
from yuanjax.model import moe as moe_lib

log = logging.getLogger(__name__)

MODEL_TYPE = 'yuan'
TIED_LM_HEAD = True  # lm_head.weight may be absent; if present it must equal the embedding
LM_HEAD = 'lm_head.weight'
EMBED = 'model.embed_tokens.weight'
HF_ROPE_BASE = 10000.0  # hard-coded in the released yuan_moe_hf_model.py
HF_LF_NORM_EPS = 1e-6  # LocalizedFiltering's RMSNorm ignores rms_norm_eps

# What the released Yuan2-M32-hf config.json sets besides the sizes; used for exports of
# models that were not imported from HF (an imported model re-uses its source config.json).
DEFAULT_HF_CONFIG = {
    'architectures': ['YuanForCausalLM'],
    'auto_map': {
        'AutoConfig': 'configuration_yuan.YuanConfig',
        'AutoModelForCausalLM': 'yuan_hf_model.YuanForCausalLM'
    },
    'bos_token_id': 77185,
    'eos_token_id': 77185,
    'pad_token_id': 77185,
    'eod_token': 77185,
    'eod_token_id': 77185,
    'sep_token': 77187,
    'sep_token_id': 77185,
    'mask_token_id': 77185,
    'causal_mask': True,
    'dropout': 0,
    'hidden_act': 'silu',
    'initializer_range': 0.02,
    'model_max_length': 8192,
    'model_type': 'yuan',
    'output_router_logits': True,
    'reset_attention_mask': False,
    'reset_position_ids': True,
    'tokenizer_class': 'YuanTokenizer',
    'transformers_version': '4.30.2',
    'use_cache': True,
    'use_flash_attention': True,
    'use_loss_mask': False,
    'use_moe': True,
}


def tokenizer_options(tokenizer_config: dict | None = None) -> dict:
  """yuanjax.data.tokenizer.Tokenizer's options for Yuan's tokenizer.model, as Yuan's runtime
  loads it: HF LlamaTokenizer(eos_token='<eod>', add_bos_token=False) (the special tokens of
  `tokenizer_config`, a tokenizer_config.json dict, with that eos), then YUAN_ADDED_TOKENS;
  newlines written as '<n>'."""
  # lazily: the data package is optional
  from yuanjax.data.tokenizer import YUAN_ADDED_TOKENS, hf_special_tokens
  special = hf_special_tokens(tokenizer_config, eos_token='<eod>')
  return dict(newline_token='<n>', added_tokens=tuple(special.values()) + YUAN_ADDED_TOKENS)


class HFConfigError(ValueError):
  """A config.json (or a model config to export) that yuanjax cannot map; lists every problem."""


def raise_problems(problems, what):
  if problems:
    raise HFConfigError(f'{what}:\n' + '\n'.join(f'  - {p}' for p in problems))


# ---------------------------------------------------------------- config


def model_config_from_hf(c: dict) -> ml_collections.ConfigDict:
  """config.model for an HF Yuan config.json dict (see the module docstring)."""
  problems = [
      f'missing field {k!r}' for k in ('hidden_size', 'num_attention_heads', 'num_hidden_layers',
                                       'vocab_size') if k not in c
  ]
  raise_problems(problems, 'config.json cannot be mapped to a yuanjax model')
  D, H = c['hidden_size'], c['num_attention_heads']
  aps = c.get('attention_projection_size') or D
  K, R = aps // H, D // H
  moe = c.get('moe_config') or {}
  if aps % H:
    problems.append(f'attention_projection_size={aps} is not a multiple of num_attention_heads={H}')
  if 'head_dim' in c and c['head_dim'] != K:
    problems.append(
        f'head_dim={c["head_dim"]} != attention_projection_size / num_attention_heads = {K}')
  if R > K:
    problems.append(f'rotary dims hidden_size // num_attention_heads = {R} > head_dim = {K}')
  if c.get('use_moe') is False or not moe.get('moe_num_experts'):
    problems.append(
        'not a MoE model (use_moe false or no moe_config.moe_num_experts): dense Yuan 2.0 '
        'checkpoints are not supported; HF import needs every layer MoE (moe_every=1)')
  for k in ('moe_top_k', 'ffn_hidden_size'):
    if moe.get('moe_num_experts') and k not in moe:
      problems.append(f'missing field moe_config.{k}')
  if moe.get('gated_linear_unit', True) is not True:
    problems.append('moe_config.gated_linear_unit is false: yuanjax experts are SwiGLU')
  router_type = str(moe.get('router_type', 'attention')).lower()
  if 'attn' not in router_type and 'attention' not in router_type:
    problems.append(
        f'moe_config.router_type={moe["router_type"]!r}: only the attention router exists in HF Yuan'
    )
  if c.get('hidden_act', 'silu') != 'silu':
    problems.append(f'hidden_act={c["hidden_act"]!r}: only silu (SwiGLU) is supported')
  if c.get('use_shareqk'):
    problems.append(
        'use_shareqk is true: only LFA attention (q_proj/k_proj + lf_gate) is supported')
  if c.get('num_key_value_heads', H) != H:
    problems.append(
        f'num_key_value_heads={c["num_key_value_heads"]} != num_attention_heads={H}: no GQA')
  raise_problems(problems, 'config.json cannot be mapped to a yuanjax model')

  eps = float(c.get('rms_norm_eps', 1e-6))
  if eps != HF_LF_NORM_EPS:
    log.warning(
        'rms_norm_eps=%g: HF uses 1e-6 in the LFA norm regardless, yuanjax uses norm_eps '
        'everywhere', eps)
  base = float(c.get('rotary_base', c.get('rope_theta', HF_ROPE_BASE)))
  if base != HF_ROPE_BASE:
    log.warning(
        'rotary base %g from config.json: the released HF modelling code ignores it and '
        'uses %g', base, HF_ROPE_BASE)
  m = config_lib.m32_model()
  m.update(
      dict(vocab_size=c['vocab_size'], hidden_size=D, num_layers=c['num_hidden_layers'],
           num_heads=H, head_dim=K, rotary_dims=R, rope_base=base, rope_ntk_factor=1.0,
           max_seq_len=int(c.get('max_position_embeddings', 4096)), norm_eps=eps,
           num_experts=moe['moe_num_experts'], moe_every=1, dense_ffn_size=moe['ffn_hidden_size']))
  m.router.type = 'attention'
  m.router.top_k = moe['moe_top_k']
  m.router.norm_topk_prob = bool(moe.get('norm_topk_prob', True))
  m.moe.ffn_size = moe['ffn_hidden_size']
  m.moe.dispatch = moe_lib.inference_dispatch(m.moe.dispatch)
  config_lib.validate_model(m)
  return m


# The name the config.py of converted dirs written before config_lib.upgrade calls.
model_config_from_saved = config_lib.upgrade


def exportable(m: ml_collections.ConfigDict) -> None:
  """Raises HFConfigError listing why config.model has no HF Yuan equivalent, if it has none."""
  problems = []
  if m.attention_type != 'lfa':
    problems.append(f'attention_type={m.attention_type!r}: HF Yuan has LFA attention only')
  if attention.num_kv_heads(m) != m.num_heads:
    problems.append(f'num_kv_heads={m.num_kv_heads} != num_heads={m.num_heads}: HF Yuan has no GQA')
  if not m.tie_embeddings:
    problems.append('tie_embeddings=False: HF Yuan ties lm_head to the embedding')
  if m.moe_every != 1:
    problems.append(f'moe_every={m.moe_every}: HF Yuan has every layer MoE; only moe_every=1 maps')
  if m.router.type != 'attention':
    problems.append(f'router.type={m.router.type!r}: HF Yuan has only the attention router')
  if m.router.num_shared_experts:
    problems.append(f'router.num_shared_experts={m.router.num_shared_experts}: HF Yuan has none')
  if m.router.noisy_topk:
    problems.append('router.noisy_topk: HF Yuan has no noise weights')
  if m.hidden_size // m.num_heads != m.rotary_dims:
    problems.append(
        f'rotary_dims={m.rotary_dims}: HF Yuan always rotates hidden_size // num_heads = '
        f'{m.hidden_size // m.num_heads} dims')
  raise_problems(problems, 'this model cannot be exported to the HF Yuan format')


def keep_or_set(c: dict, key: str, value, default=None) -> None:
  """Sets c[key] = value unless it already holds an equal value (keeps 10000 vs 10000.0)."""
  if key in c:
    if c[key] != value:
      c[key] = value
  elif default is None or value != default:
    c[key] = value


def hf_config_from_model(m: ml_collections.ConfigDict, base: dict | None, torch_dtype: str) -> dict:
  """config.json for config.model: `base` (the imported source's config.json) or the defaults."""
  exportable(m)
  c = copy.deepcopy(base) if base else copy.deepcopy(DEFAULT_HF_CONFIG)
  D, H, K, F = m.hidden_size, m.num_heads, m.head_dim, m.moe.ffn_size
  for key, value in (('hidden_size', D), ('num_attention_heads', H),
                     ('num_hidden_layers', m.num_layers), ('vocab_size', m.vocab_size),
                     ('max_position_embeddings', m.max_seq_len), ('torch_dtype', torch_dtype)):
    keep_or_set(c, key, value)
  keep_or_set(c, 'attention_projection_size', H * K, default=D)
  keep_or_set(c, 'rms_norm_eps', m.norm_eps)
  if not base:
    c['intermediate_size'] = F  # the dense FFN size, unused by MoE layers; M32 sets it to F
  base_freq = layers.rope_base(m.rope_base, m.rotary_dims, m.rope_ntk_factor)
  rope_key = next((k for k in ('rotary_base', 'rope_theta') if k in c), 'rotary_base')
  keep_or_set(c, rope_key, base_freq, default=HF_ROPE_BASE)
  if base_freq != HF_ROPE_BASE:
    log.warning('rotary base %g written as %s: the released HF modelling code ignores it',
                base_freq, rope_key)
  moe = dict(c.get('moe_config') or {})
  for key, value in (('moe_num_experts', m.num_experts), ('moe_top_k', m.router.top_k),
                     ('ffn_hidden_size', F), ('norm_topk_prob', bool(m.router.norm_topk_prob)),
                     ('gated_linear_unit', True)):
    keep_or_set(moe, key, value)
  c['moe_config'] = dict(sorted(moe.items()))
  return c


# ---------------------------------------------------------------- tensors


@dataclasses.dataclass(frozen=True)
class Group:
  """Some HF tensors <-> some yuanjax leaves, for one layer (`per_layer`) or the whole model.

  Per-layer leaf shapes and HF names exclude the layer: the stacked leaf is [num_layers, *shape]
  and '{i}' in a name is the layer index.
  """
  leaves: tuple[tuple[str, ...], ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  hf_names: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  to_jax: Callable[..., tuple[np.ndarray, ...]]
  to_hf: Callable[..., tuple[np.ndarray, ...]]
  per_layer: bool = True

  def names(self, i: int | None) -> list[str]:
    return [n.format(i=i) for n in self.hf_names] if self.per_layer else list(self.hf_names)


def one_group(leaf, leaf_shape, hf, hf_shape, to_jax, to_hf, per_layer=True) -> Group:
  return Group((leaf,), (leaf_shape,), (hf,), (hf_shape,), lambda x: (to_jax(x),), lambda y:
               (to_hf(y),), per_layer)


LAYER, ATTN = ('blocks', 'layer_0'), ('blocks', 'layer_0', 'attention')  # per-layer param paths
HF_LAYER = 'model.layers.{i}.'
_ident = lambda x: x


def head_group(leaf: str, D: int, n: int, K: int, hf: str) -> Group:
  """The attention param `leaf` [D, n, K] <-> HF's [n * K, D] linear `hf` (q, k or v)."""
  return one_group(ATTN + (leaf,), (D, n, K), HF_LAYER + hf, (n * K, D),
                   lambda w: w.reshape(n, K, D).transpose(2, 0, 1),
                   lambda w: w.transpose(1, 2, 0).reshape(n * K, D))


def common_groups(m: ml_collections.ConfigDict) -> dict[str, Group]:
  """The groups HF Yuan and Mixtral lay out alike (Llama's names): the embedding, the final
  and per-layer norms, the value and output projections."""
  V, D, H, K = m.vocab_size, m.hidden_size, m.num_heads, m.head_dim
  norm = lambda leaf, hf, per_layer=True: one_group(leaf, (D,), hf, (D,), _ident, _ident, per_layer)
  groups = {}
  groups['embedding'] = one_group(('embedding',), (V, D), EMBED, (V, D), _ident, _ident, False)
  groups['final_norm'] = norm(('final_norm', 'scale'), 'model.norm.weight', per_layer=False)
  groups['input_norm'] = norm(LAYER + ('input_norm', 'scale'), HF_LAYER + 'input_layernorm.weight')
  groups['wv'] = head_group('wv', D, attention.num_kv_heads(m), K, 'self_attn.v_proj.weight')
  groups['wo'] = one_group(ATTN + ('wo',), (H, K, D), HF_LAYER + 'self_attn.o_proj.weight',
                           (D, H * K), lambda w: w.T.reshape(H, K, D),
                           lambda w: w.reshape(H * K, D).T)
  groups['post_attention_norm'] = norm(LAYER + ('post_attention_norm', 'scale'),
                                       HF_LAYER + 'post_attention_layernorm.weight')
  return groups


def tensor_groups(m: ml_collections.ConfigDict) -> list[Group]:
  """Every HF tensor (lm_head aside) and every yuanjax param, in conversion order."""
  D, H, K, E, F = m.hidden_size, m.num_heads, m.head_dim, m.num_experts, m.moe.ffn_size
  M = D // 2
  ident, T = _ident, (lambda x: x.T)

  def qk_to_jax(q, k):
    s = np.concatenate([q, k], axis=0).reshape(H, 2, K, D)  # quirk 1
    return s[:, 0].transpose(2, 0, 1), s[:, 1].transpose(2, 0, 1)

  def qk_to_hf(wq, wk):
    s = np.stack([wq.transpose(1, 2, 0), wk.transpose(1, 2, 0)], axis=1).reshape(2 * H * K, D)
    return s[:H * K], s[H * K:]

  conv_to_jax = lambda w: w[..., 0].transpose(2, 1, 0)  # [out, in, 2, 1] -> [2, in, out]
  conv_to_hf = lambda k: k.transpose(2, 1, 0)[..., None]
  L, A, p = LAYER, ATTN, HF_LAYER
  c = common_groups(m)
  groups = [
      c['embedding'],
      c['final_norm'],
      c['input_norm'],
      Group((A + ('wq',), A + ('wk',)), ((D, H, K),) * 2,
            (p + 'self_attn.q_proj.weight', p + 'self_attn.k_proj.weight'), ((H * K, D),) * 2,
            qk_to_jax, qk_to_hf),
      c['wv'],
      c['wo'],
      one_group(A + ('lf', 'conv1_kernel'), (2, D, M), p + 'self_attn.lf_gate.conv1.weight',
                (M, D, 2, 1), conv_to_jax, conv_to_hf),
      one_group(A + ('lf', 'conv1_bias'), (M,), p + 'self_attn.lf_gate.conv1.bias', (M,), ident,
                ident),
      one_group(A + ('lf', 'conv2_kernel'), (2, M, D), p + 'self_attn.lf_gate.conv2.weight',
                (D, M, 2, 1), conv_to_jax, conv_to_hf),
      one_group(A + ('lf', 'conv2_bias'), (D,), p + 'self_attn.lf_gate.conv2.bias', (D,), ident,
                ident),
      one_group(A + ('lf', 'norm', 'scale'), (D,), p + 'self_attn.lf_gate.output_layernorm.weight',
                (D,), ident, ident),
      c['post_attention_norm'],
  ]
  for ours, theirs in (('wq', 'query'), ('wk', 'key'), ('wv', 'value')):
    groups.append(
        one_group(L + ('moe', 'router', ours), (D, E), p + f'mlp.gate.{theirs}.weight', (E, D), T,
                  T))
  for w, shape, hf_shape in (('w1', (E, D, 2 * F), (2 * F, D)), ('w2', (E, F, D), (D, F))):
    groups.append(
        Group((L + ('moe', w),), (shape,), tuple(
            p + f'mlp.experts.{e}.{w}.weight' for e in range(E)), (hf_shape,) * E, lambda *ws:
              (np.stack([x.T for x in ws]),), lambda x: tuple(x[e].T for e in range(x.shape[0]))))
  return groups


def hf_shapes_of(groups: list[Group], num_layers: int) -> dict[str, tuple[int, ...]]:
  """{HF name: shape} of every tensor of `groups`."""
  out = {}
  for g in groups:
    for i in (range(num_layers) if g.per_layer else [None]):
      out.update(zip(g.names(i), g.hf_shapes))
  return out


def leaf_shapes_of(groups: list[Group], num_layers: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} of `groups` (per-layer leaves stacked on [num_layers])."""
  out = {}
  for g in groups:
    for leaf, shape in zip(g.leaves, g.leaf_shapes):
      out[leaf] = (num_layers, *shape) if g.per_layer else shape
  return out


def hf_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """{HF name: shape} of every tensor the checkpoint must hold (lm_head aside)."""
  return hf_shapes_of(tensor_groups(m), m.num_layers)


def leaf_shapes(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} the groups produce (per-layer leaves stacked on [num_layers])."""
  return leaf_shapes_of(tensor_groups(m), m.num_layers)
