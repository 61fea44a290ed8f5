"""What a model costs and what a device offers: the one owner of both.

Model, from config.model (FLOPs: arithmetic on the sizes; parameters and decode bytes: a walk
of the abstract params, jax.eval_shape, nothing allocated):
  model_facts                total / active / router params, forward FLOPs per token
  forward_flops_by_part      forward FLOPs per token by part (`step_cost.PARTS`): each
                             matmul of the active params, 2 x its weights (the router's as
                             its class says: `routers.Router.flops_per_token`), and the
                             attention products, causal, at a sequence length
  train_flops_per_token      forward + backward (3 x forward) at train.seq_len: what MFU
                             divides by; `train_flops_by_part` the same by part, which
                             `yuanjax.step_cost` sets against the compiled step
  decode_bytes_per_step      the bytes a cached decode step reads (the decode roofline)

Devices: `DEVICES`, vendor spec-sheet facts under one name per device (the names `python -m
yuanjax.plan --device_kind` takes), and `ALIASES`, the one map from JAX's `device_kind`
('NVIDIA H100 80GB HBM3', 'TPU v5 lite') to those names. `peak_flops`, `memory_bandwidth`,
`memory_gib`, `mfu` and `roofline_fraction` take either; each is None for an unknown device
(the CPU).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from yuanjax import config_lib, train_state
from yuanjax.model import attention, routers

# ---------------------------------------------------------------- the model


def attention_flops_per_token(m, seq_len: int | None = None) -> float:
  """Forward FLOPs of the attention products per token, causal, at seq_len (default
  max_seq_len): QK^T and AV each 2 * H * K * (mean context (L+1)/2), every layer."""
  L = seq_len or m.max_seq_len
  return float(2 * 2 * m.num_heads * m.head_dim * (L + 1) / 2 * m.num_layers)


def num_moe_layers(m) -> int:
  return 0 if m.moe_every == 0 else m.num_layers // m.moe_every


def forward_flops_by_part(m, seq_len: int | None = None) -> dict[str, float]:
  """Forward FLOPs per token of config.model `m` by part, attention at seq_len
  (default max_seq_len). An untied embedding is only looked up (no FLOPs); the tied one is
  the LM head."""
  D, H, K, E, F = m.hidden_size, m.num_heads, m.head_dim, m.num_experts, m.moe.ffn_size
  G, lfa = attention.num_kv_heads(m), m.attention_type == 'lfa'
  n_moe = num_moe_layers(m)
  router = routers.router_class(m.router.type).flops_per_token(m) if n_moe else 0
  return dict(
      router=router * n_moe,
      experts=2 * 3 * D * F * (m.router.top_k + m.router.num_shared_experts) * n_moe,
      dense_ffn=2 * 3 * D * m.dense_ffn_size * (m.num_layers - n_moe),
      lf_conv=2 * 2 * 2 * D * (D // 2) * m.num_layers * lfa,
      qkvo_proj=2 * 2 * D * (H + G) * K * m.num_layers,
      attention=attention_flops_per_token(m, seq_len),
      lm_head=2 * m.vocab_size * D,
  )


def train_flops_by_part(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Per token, forward + backward (3 x forward) at train.seq_len, by part."""
  parts = forward_flops_by_part(config.model, config.train.seq_len)
  return {k: 3.0 * v for k, v in parts.items()}


def train_flops_per_token(config: ml_collections.ConfigDict) -> float:
  """Model FLOPs of training per token (`train_flops_by_part` summed): what MFU divides by."""
  return sum(train_flops_by_part(config).values())


def _param_leaves(m):
  """(path, logical axis names, shape) of every param of config.model `m` (abstract)."""
  params = train_state.abstract_params(m, boxed=True)
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return [(path, leaf.names, leaf.value.shape) for path, leaf in leaves]


def _is_embedding(path) -> bool:
  return [getattr(k, 'key', None) for k in path][:1] == ['embedding']


def model_facts(m) -> dict:
  """total_params (a tied embedding counted once, an lm_head too); active_params (what one
  token uses: all non-expert params, top_k/E of the routed expert params, all shared-expert
  params); router_params (all layers); forward_flops_per_token (every part but attention:
  2 x the active matmul weights, the paper's convention); attention_flops_per_token (those
  products at max_seq_len)."""
  config_lib.validate_model(m)
  moe_frac = (m.router.top_k / m.num_experts) if m.moe_every else 0.0
  total = active = router = 0.0
  for path, names, shape in _param_leaves(m):
    n = float(math.prod(shape))
    total += n
    active += n * (moe_frac if 'expert' in names else 1.0)
    router += n if any(getattr(k, 'key', None) == 'router' for k in path) else 0.0
  parts = forward_flops_by_part(m)
  attention_flops = parts.pop('attention')
  return dict(total_params=int(total), active_params=int(active), router_params=int(router),
              forward_flops_per_token=float(sum(parts.values())),
              attention_flops_per_token=attention_flops)


def decode_bytes_per_step(m, batch: int, context: float, experts_per_layer: float | None = None,
                          weight_bytes: float | None = None) -> dict:
  """Bytes one cached decode step (one new token in each of `batch` rows) of config.model `m`
  must read from device memory: what a step that reads nothing twice and nothing it does not
  need reads, the memory-bandwidth roofline's numerator (`benchmarks/decode.py`).

    params      every non-expert parameter once (the tied embedding, as the LM head, or an
                untied lm_head, whose embedding is only looked up (`batch` rows); attention,
                LF convolutions, norms, routers, dense MLPs, shared experts), at
                `weight_bytes` per parameter: by default config.model.param_dtype's size (the
                step reads them so and casts them); int8 weights: `yuanjax.quantize
                .bytes_per_param` (about 1, their scales included)
    experts     per MoE layer, `experts_per_layer` of its E routed experts (w1 and w2), at
                `weight_bytes` per parameter; by default min(E, batch x top_k) experts, the
                most a step's tokens can reach
    kv_cache    per layer, the keys and values (num_kv_heads of them) of `context` positions
                per row (the tokens attended to, the new one included), in config.model.dtype
    lf_state    per layer, the LFA state (the last two LF inputs per row), config.model.dtype;
                0 for standard attention
    total       their sum

  Not counted: writes (the new keys/values and LF state), activations, the cache index.
  """
  config_lib.validate_model(m)
  param_bytes = jnp.dtype(m.param_dtype).itemsize if weight_bytes is None else weight_bytes
  act_bytes = jnp.dtype(m.dtype).itemsize
  E = m.num_experts
  G, lfa = attention.num_kv_heads(m), m.attention_type == 'lfa'
  reach = min(E, batch * m.router.top_k) if experts_per_layer is None else experts_per_layer
  dense = expert = 0
  for path, names, shape in _param_leaves(m):
    n = math.prod(shape) * param_bytes
    if not m.tie_embeddings and _is_embedding(path):
      dense += min(batch, m.vocab_size) * m.hidden_size * param_bytes
    elif 'expert' in names:
      expert += n
    else:
      dense += n
  out = dict(params=float(dense), experts=expert * reach / E,
             kv_cache=2.0 * m.num_layers * batch * context * G * m.head_dim * act_bytes,
             lf_state=2.0 * m.num_layers * batch * m.hidden_size * act_bytes * lfa)
  out['total'] = sum(out.values())
  return out


# ---------------------------------------------------------------- devices


@dataclasses.dataclass(frozen=True)
class Device:
  """One accelerator (a GPU, or a TPU chip), from vendor spec sheets.

  peak_flops  dense FLOP/s by dtype (bfloat16, the MFU convention, is what is listed)
  bandwidth   memory (HBM) bytes/s
  memory_gib  nominal memory, GiB; None where the planner does not list the device yet
  gpu         a GPU, else a TPU (which attention backend runs: `yuanjax.plan.attention_backend`)
  """
  peak_flops: dict[str, float]
  bandwidth: float
  memory_gib: int | None = None
  gpu: bool = False


def _gpu(bf16: float, bandwidth: float, memory_gib: int | None = None) -> Device:
  return Device({'bfloat16': bf16}, bandwidth, memory_gib, gpu=True)


def _tpu(bf16: float, bandwidth: float, memory_gib: int | None = None) -> Device:
  return Device({'bfloat16': bf16}, bandwidth, memory_gib)


# Peaks: H100 SXM 989 TF dense bf16 (we measured 797 TF/s for a bf16 8192^3 matmul through JAX,
# on an H100 in 2026-11). Bandwidths: NVIDIA's H200, H100 and A100 datasheets (H100 SXM 3.35 TB/s,
# PCIe 2.0, NVL 3.9; A100 80GB SXM 2,039 GB/s, 80GB PCIe 1,935, 40GB 1,555), L40/L40S 864 GB/s,
# L4 300 GB/s; Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e: 1200, 819,
# 2765 and 1638 GB/s). The planner checks the devices with a memory, in this order.
DEVICES: dict[str, Device] = {
    'H100-80G': _gpu(989e12, 3.35e12, 80),
    'H200': _gpu(989e12, 4.8e12, 141),
    'H100 PCIe': _gpu(756e12, 2.0e12),
    'H100 NVL': _gpu(989e12, 3.9e12),
    'A100-80G': _gpu(312e12, 2.039e12),
    'A100-80G PCIe': _gpu(312e12, 1.935e12),
    'A100-40G': _gpu(312e12, 1.555e12),
    'L40S': _gpu(362e12, 864e9),
    'L40': _gpu(181e12, 864e9),
    'L4': _gpu(121e12, 300e9),
    'TPU v5e': _tpu(197e12, 819e9, 16),
    'TPU v5p': _tpu(459e12, 2.765e12, 95),
    'TPU v6e': _tpu(918e12, 1.638e12, 32),
    'TPU v4': _tpu(275e12, 1.2e12),
}

# JAX device_kind -> DEVICES name: the first alias that is a case-insensitive substring of it,
# so specific names come first (JAX calls v5e 'TPU v5 lite', v5p 'TPU v5', v6e 'TPU v6 lite').
ALIASES = (
    ('H200', 'H200'),
    ('H100 PCIe', 'H100 PCIe'),
    ('H100 NVL', 'H100 NVL'),
    ('H100', 'H100-80G'),
    ('A100-SXM4-40GB', 'A100-40G'),
    ('A100-PCIE-40GB', 'A100-40G'),
    ('A100 80GB PCIe', 'A100-80G PCIe'),
    ('A100', 'A100-80G'),
    ('L40S', 'L40S'),
    ('L40', 'L40'),
    ('L4', 'L4'),
    ('TPU v6', 'TPU v6e'),
    ('TPU v5 lite', 'TPU v5e'),
    ('TPU v5e', 'TPU v5e'),
    ('TPU v5', 'TPU v5p'),
    ('TPU v4', 'TPU v4'),
)


def device_name(kind: str) -> str | None:
  """The DEVICES name of `kind` (a DEVICES name, or JAX's device_kind), or None (CPU)."""
  if kind in DEVICES:
    return kind
  return next((name for alias, name in ALIASES if alias.lower() in kind.lower()), None)


def device(kind: str) -> Device | None:
  name = device_name(kind)
  return None if name is None else DEVICES[name]


def peak_flops(kind: str, dtype: str = 'bfloat16') -> float | None:
  """Peak dense FLOP/s of one device in `dtype`, or None when unknown (then no MFU)."""
  d = device(kind)
  return None if d is None else d.peak_flops.get(dtype)


def memory_bandwidth(kind: str) -> float | None:
  """Memory bandwidth (bytes/s) of one device, or None when unknown."""
  d = device(kind)
  return None if d is None else d.bandwidth


def memory_gib(kind: str) -> int | None:
  """Nominal memory (GiB) of one device, or None when unknown or not listed."""
  d = device(kind)
  return None if d is None else d.memory_gib


def planned_devices() -> list[str]:
  """The DEVICES names with a memory: what `yuanjax.plan` checks a config against."""
  return [name for name, d in DEVICES.items() if d.memory_gib is not None]


def mfu(tokens_per_sec: float, flops_per_token: float, kind: str, num_devices: int) -> float | None:
  """Model FLOPs utilisation over all devices (bfloat16 peak), or None when unknown."""
  peak = peak_flops(kind)
  return None if peak is None else tokens_per_sec * flops_per_token / (peak * num_devices)


def roofline_fraction(bytes_per_s: float, kind: str) -> float | None:
  """Achieved bytes/s of one device over its memory bandwidth, or None when unknown."""
  bandwidth = memory_bandwidth(kind)
  return None if bandwidth is None else bytes_per_s / bandwidth
