"""benchmarks/train_step.py on tiny configs: it runs the real step, its JSON has sane values,
and its FLOP analysis counts every layer and finds only the known waste."""
import importlib.util
import json
import os

import pytest

from yuanjax import cost, step_cost
from tests.test_step_cost import tiny_config

_SPEC = importlib.util.spec_from_file_location(
    'train_step_benchmark',
    os.path.join(os.path.dirname(__file__), '..', '..', 'benchmarks', 'train_step.py'))
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

B, L = 2, 32  # 64 tokens: capacity ceil(1.25 * 64 * 2 / 8) = 20 slots, exactly 1.25x
LAYER_PARTS = ('router', 'experts', 'lf_conv', 'qkvo_proj', 'attention', 'other_dots')


@pytest.fixture(scope='module')
def one_layer():
  """The benchmark run: one layer, so the real step is its own analysis (one compile)."""
  return bench.run(tiny_config(1, B, L), steps=2, warmup=1, compile_only=False)


@pytest.fixture(scope='module')
def two_layers():
  """Two layers, and the loss tiled in 4 chunks (unrolled for the analysis too)."""
  config = tiny_config(2, B, L)
  config.model.loss_chunk_len = L // 4
  return step_cost.analyse(config, bench.sharding.make_mesh(config.mesh))


def test_json_has_the_fields_with_sane_values(one_layer):
  out = json.loads(json.dumps(one_layer))  # strict JSON, as printed
  assert out['device_kind'] == 'cpu' and out['mfu'] is None  # no known peak
  assert out['step_s_min'] <= out['step_s'] and out['compile_s'] > 0
  assert out['tokens_per_s'] == pytest.approx(B * L / out['step_s'])
  assert out['model_flops_per_token'] == cost.train_flops_per_token(tiny_config(1, B, L))
  # Params + AdamW's two moments in float32 are arguments; activations are temporaries.
  assert out['argument_bytes'] > 3 * 4 * 100_000 and out['temp_bytes'] > 0
  # The dots do at least the model's FLOPs (less would be uncounted FLOPs) and at most that
  # plus the experts' capacity padding (x1.25) and the masked half of attention (x2); at
  # d = 64 the elementwise work and AdamW are a visible but minor share (13% here).
  ex, mo = out['executed_parts'], out['model_parts']
  dots = sum(v for k, v in ex.items() if k not in ('elementwise', 'optimizer'))
  model = out['model_flops_per_token']
  assert model <= dots <= model + 0.25 * mo['experts'] + mo['attention']
  assert 0 < ex['elementwise'] + ex['optimizer'] < 0.2 * out['executed_flops_per_token']
  assert out['flops_ratio'] == pytest.approx(out['executed_flops_per_token'] / model)
  assert 'executed' in bench.summary(out) and out['analysis_loops'] == 0


def test_analysis_counts_every_layer(one_layer, two_layers):
  """Layers unrolled for the analysis: two layers, twice each layer's dots (a scanned step's
  cost analysis counts its loop body once, whatever the depth)."""
  one, two = one_layer['executed_parts'], two_layers['executed_parts']
  assert two_layers['analysis_loops'] == 0
  for part in LAYER_PARTS:
    assert two[part] == 2 * one[part] > 0, part
  assert two['lm_head'] == one['lm_head']  # the tiled loss does the one-piece loss's FLOPs
  # The total grows by one layer's dots and its share of the elementwise work and of the
  # optimizer (at most what the one-layer step had in all).
  grow = two_layers['executed_flops_per_token'] - one_layer['executed_flops_per_token']
  layer_dots = sum(one[p] for p in LAYER_PARTS)
  assert layer_dots <= grow <= layer_dots + one['elementwise'] + one['optimizer']


def test_waste_is_capacity_padding_and_the_masked_half(two_layers):
  """Executed dots equal the model's FLOPs part by part, except the experts (capacity
  factor 1.25: exactly 1.25x here) and attention (the full L x L square, 2L/(L+1) x causal)."""
  ex, mo = two_layers['executed_parts'], two_layers['model_parts']
  for part in ('router', 'lf_conv', 'qkvo_proj', 'lm_head'):
    assert ex[part] == pytest.approx(mo[part], rel=1e-9), part
  assert ex['experts'] == pytest.approx(1.25 * mo['experts'], rel=1e-9)
  assert ex['attention'] == pytest.approx(2 * L / (L + 1) * mo['attention'], rel=1e-9)
