"""HF Yuan2-M32 checkpoint import/export (yuanjax.interop.hf, python -m yuanjax.convert), the
converted format (yuanjax.interop.converted) and loading (yuanjax.loader).

Tiny random checkpoints in the exact HF layout (hidden 32, 2 heads x head_dim 32: rotary on
hidden // heads = 16 of 32 dims; 2 layers, 4 experts top-2, vocab 97; tests/interop/
checkpoints.py). Logits are checked against hf_reference.forward, a NumPy transcription of the
HF code (for every layout, and the round trip: test_roundtrip.py).
"""
import importlib.util
import json
import os
import pickle
import shutil
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import rel_err
from tests.interop import checkpoints
from tests.interop import hf_reference as R
from tests.interop.hf_reference import read_all
from yuanjax import config_lib, convert, loader, train_state
from yuanjax.interop import converted as converted_lib
from yuanjax.interop import hf, hf_mapping, torch_bin
from yuanjax.model import Transformer

TOKENS = checkpoints.TOKENS['yuan']
F32 = checkpoints.F32
YUAN_KINDS = [kind for family, kind in checkpoints.KINDS if family == 'yuan']


def logits_of(path, exact_hf_rope=False):
  return checkpoints.logits_of(str(path), 'yuan', exact_hf_rope)


@pytest.fixture(params=YUAN_KINDS)
def converted(request, hf_checkpoint):
  """(kind, HF src dir, converted dst dir, tensors, config); logits and the round trip of
  each: tests/interop/test_roundtrip.py."""
  c = hf_checkpoint('yuan', request.param)
  return c.kind, c.src, c.dst, c.tensors, c.config


def _per_layer_abstract(m):
  """abstract_params(m) with each per-layer param replaced by {'0': layer 0, '1': ...}: the
  tree a converted dir's params/ holds."""
  flat = {}
  for g in hf_mapping.tensor_groups(m):
    for leaf, shape in zip(g.leaves, g.leaf_shapes):
      dtype = np.dtype(m.param_dtype)
      if g.per_layer:
        for i in range(m.num_layers):
          flat[leaf + (str(i),)] = jax.ShapeDtypeStruct(shape, dtype)
      else:
        flat[leaf] = jax.ShapeDtypeStruct(shape, dtype)
  return converted_lib.nest(flat)


def test_params_restore_with_plain_orbax(converted):
  """StandardCheckpointer().restore(DST/params, per-layer tree) -> float32; stacking the
  layers gives the model's params (= hf.restore_params = the in-memory conversion)."""
  kind, src, dst, tensors, _ = converted
  with open(os.path.join(dst, 'config.json')) as f:
    saved = json.load(f)
  assert saved['format'] == converted_lib.FORMAT == 'yuanjax-hf/2' and saved['hf']['has_lm_head']
  m = config_lib.upgrade(saved['model'])
  per_layer = ocp.StandardCheckpointer().restore(os.path.join(dst, 'params'),
                                                 _per_layer_abstract(m))
  assert {a.dtype for a in jax.tree.leaves(per_layer)} == {np.dtype(np.float32)}
  emb = tensors['model.embed_tokens.weight'].astype(np.float32)
  np.testing.assert_array_equal(per_layer['embedding'], emb)
  stack = lambda d: np.stack([d[str(i)] for i in range(m.num_layers)])
  flat = {}
  for g in hf_mapping.tensor_groups(m):
    for leaf in g.leaves:
      flat[leaf] = stack(converted_lib.get(per_layer, leaf)) if g.per_layer else converted_lib.get(
          per_layer, leaf)
  params = converted_lib.nest(flat)
  abstract = train_state.abstract_params(m)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params,
               converted_lib.restore_params(dst, abstract))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, hf.params_from_hf(src)[1])
  stored = ocp.StandardCheckpointer().metadata(os.path.join(dst, 'params')).item_metadata.tree
  assert stored['embedding'].dtype == tensors[
      'model.embed_tokens.weight'].dtype  # bf16 stays bf16 on disk
  spec = importlib.util.spec_from_file_location('converted_config', os.path.join(dst, 'config.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  config_lib.validate(cfg) if hasattr(config_lib, 'validate') else config_lib.validate_model(
      cfg.model)
  assert cfg.model.to_dict() == m.to_dict()
  assert (cfg.model.head_dim, cfg.model.rotary_dims, cfg.model.moe.dispatch) == (32, 16, 'dropless')


def test_converted_dir_saved_before_the_added_fields(converted, tmp_path):
  """A converted dir whose config.json holds a config.model saved before the fields added
  since (none of them in it) loads through config_lib.upgrade, in the loader and in its
  config.py: each field gets its old behaviour, and the logits are those of the current dir."""
  from tests.test_config import OLD_BEHAVIOUR, plain, without_added_fields
  _, _, dst, _, _ = converted
  old = tmp_path / 'old'
  shutil.copytree(dst, old)
  with open(os.path.join(dst, 'config.json')) as f:
    saved = json.load(f)
  saved['model'] = without_added_fields(config_lib.upgrade(saved['model']))
  with open(old / 'config.json', 'w') as f:
    json.dump(saved, f)
  model, _ = checkpoints.loaded(str(old))
  spec = importlib.util.spec_from_file_location('old_config', os.path.join(old, 'config.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for m in (model.config, module.get_config().model):
    assert (m.loss_chunk_len, m.num_kv_heads, m.attention_type, m.tie_embeddings,
            m.rope_hf_bf16) == (0, 0, 'lfa', True, False)
    assert {
        k: plain(m[k]) for k in OLD_BEHAVIOUR if '.' not in k
    } == {
        k: v for k, v in OLD_BEHAVIOUR.items() if '.' not in k
    }
  np.testing.assert_array_equal(logits_of(old), logits_of(dst))


def test_import_writes_one_leaf_per_layer(converted):
  """The memory property, structurally: every per-layer param is stored as one leaf per layer
  (none has the layers axis), so from-hf holds at most one layer of a param at a time."""
  _, _, dst, _, _ = converted
  with open(os.path.join(dst, 'config.json')) as f:
    m = config_lib.upgrade(json.load(f)['model'])
  assert m.num_layers > 1
  stored = ocp.StandardCheckpointer().metadata(os.path.join(dst, 'params')).item_metadata.tree
  shapes = {
      tuple(k.key for k in path): tuple(
          leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(stored)
  }
  expected = {}
  for g in hf_mapping.tensor_groups(m):
    for leaf, shape in zip(g.leaves, g.leaf_shapes):
      for i in (range(m.num_layers) if g.per_layer else [None]):
        expected[leaf if i is None else leaf + (str(i),)] = tuple(shape)
  assert shapes == expected
  largest_layer = max(int(np.prod(s)) for g in hf_mapping.tensor_groups(m) for s in g.leaf_shapes)
  assert max(int(np.prod(s)) for s in shapes.values()) == largest_layer


def test_sharded_restore_stacks_on_device(converted):
  """Abstract leaves with shardings: layers restored sharded like the stacked leaf minus its
  layers axis, stacked on device into the stacked leaf's sharding."""
  _, _, dst, _, _ = converted
  with open(os.path.join(dst, 'config.json')) as f:
    m = config_lib.upgrade(json.load(f)['model'])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
  P = jax.sharding.PartitionSpec
  spec = lambda a: P('x') if a.ndim >= 2 and a.shape[0] == m.num_layers else P()
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(
          mesh, spec(a))), train_state.abstract_params(m))
  got = converted_lib.restore_params(dst, abstract)
  ref = converted_lib.restore_params(dst, train_state.abstract_params(m))
  for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(ref), jax.tree.leaves(abstract)):
    assert isinstance(a, jax.Array) and a.sharding == s.sharding and a.dtype == s.dtype
    np.testing.assert_array_equal(np.asarray(a), b)


def test_old_format_refused_with_a_clear_error(converted, tmp_path, capsys):
  _, _, dst, _, _ = converted
  old = tmp_path / 'old'
  os.makedirs(old)
  with open(os.path.join(dst, 'config.json')) as f:
    saved = json.load(f)
  saved['format'] = 'yuanjax-hf/1'
  with open(old / 'config.json', 'w') as f:
    json.dump(saved, f)
  assert converted_lib.is_converted(str(old))
  for call in (lambda: loader.load_model(str(old)),
               lambda: converted_lib.restore_params(str(old), {}),
               lambda: hf.export_hf(str(old), str(tmp_path / 'out'))):
    with pytest.raises(
        ValueError, match=r"'yuanjax-hf/1'.*Re-run the conversion: python -m "
        r'yuanjax.convert from-hf SRC .* --overwrite'):
      call()
  assert convert.main(['to-hf', str(old), str(tmp_path / 'out'), '-q']) == 1
  assert 'from-hf' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'out')


def test_layout_quirks():
  """Quirk 1 (interleaved q/k heads) and the conv kernel order, on the mapping itself."""
  config = R.tiny_hf_config()
  m = hf_mapping.model_config_from_hf(config)
  t = R.random_hf_tensors(config, seed=1)
  groups = {'/'.join(g.leaves[0][2:]): g for g in hf_mapping.tensor_groups(m)}
  q, k = t['model.layers.0.self_attn.q_proj.weight'], t['model.layers.0.self_attn.k_proj.weight']
  wq, wk = groups['attention/wq'].to_jax(q, k)
  stacked, K = np.concatenate([q, k]), m.head_dim
  for h in range(m.num_heads):
    np.testing.assert_array_equal(wq[:, h, :], stacked[2 * h * K:2 * h * K + K].T)
    np.testing.assert_array_equal(wk[:, h, :], stacked[2 * h * K + K:2 * h * K + 2 * K].T)
  w = t['model.layers.0.self_attn.lf_gate.conv1.weight']
  (kernel,) = groups['attention/lf/conv1_kernel'].to_jax(w)
  np.testing.assert_array_equal(kernel[0], w[:, :, 0, 0].T)  # previous position
  np.testing.assert_array_equal(kernel[1], w[:, :, 1, 0].T)  # current position
  for g in groups.values():  # every map inverts exactly
    hf_in = [np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in g.hf_shapes]
    for x, y in zip(g.to_hf(*g.to_jax(*hf_in)), hf_in):
      np.testing.assert_array_equal(x, y)


@pytest.fixture
def tiny_src(tmp_path):
  config = R.tiny_hf_config()
  tensors = R.random_hf_tensors(config, seed=5)
  return tmp_path, config, tensors


def test_bad_tensors_listed_in_one_error_and_nothing_written(tiny_src, capsys):
  root, config, tensors = tiny_src
  tensors.pop('model.layers.1.mlp.experts.2.w2.weight')
  tensors['model.layers.0.self_attn.v_proj.weight'] = np.zeros((64, 31), np.float32)
  tensors['model.layers.0.mlp.shared_expert.weight'] = np.zeros((3,), np.float32)
  tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(np.float64)
  R.write_hf_dir(root / 'src', tensors, config)
  with pytest.raises(hf.HFCheckpointError) as e:
    hf.import_hf(str(root / 'src'), str(root / 'dst'))
  msg = str(e.value)
  assert 'missing (1)' in msg and 'model.layers.1.mlp.experts.2.w2.weight [expected [32, 24]]' in msg
  assert 'mis-shaped (1)' in msg and 'v_proj.weight: expected [64, 32], found [64, 31]' in msg
  assert 'unexpected (1)' in msg
  assert 'model.layers.0.mlp.shared_expert.weight [3] float32' in msg
  assert 'model.norm.weight: float64' in msg and 'nothing was written' in msg
  assert sorted(os.listdir(root)) == ['src']
  assert convert.main(['from-hf', str(root / 'src'), str(root / 'dst'), '-q']) == 1
  assert 'missing (1)' in capsys.readouterr().err
  assert sorted(os.listdir(root)) == ['src']


def test_untied_lm_head_refused(tiny_src):
  root, config, tensors = tiny_src
  tensors['lm_head.weight'] = tensors['lm_head.weight'] + 1e-3
  R.write_hf_dir(root / 'src', tensors, config)
  with pytest.raises(hf.HFCheckpointError, match='lm_head.weight differs'):
    hf.import_hf(str(root / 'src'), str(root / 'dst'))
  assert not os.path.exists(root / 'dst')


def test_existing_dst_refused_unless_overwrite(tiny_src):
  root, config, tensors = tiny_src
  del tensors['lm_head.weight']  # tied weights saved once: allowed
  R.write_hf_dir(root / 'src', tensors, config)
  os.makedirs(root / 'dst')
  (root / 'dst' / 'keep').write_text('x')
  with pytest.raises(FileExistsError, match='--overwrite'):
    hf.import_hf(str(root / 'src'), str(root / 'dst'))
  assert os.listdir(root / 'dst') == ['keep']
  hf.import_hf(str(root / 'src'), str(root / 'dst'), overwrite=True)
  assert sorted(os.listdir(root / 'dst')) == ['config.json', 'config.py', 'params']
  assert sorted(os.listdir(root)) == ['dst', 'src']  # no tmp or old dirs left
  hf.export_hf(str(root / 'dst'), str(root / 'out'))
  assert 'lm_head.weight' not in read_all(root / 'out')  # absent in, absent out


def test_unsupported_configs_list_every_problem():
  bad = R.tiny_hf_config(hidden_act='gelu', use_moe=False, num_key_value_heads=1)
  bad['moe_config']['gated_linear_unit'] = False
  with pytest.raises(hf_mapping.HFConfigError) as e:
    hf_mapping.model_config_from_hf(bad)
  for word in ('hidden_act', 'not a MoE model', 'gated_linear_unit', 'num_key_value_heads'):
    assert word in str(e.value)
  m = hf_mapping.model_config_from_hf(R.tiny_hf_config())
  m.moe_every, m.num_layers = 2, 4
  with pytest.raises(hf_mapping.HFConfigError, match='moe_every=2'):
    hf_mapping.hf_config_from_model(m, None, 'bfloat16')


# The released Yuan2-M32-hf config.json (huggingface.co/IEITYuan/Yuan2-M32-hf), minus the path.
M32_HF_CONFIG = {
    'architectures': ['YuanForCausalLM'],
    'attention_projection_size': 4096,
    'auto_map': {
        'AutoConfig': 'configuration_yuan.YuanConfig',
        'AutoModelForCausalLM': 'yuan_hf_model.YuanForCausalLM'
    },
    'bos_token_id': 77185,
    'causal_mask': True,
    'dropout': 0,
    'eod_token': 77185,
    'eod_token_id': 77185,
    'eos_token_id': 77185,
    'hidden_act': 'silu',
    'hidden_size': 2048,
    'initializer_range': 0.02,
    'intermediate_size': 8192,
    'mask_token_id': 77185,
    'max_position_embeddings': 4096,
    'model_max_length': 8192,
    'model_type': 'yuan',
    'moe_config': {
        'ffn_hidden_size': 8192,
        'gated_linear_unit': True,
        'moe_num_experts': 32,
        'moe_top_k': 2,
        'norm_topk_prob': True
    },
    'num_attention_heads': 16,
    'num_hidden_layers': 24,
    'output_router_logits': True,
    'pad_token_id': 77185,
    'reset_attention_mask': False,
    'reset_position_ids': True,
    'rms_norm_eps': 1e-06,
    'sep_token': 77187,
    'sep_token_id': 77185,
    'tokenizer_class': 'YuanTokenizer',
    'torch_dtype': 'bfloat16',
    'transformers_version': '4.30.2',
    'use_cache': True,
    'use_flash_attention': True,
    'use_loss_mask': False,
    'use_moe': True,
    'vocab_size': 135040,
}


def test_released_m32_config_maps_to_m32_model():
  m, ref = hf_mapping.model_config_from_hf(M32_HF_CONFIG), config_lib.m32_model()
  for f in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'head_dim', 'rotary_dims',
            'rope_base', 'max_seq_len', 'norm_eps', 'num_experts', 'moe_every'):
    assert m[f] == ref[f], f
  assert (m.router.type, m.router.top_k, m.router.norm_topk_prob, m.moe.ffn_size) == ('attention',
                                                                                      2, True, 8192)
  assert hf_mapping.hf_config_from_model(ref, None, 'bfloat16') == M32_HF_CONFIG
  assert hf_mapping.hf_config_from_model(m, M32_HF_CONFIG, 'bfloat16') == M32_HF_CONFIG
  shapes = hf_mapping.hf_shapes(m)
  assert shapes['model.layers.23.self_attn.q_proj.weight'] == (4096, 2048)
  assert shapes['model.layers.23.mlp.experts.31.w1.weight'] == (16384, 2048)
  assert len(shapes) == 2 + 24 * (14 + 2 * 32)


def test_save_hf_of_a_yuanjax_model(tmp_path):
  """In-memory params -> HF dir (default config.json, no source) -> the same logits."""
  m = hf_mapping.model_config_from_hf(R.tiny_hf_config())
  m.dtype = 'float32'
  model = Transformer(m)
  params = jax.jit(model.init)(jax.random.key(0), TOKENS)['params']
  hf.save_hf(str(tmp_path / 'out'), m, params, dtype='float32')
  with open(tmp_path / 'out' / 'config.json') as f:
    cfg = json.load(f)
  assert cfg['attention_projection_size'] == 64 and cfg['eod_token'] == 77185
  ref = np.asarray(jax.jit(model.apply)({'params': params}, TOKENS)[0])
  assert rel_err(logits_of(tmp_path / 'out'), ref) < 1e-6
  assert rel_err(R.forward(read_all(tmp_path / 'out'), cfg, TOKENS), ref) < 1e-5


def test_exact_hf_rope(tiny_src):
  """exact_hf_rope=True reproduces HF's bfloat16 rotary (quirk 3); the float32 default differs."""
  root, config, tensors = tiny_src
  R.write_hf_dir(root / 'src', tensors, config)
  ref_bf16 = R.forward(tensors, config, TOKENS, hf_bf16_rope=True)
  ref_f32 = R.forward(tensors, config, TOKENS)
  got_bf16 = logits_of(root / 'src', exact_hf_rope=True)
  got_f32 = logits_of(root / 'src')
  assert rel_err(got_bf16, ref_bf16) < 1e-5
  assert rel_err(got_f32, ref_f32) < 1e-5
  # The two rotaries differ by far more than the tolerance, so the comparison above can fail.
  assert rel_err(ref_bf16, ref_f32) > 1e-4 and rel_err(got_bf16, got_f32) > 1e-4  # ~1.3e-3
  model, _ = loader.load_model(str(root / 'src'), exact_hf_rope=True)
  assert model.config.rope_hf_bf16 and not loader.load_model(str(
      root / 'src'))[0].config.rope_hf_bf16


def test_load_tokenizer(tiny_src):
  tokenizer = pytest.importorskip('yuanjax.data.tokenizer')
  pytest.importorskip('sentencepiece')
  root, config, tensors = tiny_src
  model = R.yuan_sentencepiece(root, [f'line {i} of some text' for i in range(200)])
  R.write_hf_dir(root / 'src', tensors, config, extra_files={'tokenizer.model': model})
  hf.import_hf(str(root / 'src'), str(root / 'dst'))
  for path in (root / 'src', root / 'dst'):
    tok = loader.load_tokenizer(str(path))
    assert isinstance(tok, tokenizer.Tokenizer)
    assert tok.decode(tok.encode('line 1\nline 2')) == 'line 1\nline 2'


def test_load_tokenizer_adds_yuan_tokens_past_the_model(tiny_src):
  """The tokens Yuan's runtime adds: <sep> (in the model) keeps its id, the rest follow it."""
  from yuanjax.data.tokenizer import YUAN_ADDED_TOKENS
  pytest.importorskip('sentencepiece')
  root, config, tensors = tiny_src
  model = R.yuan_sentencepiece(root, [f'line {i} of some text' for i in range(200)])
  R.write_hf_dir(root / 'src', tensors, config, extra_files={'tokenizer.model': model})
  tok = loader.load_tokenizer(str(root / 'src'))
  added = [t for t in YUAN_ADDED_TOKENS if t != '<sep>']
  assert [tok.token_id(t) for t in added] == list(range(60, 60 + len(added)))
  assert tok.sep_id == tok.sp.piece_to_id('<sep>') < 60 and tok.fim_prefix_id == 60 + 4
  assert tok.encode('a<FIM_PREFIX>b') == tok.sp.encode('a') + [64] + tok.sp.encode('b')


def test_load_computes_in_the_checkpoint_dtype(tiny_src):
  root, _, tensors = tiny_src
  R.write_hf_dir(root / 'src', tensors, R.tiny_hf_config(torch_dtype='bfloat16'))
  hf.import_hf(str(root / 'src'), str(root / 'dst'))
  for path in (root / 'src', root / 'dst'):
    assert loader.load_model(str(path))[0].config.dtype == 'bfloat16'
    assert loader.load_model(str(path), overrides=F32)[0].config.dtype == 'float32'
  R.write_hf_dir(root / 'f32', tensors, R.tiny_hf_config(torch_dtype='float32'))
  assert loader.load_model(str(root / 'f32'))[0].config.dtype == 'float32'


def test_torch_bin_reader_refuses_what_it_cannot_read(tmp_path):
  legacy = tmp_path / 'legacy.bin'
  legacy.write_bytes(pickle.dumps({'a': 1}))
  with pytest.raises(torch_bin.TorchBinError, match='pip install torch==2.13.0'):
    torch_bin.TorchBinFile(legacy)
  evil = tmp_path / 'evil.bin'
  with zipfile.ZipFile(evil, 'w') as zf:
    zf.writestr('archive/data.pkl', b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.')
  with pytest.raises(torch_bin.TorchBinError, match='os.system'):
    torch_bin.TorchBinFile(evil)
