import copy
import types

import numpy as np
import pytest

from yuanjax import config_lib, sharding
from tests.conftest import rel_err  # noqa: F401  (conftest puts the repo on sys.path)
import configs.demo as demo
import configs.mixtral_8x7b as mixtral_8x7b
import configs.tiny as tiny
import configs.xverse_moe_a4b as xverse_moe_a4b
import configs.yuan_m32 as yuan_m32

CONFIGS = (demo, tiny, yuan_m32, mixtral_8x7b, xverse_moe_a4b)


@pytest.mark.parametrize('module', CONFIGS, ids=lambda m: m.__name__)
def test_configs_and_variants_validate(module):
  config_lib.validate(module.get_config())
  config_lib.validate(module.get_config('runlocal'))
  name = module.__name__.split('.')[-1]
  with pytest.raises(ValueError, match=f"^configs/{name}.py: unknown variant 'nope' "):
    module.get_config('nope')


@pytest.mark.parametrize('module', CONFIGS, ids=lambda m: m.__name__)
def test_runlocal_is_a_short_run(module):
  config = module.get_config('runlocal')
  assert config.train.num_steps <= 6 and config.train.eval_every == 0
  assert not config.train.progress and 0 < config.checkpoint.every < config.train.num_steps


def test_unknown_variant_lists_the_variants():
  for arg in (None, 'a', 'b'):
    config_lib.check_variant(arg, (None, 'a', 'b'), 'configs/x.py')
  with pytest.raises(ValueError,
                     match=r"^configs/x\.py: unknown variant 'c' \(expected none, a or b\)$"):
    config_lib.check_variant('c', (None, 'a', 'b'), 'configs/x.py')


def test_m32_config_is_the_spec():
  m = yuan_m32.get_config().model
  assert (m.num_layers, m.hidden_size, m.num_heads, m.head_dim, m.rotary_dims) == (24, 2048, 16,
                                                                                   256, 128)
  assert (m.num_experts, m.router.top_k, m.moe.ffn_size, m.vocab_size) == (32, 2, 8192, 135040)
  assert m.router.type == 'attention' and m.router.load_balance_weight == 0.0
  assert m.norm_eps == 1e-6 and m.rope_base == 10000.0


@pytest.mark.parametrize('field,value,pattern', [
    ('model.router.top_k', 99, r'config\.model\.router\.top_k=99'),
    ('train.seq_len', 4096, r'config\.train\.seq_len=4096: longer than the rotary range'),
    ('train.grad_accum', 3, r'config\.train\.grad_accum=3'),
    ('optimizer.lr', -1.0, r'config\.optimizer\.lr'),
    ('data.fim_rate', 1.5, r'config\.data\.fim_rate'),
    ('model.moe.dispatch', 'magic', r'config\.model\.moe\.dispatch'),
    ('model.attention_backend', 'flash', r'config\.model\.attention_backend'),
    ('model.scan_unroll', 0, r'config\.model\.scan_unroll=0: must be a positive integer'),
    ('model.attention_query_blocks', 0, r'config\.model\.attention_query_blocks=0'),
])
def test_bad_values_name_the_field(field, value, pattern):
  config = demo.get_config()
  config_lib.override(config, {field: value})
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate(config)


# Each field added to config.model after configs were first saved, and the value that gives a
# config saved before it its behaviour then (written out here, not read from config_lib).
OLD_BEHAVIOUR = {
    'rope_hf_bf16': False,
    'attention_query_blocks': 1,
    'scan_unroll': 1,
    'loss_chunk_len': 0,  # the loss took the logits whole; m32_model() now says 1024
    'loss_unroll': False,
    'num_kv_heads': 0,
    'attention_type': 'lfa',
    'tie_embeddings': True,
    'moe.grouped_matmul': 'ragged_dot',
    'moe.megablox_tiling': (128, 128, 128),
    # Never read before it existed; an old config run now with attention_backend='splash'
    # or 'auto' gets MaxText's 512 tiles.
    'splash': {
        b: 512 for b in ('block_q', 'block_kv', 'block_kv_compute', 'block_q_dkv', 'block_kv_dkv',
                         'block_kv_dkv_compute', 'block_q_dq', 'block_kv_dq')
    },
}


def plain(value):
  """A config field as plain data: a nested ConfigDict (e.g. `splash`) as a dict."""
  return value.to_dict() if hasattr(value, 'to_dict') else value


def without_added_fields(m) -> dict:
  """config.model as a dict saved before every field of OLD_BEHAVIOUR existed."""
  saved = m.to_dict()
  for key in OLD_BEHAVIOUR:
    *path, last = key.split('.')
    node = saved
    for k in path:
      node = node[k]
    del node[last]
  return saved


def test_upgrade_gives_a_config_saved_before_each_field_its_old_behaviour():
  current = config_lib.m32_model()
  saved = without_added_fields(current)
  before = copy.deepcopy(saved)
  m = config_lib.upgrade(saved)
  assert saved == before  # the saved dict is left as it was
  assert sorted(config_lib.SAVED_CONFIG_DEFAULTS) == sorted(OLD_BEHAVIOUR)
  for key, value in OLD_BEHAVIOUR.items():
    node = m
    for k in key.split('.'):
      node = node[k]
    assert plain(node) == value, key
  assert current.loss_chunk_len == 1024 and m.loss_chunk_len == 0
  config_lib.validate_model(m)
  assert {
      k: v for k, v in m.to_dict().items() if k not in OLD_BEHAVIOUR and k != 'moe'
  } == {
      k: v for k, v in current.to_dict().items() if k not in OLD_BEHAVIOUR and k != 'moe'
  }
  # What a config saved says is kept, whatever the default; a current config comes back equal.
  kept = config_lib.upgrade({**saved, 'loss_chunk_len': 512, 'attention_type': 'standard'})
  assert (kept.loss_chunk_len, kept.attention_type) == (512, 'standard')
  assert config_lib.upgrade(current).to_dict() == current.to_dict()


@pytest.mark.parametrize('overrides,pattern', [
    ({
        'model.attention_backend': 'splash',
        'train.seq_len': 200
    }, r'config\.model\.splash\.block_q=512: splash needs a sequence length \(200\)'),
    ({
        'model.attention_backend': 'auto',
        'model.splash.block_kv': 100
    }, r'config\.model\.splash\.block_kv=100: must be a positive multiple of 128'),
    ({
        'model.attention_backend': 'cudnn',
        'model.dtype': 'float32'
    }, r"config\.model\.dtype='float32': attention_backend='cudnn' needs"),
])
def test_attention_backend_settings_name_the_field(overrides, pattern):
  config = demo.get_config()
  config_lib.override(config, overrides)
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate(config)


def test_auto_takes_a_length_splash_cannot_tile():
  """Under 'auto' such a length runs XLA's attention on a TPU (yuanjax.model.attention, and
  the planner counts its scores); only an explicit 'splash' refuses it (above)."""
  config = demo.get_config()
  config_lib.override(config, {'model.attention_backend': 'auto', 'train.seq_len': 200})
  config_lib.validate(config)


def test_m32_long_is_16k_with_the_ntk_base_and_full_remat():
  config = yuan_m32.get_config('long')
  config_lib.validate(config)
  m = config.model
  assert (config.train.seq_len, m.max_seq_len, m.rope_ntk_factor, m.remat) == (16384, 16384, 4.0,
                                                                               'full')
  assert m.attention_backend == 'auto' and m.splash.block_q == 512
  config.model.attention_backend = 'splash'
  config_lib.validate(config)  # 512-blocks tile 16384


def test_query_blocks_need_the_xla_backend():
  config = demo.get_config()
  config.model.update(attention_backend='dot_product_attention', attention_query_blocks=4)
  with pytest.raises(ValueError, match=r"attention_query_blocks=4: only the 'xla'"):
    config_lib.validate(config)
  config.model.attention_backend = 'xla'
  config_lib.validate(config)


def test_mesh_rules_name_the_field():
  config = demo.get_config()
  mesh = types.SimpleNamespace(shape={'data': 3, 'fsdp': 1, 'expert': 1, 'tensor': 1})
  with pytest.raises(ValueError, match=r'config\.train\.batch_size=16.*data-parallel size'):
    config_lib.validate_against_mesh(config, mesh)
  mesh.shape = {'data': 1, 'fsdp': 1, 'expert': 3, 'tensor': 1}
  config.train.batch_size = 3
  with pytest.raises(ValueError, match=r'config\.model\.num_experts=8'):
    config_lib.validate_against_mesh(config, mesh)
  mesh.shape = {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 3}
  with pytest.raises(ValueError, match=r'config\.model\.num_heads=4'):
    config_lib.validate_against_mesh(config, mesh)
  mesh.shape = {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 2}
  config.model.update(num_heads=6, num_kv_heads=3)
  with pytest.raises(ValueError, match=r'config\.model\.num_kv_heads=3'):
    config_lib.validate_against_mesh(config, mesh)
  config.model.update(num_heads=4, num_kv_heads=0)
  config.model.moe.ffn_size = 63
  with pytest.raises(ValueError, match=r'config\.model\.moe\.ffn_size=63'):
    config_lib.validate_against_mesh(config, mesh)


def test_baseline_configs_are_the_published_architectures():
  m = mixtral_8x7b.get_config().model
  assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim) == (32, 4096, 32, 8,
                                                                                    128)
  assert (m.num_experts, m.router.top_k, m.moe.ffn_size, m.vocab_size) == (8, 2, 14336, 32000)
  assert (m.rotary_dims, m.rope_base, m.norm_eps) == (128, 1e6, 1e-5)
  assert (m.attention_type, m.tie_embeddings, m.router.type) == ('standard', False, 'linear')
  assert m.router.norm_topk_prob and m.router.num_shared_experts == 0
  x = xverse_moe_a4b.get_config().model
  assert (x.num_layers, x.hidden_size, x.num_heads, x.moe.ffn_size) == (28, 2560, 32, 1728)
  assert (x.num_experts, x.router.top_k, x.router.num_shared_experts) == (64, 6, 2)
  assert (x.attention_type, x.tie_embeddings, x.vocab_size) == ('standard', False, 100534)


def test_mesh_shape():
  cfg = sharding.mesh_config()
  assert sharding.mesh_shape(cfg, 8) == (8, 1, 1, 1)
  cfg.expert = 4
  assert sharding.mesh_shape(cfg, 8) == (2, 1, 4, 1)
  cfg.data = 3
  with pytest.raises(ValueError, match='config.mesh'):
    sharding.mesh_shape(cfg, 8)


@pytest.mark.parametrize('module', CONFIGS, ids=lambda m: m.__name__)
def test_sweep_variants_validate(module):
  variants = module.sweep()
  assert len(variants) >= 2
  for overrides in variants:
    config = module.get_config()
    config_lib.override(config, overrides)
    config_lib.validate(config)


def test_multislice_dcn_mesh():
  """config.mesh.dcn splits an axis across slices: global size ici * dcn, slices contiguous."""
  cfg = sharding.mesh_config()
  cfg.update(dict(data=-1, fsdp=2))
  cfg.dcn.data = 2
  assert sharding.mesh_shape(cfg, 16) == (8, 2, 1, 1)  # 2 slices of 8: data 4 x 2
  devices = [
      types.SimpleNamespace(id=i, slice_index=i // 8, platform='cpu', device_kind='cpu',
                            process_index=i // 4) for i in range(16)
  ]
  grid = sharding.hybrid_device_grid(cfg, devices)
  assert grid.shape == (8, 2, 1, 1)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slices[:4] == 0).all() and (slices[4:] == 1).all()  # data axis: slice-major
  cfg.dcn.data = 4  # 4 granules asked, 2 present
  with pytest.raises(ValueError, match='config.mesh.dcn'):
    sharding.hybrid_device_grid(cfg, devices)
  cfg.dcn.data = 3
  with pytest.raises(ValueError, match='config.mesh.dcn'):
    sharding.mesh_shape(cfg, 16)
  cfg.dcn.data = 0
  with pytest.raises(ValueError, match=r'config\.mesh\.dcn\.data=0'):
    sharding.mesh_shape(cfg, 16)
