import json
import subprocess
import sys

import pytest

from yuanjax import config_lib
from yuanjax.stats import decode_bytes_per_step, model_facts


def test_m32_facts_match_paper():
  facts = model_facts(config_lib.m32_model())
  assert abs(facts['total_params'] / 40e9 - 1) < 0.02
  assert abs(facts['active_params'] / 3.7e9 - 1) < 0.02
  assert abs(facts['forward_flops_per_token'] / 7.4e9 - 1) < 0.02


@pytest.mark.parametrize('name,total,active,tol', [('mixtral_8x7b', 46.7e9, 12.9e9, 0.01),
                                                   ('xverse_moe_a4b', 25.8e9, 4.2e9, 0.02)])
def test_baselines_match_published_sizes(name, total, active, tol):
  """Mixtral-8x7B: 46.7B / 12.9B (Jiang et al. 2024); XVERSE-MoE-A4.2B: 25.8B / 4.2B (card)."""
  import importlib
  facts = model_facts(importlib.import_module(f'configs.{name}').get_config().model)
  assert abs(facts['total_params'] / total - 1) < tol
  assert abs(facts['active_params'] / active - 1) < tol


def test_active_params_follow_top_k():
  m = config_lib.m32_model()
  m.router.top_k = 4
  two = model_facts(config_lib.m32_model())
  four = model_facts(m)
  expert = 24 * 32 * 3 * 2048 * 8192
  assert four['total_params'] == two['total_params']
  assert four['active_params'] - two['active_params'] == expert * 2 // 32


def test_cli_prints_json_last_line():
  out = subprocess.run([
      sys.executable, '-m', 'yuanjax.stats', '--config', 'configs/yuan_m32.py',
      '--config.model.num_experts=16'
  ], capture_output=True, text=True, check=True)
  facts = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(facts) >= {'total_params', 'active_params', 'forward_flops_per_token'}
  assert abs(facts['total_params'] / 20.6e9 - 1) < 0.05


def _hand_count(m, batch, context, experts):
  """decode_bytes_per_step's parts counted by hand from the config's sizes."""
  D, H, K, E, F, V, L = (m.hidden_size, m.num_heads, m.head_dim, m.num_experts, m.moe.ffn_size,
                         m.vocab_size, m.num_layers)
  G, lfa = (m.num_kv_heads or H), m.attention_type == 'lfa'
  lf = 2 * D * (D // 2) + D // 2 + 2 * (D // 2) * D + D + D  # convolutions, biases, LF norm
  attn = 2 * D * H * K + 2 * D * G * K + lfa * lf
  embeddings = V * D if m.tie_embeddings else V * D + batch * D  # untied: lm_head + looked-up rows
  moe_layers = L // m.moe_every
  router = {'attention': 3 * D * E, 'linear': D * E, 'shared': D * E}[m.router.type]
  shared = m.router.num_shared_experts * 3 * D * F
  dense_mlp = 3 * D * m.dense_ffn_size
  per_layer = attn + 2 * D  # + the two layer norms
  params = (embeddings + D + L * per_layer + moe_layers * (router + shared) +
            (L - moe_layers) * dense_mlp) * 4  # float32 params
  return dict(
      params=params,
      experts=moe_layers * experts * 3 * D * F * 4,
      kv_cache=L * 2 * batch * context * G * K * 2,  # bfloat16 cache
      lf_state=L * batch * 2 * D * 2 * lfa)


# A shared-expert router, one MoE layer and one dense one.
SHARED_HALF_DENSE = {'router.type': 'shared', 'router.num_shared_experts': 1, 'moe_every': 2}

# 3 rows x top-2 reach 6 of the 8 experts; 8 rows make 16 slots, but there are only 8 experts.
MIXTRAL_SHAPE = {'attention_type': 'standard', 'num_kv_heads': 2, 'tie_embeddings': False}


@pytest.mark.parametrize('batch, reach, overrides', [(3, 6, {}), (8, 8, SHARED_HALF_DENSE),
                                                     (3, 6, MIXTRAL_SHAPE)])
def test_decode_bytes_per_step_equals_a_hand_count(batch, reach, overrides):
  m = config_lib.tiny_model()
  m.dtype = 'bfloat16'
  config_lib.override(m, overrides)
  got = decode_bytes_per_step(m, batch=batch, context=10.5)
  want = _hand_count(m, batch, 10.5, experts=reach)
  assert got == pytest.approx({**want, 'total': sum(want.values())}, rel=1e-12)


def test_decode_bytes_per_step_reads_the_experts_measured():
  m = config_lib.tiny_model()
  got = decode_bytes_per_step(m, batch=3, context=1, experts_per_layer=2.5)['experts']
  assert got == pytest.approx(_hand_count(m, 3, 1, experts=2.5)['experts'])
