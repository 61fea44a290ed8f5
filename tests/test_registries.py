"""Adding a router or a dispatch is one class or one function plus its registry entry.

A toy of each is registered (and removed after): the cost model, the compiled step's analysis,
generation, config validation and the MoE layer take it with no other edit.
"""
import jax
import jax.numpy as jnp
import pytest

from tests.model.helpers import rel_err, tiny
from tests.test_cost import matmul_flops_from_params
from tests.test_generate import argmax_of_full_forwards, setup_model
from tests.test_step_cost import tiny_config
from yuanjax import config_lib, cost, sharding, step_cost
from yuanjax import generate as gen
from yuanjax.model import layers, moe, routers


class BilinearRouter(routers.Router):
  """A router no table anywhere knows: logits = (u Wa) * (u Wb), elementwise."""

  @staticmethod
  def logit_flops(m) -> float:
    return 2 * 2 * m.hidden_size * m.num_experts  # the two projections

  def logits(self, u_TxD):
    shape, axes = (u_TxD.shape[-1], self.config.num_experts), ('embed', 'router')
    wa_DxE, wb_DxE = (self.dense_init(n, shape, axes).astype(jnp.float32) for n in ('wa', 'wb'))
    return (u_TxD @ wa_DxE) * (u_TxD @ wb_DxE)


def run_gather(x_TxD, r, w1_ExDx2F, w2_ExFxD, cfg, ex):
  """Each slot gathers its expert's weights ([A, D, 2F]: fine at toy sizes); drops nothing."""
  del cfg, ex
  h_Ax2F = jnp.einsum('ad,adf->af', x_TxD[r.token_A], w1_ExDx2F[r.expert_A])
  y_AxD = jnp.einsum('af,afd->ad', layers.swiglu(h_Ax2F), w2_ExFxD[r.expert_A])
  w_A = jnp.where(r.valid_A, r.weight_A, 0.0).astype(x_TxD.dtype)
  return jnp.zeros_like(x_TxD).at[r.token_A].add(y_AxD * w_A[:, None]), jnp.zeros((), jnp.float32)


@pytest.fixture
def bilinear():
  routers.ROUTERS['bilinear'] = BilinearRouter
  yield 'bilinear'
  del routers.ROUTERS['bilinear']


@pytest.fixture
def gather():
  moe.DISPATCHES['gather'] = moe.Dispatch(run_gather)
  yield 'gather'
  del moe.DISPATCHES['gather']


def test_a_new_router_is_counted_by_the_cost_model(bilinear):
  m = config_lib.tiny_model()
  m.router.type = bilinear
  facts = cost.model_facts(m)
  assert facts['router_params'] == m.num_layers * 2 * m.hidden_size * m.num_experts
  assert cost.forward_flops_by_part(m)['router'] == m.num_layers * 4 * m.hidden_size * m.num_experts
  assert facts['forward_flops_per_token'] == matmul_flops_from_params(m)
  assert bilinear in routers.causal_routers()


def test_a_new_router_is_analysed_in_the_compiled_step(bilinear):
  """Its dots are found under the router part, and equal what its class declares."""
  config = tiny_config(1)
  config.model.router.type = bilinear
  out = step_cost.analyse(config, sharding.make_mesh(config.mesh))
  want = 3 * BilinearRouter.logit_flops(config.model)
  assert out['model_parts']['router'] == want
  assert out['executed_parts']['router'] == pytest.approx(want, rel=1e-9)


def test_a_new_router_generates(bilinear):
  """Generation takes it (it is causal) and its greedy tokens are the full forwards' argmax."""
  setup = setup_model(tiny(**{'router.type': bilinear}))
  assert setup['greedy'] == argmax_of_full_forwards(setup)


def test_a_new_dispatch_is_validated_run_and_kept_at_inference(gather):
  cfg = tiny(**{'moe.dispatch': gather})  # validates
  x = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
  layer = moe.MoE(cfg)
  v = layer.init(jax.random.key(0), x)
  y, _ = layer.apply(v, x)
  y_dense, _ = moe.MoE(tiny(**{'moe.dispatch': 'dense'})).apply(v, x)
  assert rel_err(y, y_dense) < 1e-5
  assert moe.inference_dispatch(gather) == gather  # it never drops
  moe.DISPATCHES[gather] = moe.Dispatch(run_gather, drops=True)
  assert moe.inference_dispatch(gather) == 'dropless'
  assert gen.generation_config(cfg).moe.dispatch == 'dropless'
