"""The memory planner: shard arithmetic, totals against yuanjax.cost, errors, the CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from yuanjax import cost, plan
from yuanjax.model import layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny, yuan_m32  # pylint: disable=g-import-not-at-top


def test_shard_bytes():
  mesh = dict(data=2, fsdp=4, expert=2, tensor=1)
  assert plan.shard_bytes((64, 32), 'float32', P('fsdp', 'expert'), mesh) * 8 == 64 * 32 * 4
  assert plan.shard_bytes((64, 32), 'float32', P(None, None), mesh) == 64 * 32 * 4
  assert plan.shard_bytes((64, 32), 'bfloat16', P(('data', 'fsdp')), mesh) == 8 * 32 * 2
  assert plan.shard_bytes((6,), 'float32', P('fsdp'), mesh) == 2 * 4  # uneven: rounded up


def test_fully_sharded_params_split_exactly_and_replicated_ones_count_fully():
  config = tiny.get_config()
  # Every param dimension named 'embed' goes over fsdp; 'expert' over expert.
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, 4, 2
  r = plan.plan(config)
  assert r['devices'] == 8 and r['mesh'] == dict(data=1, fsdp=4, expert=2, tensor=1)
  params = [x for x in r['leaves'] if x['part'] == 'params']
  full = [x for x in params if {'fsdp', 'expert'} <= set(_axes(x['spec']))]
  replicated = [x for x in params if not _axes(x['spec'])]
  assert full and replicated
  for x in full:  # split over all 8 devices: shards add up to the whole
    assert x['per_device_bytes'] * r['devices'] == x['total_bytes'], x
  for x in replicated:  # every device holds all of it
    assert x['per_device_bytes'] == x['total_bytes'], x
  for x in params:
    assert x['total_bytes'] <= x['per_device_bytes'] * r['devices']
  assert r['per_device']['params'] == sum(x['per_device_bytes'] for x in params)


def _axes(spec):
  out = []
  for a in spec:
    out += [] if a is None else ([a] if isinstance(a, str) else list(a))
  return out


def test_m32_on_8_h100_with_expert_parallelism():
  config = yuan_m32.get_config()
  config.mesh.expert = 8
  r = plan.plan(config, devices=8, device_kind='H100-80G')
  facts = cost.model_facts(config.model)
  assert r['mesh'] == dict(data=1, fsdp=1, expert=8, tensor=1)
  assert r['param_count'] == facts['total_params']
  assert r['totals']['params'] == 4 * facts['total_params']  # float32 params
  assert r['totals']['gradients'] == 4 * facts['total_params']
  # AdamW: mu and nu like the params, plus scalar counts.
  assert 2 * r['totals']['params'] <= r['totals']['optimizer'] < 2 * r['totals']['params'] + 1024
  # Expert weights split 8 ways, everything else replicated (fsdp = tensor = 1).
  leaves = [x for x in r['leaves'] if x['part'] == 'params']
  expert = sum(x['total_bytes'] for x in leaves if 'expert' in _axes(x['spec']))
  rest = sum(x['total_bytes'] for x in leaves if 'expert' not in _axes(x['spec']))
  assert expert > 0.9 * r['totals']['params']
  assert r['per_device']['params'] == expert // 8 + rest
  assert r['per_device']['gradients'] == r['per_device']['params']
  # Per micro-batch: 1536 sequences / 8 data-parallel devices x 4096 tokens.
  assert r['micro_batch_tokens_per_device'] == 1536 / 8 * 4096
  assert r['per_device']['total'] == sum(v for k, v in r['per_device'].items() if k != 'total')
  assert r['fits'] == {'H100-80G': False}  # ~91 GiB of state alone


def test_remat_and_accumulation_shrink_activations():
  config = yuan_m32.get_config()
  config.mesh.expert, config.mesh.fsdp = 8, 4
  config.model.attention_backend = 'dot_product_attention'  # XLA's scores on every device kind
  base = plan.plan(config, devices=32)['per_device']['activations']
  config.model.remat = 'full'
  full = plan.plan(config, devices=32)['per_device']['activations']
  config.train.grad_accum = 48
  r = plan.plan(config, devices=32, device_kind='TPU v5p')
  assert full < base / 4  # the float32 logits (vocab 135040) stay
  # Token-proportional terms shrink 48-fold; one block's float32 weight gradients do not.
  assert r['per_device']['activations'] == pytest.approx(full / 48, rel=0.05)
  assert r['micro_batch_tokens_per_device'] == 4096
  assert r['fits'] == {'TPU v5p': True}


def test_standard_attention_and_fewer_kv_heads_keep_what_they_should():
  """Per token and layer (remat none): standard attention drops LFA's 5 D; G = H / 4
  key/value heads drop 3 (H - G) K of k, v and rotated k."""
  config, mesh = yuan_m32.get_config(), {'data': 2, 'fsdp': 1, 'expert': 8, 'tensor': 1}
  m, act = config.model, lambda: plan.activation_bytes(config, mesh)[1]
  lfa = act()
  m.attention_type = 'standard'
  std = act()
  m.num_kv_heads = m.num_heads // 4
  gqa = act()
  tokens, b = plan.activation_bytes(config, mesh)[2], 2  # bfloat16
  assert lfa - std == pytest.approx(tokens * 5 * m.hidden_size * b)
  assert std - gqa == pytest.approx(tokens * 3 * (m.num_heads - m.num_kv_heads) * m.head_dim * b)


def test_device_kind_by_name_or_as_jax_reports_it():
  config = tiny.get_config()
  by_name = plan.plan(config, device_kind='TPU v5p')
  by_kind = plan.plan(config, device_kind='TPU v5')  # what JAX calls a v5p chip
  assert by_kind['fits'] == by_name['fits'] == {'TPU v5p': True}
  assert by_kind['device_memory_gib'] == {'TPU v5p': 95}
  with pytest.raises(ValueError, match=r"--device_kind='NVIDIA L4': expected one of \['H100-80G'"):
    plan.plan(config, device_kind='NVIDIA L4')  # no memory listed


@pytest.mark.parametrize('axis, value, devices', [('expert', 3, 24), ('expert', 0, 8),
                                                  ('tensor', 3, 3)])
def test_bad_mesh_names_the_axis(axis, value, devices):
  config = yuan_m32.get_config()
  config.mesh[axis] = value
  with pytest.raises(ValueError, match=rf'config\.mesh\.{axis}={value}'):
    plan.plan(config, devices=devices)


def _cli(*flags) -> tuple[list[str], dict]:
  """`python -m yuanjax.plan FLAGS` from the repository root: (its lines, its last line's JSON)."""
  r = subprocess.run([sys.executable, '-m', 'yuanjax.plan', *flags], cwd=REPO,
                     env=dict(os.environ,
                              JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  return lines, json.loads(lines[-1])


def test_cli_prints_table_then_json():
  lines, out = _cli('--config=configs/yuan_m32.py', '--config.mesh.expert=8', '--devices=8',
                    '--device_kind=H100-80G')
  assert out['devices'] == 8 and out['fits'] == {'H100-80G': False}
  assert out['totals']['params'] == 4 * out['param_count']
  assert any('does NOT fit' in line for line in lines[:-1])
  assert math.isclose(out['per_device']['params'] / 2**30,
                      float(next(l for l in lines if l.startswith('params')).split()[1]),
                      abs_tol=0.01)


def test_estimate_within_25_percent_of_xla_memory_analysis():
  """The tiny config's real train step (tiled loss) compiled on this CPU: temp vs gradients +
  activations, argument vs params + optimizer (the slice's comparison is in the README)."""
  config = tiny.get_config()
  config.model.loss_chunk_len = 32
  r = plan.compare(plan.plan(config, devices=1), plan.xla_memory(config))
  assert 0.75 <= r['temp']['ratio'] <= 1.25, r
  assert 0.75 <= r['argument']['ratio'] <= 1.25, r


def test_attention_backends_keep_what_they_should():
  """configs/yuan_m32.py:long (seq 16384), per token of one layer: XLA keeps the scores and
  probabilities (2 H L float32), splash only the log-sum-exp (H floats), cuDNN that and the
  packed rows' L x L mask bias (L b); 'auto' is splash on a TPU, cuDNN on a GPU, XLA without a
  device kind."""
  config, mesh = yuan_m32.get_config('long'), {'data': 1, 'fsdp': 1, 'expert': 8, 'tensor': 1}
  m, L = config.model, 16384
  assert (config.train.seq_len, m.remat) == (L, 'full')
  assert round(layers.rope_base(m.rope_base, m.rotary_dims, m.rope_ntk_factor)) == 40890
  one = {b: plan.activation_bytes(config, mesh, b)[1] for b in ('xla', 'splash', 'cudnn')}
  tokens, H, b = plan.activation_bytes(config, mesh)[2], m.num_heads, 2  # bfloat16
  assert one['xla'] - one['splash'] == pytest.approx(tokens * (2 * H * L * 4 - H * 4))
  assert one['cudnn'] - one['splash'] == pytest.approx(tokens * L * b)
  assert plan.activation_bytes(config, mesh, 'dot_product_attention')[1] == one['xla']
  kinds = {None: 'dot_product_attention', 'TPU v5p': 'splash', 'H100-80G': 'cudnn'}
  assert {k: plan.attention_backend(config, k) for k in kinds} == kinds


@pytest.mark.parametrize('devices, kind, fsdp', [(16, 'H100-80G', 2), (32, 'TPU v5p', 4)])
def test_long_context_fits_only_without_the_scores(devices, kind, fsdp):
  """M32 at seq 16384 (remat full, one row per device per micro-batch) fits 16 H100s with
  cuDNN and a v5p-64 slice with splash; with XLA's attention neither (one layer's float32
  scores and probabilities: 32 GiB)."""
  config = yuan_m32.get_config('long')
  config.mesh.expert, config.mesh.fsdp = 8, fsdp
  config.train.grad_accum = config.train.batch_size // devices
  fused = plan.plan(config, devices, kind)
  config.model.attention_backend = 'dot_product_attention'
  xla = plan.plan(config, devices, kind)
  assert fused['micro_batch_tokens_per_device'] == 16384
  assert fused['fits'] == {kind: True} and xla['fits'] == {kind: False}
  saved = xla['per_device']['activations'] - fused['per_device']['activations']
  # Kept twice: by the recomputed layer and by the block's backward (less cuDNN's mask).
  assert saved == pytest.approx(2 * 32 * 2**30, rel=0.02)


def test_without_a_device_kind_each_kind_is_judged_with_its_own_attention():
  """M32 at seq 16384 on a v5p-64-sized mesh under 'auto', every device kind in one plan()
  call: TPU kinds with splash, GPU kinds with cuDNN, each kind's total the one plan() gives
  with that --device_kind; the table's bytes stay the CPU's (XLA's scores: more than a v5p)."""
  config = yuan_m32.get_config('long')
  config.mesh.expert, config.mesh.fsdp = 8, 4
  config.train.grad_accum = config.train.batch_size // 32
  r = plan.plan(config, 32)
  assert r['attention_backend'] == 'dot_product_attention'
  assert r['device_attention_backend'] == {
      k: 'cudnn' if cost.device(k).gpu else 'splash' for k in cost.planned_devices()
  }
  for kind in ('TPU v5p', 'H200'):
    alone = plan.plan(config, 32, kind)
    assert r['device_total'][kind] == alone['per_device']['total']
    assert r['fits'][kind] and alone['fits'][kind]
  assert r['per_device']['total'] > plan.HEADROOM * cost.memory_gib('TPU v5p') * plan.GiB
  line = next(l for l in plan.format_table(r).splitlines() if l.startswith('TPU v5p'))
  assert line.endswith(f"({r['device_total']['TPU v5p'] / plan.GiB:.1f} GiB of 80.8 usable at "
                       '85%; attention=splash)')


def test_auto_on_a_tpu_plans_xla_attention_where_splash_cannot_tile_the_length():
  """'auto' takes XLA's attention on a TPU when config.model.splash cannot tile train.seq_len
  (yuanjax.model.attention), so the plan counts the scores that run will keep."""
  config = tiny.get_config()
  config.model.attention_backend = 'auto'
  assert plan.plan(config, device_kind='TPU v5p')['attention_backend'] == 'splash'  # 128
  config.train.seq_len = 200
  r = plan.plan(config, device_kind='TPU v5p')
  assert r['attention_backend'] == 'dot_product_attention'
  assert r['per_device'] == plan.plan(config)['per_device']  # the CPU's: XLA's scores too


def test_explicit_splash_is_planned_on_tpus_only():
  config = tiny.get_config()
  config.model.attention_backend = 'splash'
  tpus = [k for k in cost.planned_devices() if not cost.device(k).gpu]
  assert list(plan.plan(config)['fits']) == tpus
  with pytest.raises(ValueError, match=r"config\.model\.attention_backend='splash'.* gpu"):
    plan.plan(config, device_kind='H100-80G')


def _inference_by_hand(config, B: int, S: int, weight_bytes: float, dp: int = 1, tp: int = 1):
  """Weights, KV cache and LFA state per device of tiny (float32 cache; params not split):
  counted from the config's sizes, not from any tree."""
  m = config.model
  facts = cost.model_facts(m)
  L, G, K, D = m.num_layers, m.num_kv_heads or m.num_heads, m.head_dim, m.hidden_size
  rows = -(-B // dp)
  return dict(weights=facts['total_params'] * weight_bytes,
              kv_cache=2 * L * rows * S * (G // tp) * K * 4 + rows * 4,
              lfa_state=L * rows * 2 * D * 4)


@pytest.mark.parametrize('weight_bytes', [None, 1])
def test_inference_memory_is_weights_cache_and_lfa_state(weight_bytes):
  config = tiny.get_config()
  config.mesh.data = 1
  r = plan.inference(config, 3, 40, weight_bytes)
  want = _inference_by_hand(config, 3, 40, 4 if weight_bytes is None else 1)
  assert {k: v for k, v in r['per_device'].items() if k != 'total'} == want
  assert r['per_device']['total'] == sum(want.values())
  assert r['devices'] == 1 and r['weight_bytes'] == (weight_bytes or 4)


def test_inference_cache_splits_rows_over_data_and_heads_over_tensor():
  config = tiny.get_config()
  config.mesh.data, config.mesh.tensor = 2, 2
  r = plan.inference(config, 5, 64, 1)  # 5 rows: 3 per device (generation pads to 6)
  want = _inference_by_hand(config, 5, 64, 1, dp=2, tp=2)
  assert r['per_device']['kv_cache'] == want['kv_cache']
  assert r['per_device']['lfa_state'] == want['lfa_state']
  assert r['per_device']['weights'] < want['weights']  # heads, ffn, vocab split over tensor
  with pytest.raises(ValueError, match='--inference_batch=0: must be >= 1'):
    plan.inference(config, 0, 64)
  config.mesh.expert = 16
  with pytest.raises(ValueError, match='config.model.num_experts=8: must be divisible'):
    plan.inference(config, 4, 64, devices=64)


def test_cli_inference_prints_table_then_json():
  lines, out = _cli(f'--config={REPO}/configs/tiny.py', '--config.mesh.data=1',
                    '--inference_batch=2', '--inference_context=16', '--weight_bytes=1',
                    '--device_kind=H100-80G')
  assert lines[0].startswith('inference: mesh data=1 fsdp=1 expert=1 tensor=1 (1 devices)')
  assert out['per_device']['total'] == sum(v for k, v in out['per_device'].items() if k != 'total')
  assert out['fits'] == {'H100-80G': True} and 'H100-80G' in lines[-2]
