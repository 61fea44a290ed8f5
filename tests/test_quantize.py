"""Int8 weights (yuanjax.quantize): the per-channel round trip, which params are quantized and
their bytes, the tiny model's logits and greedy tokens against its bfloat16 weights, and the
loader / command-line entry points."""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.model.helpers import rel_err, tiny, tiny_mixtral
from tests.test_generate import hf_dirs, save_workdir  # pylint: disable=unused-import (fixture)
from yuanjax import config_lib, cost, loader, quantize, train_state
from yuanjax import generate as gen
from yuanjax.model import Transformer

# Measured on this CPU (jax 0.10.2): the tiny bfloat16 model below, int8 against bfloat16
# weights: logits 0.0174 relative (norm), greedy tokens 1.0 equal; the logits of unrelated
# weights are 1.30 away. Bounds: the measured figure with margin.
LOGITS_REL_ERR = 0.03
GREEDY_AGREEMENT = 0.9


def random_params(cfg, std: float, seed: int = 0):
  """Params of config.model `cfg` ~ N(0, std) (norm scales near 1, biases 0.1)."""
  abstract = train_state.abstract_params(cfg)
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = path[-1].key
    if name == 'scale':
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(a.shape), a.dtype)
    return jnp.asarray((0.1 if 'bias' in name else std) * rng.standard_normal(a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def flat(params):
  return flax.traverse_util.flatten_dict(params)


@pytest.mark.parametrize('shape, reduce_axes', [((6, 5), (0,)), ((3, 8, 6), (1,)),
                                                ((2, 4, 3, 5), (1, 2)), ((7, 9), (1,))])
def test_round_trip_within_half_a_step_per_channel(shape, reduce_axes):
  rng = np.random.default_rng(1)
  w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10, shape)
  channel = tuple(slice(0, 1) if i in reduce_axes else slice(None) for i in range(len(shape)))
  zero = tuple(slice(None) if i in reduce_axes else 0 for i in range(len(shape)))
  w[zero] = 0  # a channel of zeros
  q = quantize.quantize_array(w, reduce_axes)
  assert q.values.dtype == np.int8 and q.scale.dtype == np.float32
  assert q.scale.shape == w[channel].shape  # one scale per output channel
  assert np.abs(q.values).max() <= 127
  err = np.abs(w - np.asarray(q.astype(jnp.float32)))
  assert np.all(err <= q.scale / 2 * (1 + 1e-6))
  # Each channel's largest weight lands on +-127 exactly; the zero channel (the first) on 0.
  top = np.abs(q.values).max(axis=reduce_axes).ravel()
  assert top[0] == 0 and np.all(top[1:] == 127)
  assert not np.any(np.asarray(q.astype(jnp.float32))[zero])
  # On the device: the same values and scales as on the host.
  d = quantize.quantize_array(jnp.asarray(w), reduce_axes)
  np.testing.assert_array_equal(d.values, q.values)
  np.testing.assert_array_equal(d.scale, q.scale)


def _variants():
  return {
      'm32':
          tiny(),
      'mixtral':
          tiny_mixtral(**{
              'tie_embeddings': False,
              'router.type': 'linear'
          }),
      'dense_layers_shared_noisy':
          tiny(
              **{
                  'moe_every': 2,
                  'router.type': 'shared',
                  'router.num_shared_experts': 1,
                  'router.noisy_topk': True
              }),
  }


@pytest.mark.parametrize('name', list(_variants()))
def test_every_matmul_weight_is_int8_per_output_channel(name):
  """Every param with a matrix is int8 and its scale reduces exactly its contracted axes;
  only vectors (norm scales, biases) stay float."""
  cfg = _variants()[name]
  params = random_params(cfg, 0.1)
  q = flat(quantize.quantize_params(params, cfg))
  for path, w in flat(params).items():
    per_layer = w.ndim - (path[0] == 'blocks')
    if per_layer == 1:
      assert not isinstance(q[path], quantize.QInt8) and q[path].dtype == w.dtype, path
      continue
    assert isinstance(q[path], quantize.QInt8) and q[path].values.dtype == jnp.int8, path
    first = w.ndim - per_layer  # scanned layers: a scale per layer
    reduced = [i for i, n in enumerate(q[path].scale.shape) if n == 1 and w.shape[i] != 1]
    if path[-1] in ('embedding', 'lm_head'):  # [V, D]: a scale per vocabulary row
      want = [w.ndim - 1]
    elif path[-1] == 'wo':  # [H, K, D]: per D
      want = [first, first + 1]
    elif path[-2] in ('router', 'attention'):  # [D, ...]: per the rest
      want = [first]
    else:  # experts [E, D, F], convs [2, D, M], MLPs [D, F]: per expert / tap, per column
      want = [w.ndim - 2]
    assert reduced == want, path


def test_a_param_of_unknown_layout_is_named(monkeypatch):
  monkeypatch.delitem(quantize.CONTRACTED, ('heads', 'kv', 'embed'))
  with pytest.raises(ValueError, match=r'params/blocks/layer_0/attention/wo has logical axes'):
    quantize.reduce_axes_of(tiny())


def test_bytes_quarter_of_float32_half_of_bfloat16():
  """The tiny model: int8 values take exactly 1/4 of the float32 weights' bytes; with scales
  (one per output channel of 32-wide inputs, so 1/8 extra here) and the float vectors, the
  tree under 0.3x. M32 (abstract, nothing allocated): 1.000 bytes per parameter, 1/2 of
  bfloat16 and 1/4 of float32 to 0.1%."""
  cfg = tiny()
  params = random_params(cfg, 0.1)
  q = quantize.quantize_params(params, cfg)
  qint8 = [l for l in flat(q).values() if isinstance(l, quantize.QInt8)]
  values = sum(l.values.nbytes for l in qint8)
  weights = sum(w.nbytes for p, w in flat(params).items() if isinstance(flat(q)[p], quantize.QInt8))
  assert values * 4 == weights
  ratio = quantize.param_bytes(q) / quantize.param_bytes(params)
  print(f'tiny: int8 tree / float32 tree = {ratio:.3f}')
  assert 0.25 < ratio < 0.3
  assert quantize.param_bytes(q) == quantize.param_bytes(quantize.abstract_params(cfg))
  m32 = config_lib.m32_model()
  per_param = quantize.bytes_per_param(m32)
  print(f'M32: {per_param:.5f} bytes/param in int8 '
        f'({quantize.param_bytes(quantize.abstract_params(m32)) / 1e9:.2f} GB)')
  assert 1.0 < per_param < 1.002
  assert quantize.bytes_per_param(m32, 'none') == 4  # float32 params


def test_decode_bytes_per_step_halved_against_bfloat16():
  """M32 at batch 1: the weights a decode step reads (non-expert params + 2 experts per
  layer) in int8 are half their bfloat16 bytes (to 0.2%); the KV cache is unchanged."""
  m32 = config_lib.m32_model()
  m32.param_dtype = 'bfloat16'
  bf16 = cost.decode_bytes_per_step(m32, 1, 4096)
  int8 = cost.decode_bytes_per_step(m32, 1, 4096, weight_bytes=quantize.bytes_per_param(m32))
  for part in ('params', 'experts'):
    assert int8[part] / bf16[part] == pytest.approx(0.5, rel=2e-3), part
  assert int8['kv_cache'] == bf16['kv_cache']
  print(f"M32 decode step, batch 1, 4k context: {bf16['total'] / 1e9:.3f} GB in bfloat16, "
        f"{int8['total'] / 1e9:.3f} GB in int8")


@pytest.fixture(scope='module')
def bf16_model():
  """The tiny M32 in bfloat16 (params and compute), weights ~ N(0, 0.05): logits with a
  spread (std 0.33 over 97 tokens) that depend on the input; and its int8 weights."""
  cfg = tiny(**{'param_dtype': 'bfloat16', 'dtype': 'bfloat16'})
  params = random_params(cfg, 0.05)
  return cfg, params, quantize.quantize_params(params, cfg)


def test_logits_int8_against_bfloat16(bf16_model):
  cfg, params, q = bf16_model
  model = Transformer(cfg)
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t)[0])
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 24)).astype(np.int32)
  want = forward(params, tokens)
  err = rel_err(forward(q, tokens), want)
  unrelated = rel_err(forward(random_params(cfg, 0.05, seed=5), tokens), want)
  print(f'logits: int8 vs bfloat16 weights {err:.4f} relative; unrelated weights {unrelated:.3f}')
  assert err < LOGITS_REL_ERR
  assert unrelated > 30 * LOGITS_REL_ERR  # a broken quantization is nowhere near the bound


def test_greedy_tokens_int8_against_bfloat16(bf16_model):
  cfg, params, q = bf16_model
  model = Transformer(cfg)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 5, 8, 12, 4, 9)]
  want = gen.generate(model, params, prompts, max_new_tokens=12)
  got = gen.generate(model, q, prompts, max_new_tokens=12)
  agreement = np.mean([a == b for w, g in zip(want, got) for a, b in zip(w, g)])
  print(f'greedy: {agreement:.3f} of {sum(map(len, want))} tokens equal (int8 vs bfloat16)')
  assert agreement >= GREEDY_AGREEMENT


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  cfg = tiny(**{'moe.dispatch': 'dense'})
  params = random_params(cfg, 0.1)
  path = tmp_path_factory.mktemp('quantize') / 'workdir'
  save_workdir(path, {'cfg': cfg, 'params': params}, {1: 1.0})
  return path, cfg, params


def test_loader_quantizes_what_it_loads(workdir):
  path, cfg, params = workdir
  m, q = loader.load(path, quantize='int8')
  want = quantize.quantize_params(params, cfg)
  jax.tree.map(np.testing.assert_array_equal, q, want)
  assert isinstance(q['embedding'], quantize.QInt8) and q['embedding'].values.dtype == jnp.int8
  # With target shardings (here one device's): restored float, quantized where it lies, the
  # float weights deleted; the same int8 as from the host.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = lambda m: jax.tree.map(lambda _: one, train_state.abstract_params(m))
  _, placed = loader.load(path, quantize='int8', shardings=shardings)
  jax.tree.map(np.testing.assert_array_equal, placed, want)
  model = Transformer(gen.generation_config(m))
  assert gen.generate(model, q, [[1, 2, 3]],
                      max_new_tokens=4) == gen.generate(model, want, [[1, 2, 3]], max_new_tokens=4)


def test_bad_quantize_value_is_named_before_loading(tmp_path, capsys):
  with pytest.raises(ValueError, match=r"quantize='int4': expected one of \('none', 'int8'\)"):
    loader.load(tmp_path / 'nowhere', quantize='int4')  # named before the missing path
  with pytest.raises(SystemExit):
    gen.main(['--checkpoint', str(tmp_path / 'nowhere'), '--prompt', 'x', '--quantize', 'int4'])
  assert "--quantize: invalid choice: 'int4'" in capsys.readouterr().err


def test_generate_cli_int8(hf_dirs, capsys):
  """`python -m yuanjax.generate --quantize int8` on a converted dir: the tokens of `generate`
  with the loaded params quantized."""
  path = str(hf_dirs / 'yj')
  assert gen.main([
      '--checkpoint', path, '--prompt', 'line 1 of', '--max_new_tokens', '5', '--json',
      '--quantize', 'int8'
  ]) == 0
  got = json.loads(capsys.readouterr().out)['tokens']
  model, params = loader.load_model(path)
  tok = loader.load_tokenizer(path)
  want = gen.generate(model, quantize.quantize_params(params,
                                                      model.config), [tok.encode('line 1 of')],
                      max_new_tokens=5, eod_id=tok.eod_id, vocab_limit=tok.vocab_size)[0]
  assert got == want
