"""Statistics MoE researchers read off expert loads (NumPy; no JAX, no plotting).

Axis key: L MoE layers, E experts. `load_LxE` may be fractions of routed slots (each row sums
to 1, as `aux['moe']['load']` and metrics.jsonl's `moe/load/...` are) or raw counts: every
function here normalises per layer, so both give the same answer.
"""
from __future__ import annotations

import numpy as np

DEAD_THRESHOLD = 0.01  # an expert under 1% of its balanced share is counted dead


def relative_load(load_LxE) -> np.ndarray:
  """Load ÷ balanced load (DeepSeek-V3's heatmaps): 1 everywhere when balanced.

  With top-k routing the balanced load is k/E of the tokens per expert, which for slot
  fractions is 1/E: so this is load × E / (sum over experts)."""
  load = np.asarray(load_LxE, np.float64)
  total = load.sum(axis=-1, keepdims=True)
  return load * load.shape[-1] / np.where(total > 0, total, 1.0)


def sorted_by_load(rel_load_LxE) -> np.ndarray:
  """Each layer's loads, largest first. Expert indices mean nothing across seeds (or runs, or
  layers): average these, never the [L, E] maps, or the imbalance averages away."""
  return -np.sort(-np.asarray(rel_load_LxE, np.float64), axis=-1)


def max_vio(load_LxE) -> np.ndarray:
  """MaxVio per layer (Loss-Free Balancing): max load ÷ mean load − 1; 0 when balanced."""
  return relative_load(load_LxE).max(axis=-1) - 1.0


def dead_experts(load_LxE, threshold: float = DEAD_THRESHOLD) -> np.ndarray:
  """Per layer, how many experts get less than `threshold` of their balanced share."""
  return (relative_load(load_LxE) < threshold).sum(axis=-1)


def top_k_load_share(load_LxE, top_k: int) -> np.ndarray:
  """Per layer, the share of the routed slots the `top_k` most loaded experts take: k/E when
  balanced, 1 when every token goes to the same k experts (a top-k collapse)."""
  load = np.asarray(load_LxE, np.float64)
  top_Lxk = np.sort(load, axis=-1)[..., ::-1][..., :top_k]
  return top_Lxk.sum(axis=-1) / np.maximum(load.sum(axis=-1), 1e-30)


def collapsed_layers(load_LxE, top_k: int, threshold: float) -> list[tuple[int, float]]:
  """(layer, top-k load share) of the layers whose `top_k` most loaded experts take more than
  `threshold` of the routed slots. Not the effective expert count exp(H) < c·E: a collapse
  onto k experts has exp(H) ≈ k, which that rule misses whenever k ≥ c·E. With k ≥ E every
  layer has share 1 and none is flagged."""
  if top_k >= np.shape(load_LxE)[-1]:
    return []
  share_L = top_k_load_share(load_LxE, top_k)
  return [(i, float(s)) for i, s in enumerate(share_L) if s > threshold]


def expert_diversity(entropy_nats, num_experts: int):
  """exp(router entropy) ÷ E: 1 when the router spreads its probability over all experts,
  1/E when it puts all of it on one. `entropy_nats` may be a scalar or an array."""
  return np.exp(np.asarray(entropy_nats, np.float64)) / num_experts


# Statistics of routing decisions (`yuanjax.analysis.routing.Routing`). Axis key: M MoE layers,
# then any token axes (N, or B and L), K chosen experts per token (-1: none), E experts.
# `mask` (the token axes' shape, bool) keeps the real tokens; None keeps all.


def _tokens(x_Mx___, mask, trailing: int) -> np.ndarray:
  """[M, N, ...]: the token axes flattened, masked tokens dropped."""
  x = np.asarray(x_Mx___)
  x = x.reshape(x.shape[0], -1, *x.shape[x.ndim - trailing:])
  if mask is None:
    return x
  return x[:, np.asarray(mask, bool).reshape(-1)]


def multi_hot(experts_MxNxK, num_experts: int) -> np.ndarray:
  """[M, N, E] float: 1 where the token routes to the expert (-1 entries ignored)."""
  e = np.asarray(experts_MxNxK)
  hot = np.zeros(e.shape[:-1] + (num_experts + 1,))
  np.put_along_axis(hot, np.where(e < 0, num_experts, e), 1.0, axis=-1)
  return hot[..., :num_experts]


def expert_load(experts_Mx___xK, num_experts: int, mask=None) -> np.ndarray:
  """[M, E]: each expert's fraction of the routed slots per layer (rows sum to 1), as
  `aux['moe']['load']`; feed it to `relative_load`."""
  hot_MxNxE = multi_hot(_tokens(experts_Mx___xK, mask, 1), num_experts)
  counts_MxE = hot_MxNxE.sum(axis=1)
  return counts_MxE / np.maximum(counts_MxE.sum(axis=-1, keepdims=True), 1.0)


def token_share(experts_Mx___xK, num_experts: int, mask=None) -> np.ndarray:
  """[M, E]: the share of tokens each expert takes (OLMoE's domain specialisation); k/E each
  when balanced, and rows sum to k."""
  hot_MxNxE = multi_hot(_tokens(experts_Mx___xK, mask, 1), num_experts)
  return hot_MxNxE.sum(axis=1) / max(hot_MxNxE.shape[1], 1)


def coactivation(experts_Mx___xK, num_experts: int, mask=None) -> np.ndarray:
  """[M, E, E]: P(expert j fires | expert i fires) per layer (OLMoE), over the tokens routed
  to i; the diagonal (trivially 1) and the rows of experts that never fire are 0."""
  hot_MxNxE = multi_hot(_tokens(experts_Mx___xK, mask, 1), num_experts)
  both_MxExE = np.einsum('mni,mnj->mij', hot_MxNxE, hot_MxNxE)
  fires_MxE = np.diagonal(both_MxExE, axis1=1, axis2=2)
  p = both_MxExE / np.maximum(fires_MxE, 1.0)[:, :, None]
  p[:, np.arange(num_experts), np.arange(num_experts)] = 0.0
  return p


def router_entropy(probs_Mx___xE, mask=None) -> np.ndarray:
  """[M]: mean entropy (nats) of the router's probabilities per layer; log E at most."""
  p = _tokens(probs_Mx___xE, mask, 1).astype(np.float64)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return -plogp.sum(axis=-1).mean(axis=-1)


def top1_margin(probs_Mx___xE, mask=None) -> np.ndarray:
  """[M]: mean over tokens of p1 - p2, the router's largest probability minus its second.
  Entropy near log E says the probabilities are near uniform; a small margin beside a
  collapsed load says a slight, token-independent preference still picks the same experts."""
  p = np.sort(_tokens(probs_Mx___xE, mask, 1).astype(np.float64), axis=-1)
  return (p[..., -1] - p[..., -2]).mean(axis=-1)


def saturation(experts_Mx___xK, final_experts_Mx___xK, mask=None) -> np.ndarray:
  """[M]: router saturation (OLMoE): the share of the final checkpoint's top-k choices that
  this checkpoint already makes, per layer, over the same tokens. 1 when identical."""
  E = int(max(np.max(experts_Mx___xK), np.max(final_experts_Mx___xK))) + 1
  now = multi_hot(_tokens(experts_Mx___xK, mask, 1), E)
  final = multi_hot(_tokens(final_experts_Mx___xK, mask, 1), E)
  return (now * final).sum(axis=(1, 2)) / np.maximum(final.sum(axis=(1, 2)), 1.0)


def same_expert_as_previous(experts_MxBxLxK, mask_BxL=None) -> np.ndarray:
  """[M]: how often a token's first-choice expert is the previous token's (Mixtral §5), over
  pairs of consecutive real tokens of a row; 1/E by chance."""
  first_MxBxL = np.asarray(experts_MxBxLxK)[..., 0]
  mask = (np.ones(first_MxBxL.shape[1:], bool) if mask_BxL is None else np.asarray(mask_BxL, bool))
  pair_BxL1 = mask[:, 1:] & mask[:, :-1]
  same_MxBxL1 = first_MxBxL[:, :, 1:] == first_MxBxL[:, :, :-1]
  return (same_MxBxL1 & pair_BxL1).sum(axis=(1, 2)) / max(pair_BxL1.sum(), 1)
