"""yuanjax.cost's model FLOPs by part, and yuanjax.step_cost counting a compiled module's dots.
(The compiled train step's analysis is tested through the benchmark that prints it:
tests/benchmarks/test_train_step.py.)"""
import jax
import jax.numpy as jnp
import pytest

from yuanjax import config_lib, cost, step_cost


def tiny_config(num_layers=2, batch_size=2, seq_len=32):
  """configs/tiny.py's model (capacity dispatch at 1.25, xla attention), a small batch."""
  config = config_lib.base_config()
  config.model = config_lib.tiny_model()
  config.model.num_layers = num_layers
  config.train.update(dict(batch_size=batch_size, seq_len=seq_len))
  return config


def test_model_flops_equal_a_hand_count():
  # configs/tiny.py's model: V 512, D 64, 2 layers, 4 heads x 32, 8 experts top-2, ffn 64.
  V, D, N, H, K, E, F, L = 512, 64, 2, 4, 32, 8, 64, 32
  per_layer = (
      4 * D * H * K  # q, k, v, o
      + 2 * D * (D // 2) * 2  # the two kernel-2 LF convolutions
      + 3 * D * E  # the Attention Router's q, k, v
      + 2 * 3 * D * F)  # two of the experts, each w1 [D, 2F] and w2 [F, D]
  matmul_params = V * D + N * per_layer  # the tied embedding is the LM head
  attention = N * 2 * 2 * H * K * (L + 1) / 2  # QK^T and AV, causal: mean context (L+1)/2
  want = 3 * (2 * matmul_params + attention)
  config = tiny_config(seq_len=L)
  assert cost.train_flops_per_token(config) == pytest.approx(want, rel=1e-12)
  assert sum(cost.train_flops_by_part(config).values()) == pytest.approx(want, rel=1e-12)


def test_untied_grouped_model_flops_equal_a_hand_count():
  """Mixtral's shape: standard attention (no LF), 2 of 4 key/value heads, linear router, an
  untied lm_head (the embedding is a lookup: no FLOPs)."""
  V, D, N, H, G, K, E, F, L = 512, 64, 2, 4, 2, 32, 8, 64, 32
  per_layer = (
      2 * D * H * K + 2 * D * G * K  # q and o; k and v
      + D * E + 2 * 3 * D * F)  # the linear router; two experts
  want = 3 * (2 * (V * D + N * per_layer) + N * 2 * 2 * H * K * (L + 1) / 2)
  config = tiny_config(seq_len=L)
  config.model.update(attention_type='standard', num_kv_heads=G, tie_embeddings=False)
  config.model.router.type = 'linear'
  assert cost.train_flops_per_token(config) == pytest.approx(want, rel=1e-12)
  assert sum(cost.train_flops_by_part(config).values()) == pytest.approx(want, rel=1e-12)


def test_dot_flops_of_a_matmul_equal_cost_analysis():
  a, b = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32), jax.ShapeDtypeStruct((3, 7, 11), jnp.float32)
  compiled = jax.jit(lambda x, y: jnp.einsum('bik,bkj->bij', x, y)).lower(a, b).compile()
  (_, flops), = step_cost.dot_flops(compiled.as_text())
  assert flops == 2 * 3 * 5 * 7 * 11 == compiled.cost_analysis()['flops']


def test_parts_by_op_name():
  name = 'jit(train_step)/transpose(jvp(Transformer))/blocks/layer_1/%s/dot_general'
  assert step_cost.part_of(name % 'moe/router/router.logits') == 'router'
  assert step_cost.part_of(name % 'moe/ecd,edf->ecf') == 'experts'
  assert step_cost.part_of(name % 'attention/lf/blc,cm->blm') == 'lf_conv'
  assert step_cost.part_of(name % 'attention/bld,dhk->blhk') == 'qkvo_proj'
  assert step_cost.part_of(name % 'attention/bld,dgk->blgk') == 'qkvo_proj'  # GQA's k, v
  assert step_cost.part_of(name % 'attention/blgrk,bsgk->bgrls') == 'attention'
  assert step_cost.part_of('jit(train_step)/jvp(Transformer)/bld,vd->blv/dot_general') == 'lm_head'
  assert step_cost.part_of('') == 'other_dots'
