"""Statistics MoE researchers read off expert loads (NumPy; no JAX, no plotting).

Axis key: L MoE layers, E experts. `load_LxE` may be fractions of routed slots (each row sums
to 1, as `aux['moe']['load']` and metrics.jsonl's `moe/load/...` are) or raw counts: every
function here normalises per layer, so both give the same answer.
"""
from __future__ import annotations

import numpy as np

DEAD_THRESHOLD = 0.01   # an expert under 1% of its balanced share is counted dead


def relative_load(load_LxE) -> np.ndarray:
  """Load ÷ balanced load (DeepSeek-V3's heatmaps): 1 everywhere when balanced.

  With top-k routing the balanced load is k/E of the tokens per expert, which for slot
  fractions is 1/E: so this is load × E / (sum over experts)."""
  load = np.asarray(load_LxE, np.float64)
  total = load.sum(axis=-1, keepdims=True)
  return load * load.shape[-1] / np.where(total > 0, total, 1.0)


def max_vio(load_LxE) -> np.ndarray:
  """MaxVio per layer (Loss-Free Balancing): max load ÷ mean load − 1; 0 when balanced."""
  return relative_load(load_LxE).max(axis=-1) - 1.0


def dead_experts(load_LxE, threshold: float = DEAD_THRESHOLD) -> np.ndarray:
  """Per layer, how many experts get less than `threshold` of their balanced share."""
  return (relative_load(load_LxE) < threshold).sum(axis=-1)


def expert_diversity(entropy_nats, num_experts: int):
  """exp(router entropy) ÷ E: 1 when the router spreads its probability over all experts,
  1/E when it puts all of it on one. `entropy_nats` may be a scalar or an array."""
  return np.exp(np.asarray(entropy_nats, np.float64)) / num_experts
