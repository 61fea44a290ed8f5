"""yuanjax.cost: model sizes and FLOPs, decode bytes, the device table (and the stats CLI)."""
import json
import math
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from yuanjax import config_lib, cost, train_state
from yuanjax.cost import decode_bytes_per_step, model_facts
from yuanjax.model import routers


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


def matmul_flops_from_params(m) -> float:
  """2 x the active matmul weights, walking the abstract params: every leaf with two or more
  logical axes besides 'layers' (kernels, convolutions, the tied embedding as the LM head; an
  untied embedding is only looked up), routed experts at top_k / E."""
  params = train_state.abstract_params(m, boxed=True)
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  total = 0.0
  for path, leaf in leaves:
    lookup = not m.tie_embeddings and path[0].key == 'embedding'
    if len([a for a in leaf.names if a != 'layers']) >= 2 and not lookup:
      share = m.router.top_k / m.num_experts if 'expert' in leaf.names else 1.0
      total += 2 * math.prod(leaf.value.shape) * share
  return total


@pytest.mark.parametrize('overrides', [
    {},
    {
        'router.type': 'linear',
        'router.noisy_topk': True
    },
    {
        'router.type': 'shared',
        'router.num_shared_experts': 2
    },
    {
        'router.type': 'expert_choice'
    },
    {
        'attention_type': 'standard',
        'num_kv_heads': 2,
        'tie_embeddings': False
    },
    {
        'moe_every': 2,
        'num_layers': 4
    },
    {
        'moe_every': 0
    },
])
def test_forward_flops_are_twice_the_active_matmul_weights(overrides):
  """The FLOPs, counted part by part from the sizes (and each router's own count), are those of
  the model's params: the two stay in step when either changes."""
  m = config_lib.tiny_model()
  config_lib.override(m, overrides)
  assert model_facts(m)['forward_flops_per_token'] == matmul_flops_from_params(m)


def test_router_flops_are_what_each_router_class_declares():
  m = config_lib.tiny_model()
  D, E = m.hidden_size, m.num_experts
  assert routers.ROUTERS['attention'].flops_per_token(m) == 3 * 2 * D * E
  assert routers.ROUTERS['linear'].flops_per_token(m) == 2 * D * E
  m.router.noisy_topk = True  # + the noise projection
  assert routers.ROUTERS['linear'].flops_per_token(m) == 2 * 2 * D * E
  assert cost.forward_flops_by_part(m)['router'] == m.num_layers * 4 * 2 * D * E


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


# The device table: which entry each JAX device_kind string finds.


def test_device_names_are_their_own_aliases():
  assert cost.planned_devices() == ['H100-80G', 'H200', 'TPU v5e', 'TPU v5p', 'TPU v6e']
  for name in cost.DEVICES:
    assert cost.device_name(name) == name
  assert {name for _, name in cost.ALIASES} == set(cost.DEVICES)
  assert cost.device_name('NVIDIA H100 80GB HBM3') == 'H100-80G'
  assert cost.device_name('TPU v5') == 'TPU v5p' and cost.device_name('cpu') is None
  assert cost.memory_gib('NVIDIA H200') == 141 and cost.memory_gib('NVIDIA L4') is None
  assert cost.peak_flops('TPU v5p', 'float32') is None  # only bfloat16 peaks are listed


@pytest.mark.parametrize(
    'kind, bandwidth',
    [
        ('NVIDIA H100 80GB HBM3', 3.35e12),
        ('NVIDIA H100 PCIe', 2.0e12),
        ('NVIDIA H200', 4.8e12),
        ('NVIDIA A100-SXM4-40GB', 1.555e12),
        ('NVIDIA A100-SXM4-80GB', 2.039e12),
        ('NVIDIA L40S', 864e9),
        ('NVIDIA L4', 300e9),
        ('TPU v4', 1.2e12),
        ('TPU v5 lite', 819e9),  # v5e
        ('TPU v5', 2.765e12),  # v5p
        ('TPU v6 lite', 1.638e12),  # v6e
        ('cpu', None),
    ])
def test_memory_bandwidth_by_device_kind(kind, bandwidth):
  assert cost.memory_bandwidth(kind) == bandwidth
  want = None if bandwidth is None else 0.25
  assert cost.roofline_fraction(0.25 * (bandwidth or 1.0), kind) == want


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA L40S', 362e12),
    ('NVIDIA L4', 121e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
    ('cpu', None),
])
def test_peak_flops_by_device_kind(kind, peak):
  assert cost.peak_flops(kind) == peak


def test_the_slurm_launcher_offers_the_gpus_the_planner_knows():
  """launch/ imports no jax, so gpu_slurm keeps its own list: it must be cost's."""
  from launch import gpu_slurm  # pylint: disable=g-import-not-at-top
  assert set(gpu_slurm.GPU_KINDS) == {n for n, d in cost.DEVICES.items() if d.gpu and d.memory_gib}
