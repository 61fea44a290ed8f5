"""Routers: which experts each token goes to, with what weight.

Every router computes float32 logits over the E routed experts and returns a `Routing`:
a flat list of A token-slots (token, expert, weight, valid). Token-choice routers emit
A = T * top_k slots in token-major order (token 0's choices first), which keeps capacity
dispatch causal: whether a slot is dropped depends only on earlier tokens.

  attention      Yuan 2.0-M32's Attention Router (the paper's equation, float32):
                 q = Wq' u, k = Wk' u, v = Wv' u (N-vectors); logits = softmax_row(q k^T) v.
  linear         the classical router (Mixtral): logits = W u.
  shared         a linear router for shared-expert isolation with fine-grained experts
                 (DeepSeekMoE / XVERSE-MoE): the MoE layer adds `num_shared_experts`
                 always-on experts next to the top-k routed ones.
  expert_choice  each expert takes its top-C tokens (Zhou et al. 2022). NOT CAUSAL: a
                 token's routing depends on the other tokens of the group, later ones
                 included. For ablations only; never for autoregressive evaluation.

Adding a router is one small subclass plus an entry in `ROUTERS`: it defines `logits` and
`logit_flops` (its FLOPs per token, for `yuanjax.cost`), and `select` and `causal = False` if it
is not token-choice top-k. What else reads a router (the cost model, expert parallelism,
generation) asks the class.

Options (config.model.router): top_k, norm_topk_prob (renormalise the chosen weights to
sum to 1), jitter_eps (Switch: multiplicative input jitter in training), noisy_topk
(Shazeer et al.: learned Gaussian noise on the logits in training), load_balance_weight
(Switch/GShard loss, 1 per layer at balance, summed over layers; `weight_from_pooled_coef`
converts an HF coefficient), z_loss_weight (ST-MoE). Noise needs the 'router' rng and
`deterministic=False`.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from yuanjax.model import layers

f32 = jnp.float32


@flax.struct.dataclass
class Routing:
  token_A: jax.Array  # int32, the token of each slot
  expert_A: jax.Array  # int32, the expert of each slot
  weight_A: jax.Array  # float32 combine weight (0 where not valid)
  valid_A: jax.Array  # bool, the slot is routed at all
  probs_TxE: jax.Array  # float32 router probabilities (softmax of the logits)
  aux: dict[str, Any]  # aux losses (unweighted and the weighted sum 'aux_loss')


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """GShard capacity: ceil(capacity_factor * T * k / E), at least 1 and at most T."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def load_balance_loss(probs_TxE, expert_A, valid_A):
  """Switch/GShard: E * sum_e f_e P_e (1.0 when perfectly balanced)."""
  E = probs_TxE.shape[-1]
  counts_E = jnp.zeros((E,), f32).at[expert_A].add(valid_A.astype(f32))
  frac_E = counts_E / jnp.maximum(counts_E.sum(), 1.0)
  return E * jnp.sum(frac_E * probs_TxE.mean(axis=0))


def weight_from_pooled_coef(coef: float, top_k: int, num_moe_layers: int) -> float:
  """`router.load_balance_weight` for a Hugging Face `router_aux_loss_coef` (Mixtral, XVERSE).

  yuanjax's loss is 1.0 per layer at balance, summed over the layers; HF's pools every layer's
  routing into one loss that is top_k at balance. The same pull on the routers is therefore
  coef * top_k / layers (up to pooled vs per-layer statistics away from balance)."""
  return coef * top_k / num_moe_layers


def z_loss(logits_TxE):
  """ST-MoE router z-loss: mean(logsumexp(logits)^2)."""
  return jnp.mean(jax.nn.logsumexp(logits_TxE, axis=-1)**2)


class Router(nn.Module):
  """Token-choice top-k routing on the logits a subclass defines.

  `causal`: a token's routing depends on that token alone, as token-choice routing's does (its
  k slots per token come token-major): what decoding (`yuanjax.generate`) and the expert-
  parallel dispatches (`yuanjax.model.moe`) need.
  """
  config: ml_collections.ConfigDict  # config.model
  causal: ClassVar[bool] = True

  @staticmethod
  def logit_flops(m) -> float:
    """Forward FLOPs per token of `logits` for config.model `m`."""
    raise NotImplementedError

  @classmethod
  def flops_per_token(cls, m) -> float:
    """Forward FLOPs per token: the logits' and, with router.noisy_topk, the noise's."""
    return cls.logit_flops(m) + 2 * m.hidden_size * m.num_experts * m.router.noisy_topk

  @property
  def rcfg(self):
    return self.config.router

  def dense_init(self, name, shape, axes):
    return layers.param_with_axes(self, name, nn.initializers.normal(self.config.init_std), shape,
                                  axes, layers.dtype_of(self.config.param_dtype))

  def logits(self, u_TxD):
    raise NotImplementedError

  @nn.compact
  def __call__(self, u_TxD, *, deterministic: bool = True) -> Routing:
    rcfg, E = self.rcfg, self.config.num_experts
    u_TxD = u_TxD.astype(f32)
    if rcfg.jitter_eps > 0 and not deterministic:
      eps = rcfg.jitter_eps
      u_TxD = u_TxD * jax.random.uniform(self.make_rng('router'), u_TxD.shape, f32, 1.0 - eps,
                                         1.0 + eps)
    logits_TxE = self.logits(u_TxD)
    if rcfg.noisy_topk:
      w_noise_DxE = self.dense_init('w_noise', (u_TxD.shape[-1], E), ('embed', 'router'))
      if not deterministic:
        noise_std_TxE = jax.nn.softplus(u_TxD @ w_noise_DxE.astype(f32))
        logits_TxE = logits_TxE + noise_std_TxE * jax.random.normal(self.make_rng('router'),
                                                                    logits_TxE.shape, f32)
    routing = self.select(logits_TxE)
    lb, zl = load_balance_loss(routing.probs_TxE, routing.expert_A,
                               routing.valid_A), z_loss(logits_TxE)
    aux = dict(load_balance_loss=lb, z_loss=zl,
               aux_loss=rcfg.load_balance_weight * lb + rcfg.z_loss_weight * zl)
    return routing.replace(aux=aux)

  def select(self, logits_TxE) -> Routing:
    """Top-k of softmax(logits) per token; optionally renormalised to sum to 1."""
    k = self.rcfg.top_k
    T = logits_TxE.shape[0]
    probs_TxE = jax.nn.softmax(logits_TxE.astype(f32), axis=-1)
    weight_TxK, expert_TxK = jax.lax.top_k(probs_TxE, k)
    if self.rcfg.norm_topk_prob:
      weight_TxK = weight_TxK / jnp.sum(weight_TxK, axis=-1, keepdims=True)
    token_TxK = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, k))
    return Routing(token_A=token_TxK.reshape(-1), expert_A=expert_TxK.reshape(-1).astype(jnp.int32),
                   weight_A=weight_TxK.reshape(-1), valid_A=jnp.ones(
                       (T * k,), bool), probs_TxE=probs_TxE, aux={})


class LinearRouter(Router):
  """Classical router (Mixtral): logits = W u."""

  @staticmethod
  def logit_flops(m) -> float:
    return 2 * m.hidden_size * m.num_experts

  def logits(self, u_TxD):
    w_DxE = self.dense_init('w', (u_TxD.shape[-1], self.config.num_experts), ('embed', 'router'))
    return u_TxD @ w_DxE.astype(f32)


class SharedExpertRouter(LinearRouter):
  """Linear router; the MoE layer adds `router.num_shared_experts` always-on experts."""


class AttentionRouter(Router):
  """Yuan 2.0-M32's Attention Router: logits = softmax_row(q k^T) v, q/k/v = W' u, float32.

  Row i of softmax(q k^T) depends on q_i alone (q k^T has rank one), so the router is a
  learned smooth function of each expert's own query; no 1/sqrt scaling (as in the paper).
  """

  @staticmethod
  def logit_flops(m) -> float:
    """The q, k and v projections (the E x E mixing, 4 E^2 more, is not counted)."""
    return 3 * 2 * m.hidden_size * m.num_experts

  def logits(self, u_TxD):
    D, E = u_TxD.shape[-1], self.config.num_experts
    q_TxE = u_TxD @ self.dense_init('wq', (D, E), ('embed', 'router')).astype(f32)
    k_TxE = u_TxD @ self.dense_init('wk', (D, E), ('embed', 'router')).astype(f32)
    v_TxE = u_TxD @ self.dense_init('wv', (D, E), ('embed', 'router')).astype(f32)
    attn_TxExE = jax.nn.softmax(q_TxE[:, :, None] * k_TxE[:, None, :], axis=-1)
    # For inspection (dead code unless 'intermediates' is mutable): row i is how expert i's
    # logit mixes the experts' values for this token (`yuanjax.analysis.routing`).
    self.sow('intermediates', 'expert_attention', attn_TxExE)
    return jnp.einsum('tij,tj->ti', attn_TxExE, v_TxE)


class ExpertChoiceRouter(LinearRouter):
  """Expert choice (Zhou et al. 2022): expert e takes its top-C tokens by softmax score.

  NOT CAUSAL: which tokens an expert takes depends on every token of the group, later
  ones included. C = ceil(moe.capacity_factor * T * top_k / E). A token may get zero,
  one or several experts. Excluded from the causality test; for ablations only.
  """
  causal: ClassVar[bool] = False

  def select(self, logits_TxE) -> Routing:
    T, E = logits_TxE.shape
    C = expert_capacity(T, E, self.rcfg.top_k, self.config.moe.capacity_factor)
    probs_TxE = jax.nn.softmax(logits_TxE.astype(f32), axis=-1)
    weight_ExC, token_ExC = jax.lax.top_k(probs_TxE.T, C)
    expert_ExC = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[:, None], (E, C))
    return Routing(token_A=token_ExC.reshape(-1).astype(jnp.int32), expert_A=expert_ExC.reshape(-1),
                   weight_A=weight_ExC.reshape(-1), valid_A=jnp.ones(
                       (E * C,), bool), probs_TxE=probs_TxE, aux={})


ROUTERS: dict[str, type[Router]] = {
    'attention': AttentionRouter,
    'linear': LinearRouter,
    'shared': SharedExpertRouter,
    'expert_choice': ExpertChoiceRouter,
}


def router_class(router_type: str) -> type[Router]:
  """ROUTERS[router_type]; ValueError naming config.model.router.type if there is none."""
  try:
    return ROUTERS[router_type]
  except KeyError:
    raise ValueError(f'config.model.router.type={router_type!r}: '
                     f'expected one of {sorted(ROUTERS)}') from None


def causal_routers() -> tuple[str, ...]:
  """The names of the causal routers (`Router.causal`), in registry order."""
  return tuple(name for name, cls in ROUTERS.items() if cls.causal)


def make_router(config: ml_collections.ConfigDict, name: str = 'router') -> Router:
  return router_class(config.router.type)(config, name=name)
