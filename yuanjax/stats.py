"""Model facts from abstract shapes (jax.eval_shape: nothing is allocated).

  python -m yuanjax.stats --config configs/yuan_m32.py [--config.model.num_experts=16]

Prints a human summary, then (last line) one JSON object:
  total_params             every parameter (a tied embedding counted once, an lm_head too)
  active_params            parameters one token uses: all non-expert params, top_k/E of
                           the routed expert params, all shared-expert params
  router_params            the routers' parameters (all layers)
  forward_flops_per_token  2 x active matmul weights (the paper's convention: excludes the
                           attention score/value products, which depend on sequence length)
  attention_flops_per_token  those products at config.model.max_seq_len (causal, averaged)

`decode_bytes_per_step` counts the bytes a cached decode step reads (the decode roofline).
"""
from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app
from ml_collections import config_flags

from yuanjax import config_lib, train_state
from yuanjax.model import attention


def model_facts(model_cfg) -> dict:
  config_lib.validate_model(model_cfg)
  params = train_state.abstract_params(model_cfg, boxed=True)
  total = active = matmul_active = router = 0.0
  moe_frac = (model_cfg.router.top_k / model_cfg.num_experts) if model_cfg.moe_every else 0.0
  tied = model_cfg.tie_embeddings
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
    shape = leaf.value.shape if isinstance(leaf, nn.LogicallyPartitioned) else leaf.shape
    n = float(math.prod(shape))
    share = moe_frac if 'expert' in names else 1.0
    total += n
    active += n * share
    router += n if any(getattr(k, 'key', None) == 'router' for k in path) else 0.0
    lookup_only = not tied and _is_embedding(path)  # an untied embedding is only looked up
    if len([a for a in names if a != 'layers']) >= 2 and not lookup_only:
      matmul_active += n * share  # weight matrices, convs, lm head (the tied embedding)
  return dict(total_params=int(total), active_params=int(active), router_params=int(router),
              forward_flops_per_token=2.0 * matmul_active,
              attention_flops_per_token=attention_flops_per_token(model_cfg))


def _is_embedding(path) -> bool:
  return [getattr(k, 'key', None) for k in path][:1] == ['embedding']


def attention_flops_per_token(model_cfg, seq_len: int | None = None) -> float:
  """Forward FLOPs of the attention products per token, causal, at seq_len (default
  max_seq_len): QK^T and AV each 2 * H * K * (mean context (L+1)/2), every layer."""
  m, L = model_cfg, seq_len or model_cfg.max_seq_len
  return float(2 * 2 * m.num_heads * m.head_dim * (L + 1) / 2 * m.num_layers)


def decode_bytes_per_step(model_cfg, batch: int, context: float,
                          experts_per_layer: float | None = None) -> dict:
  """Bytes one cached decode step (one new token in each of `batch` rows) must read from
  device memory: what a step that reads nothing twice and nothing it does not need reads, the
  memory-bandwidth roofline's numerator (`benchmarks/decode.py`).

    params      every non-expert parameter once (the tied embedding, as the LM head, or an
                untied lm_head, whose embedding is only looked up (`batch` rows); attention,
                LF convolutions, norms, routers, dense MLPs, shared experts), in
                config.model.param_dtype (the step reads them so and casts them)
    experts     per MoE layer, `experts_per_layer` of its E routed experts (w1 and w2); by
                default min(E, batch x top_k), the most a step's tokens can reach
    kv_cache    per layer, the keys and values (num_kv_heads of them) of `context` positions
                per row (the tokens attended to, the new one included), in config.model.dtype
    lf_state    per layer, the LFA state (the last two LF inputs per row), config.model.dtype;
                0 for standard attention
    total       their sum

  Not counted: writes (the new keys/values and LF state), activations, the cache index.
  """
  config_lib.validate_model(model_cfg)
  m = model_cfg
  param_bytes = jnp.dtype(m.param_dtype).itemsize
  act_bytes = jnp.dtype(m.dtype).itemsize
  E = m.num_experts
  G, lfa = attention.num_kv_heads(m), m.attention_type == 'lfa'
  reach = min(E, batch * m.router.top_k) if experts_per_layer is None else experts_per_layer
  dense = expert = 0
  params = train_state.abstract_params(m, boxed=True)
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    n = math.prod(leaf.value.shape) * param_bytes
    if not m.tie_embeddings and _is_embedding(path):
      dense += min(batch, m.vocab_size) * m.hidden_size * param_bytes
    elif 'expert' in leaf.names:
      expert += n
    else:
      dense += n
  out = dict(params=float(dense), experts=expert * reach / E,
             kv_cache=2.0 * m.num_layers * batch * context * G * m.head_dim * act_bytes,
             lf_state=2.0 * m.num_layers * batch * m.hidden_size * act_bytes * lfa)
  out['total'] = sum(out.values())
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  facts = model_facts(config.model)
  print(f"total params        {facts['total_params'] / 1e9:8.3f} B")
  print(f"active params/token {facts['active_params'] / 1e9:8.3f} B")
  print(f"forward GFLOPs/token {facts['forward_flops_per_token'] / 1e9:7.3f} "
        f"(+{facts['attention_flops_per_token'] / 1e9:.3f} attention at seq "
        f"{config.model.max_seq_len})")
  print(json.dumps(facts))


if __name__ == '__main__':
  # Flags are defined here, not at import, so the trainer can import this module.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                            lock_config=True)
  app.run(main)
