"""HF Mixtral (MixtralForCausalLM) import, export and use (yuanjax.interop, yuanjax.convert).

Tiny random checkpoints in the exact HF layout (hidden 32, 4 heads / 2 kv heads x head_dim 8,
2 layers, 4 experts top-2 of ffn 24, vocab 97, untied lm_head; tests/interop/checkpoints.py).
Logits are checked against mixtral_reference.forward, a NumPy transcription of transformers'
Mixtral forward (for every layout, and the round trip: test_roundtrip.py).
"""
import json
import os

import jax
import numpy as np
import pytest

from tests.conftest import rel_err
from tests.interop import checkpoints, hf_reference
from tests.interop.hf_reference import read_all
from tests.interop import mixtral_reference as R
from yuanjax import config_lib, convert, generate, loader
from yuanjax.analysis import routing as routing_lib
from yuanjax.analysis import routing_stats
from yuanjax.interop import hf, mappings, mixtral_mapping
from yuanjax.model import Transformer

TOKENS = checkpoints.TOKENS['mixtral']
F32 = checkpoints.F32
loaded, forward = checkpoints.loaded, checkpoints.forward
MIXTRAL_KINDS = [kind for family, kind in checkpoints.KINDS if family == 'mixtral']


@pytest.fixture(params=MIXTRAL_KINDS)
def converted(request, hf_checkpoint):
  """(kind, HF src dir, converted dst dir, tensors, config); logits and the round trip of
  each: tests/interop/test_roundtrip.py."""
  c = hf_checkpoint('mixtral', request.param)
  return c.kind, c.src, c.dst, c.tensors, c.config


@pytest.fixture
def f32(hf_checkpoint):
  c = hf_checkpoint('mixtral', 'f32')
  return c.kind, c.src, c.dst, c.tensors, c.config


def test_imported_config_and_no_exact_hf_rope(converted):
  _, _, dst, _, _ = converted
  with pytest.raises(ValueError, match='exact_hf_rope reproduces the HF Yuan runtime'):
    loader.load_model(dst, exact_hf_rope=True)  # Yuan's bfloat16 rotary quirk is not Mixtral's
  m = loaded(dst)[0].config
  assert (m.attention_type, m.num_heads, m.num_kv_heads, m.head_dim, m.rotary_dims, m.rope_base,
          m.tie_embeddings, m.router.type) == ('standard', 4, 2, 8, 8, 1000.0, False, 'linear')


def test_logits_of_other_shapes_match_the_reference(tmp_path):
  """head_dim 12 != hidden / heads, eps 1e-6 (not mixtral_model's), 4 kv heads = 4 heads
  (the plain multi-head einsums), theta 500 from transformers 5's rope_parameters."""
  config = R.tiny_config(head_dim=12, rms_norm_eps=1e-6, num_key_value_heads=4, rope_parameters={
      'rope_type': 'default',
      'rope_theta': 500.0
  })
  del config['rope_theta']
  tensors = R.random_tensors(config, seed=5)
  hf_reference.write_hf_dir(tmp_path / 'src', tensors, config)
  model, params = loader.load_model(str(tmp_path / 'src'), overrides=F32)
  assert (model.config.head_dim, model.config.norm_eps, model.config.rope_base) == (12, 1e-6, 500)
  assert rel_err(forward(model, params, TOKENS), R.forward(tensors, config, TOKENS)) < 1e-5


def test_aux_coefficient_and_jitter_map_both_ways():
  """router_aux_loss_coef -> load_balance_weight = coef x top_k / layers (3 layers: a value
  that does not round trip through the formula), and back to the source's bits on export."""
  config = R.tiny_config(num_hidden_layers=3, router_aux_loss_coef=0.001, router_jitter_noise=0.1)
  m = mixtral_mapping.model_config_from_hf(config)
  assert m.router.load_balance_weight == 0.001 * 2 / 3 and m.router.jitter_eps == 0.1
  back = mixtral_mapping.hf_config_from_model(m, config, 'float32')
  assert back['router_aux_loss_coef'] == 0.001 and back['router_jitter_noise'] == 0.1
  m.router.load_balance_weight = 0.01
  assert mixtral_mapping.hf_config_from_model(
      m, config, 'float32')['router_aux_loss_coef'] == (pytest.approx(0.01 * 3 / 2))


def test_cached_greedy_decoding_equals_full_forward_argmax(f32):
  """yuanjax.generate (prefill + KV cache of 2 kv heads) on the imported model: every greedy
  token is the argmax of a full forward over its prefix, ours and the NumPy reference's."""
  _, _, dst, tensors, config = f32
  model, params = loaded(dst)
  prompts = [TOKENS[0, :5].tolist(), TOKENS[1, :9].tolist()]
  new = 6
  outs = generate.generate(model, params, prompts, max_new_tokens=new)
  for p, o in zip(prompts, outs):
    assert len(o) == new
    seq = np.array([p + o])
    ours = forward(model, params, seq)[0]
    ref = R.forward(tensors, config, seq)[0]
    n = len(p)
    assert o == np.argmax(ours[n - 1:-1], -1).tolist() == np.argmax(ref[n - 1:-1], -1).tolist()
  assert len({tuple(o) for o in outs}) == 2  # the rows really differ


def test_routing_analysis_on_the_imported_model(f32):
  """yuanjax.analysis.routing on an imported Mixtral: the reference's top-2 experts, no
  Attention-Router matrix, and the statistics the notebook draws."""
  _, _, dst, tensors, config = f32
  model, params = loaded(dst)
  r = routing_lib.routing(model, params, TOKENS)
  _, experts = R.forward(tensors, config, TOKENS, return_experts=True)
  np.testing.assert_array_equal(r.experts_MxBxLxK, experts)
  assert r.attention_MxExE is None and r.attention_MxBxLxExE is None
  np.testing.assert_allclose(r.weights_MxBxLxK.sum(-1), 1.0, rtol=1e-6)  # renormalised top-2
  want = [np.bincount(e.ravel(), minlength=4) / e.size for e in experts]  # share of the slots
  np.testing.assert_allclose(routing_stats.expert_load(r.experts_MxBxLxK, 4, r.mask_BxL), want)
  assert routing_stats.router_entropy(r.probs_MxBxLxE, r.mask_BxL).shape == (2,)


def test_unknown_model_type_is_named_before_anything_is_written(tmp_path, capsys):
  for model_type in ('llama', None):
    config = R.tiny_config(model_type=model_type)
    src = tmp_path / f'src-{model_type}'
    hf_reference.write_hf_dir(src, R.random_tensors(config), config)
    with pytest.raises(hf.HFConfigError) as e:
      hf.import_hf(str(src), str(tmp_path / 'dst'))
    assert f'model_type={model_type!r}' in str(e.value)
    assert 'known: mixtral, yuan' in str(e.value)
    assert convert.main(['from-hf', str(src), str(tmp_path / 'dst'), '-q']) == 1
    assert 'known: mixtral, yuan' in capsys.readouterr().err
    with pytest.raises(hf.HFConfigError, match='known: mixtral, yuan'):
      loader.load_model(str(src))
  assert not os.path.exists(tmp_path / 'dst')


def test_fields_yuanjax_cannot_compute_are_each_named(tmp_path):
  bad = R.tiny_config(hidden_act='gelu', sliding_window=16, rope_scaling={'type': 'linear'},
                      tie_word_embeddings=True, num_key_value_heads=3, partial_rotary_factor=0.5)
  hf_reference.write_hf_dir(tmp_path / 'src', R.random_tensors(R.tiny_config()), bad)
  with pytest.raises(hf.HFConfigError) as e:
    hf.import_hf(str(tmp_path / 'src'), str(tmp_path / 'dst'))
  msg = str(e.value)
  for field in ("hidden_act='gelu'", 'sliding_window=16 < max_position_embeddings=64',
                'rope_scaling=', 'tie_word_embeddings', 'num_key_value_heads=3',
                'partial_rotary_factor=0.5'):
    assert field in msg, field
  assert not os.path.exists(tmp_path / 'dst')
  # A window that covers the whole context is exact: accepted.
  ok = mixtral_mapping.model_config_from_hf(R.tiny_config(sliding_window=64))
  assert ok.max_seq_len == 64


def test_bad_tensors_listed_in_one_error(tmp_path):
  config = R.tiny_config()
  tensors = R.random_tensors(config)
  tensors.pop('lm_head.weight')
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((32, 32), np.float32)  # MHA k
  hf_reference.write_hf_dir(tmp_path / 'src', tensors, config)
  with pytest.raises(hf.HFCheckpointError) as e:
    hf.import_hf(str(tmp_path / 'src'), str(tmp_path / 'dst'))
  assert 'lm_head.weight [expected [97, 32]]' in str(e.value)
  assert 'k_proj.weight: expected [16, 32], found [32, 32]' in str(e.value)
  assert not os.path.exists(tmp_path / 'dst')


# Mixtral-8x7B-v0.1's config.json (huggingface.co/mistralai/Mixtral-8x7B-v0.1).
MIXTRAL_8X7B = {
    'architectures': ['MixtralForCausalLM'],
    'attention_dropout': 0.0,
    'bos_token_id': 1,
    'eos_token_id': 2,
    'hidden_act': 'silu',
    'hidden_size': 4096,
    'initializer_range': 0.02,
    'intermediate_size': 14336,
    'max_position_embeddings': 32768,
    'model_type': 'mixtral',
    'num_attention_heads': 32,
    'num_experts_per_tok': 2,
    'num_hidden_layers': 32,
    'num_key_value_heads': 8,
    'num_local_experts': 8,
    'output_router_logits': False,
    'rms_norm_eps': 1e-05,
    'rope_theta': 1e6,
    'router_aux_loss_coef': 0.02,
    'sliding_window': None,
    'tie_word_embeddings': False,
    'torch_dtype': 'bfloat16',
    'transformers_version': '4.36.0.dev0',
    'use_cache': True,
    'vocab_size': 32000,
}


def test_released_mixtral_config_maps_to_mixtral_model():
  m, ref = mixtral_mapping.model_config_from_hf(MIXTRAL_8X7B), config_lib.mixtral_model()
  for f in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
            'rotary_dims', 'rope_base', 'norm_eps', 'num_experts', 'moe_every', 'attention_type',
            'tie_embeddings'):
    assert m[f] == ref[f], f
  assert (m.router.type, m.router.top_k, m.router.norm_topk_prob, m.moe.ffn_size) == ('linear', 2,
                                                                                      True, 14336)
  assert mappings.for_model(m) is mixtral_mapping
  assert mixtral_mapping.hf_config_from_model(m, MIXTRAL_8X7B, 'bfloat16') == MIXTRAL_8X7B
  fresh = mixtral_mapping.hf_config_from_model(m, None, 'bfloat16')
  assert fresh == {k: v for k, v in MIXTRAL_8X7B.items() if k != 'transformers_version'}
  shapes = mixtral_mapping.hf_shapes(m)
  assert shapes['model.layers.31.self_attn.k_proj.weight'] == (1024, 4096)
  assert shapes['model.layers.31.block_sparse_moe.experts.7.w3.weight'] == (14336, 4096)
  assert len(shapes) == 3 + 32 * (7 + 3 * 8)
  total = sum(int(np.prod(s)) for s in shapes.values())
  assert abs(total / 46.7e9 - 1) < 0.01  # the published 46.7B parameters
  # transformers >= 5 writes rope_parameters and dtype (and head_dim): same model, same file.
  v5 = {k: v for k, v in MIXTRAL_8X7B.items() if k not in ('rope_theta', 'torch_dtype')}
  v5.update(rope_parameters={
      'rope_type': 'default',
      'rope_theta': 1e6
  }, dtype='bfloat16', head_dim=128)
  assert mixtral_mapping.model_config_from_hf(v5).to_dict() == m.to_dict()
  assert mixtral_mapping.hf_config_from_model(m, v5, 'bfloat16') == v5


def test_yuan_export_refuses_a_mixtral_model_and_back():
  m = mixtral_mapping.model_config_from_hf(R.tiny_config())
  with pytest.raises(hf.HFConfigError, match="attention_type='standard'"):
    hf.hf_mapping.hf_config_from_model(m, None, 'bfloat16')
  y = hf.hf_mapping.model_config_from_hf(hf_reference.tiny_hf_config())
  with pytest.raises(hf.HFConfigError, match="attention_type='lfa'"):
    mixtral_mapping.hf_config_from_model(y, None, 'bfloat16')


def test_notebook_path_on_the_imported_model(f32):
  """What notebooks/02_router_inspection.py does with YUANJAX_CHECKPOINT=<converted Mixtral>:
  loader.load_checkpoint finds Mixtral's tokenizer conventions (<s> first, </s> as eod),
  and texts batch and route."""
  _, src, dst, _, _ = f32
  model, params, tok = loader.load_checkpoint(dst, overrides=F32)
  assert (tok.eod_id, tok.pad_id) == (2, 2) and tok.encode('line 7')[0] == 1
  assert tok.decode(tok.encode('line 7 of some text')) == 'line 7 of some text'
  assert loader.load_checkpoint(src)[2].encode('line 7') == tok.encode('line 7')
  tokens, segment_ids = routing_lib.batch_texts(tok, ['line 1 of', 'line 22 of some text'], 13)
  r = routing_lib.routing(model, params, tokens, segment_ids)
  assert r.experts_MxBxLxK.shape == (2, 2, 13, 2) and r.mask_BxL.sum() == (segment_ids > 0).sum()
  assert r.attention_MxExE is None


def test_save_hf_of_a_yuanjax_mixtral(tmp_path):
  """A yuanjax model with Mixtral's architecture (fresh params, no HF source) -> an HF dir
  with Mixtral-8x7B's config.json fields -> the NumPy reference gives the model's logits."""
  m = mixtral_mapping.model_config_from_hf(R.tiny_config())
  m.dtype = 'float32'
  model = Transformer(m)
  params = jax.jit(model.init)(jax.random.key(0), TOKENS)['params']
  hf.save_hf(str(tmp_path / 'out'), m, params, dtype='float32')
  with open(tmp_path / 'out' / 'config.json') as f:
    cfg = json.load(f)
  want = R.tiny_config()
  assert cfg == {
      k: v for k, v in want.items() if k not in ('transformers_version', 'router_jitter_noise')
  }
  ref = forward(model, params, TOKENS)
  assert rel_err(R.forward(read_all(tmp_path / 'out'), cfg, TOKENS), ref) < 1e-5
