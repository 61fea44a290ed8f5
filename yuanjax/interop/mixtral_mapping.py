"""Mixtral (HF `MixtralForCausalLM`) <-> yuanjax: the config fields and the tensor layout.

Config (HF config.json -> config.model, on `config_lib.mixtral_model()`):
  hidden_size -> hidden_size             num_attention_heads -> num_heads
  num_key_value_heads (= heads) -> num_kv_heads     num_hidden_layers -> num_layers
  head_dim (default hidden_size // heads) -> head_dim and rotary_dims (rotary on every dim)
  rope_theta (1e6; or rope_parameters.rope_theta) -> rope_base     rms_norm_eps -> norm_eps
  max_position_embeddings -> max_seq_len  vocab_size -> vocab_size
  num_local_experts -> num_experts       num_experts_per_tok -> router.top_k
  intermediate_size -> moe.ffn_size
  router_aux_loss_coef (0.02) -> router.load_balance_weight = coef x top_k / layers (yuanjax's
  loss is per layer and summed, HF's pooled over layers: routers.weight_from_pooled_coef)
  router_jitter_noise -> router.jitter_eps (training only; HF jitters the experts' input too,
  yuanjax the router's only), and router.type 'linear', norm_topk_prob, untied lm_head,
  standard attention, moe.dispatch 'dropless' (HF drops no token).
Refused, with one error listing every problem: model_type other than mixtral, hidden_act
other than silu, a sliding_window shorter than max_position_embeddings (yuanjax attends to
the whole context), rope_scaling (or a rope_parameters.rope_type other than default),
tie_word_embeddings true, heads not a multiple of kv heads, missing size fields.

Tensors (`tensor_groups`); HF linears are [out, in], yuanjax kernels [in, ...out]:
  model.embed_tokens.weight [V, D] -> embedding;  lm_head.weight [V, D] -> lm_head (as is)
  model.norm.weight -> final_norm/scale
  layers.i.input_layernorm / post_attention_layernorm.weight -> input_norm / post_attention_norm
  self_attn.q_proj [H*K, D] -> wq [D, H, K];  k_proj, v_proj [Hkv*K, D] -> wk, wv [D, Hkv, K]
  self_attn.o_proj [D, H*K] -> wo [H, K, D]
  block_sparse_moe.gate.weight [E, D] -> moe/router/w [D, E]
  block_sparse_moe.experts.e.w1, w3 [F, D] -> moe/w1[e] [D, 2F] = [w1.T | w3.T] (gate | up)
  block_sparse_moe.experts.e.w2 [D, F] -> moe/w2[e] [F, D]
No head permutation: HF Mixtral's rotary is rotate-half over the whole head, as yuanjax's.
Every map is a transpose/reshape/concatenation, so HF -> yuanjax -> HF is bit-exact.
"""
from __future__ import annotations

import copy

import ml_collections
import numpy as np

from yuanjax import config_lib
from yuanjax.interop import hf_mapping
from yuanjax.interop.hf_mapping import (LM_HEAD, Group, keep_or_set, one_group, raise_problems)
from yuanjax.model import attention, moe, routers

MODEL_TYPE = 'mixtral'
TIED_LM_HEAD = False  # lm_head.weight is a tensor of its own, mapped like any other
HF_MAX_POSITIONS = 4096 * 32  # MixtralConfig's default max_position_embeddings
_SIZES = ('hidden_size', 'num_attention_heads', 'num_hidden_layers', 'vocab_size',
          'intermediate_size', 'num_local_experts', 'num_experts_per_tok')

# What Mixtral-8x7B-v0.1's config.json sets besides the sizes; for exports of models that were
# not imported from HF (an imported model re-uses its source config.json).
DEFAULT_HF_CONFIG = {
    'architectures': ['MixtralForCausalLM'],
    'attention_dropout': 0.0,
    'bos_token_id': 1,
    'eos_token_id': 2,
    'hidden_act': 'silu',
    'initializer_range': 0.02,
    'model_type': 'mixtral',
    'output_router_logits': False,
    'router_aux_loss_coef': 0.02,
    'sliding_window': None,
    'tie_word_embeddings': False,
    'use_cache': True,
}


def tokenizer_options(tokenizer_config: dict | None = None) -> dict:
  """yuanjax.data.tokenizer.Tokenizer's options for Mixtral's (Llama's) tokenizer.model, as HF's
  LlamaTokenizer loads it with `tokenizer_config` (a tokenizer_config.json dict; Mixtral's when
  None): no <eod> piece, its eos '</s>' plays it (and pads), every text starts with its bos
  '<s>' (add_bos_token), and its special tokens are split out of texts."""
  from yuanjax.data.tokenizer import hf_special_tokens  # pylint: disable=g-import-not-at-top
  config = tokenizer_config or {}
  special = hf_special_tokens(config)
  more = [
      t.get('content') if isinstance(t, dict) else t
      for t in config.get('additional_special_tokens') or ()
  ]
  eos = special['eos_token']
  return dict(aliases={
      '<eod>': eos,
      '<pad>': special.get('pad_token', eos)
  }, bos_token=special['bos_token'] if config.get('add_bos_token', True) else None,
              added_tokens=tuple(special.values()) + tuple(more))


# ---------------------------------------------------------------- config


def _rope_theta(c: dict, problems: list) -> float:
  params = c.get('rope_parameters') or {}
  if params.get('rope_type', 'default') != 'default':
    problems.append(f'rope_parameters.rope_type={params["rope_type"]!r}: only default rotary')
  for key in sorted(set(params) - {'rope_type', 'rope_theta'}):
    problems.append(f'rope_parameters.{key}={params[key]!r}: only rope_type and rope_theta map')
  if c.get('rope_scaling'):
    problems.append(f'rope_scaling={c["rope_scaling"]!r}: only unscaled rotary (null)')
  if c.get('partial_rotary_factor', 1.0) != 1.0:
    problems.append(f'partial_rotary_factor={c["partial_rotary_factor"]!r}: Mixtral rotates '
                    'every head dim (1.0)')
  return float(params.get('rope_theta', c.get('rope_theta', 1e6)))


def _problems(c: dict) -> list[str]:
  """What in a Mixtral config.json yuanjax cannot compute exactly (sizes present)."""
  problems = []
  H, Hkv = c['num_attention_heads'], c.get('num_key_value_heads') or c['num_attention_heads']
  if H % Hkv:
    problems.append(f'num_key_value_heads={Hkv} does not divide num_attention_heads={H}')
  if c.get('hidden_act', 'silu') != 'silu':
    problems.append(f'hidden_act={c["hidden_act"]!r}: only silu (SwiGLU experts) is supported')
  window, ctx = c.get('sliding_window'), c.get('max_position_embeddings', HF_MAX_POSITIONS)
  if window is not None and window < ctx:
    problems.append(
        f'sliding_window={window} < max_position_embeddings={ctx}: yuanjax attends to the '
        'whole context (set sliding_window to null if you only use contexts <= the window)')
  if c.get('tie_word_embeddings', False):
    problems.append('tie_word_embeddings=true: a Mixtral import expects an untied lm_head')
  if c.get('num_experts_per_tok', 0) > c.get('num_local_experts', 0):
    problems.append(f'num_experts_per_tok={c["num_experts_per_tok"]} > num_local_experts='
                    f'{c["num_local_experts"]}')
  return problems


def model_config_from_hf(c: dict) -> ml_collections.ConfigDict:
  """config.model for an HF Mixtral config.json dict (see the module docstring)."""
  problems = [f'missing field {k!r}' for k in _SIZES if k not in c]
  raise_problems(problems, 'config.json (mixtral) cannot be mapped to a yuanjax model')
  problems = _problems(c)
  theta = _rope_theta(c, problems)
  raise_problems(problems, 'config.json (mixtral) cannot be mapped to a yuanjax model')
  D, H, F = c['hidden_size'], c['num_attention_heads'], c['intermediate_size']
  K = c.get('head_dim') or D // H
  m = config_lib.mixtral_model()
  m.update(
      dict(vocab_size=c['vocab_size'], hidden_size=D, num_layers=c['num_hidden_layers'],
           num_heads=H, num_kv_heads=c.get('num_key_value_heads') or H, head_dim=K, rotary_dims=K,
           rope_base=theta, rope_ntk_factor=1.0, num_experts=c['num_local_experts'], moe_every=1,
           dense_ffn_size=F))
  m.max_seq_len = int(c.get('max_position_embeddings', HF_MAX_POSITIONS))
  m.norm_eps = float(c.get('rms_norm_eps', 1e-5))
  m.router.update(dict(type='linear', top_k=c['num_experts_per_tok'], norm_topk_prob=True))
  m.router.jitter_eps = float(c.get('router_jitter_noise') or 0.0)
  m.router.load_balance_weight = routers.weight_from_pooled_coef(
      float(c.get('router_aux_loss_coef', 0.02)), m.router.top_k, m.num_layers)
  m.moe.ffn_size = F
  m.moe.dispatch = moe.inference_dispatch(m.moe.dispatch)
  config_lib.validate_model(m)
  return m


def exportable(m: ml_collections.ConfigDict) -> None:
  """Raises HFConfigError listing why config.model has no HF Mixtral equivalent, if none."""
  problems = []
  if m.attention_type != 'standard':
    problems.append(f'attention_type={m.attention_type!r}: Mixtral is standard')
  if m.tie_embeddings:
    problems.append('tie_embeddings=True: Mixtral has an untied lm_head')
  if m.moe_every != 1:
    problems.append(f'moe_every={m.moe_every}: Mixtral has every layer MoE')
  if m.router.type != 'linear' or not m.router.norm_topk_prob:
    problems.append(f'router.type={m.router.type!r}, norm_topk_prob={m.router.norm_topk_prob}: '
                    'Mixtral routes linear, renormalised over the top-k')
  if m.router.num_shared_experts or m.router.noisy_topk:
    problems.append('router.num_shared_experts / noisy_topk: Mixtral has neither')
  if m.rope_hf_bf16:
    problems.append('rope_hf_bf16=True: HF Mixtral computes its rotary angles in float32')
  if m.rotary_dims != m.head_dim or m.rope_ntk_factor != 1.0:
    problems.append(f'rotary_dims={m.rotary_dims}, rope_ntk_factor={m.rope_ntk_factor}: Mixtral '
                    f'rotates all head_dim={m.head_dim} dims at the plain base')
  raise_problems(problems, 'this model cannot be exported to the HF Mixtral format')


def _hf_sizes(m: ml_collections.ConfigDict) -> dict:
  """The config.json size fields of config.model."""
  return {
      'hidden_size': m.hidden_size,
      'intermediate_size': m.moe.ffn_size,
      'num_attention_heads': m.num_heads,
      'num_key_value_heads': attention.num_kv_heads(m),
      'num_hidden_layers': m.num_layers,
      'vocab_size': m.vocab_size,
      'max_position_embeddings': m.max_seq_len,
      'rms_norm_eps': m.norm_eps,
      'num_local_experts': m.num_experts,
      'num_experts_per_tok': m.router.top_k,
  }


def _set_aux_coef(c: dict, m: ml_collections.ConfigDict) -> None:
  """router_aux_loss_coef for router.load_balance_weight (the source's value when it maps to
  the same weight: bit-exact round trips)."""
  to_weight = lambda coef: routers.weight_from_pooled_coef(coef, m.router.top_k, m.num_layers)
  if 'router_aux_loss_coef' in c and to_weight(
      c['router_aux_loss_coef']) == (m.router.load_balance_weight):
    return
  c['router_aux_loss_coef'] = m.router.load_balance_weight * m.num_layers / m.router.top_k


def hf_config_from_model(m: ml_collections.ConfigDict, base: dict | None, torch_dtype: str) -> dict:
  """config.json for config.model: `base` (the imported source's config.json) or the defaults."""
  exportable(m)
  c = copy.deepcopy(base) if base else copy.deepcopy(DEFAULT_HF_CONFIG)
  for key, value in _hf_sizes(m).items():
    keep_or_set(c, key, value)
  dtype_key = 'dtype' if 'dtype' in c and 'torch_dtype' not in c else 'torch_dtype'  # v5: dtype
  keep_or_set(c, dtype_key, torch_dtype)
  if 'rope_parameters' in c:  # transformers >= 5
    c['rope_parameters'] = dict(c['rope_parameters'])
    keep_or_set(c['rope_parameters'], 'rope_theta', m.rope_base)
  else:
    keep_or_set(c, 'rope_theta', m.rope_base)
  keep_or_set(c, 'router_jitter_noise', m.router.jitter_eps, default=0.0)
  _set_aux_coef(c, m)
  if c.get('head_dim') or m.head_dim != m.hidden_size // m.num_heads:
    keep_or_set(c, 'head_dim', m.head_dim)
  raise_problems(_problems(c),
                 'the exported config.json would not describe this model (fix the base)')
  return c


# ---------------------------------------------------------------- tensors


def _experts_w1(E: int, F: int) -> tuple:
  """(to_jax, to_hf) of the w1/w3 pairs of E experts <-> w1 [E, D, 2F] (gate | up)."""

  def to_jax(*ws):
    return (np.stack([np.concatenate([ws[2 * e].T, ws[2 * e + 1].T], 1) for e in range(E)]),)

  def to_hf(w1):
    return tuple(x for e in range(E) for x in (w1[e][:, :F].T, w1[e][:, F:].T))

  return to_jax, to_hf


def tensor_groups(m: ml_collections.ConfigDict) -> list[Group]:
  """Every HF tensor and every yuanjax param, in conversion order."""
  V, D, H, K = m.vocab_size, m.hidden_size, m.num_heads, m.head_dim
  E, F = m.num_experts, m.moe.ffn_size
  ident, T = (lambda x: x), (lambda x: x.T)
  L, p = hf_mapping.LAYER, hf_mapping.HF_LAYER
  w1_to_jax, w1_to_hf = _experts_w1(E, F)
  x = p + 'block_sparse_moe.experts.'
  c = hf_mapping.common_groups(m)
  return [
      c['embedding'],
      c['final_norm'],
      one_group(('lm_head',), (V, D), LM_HEAD, (V, D), ident, ident, per_layer=False),
      c['input_norm'],
      hf_mapping.head_group('wq', D, H, K, 'self_attn.q_proj.weight'),
      hf_mapping.head_group('wk', D, attention.num_kv_heads(m), K, 'self_attn.k_proj.weight'),
      c['wv'],
      c['wo'],
      c['post_attention_norm'],
      one_group(L + ('moe', 'router', 'w'), (D, E), p + 'block_sparse_moe.gate.weight', (E, D), T,
                T),
      Group((L + ('moe', 'w1'),), ((E, D, 2 * F),),
            tuple(x + f'{e}.{w}.weight' for e in range(E) for w in ('w1', 'w3')),
            ((F, D),) * (2 * E), w1_to_jax, w1_to_hf),
      Group((L + ('moe', 'w2'),), ((E, F, D),), tuple(x + f'{e}.w2.weight' for e in range(E)),
            ((D, F),) * E, lambda *ws: (np.stack([w.T for w in ws]),),
            lambda w2: tuple(w2[e].T for e in range(E))),
  ]


def hf_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """{HF name: shape} of every tensor the checkpoint must hold."""
  return hf_mapping.hf_shapes_of(tensor_groups(m), m.num_layers)


def leaf_shapes(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} the groups produce (per-layer leaves stacked on [num_layers])."""
  return hf_mapping.leaf_shapes_of(tensor_groups(m), m.num_layers)
