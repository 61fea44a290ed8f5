"""Mixture-of-Experts feed-forward: a router, E stacked SwiGLU experts, three dispatches.

Experts are stored stacked: w1_ExDx2F (first F columns the gate), w2_ExFxD.
`config.model.moe.dispatch` picks how token-slots reach their experts:

  dense     every expert computes every token, masked by the combine weights. The
            readable reference (T * E expert FLOPs); used by tests.
  dropless  sort slots by expert, grouped matmuls, nothing dropped. The kernel is
            `config.model.moe.grouped_matmul` (`yuanjax.model.grouped_matmul`: ragged_dot,
            megablox or tokamax); the other dispatches ignore that field.
  capacity  GShard-style: each expert has C = ceil(capacity_factor * T * k / E) slots;
            slots are placed by index scatter into an [E, C, D] buffer, the experts run
            as one batched einsum, results come back by index gather. Slots past an
            expert's capacity are dropped (counted in `dropped_fraction`): they add
            nothing, so the token keeps only its residual path.

With ample capacity the three agree to float32 rounding, forward and gradients.

`DISPATCHES` registers them by name (`Dispatch`: the function `MoE` calls, whether it runs
expert-parallel, whether it can drop slots); adding a dispatch is one function of `Dispatch.run`'s
signature plus its entry. `inference_dispatch` is the one rule for inference (generation, HF
imports): a dispatch that can drop runs as 'dropless', the same forward with nothing dropped.

Expert parallelism. Under a mesh of more than one device (`jax.set_mesh`) the sparse
dispatches run inside `jax.shard_map`: each device routes its own tokens (the batch is
split over the mesh axes of 'act_batch'), places its token-slots in per-expert buffers, and
an `all_to_all` over the mesh axis of the 'expert' param axis carries them to the devices
holding those experts and back (`Exchange`). Expert weights are split over that axis and,
optionally, their ffn dimension over the axis of 'mlp' (partial sums then `psum`-ed). The
router itself runs outside, on the global (auto-sharded) arrays, so routing and its
statistics are those of a single device. Capacity is per device (GShard's groups): the
C slots of an expert are counted over that device's tokens. `dropless` exchanges fixed-size
buffers (every destination gets room for all of a device's slots: `ragged_all_to_all` is
unimplemented on XLA:CPU and unmeasured here), so nothing is ever dropped. `dense`, and any
router that is not causal (`expert_choice` routes over the whole group), stay on plain GSPMD
sharding.

Placement uses index scatter/gather, not GShard's one-hot dispatch einsum: at M32 sizes
that einsum ([T, E, C] x [T, D]) costs more FLOPs than the experts themselves.

Statistics (in the returned dict, float32): `load` (fraction of routed slots per expert,
[E]), `max_load` (max over mean expert load), `entropy` (mean router entropy, nats),
`dropped_fraction`, `load_balance_loss`, `z_loss`, and `aux_loss` (their weighted sum,
which the trainer adds to the loss). The router's probabilities and chosen experts are
also sown into 'intermediates' for inspection.

Axis key: see `yuanjax.model.layers`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from yuanjax.model import grouped_matmul, layers, routers

f32 = jnp.float32


def _experts(x_ExCxD, w1_ExDx2F, w2_ExFxD):
  h_ExCx2F = jnp.einsum('ecd,edf->ecf', x_ExCxD, w1_ExDx2F)
  return jnp.einsum('ecf,efd->ecd', layers.swiglu(h_ExCx2F), w2_ExFxD)


def combine_weights(r: routers.Routing, T: int, E: int):
  """[T, E] float32: the weight token t gives expert e (0 where not routed)."""
  return jnp.zeros((T, E), f32).at[r.token_A, r.expert_A].add(jnp.where(r.valid_A, r.weight_A, 0.0))


@dataclasses.dataclass(frozen=True)
class Exchange:
  """How expert buffers reach the devices holding the experts (inside `shard_map`).

  `expert_axis`: mesh axis (or axes) the experts are split over, in `n` shards; `tensor_axis`:
  mesh axis of the experts' ffn dimension (partial results summed). The default is one
  device: every method is the identity.
  """
  expert_axis: str | tuple[str, ...] | None = None
  n: int = 1
  tensor_axis: str | tuple[str, ...] | None = None

  def to_experts(self, x_ExCxD):
    """[E, C, D] (all experts, my slots) -> [E/n, n*C, D] (my experts, everyone's slots)."""
    if self.n == 1:
      return x_ExCxD
    return jax.lax.all_to_all(x_ExCxD, self.expert_axis, 0, 1, tiled=True)

  def from_experts(self, y_GxnCxD):
    """Inverse of `to_experts`."""
    if self.n == 1:
      return y_GxnCxD
    return jax.lax.all_to_all(y_GxnCxD, self.expert_axis, 1, 0, tiled=True)

  def swap(self, x_nxA):
    """Chunk j of axis 0 goes to expert shard j; chunk j of the result came from shard j."""
    if self.n == 1:
      return x_nxA
    return jax.lax.all_to_all(x_nxA, self.expert_axis, 0, 0, tiled=True)

  def reduce_ffn(self, y):
    return y if self.tensor_axis is None else jax.lax.psum(y, self.tensor_axis)


LOCAL = Exchange()


def dense_dispatch(x_TxD, r: routers.Routing, w1_ExDx2F, w2_ExFxD):
  """Reference: all experts on all tokens, combined with a [T, E] weight matrix."""
  T, E = x_TxD.shape[0], w1_ExDx2F.shape[0]
  combine_TxE = combine_weights(r, T, E)
  h_TxEx2F = jnp.einsum('td,edf->tef', x_TxD, w1_ExDx2F)
  y_TxExD = jnp.einsum('tef,efd->ted', layers.swiglu(h_TxEx2F), w2_ExFxD)
  y_TxD = jnp.einsum('ted,te->td', y_TxExD, combine_TxE.astype(x_TxD.dtype))
  return y_TxD, jnp.zeros((), f32)


def dropless_dispatch(x_TxD, r: routers.Routing, w1_GxDx2F, w2_GxFxD, ex: Exchange = LOCAL,
                      gmm: grouped_matmul.GroupedMatmul = grouped_matmul.RAGGED_DOT):
  """Sort slots by expert; grouped matmuls (`gmm`) over the sorted rows; nothing dropped.

  With `ex.n` expert shards (G = E/n experts here), the slots go out in fixed-size chunks,
  one per destination shard (room for all A slots each), are sorted there by local expert,
  computed, and come back the same way.
  """
  G, D = w1_GxDx2F.shape[0], x_TxD.shape[1]
  E, A = G * ex.n, r.expert_A.shape[0]
  key_A = jnp.where(r.valid_A, r.expert_A, E)  # invalid slots sort last
  order_A = jnp.argsort(key_A, stable=True)
  expert_A, token_A = key_A[order_A], r.token_A[order_A]
  xs_AxD = x_TxD[token_A]
  if ex.n == 1:
    group_sizes_G = jnp.zeros((G,), jnp.int32).at[expert_A].add(1, mode='drop')
    ys_AxD = _ragged_experts(xs_AxD, w1_GxDx2F, w2_GxFxD, group_sizes_G, ex, gmm)
  else:
    # Slot a travels in row a of its destination's chunk: rows never collide, and the
    # receiver sorts what it gets by local expert anyway (empty rows carry id G: last).
    dest_A = expert_A // G  # == n for invalid slots: dropped below
    row_A = jnp.arange(A)
    send_nxAxD = jnp.zeros((ex.n, A, D), x_TxD.dtype).at[dest_A, row_A].set(xs_AxD, mode='drop')
    send_nxA = jnp.full((ex.n, A), G, jnp.int32).at[dest_A,
                                                    row_A].set(expert_A - dest_A * G, mode='drop')
    recv_MxD, recv_M = ex.swap(send_nxAxD).reshape(-1, D), ex.swap(send_nxA).reshape(-1)
    order_M = jnp.argsort(recv_M, stable=True)
    group_sizes_G = jnp.zeros((G,), jnp.int32).at[recv_M].add(1, mode='drop')
    ys_MxD = _ragged_experts(recv_MxD[order_M], w1_GxDx2F, w2_GxFxD, group_sizes_G, ex, gmm)
    back_nxAxD = ex.swap(jnp.zeros_like(ys_MxD).at[order_M].set(ys_MxD).reshape(ex.n, A, D))
    ys_AxD = back_nxAxD.at[dest_A, row_A].get(mode='fill', fill_value=0)
  w_A = jnp.where(r.valid_A, r.weight_A, 0.0)[order_A].astype(x_TxD.dtype)
  y_TxD = jnp.zeros_like(x_TxD).at[token_A].add(ys_AxD * w_A[:, None])
  return y_TxD, jnp.zeros((), f32)


def _ragged_experts(xs_MxD, w1_GxDx2F, w2_GxFxD, group_sizes_G, ex: Exchange,
                    gmm: grouped_matmul.GroupedMatmul):
  h_Mx2F = gmm(xs_MxD, w1_GxDx2F, group_sizes_G)
  return ex.reduce_ffn(gmm(layers.swiglu(h_Mx2F), w2_GxFxD, group_sizes_G))


def capacity_dispatch(x_TxD, r: routers.Routing, w1_GxDx2F, w2_GxFxD, capacity: int,
                      ex: Exchange = LOCAL):
  """GShard capacity: scatter into [E, C, D], batched einsum, gather back; overflow dropped.

  With `ex.n` expert shards the [E, C, D] buffer is exchanged (all_to_all) so that each shard
  runs its G = E/n experts on every shard's slots, then exchanged back.
  """
  E = w1_GxDx2F.shape[0] * ex.n
  onehot_AxE = jax.nn.one_hot(r.expert_A, E, dtype=jnp.int32) * r.valid_A[:, None]
  # Position of each slot in its expert's buffer, in slot order (token-major: causal).
  pos_A = jnp.take_along_axis(jnp.cumsum(onehot_AxE, axis=0), r.expert_A[:, None], axis=1)[:, 0] - 1
  kept_A = r.valid_A & (pos_A < capacity)
  slot_A = jnp.where(kept_A, pos_A, capacity)  # out of range -> dropped by the scatter
  x_ExCxD = jnp.zeros((E, capacity, x_TxD.shape[1]),
                      x_TxD.dtype).at[r.expert_A, slot_A].set(x_TxD[r.token_A], mode='drop')
  y_GxnCxD = ex.reduce_ffn(_experts(ex.to_experts(x_ExCxD), w1_GxDx2F, w2_GxFxD))
  y_ExCxD = ex.from_experts(y_GxnCxD)
  ys_AxD = y_ExCxD.at[r.expert_A, slot_A].get(mode='fill', fill_value=0)
  w_A = jnp.where(kept_A, r.weight_A, 0.0).astype(x_TxD.dtype)
  y_TxD = jnp.zeros_like(x_TxD).at[r.token_A].add(ys_AxD * w_A[:, None])
  dropped = jnp.sum(r.valid_A & ~kept_A) / jnp.maximum(jnp.sum(r.valid_A), 1)
  return y_TxD, dropped.astype(f32)


def expert_parallel_dispatch(x_TxD, r: routers.Routing, w1_ExDx2F, w2_ExFxD, run: Callable,
                             cfg: ml_collections.ConfigDict, mesh):
  """A dispatch's `run` inside `shard_map` over `mesh`, experts exchanged by all_to_all.
  Causal (token-choice) routings only: slots token-major, k per token."""
  batch, ep, tp = (layers.mesh_axes_of(a) for a in ('act_batch', 'expert', 'mlp'))
  E, D, F2 = w1_ExDx2F.shape
  ex = Exchange(ep, layers.mesh_axes_size(mesh, ep), tp)
  n_batch = layers.mesh_axes_size(mesh, batch)
  T = x_TxD.shape[0]
  if T % n_batch:
    raise ValueError(f'MoE: {T} tokens do not split over the batch mesh axes {batch} ({n_batch})')
  T_loc = T // n_batch

  def local(x_TxD, token_A, expert_A, weight_A, valid_A, w1_GxDx2xF, w2_GxFxD):
    r = routers.Routing(token_A=token_A % T_loc, expert_A=expert_A, weight_A=weight_A,
                        valid_A=valid_A, probs_TxE=None, aux={})
    G, F = w1_GxDx2xF.shape[0], w1_GxDx2xF.shape[-1]
    w1_GxDx2F = w1_GxDx2xF.reshape(G, D, 2 * F)  # [gate | up] of this ffn shard
    y, dropped = run(x_TxD, r, w1_GxDx2F, w2_GxFxD, cfg, ex)
    return y, dropped[None]

  # Split w1's [gate | up] columns into (2, F) so that an ffn shard holds matching halves.
  w1_ExDx2xF = w1_ExDx2F.reshape(E, D, 2, F2 // 2)
  # Megablox's pallas_call declares outputs without the varying-axes type that check_vma needs.
  megablox = grouped_matmul.GroupedMatmul.from_config(cfg.moe).kind == 'megablox'
  y_TxD, dropped_n = jax.shard_map(
      local, mesh=mesh, in_specs=(P(batch, None), P(batch), P(batch), P(batch), P(batch),
                                  P(ep, None, None,
                                    tp), P(ep, tp, None)), out_specs=(P(batch, None), P(batch)),
      check_vma=not megablox)(x_TxD, r.token_A, r.expert_A, r.weight_A, r.valid_A, w1_ExDx2xF,
                              w2_ExFxD)
  return y_TxD, jnp.mean(dropped_n)  # every shard routes the same number of slots


def run_dense(x_TxD, r: routers.Routing, w1_ExDx2F, w2_ExFxD, cfg, ex: Exchange):
  del cfg, ex  # one device, or plain GSPMD sharding
  return dense_dispatch(x_TxD, r, w1_ExDx2F, w2_ExFxD)


def run_dropless(x_TxD, r: routers.Routing, w1_GxDx2F, w2_GxFxD, cfg, ex: Exchange):
  gmm = grouped_matmul.GroupedMatmul.from_config(cfg.moe)
  return dropless_dispatch(x_TxD, r, w1_GxDx2F, w2_GxFxD, ex, gmm)


def run_capacity(x_TxD, r: routers.Routing, w1_GxDx2F, w2_GxFxD, cfg, ex: Exchange):
  """Capacity counted over the tokens here (per device under expert parallelism)."""
  E = w1_GxDx2F.shape[0] * ex.n
  C = routers.expert_capacity(x_TxD.shape[0], E, cfg.router.top_k, cfg.moe.capacity_factor)
  return capacity_dispatch(x_TxD, r, w1_GxDx2F, w2_GxFxD, C, ex)


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """A registered dispatch.

  run              run(x_TxD, routing, w1_GxDx2F, w2_GxFxD, config.model, exchange) ->
                   (y_TxD, dropped fraction); G = E / exchange.n experts here (`LOCAL`: all)
  expert_parallel  `run` works inside `shard_map` with the experts split over devices
                   (`expert_parallel_dispatch`), for causal routers
  drops            `run` can drop slots (inference then runs 'dropless': `inference_dispatch`)
  """
  run: Callable
  expert_parallel: bool = False
  drops: bool = False


DISPATCHES: dict[str, Dispatch] = {
    'dense': Dispatch(run_dense),
    'dropless': Dispatch(run_dropless, expert_parallel=True),
    'capacity': Dispatch(run_capacity, expert_parallel=True, drops=True),
}


def dispatch_of(name: str) -> Dispatch:
  """DISPATCHES[name]; ValueError naming config.model.moe.dispatch if there is none."""
  try:
    return DISPATCHES[name]
  except KeyError:
    raise ValueError(f'config.model.moe.dispatch={name!r}: expected one of '
                     f'{tuple(DISPATCHES)}') from None


def inference_dispatch(name: str) -> str:
  """The dispatch inference runs for `name`: itself if it never drops, else 'dropless'. A
  dispatch that drops would make a one-token decode step (few tokens routed) disagree with the
  full forward, and HF's models drop nothing."""
  return 'dropless' if dispatch_of(name).drops else name


class MoE(nn.Module):
  """Routed SwiGLU experts (+ optional shared experts), any router, any dispatch."""
  config: ml_collections.ConfigDict  # config.model
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    B, L, D = x_BxLxD.shape
    E, F = cfg.num_experts, cfg.moe.ffn_size
    dtype, pdtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(layers.scaled_init_std(cfg.init_std, cfg.num_layers))
    w1_ExDx2F = layers.param_with_axes(self, 'w1', init, (E, D, 2 * F), ('expert', 'embed', 'mlp'),
                                       pdtype)
    w2_ExFxD = layers.param_with_axes(self, 'w2', out_init, (E, F, D), ('expert', 'mlp', 'embed'),
                                      pdtype)

    x_TxD = x_BxLxD.reshape(B * L, D)
    router = routers.make_router(cfg)
    r = router(x_TxD, deterministic=self.deterministic)
    # For inspection (dead code unless 'intermediates' is mutable): probabilities and
    # the combine weight each token gives each expert (non-zero where the expert fires).
    self.sow('intermediates', 'router_probs', r.probs_TxE.reshape(B, L, E))
    self.sow('intermediates', 'combine_weights', combine_weights(r, B * L, E).reshape(B, L, E))
    w1, w2 = w1_ExDx2F.astype(dtype), w2_ExFxD.astype(dtype)
    dispatch = dispatch_of(cfg.moe.dispatch)
    mesh = jax.sharding.get_abstract_mesh()
    if dispatch.expert_parallel and router.causal and not mesh.empty and mesh.size > 1:
      y_TxD, dropped = expert_parallel_dispatch(x_TxD, r, w1, w2, dispatch.run, cfg, mesh)
    else:
      y_TxD, dropped = dispatch.run(x_TxD, r, w1, w2, cfg, LOCAL)

    N = cfg.router.num_shared_experts
    if N:
      s1_NxDx2F = layers.param_with_axes(self, 'shared_w1', init, (N, D, 2 * F),
                                         ('shared', 'embed', 'mlp'), pdtype)
      s2_NxFxD = layers.param_with_axes(self, 'shared_w2', out_init, (N, F, D),
                                        ('shared', 'mlp', 'embed'), pdtype)
      h_TxNx2F = jnp.einsum('td,ndf->tnf', x_TxD, s1_NxDx2F.astype(dtype))
      y_TxD = y_TxD + jnp.einsum('tnf,nfd->td', layers.swiglu(h_TxNx2F), s2_NxFxD.astype(dtype))

    stats = moe_stats(r, dropped)
    return y_TxD.reshape(B, L, D).astype(dtype), stats


def moe_stats(r: routers.Routing, dropped_fraction):
  E = r.probs_TxE.shape[-1]
  counts_E = jnp.zeros((E,), f32).at[r.expert_A].add(r.valid_A.astype(f32))
  load_E = counts_E / jnp.maximum(counts_E.sum(), 1.0)
  p = r.probs_TxE
  entropy = -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                              axis=-1))
  return dict(load=load_E, max_load=jnp.max(load_E) * E, entropy=entropy,
              dropped_fraction=dropped_fraction, **r.aux)
