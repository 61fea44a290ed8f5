"""A NumPy transcription of Hugging Face transformers' `MixtralForCausalLM` forward pass.

Written from transformers' modeling_mixtral.py, operation by operation and in HF's layout
(HF tensor names, [out, in] linears), sharing no code with yuanjax: float64 throughout,
batch-first, no KV cache, positions 0..L-1, plain causal mask; the primitives (RMSNorm,
softmax, silu, rotate_half) are the Yuan reference's (tests/interop/hf_reference.py).
  MixtralRMSNorm            w * x / sqrt(mean(x^2) + eps)
  MixtralRotaryEmbedding    inv_freq = 1 / theta^(2i / head_dim), emb = cat(freqs, freqs);
  apply_rotary_pos_emb      q * cos + rotate_half(q) * sin (rotate_half: cat(-x2, x1))
  repeat_kv                 kv head j serves query heads j*n_rep .. j*n_rep + n_rep - 1
  eager attention           softmax(q k^T / sqrt(head_dim) + causal mask) v, o_proj
  MixtralSparseMoeBlock     softmax(gate(x)) -> top-k -> renormalised over the k ->
                            sum_k w_k * w2(silu(w1 x) * w3 x)
  lm_head                   untied [V, D]
Also a tiny config and random tensors in the exact HF layout.
"""
from __future__ import annotations

import numpy as np

from tests.interop.hf_reference import rms_norm, rotate_half, silu, softmax  # HF primitives

f64 = np.float64


def tiny_config(**kw) -> dict:
  """hidden 32, 4 heads / 2 kv heads of head_dim 8, 2 layers, 4 experts top-2 of ffn 24,
  vocab 97, rope_theta 1000 (so that a wrong base shows at 13 positions)."""
  c = {
      'architectures': ['MixtralForCausalLM'],
      'attention_dropout': 0.0,
      'bos_token_id': 1,
      'eos_token_id': 2,
      'hidden_act': 'silu',
      'hidden_size': 32,
      'initializer_range': 0.02,
      'intermediate_size': 24,
      'max_position_embeddings': 64,
      'model_type': 'mixtral',
      'num_attention_heads': 4,
      'num_experts_per_tok': 2,
      'num_hidden_layers': 2,
      'num_key_value_heads': 2,
      'num_local_experts': 4,
      'output_router_logits': False,
      'rms_norm_eps': 1e-05,
      'rope_theta': 1000.0,
      'router_aux_loss_coef': 0.02,
      'router_jitter_noise': 0.0,
      'sliding_window': None,
      'tie_word_embeddings': False,
      'torch_dtype': 'float32',
      'transformers_version': '4.46.0',
      'use_cache': True,
      'vocab_size': 97,
  }
  c.update(kw)
  return c


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """Every tensor of a MixtralForCausalLM checkpoint."""
  D, V, F = c['hidden_size'], c['vocab_size'], c['intermediate_size']
  H, Hkv = c['num_attention_heads'], c['num_key_value_heads']
  K = c.get('head_dim') or D // H
  s = {'model.embed_tokens.weight': (V, D)}
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    s.update({
        p + 'input_layernorm.weight': (D,),
        p + 'self_attn.q_proj.weight': (H * K, D),
        p + 'self_attn.k_proj.weight': (Hkv * K, D),
        p + 'self_attn.v_proj.weight': (Hkv * K, D),
        p + 'self_attn.o_proj.weight': (D, H * K),
        p + 'post_attention_layernorm.weight': (D,),
        p + 'block_sparse_moe.gate.weight': (c['num_local_experts'], D),
    })
    for e in range(c['num_local_experts']):
      x = p + f'block_sparse_moe.experts.{e}.'
      s.update({x + 'w1.weight': (F, D), x + 'w2.weight': (D, F), x + 'w3.weight': (F, D)})
  s['model.norm.weight'] = (D,)
  s['lm_head.weight'] = (V, D)
  return s


def random_tensors(c: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random weights; norms near 1, a router bold enough that routing matters."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in hf_shapes(c).items():
    if name.endswith('norm.weight'):
      a = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith('gate.weight'):
      a = rng.standard_normal(shape)
    else:
      a = rng.standard_normal(shape) / np.sqrt(shape[1])
    out[name] = a.astype(dtype)
  return out


def rotary(K: int, L: int, theta: float):
  inv_freq = 1.0 / theta**(np.arange(0, K, 2, dtype=f64) / K)
  emb = np.tile(np.multiply.outer(np.arange(L, dtype=f64), inv_freq), 2)
  return np.cos(emb), np.sin(emb)


def attention(w, p, h, c):
  """MixtralAttention (eager) on normed h [B, L, D]."""
  B, L, _ = h.shape
  H, Hkv = c['num_attention_heads'], c['num_key_value_heads']
  K = c.get('head_dim') or c['hidden_size'] // H
  heads = lambda name, n: (h @ w[p + name].T).reshape(B, L, n, K).transpose(0, 2, 1, 3)
  q, k, v = heads('q_proj.weight', H), heads('k_proj.weight', Hkv), heads('v_proj.weight', Hkv)
  theta = (c.get('rope_parameters') or {}).get('rope_theta', c.get('rope_theta', 1e6))  # v5
  cos, sin = rotary(K, L, theta)
  q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
  k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # repeat_kv
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(K)
  scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
  o = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(B, L, H * K)
  return o @ w[p + 'o_proj.weight'].T


def sparse_moe(w, p, h, c):
  """MixtralSparseMoeBlock on h [T, D]: (output [T, D], chosen experts [T, k])."""
  probs = softmax(h @ w[p + 'gate.weight'].T)
  chosen = np.argsort(-probs, axis=-1, kind='stable')[:, :c['num_experts_per_tok']]
  weights = np.take_along_axis(probs, chosen, -1)
  weights = weights / weights.sum(-1, keepdims=True)
  y = np.zeros_like(h)
  for t in range(h.shape[0]):
    for slot, e in enumerate(chosen[t]):
      x = p + f'experts.{e}.'
      gate, up = w[x + 'w1.weight'] @ h[t], w[x + 'w3.weight'] @ h[t]
      y[t] += weights[t, slot] * (w[x + 'w2.weight'] @ (silu(gate) * up))
  return y, chosen


def forward(w: dict[str, np.ndarray], c: dict, tokens_BxL, return_experts=False):
  """Logits [B, L, V] in float64 (and the chosen experts [layers, B, L, k] if asked)."""
  w = {k: np.asarray(v).astype(f64) for k, v in w.items()}
  eps = c['rms_norm_eps']
  B, L = tokens_BxL.shape
  x = w['model.embed_tokens.weight'][tokens_BxL]
  experts = []
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    x = x + attention(w, p + 'self_attn.', rms_norm(x, w[p + 'input_layernorm.weight'], eps), c)
    h = rms_norm(x, w[p + 'post_attention_layernorm.weight'], eps).reshape(B * L, -1)
    y, chosen = sparse_moe(w, p + 'block_sparse_moe.', h, c)
    x = x + y.reshape(x.shape)
    experts.append(chosen.reshape(B, L, -1))
  logits = rms_norm(x, w['model.norm.weight'], eps) @ w['lm_head.weight'].T
  return (logits, np.stack(experts)) if return_experts else logits
