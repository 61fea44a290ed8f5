"""Cached generation (yuanjax.generate; decode=True in yuanjax.model).

A tiny M32 (LFA, attention router, 4 experts top-2, partial rotary) with bold random weights;
a batch of three prompts of different lengths. Cached decoding must give the logits of full
forwards at every step, and greedy generation the argmax of full forwards; so must a tiny
Mixtral-style model (standard attention, 4 query heads on 2 key/value heads, full rotary,
linear router, untied lm_head).
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.model.helpers import rel_err, tiny, tiny_mixtral
from yuanjax import generate as gen
from yuanjax import loader, train_state
from yuanjax.model import Transformer
from yuanjax.model.attention import num_kv_heads
from yuanjax.model.transformer import init_cache

LENGTHS = (5, 2, 8)  # prompt lengths
NEW = 6
S = max(LENGTHS) + NEW


def setup_model(cfg):
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))

  def random_leaf(path, a):  # bold weights: routing and logits that depend on the input
    name = path[-1].key
    if name == 'scale':
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(a.shape), a.dtype)
    return jnp.asarray((0.1 if 'bias' in name else 0.3) * rng.standard_normal(a.shape), a.dtype)

  params = jax.tree_util.tree_map_with_path(random_leaf, abstract['params'])
  seqs = rng.integers(0, cfg.vocab_size, (len(LENGTHS), S)).astype(np.int32)
  prompts = [seqs[b, :n].tolist() for b, n in enumerate(LENGTHS)]
  full = Transformer(gen.generation_config(cfg))  # same function, dropless
  forward = jax.jit(lambda p, t: full.apply({'params': p}, t)[0])
  greedy = gen.generate(model, params, prompts, max_new_tokens=NEW)
  return dict(cfg=cfg, model=model, params=params, seqs=seqs, prompts=prompts, forward=forward,
              greedy=greedy)


@pytest.fixture(scope='module')
def setup():
  return setup_model(tiny(**{'moe.dispatch': 'capacity'}))  # generation must switch to dropless


@pytest.fixture(scope='module')
def mixtral_setup():
  return setup_model(
      tiny_mixtral(**{
          'moe.dispatch': 'capacity',
          'tie_embeddings': False,
          'router.type': 'linear'
      }))


both_models = pytest.mark.parametrize('name', ['setup', 'mixtral_setup'])


@both_models
def test_cached_decode_matches_full_forward(name, request):
  """Prefill of right-padded prompts, then one token per step: every step's logits equal a
  full forward's over the whole prefix (the model is causal: one padded [B, S] forward
  gives every prefix's logits)."""
  setup = request.getfixturevalue(name)
  model, params, seqs = setup['model'], setup['params'], setup['seqs']
  dec = Transformer(gen.generation_config(setup['cfg']))
  ref = np.asarray(setup['forward'](params, seqs))  # [B, S, V]
  step = jax.jit(lambda p, c, t, n: dec.apply({
      'params': p,
      'cache': c
  }, t, decode=True, lengths=n, mutable=['cache']))
  P = max(LENGTHS)
  prompt = np.where(np.arange(P) < np.array(LENGTHS)[:, None], seqs[:, :P], 0)
  (logits, _), state = step(params, init_cache(dec, len(LENGTHS), S), prompt, np.array(LENGTHS))
  for b, n in enumerate(LENGTHS):
    assert rel_err(logits[b, :n], ref[b, :n]) < 1e-5, b
  np.testing.assert_array_equal(state['cache']['index'], LENGTHS)
  for t in range(NEW):
    tokens = np.array([[seqs[b, n + t]] for b, n in enumerate(LENGTHS)])
    (logits, _), state = step(params, state['cache'], tokens, np.ones(len(LENGTHS), np.int32))
    for b, n in enumerate(LENGTHS):
      assert rel_err(logits[b, 0], ref[b, n + t]) < 1e-5, (b, t)
  np.testing.assert_array_equal(state['cache']['index'], np.array(LENGTHS) + NEW)
  kv, cfg = state['cache']['blocks']['layer_0']['attention'], setup['cfg']
  assert kv['k'].shape == (cfg.num_layers, len(LENGTHS), num_kv_heads(cfg), S, cfg.head_dim)
  if cfg.attention_type == 'lfa':
    assert kv['lf']['u_prev'].shape == (cfg.num_layers, len(LENGTHS), 2, cfg.hidden_size)
  else:
    assert 'lf' not in kv


def argmax_of_full_forwards(setup) -> list[list[int]]:
  """What greedy generation must give: each new token the argmax of a full forward."""
  buf = np.zeros((len(LENGTHS), S), np.int32)
  for b, p in enumerate(setup['prompts']):
    buf[b, :len(p)] = p
  want = [[] for _ in LENGTHS]
  for t in range(NEW):
    logits = np.asarray(setup['forward'](setup['params'], buf))
    for b, n in enumerate(LENGTHS):
      buf[b, n + t] = int(np.argmax(logits[b, n + t - 1]))
      want[b].append(int(buf[b, n + t]))
  return want


@both_models
def test_greedy_equals_argmax_of_full_forwards(name, request):
  setup = request.getfixturevalue(name)
  want = argmax_of_full_forwards(setup)
  assert setup['greedy'] == want
  assert len({tuple(w) for w in want}) == len(LENGTHS)  # rows really differ


def test_stop_at_eod(setup):
  greedy = setup['greedy']
  k = next(i for i in range(1, NEW) if greedy[0][i] not in greedy[0][:i])
  eod = greedy[0][k]  # row 0 first emits it as token k+1
  tokens, counts = gen.generate_padded(setup['model'], setup['params'], setup['prompts'],
                                       max_new_tokens=NEW, eod_id=eod)
  outs = gen.generate(setup['model'], setup['params'], setup['prompts'], max_new_tokens=NEW,
                      eod_id=eod)
  for b, g in enumerate(greedy):
    n = g.index(eod) + 1 if eod in g else NEW
    assert counts[b] == n and outs[b] == g[:n]
    np.testing.assert_array_equal(tokens[b, :n], g[:n])
    np.testing.assert_array_equal(tokens[b, n:], eod)  # padded after the stop
  assert counts[0] == k + 1 < NEW and outs[0][-1] == eod
  assert gen.strip_eod(outs[0], eod) == greedy[0][:k]
  # Every row stops at once: a one-token budget is all that is used.
  first = [g[0] for g in greedy]
  if len(set(first)) == 1:
    assert gen.generate(setup['model'], setup['params'], setup['prompts'], max_new_tokens=NEW,
                        eod_id=first[0]) == [[first[0]]] * len(LENGTHS)


def test_sampling_seeded_and_top_k_1_is_greedy(setup):
  model, params, prompts = setup['model'], setup['params'], setup['prompts']
  sample = lambda **kw: gen.generate(model, params, prompts, max_new_tokens=NEW, **kw)
  a = sample(temperature=2.0, seed=0)
  assert a == sample(temperature=2.0, seed=0)
  assert a != sample(temperature=2.0, seed=1)
  assert a != setup['greedy']
  assert sample(temperature=2.0, top_k=1, seed=3) == setup['greedy']
  assert sample(temperature=2.0, top_p=1e-6, seed=3) == setup['greedy']


def test_sample_logits_respects_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 4000))  # probabilities 0.1 .. 0.4
  key = jax.random.key(0)
  draw = lambda **kw: np.asarray(gen.sample_logits(logits, key, **kw))
  full = draw(temperature=1.0, top_k=0, top_p=1.0)
  assert set(full) == {0, 1, 2, 3} and abs(np.mean(full == 3) - 0.4) < 0.04
  assert set(draw(temperature=1.0, top_k=2, top_p=1.0)) == {2, 3}
  assert set(draw(temperature=1.0, top_k=0, top_p=0.65)) == {2, 3}  # 0.4 + 0.3 >= 0.65
  assert set(draw(temperature=1.0, top_k=0, top_p=0.75)) == {1, 2, 3}
  assert set(draw(temperature=0.0, top_k=0, top_p=1.0)) == {3}


def test_bad_inputs_name_the_argument(setup):
  model, params = setup['model'], setup['params']
  run = lambda prompts, **kw: gen.generate(model, params, prompts, **{'max_new_tokens': 2, **kw})
  with pytest.raises(ValueError, match=r'prompts\[1\]: must be a non-empty'):
    run([[1, 2], []])
  with pytest.raises(ValueError, match='prompts: expected a non-empty list'):
    run([])
  too_long = [1] * (setup['cfg'].max_seq_len + 1)
  with pytest.raises(ValueError, match=r'prompts\[0\]: 257 tokens is longer than max_len=256'):
    run([too_long])
  with pytest.raises(ValueError,
                     match=r'prompts\[0\] \(10 tokens\) \+ max_new_tokens=5 = 15 .*max_len=12'):
    run([[1] * 10], max_new_tokens=5, max_len=12)
  with pytest.raises(ValueError, match=r'prompts\[0\]: token id 97 is outside the vocabulary'):
    run([[1, 97]])
  with pytest.raises(ValueError, match='max_new_tokens=0'):
    run([[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match='top_p=0'):
    run([[1]], top_p=0.0)
  ec = tiny(**{'router.type': 'expert_choice'})
  with pytest.raises(ValueError, match="router.type='expert_choice' is not causal"):
    gen.generation_config(ec)
  with pytest.raises(ValueError, match='decode=True needs a cache'):
    model.apply({'params': params}, jnp.zeros((1, 2), jnp.int32), decode=True, mutable=['cache'])


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """A tiny HF checkpoint with a sentencepiece tokenizer ('<n>' for newlines), and its
  conversion."""
  pytest.importorskip('sentencepiece')
  from tests.interop import hf_reference as R
  from yuanjax.interop import hf
  root = tmp_path_factory.mktemp('gen_hf')
  model = R.yuan_sentencepiece(root, [f'line {i} of some text' for i in range(200)])
  config = R.tiny_hf_config()
  R.write_hf_dir(root / 'hf', R.random_hf_tensors(config, seed=5), config,
                 extra_files={'tokenizer.model': model})
  hf.import_hf(str(root / 'hf'), str(root / 'yj'))
  return root


def test_tokenizer_newlines_and_special_ids(hf_dirs):
  tok = loader.load_tokenizer(str(hf_dirs / 'yj'))
  ids = tok.encode('line 1\nsome text')
  assert tok.sp.piece_to_id('<n>') in ids and tok.decode(ids) == 'line 1\nsome text'
  assert tok.decode([tok.sp.piece_to_id('<n>')]) == '\n'
  assert (tok.eod_id, tok.sep_id) == (tok.sp.piece_to_id('<eod>'), tok.sp.piece_to_id('<sep>'))


def test_cli_on_converted_dir(hf_dirs, capsys):
  argv = ['--prompt', 'line 1 of', '--prompt', 'line 22\nline', '--max_new_tokens', '5', '--json']
  assert gen.main(['--checkpoint', str(hf_dirs / 'yj'), *argv]) == 0
  outs = {'yj': [json.loads(line) for line in capsys.readouterr().out.splitlines()]}
  assert [r['prompt'] for r in outs['yj']] == ['line 1 of', 'line 22\nline']
  model, params = loader.load_model(str(hf_dirs / 'hf'))  # the HF dir itself: the same model
  tok = loader.load_tokenizer(str(hf_dirs / 'yj'))
  want = gen.generate(model, params, [tok.encode('line 1 of'),
                                      tok.encode('line 22\nline')], max_new_tokens=5,
                      eod_id=tok.eod_id, vocab_limit=tok.vocab_size)
  assert max(max(w) for w in want) < tok.vocab_size < model.config.vocab_size
  assert [r['tokens'] for r in outs['yj']] == want
  for r, w in zip(outs['yj'], want):
    assert r['completion'] == tok.decode(gen.strip_eod(w, tok.eod_id))
    assert r['stopped'] == ('eod' if w[-1] == tok.eod_id else 'length')
  assert gen.main(['--checkpoint',
                   str(hf_dirs / 'yj'), '--prompt', 'x', '--max_new_tokens', '0']) == 1
  assert 'max_new_tokens=0' in capsys.readouterr().err
  assert gen.main(['--checkpoint', str(hf_dirs / 'nowhere'), '--prompt', 'x']) == 1
  assert 'neither' in capsys.readouterr().err


def test_cli_chat_renders_yuans_template(hf_dirs, capsys):
  """--chat: PROMPT<sep> (<n> in it a newline), the response alone, to <eod>, newlines back."""
  path = str(hf_dirs / 'yj')
  argv = ['--checkpoint', path, '--chat', '--prompt', 'line 1<n>of', '--max_new_tokens', '5']
  assert gen.main([*argv, '--json']) == 0
  r = json.loads(capsys.readouterr().out)
  model, params = loader.load_model(path)
  tok = loader.load_tokenizer(path)
  prompt = tok.encode('line 1\nof') + [tok.sep_id]
  want = gen.generate(model, params, [prompt], max_new_tokens=5, eod_id=tok.eod_id,
                      vocab_limit=tok.vocab_size)[0]
  assert r['tokens'] == want
  assert r['completion'] == tok.decode(gen.strip_eod(want, tok.eod_id)).replace('<n>', '\n')
  assert gen.main(argv) == 0
  assert capsys.readouterr().out == r['completion'] + '\n'  # the response alone


def save_workdir(workdir, setup, scales, saved_model=None):
  """WORKDIR/checkpoints/<step>/{state,meta} as the trainer writes them (state: the train
  state's fields; meta: the config json, with `saved_model` as config.model if given), step s
  holding the params × scales[s]."""
  import orbax.checkpoint as ocp
  from yuanjax import config_lib
  config = config_lib.base_config().to_dict()
  config['model'] = setup['cfg'].to_dict() if saved_model is None else saved_model
  with ocp.CheckpointManager(str(workdir / 'checkpoints')) as mngr:
    for step, scale in scales.items():
      params = jax.tree_util.tree_map(lambda a: a * scale, setup['params'])
      state = ocp.args.StandardSave({'step': step, 'params': params})
      meta = ocp.args.JsonSave({'step': step, 'config': json.dumps(config)})
      mngr.save(step, args=ocp.args.Composite(state=state, meta=meta))
    mngr.wait_until_finished()


def save_random_workdir(workdir, cfg, step: int = 1):
  """A training workdir whose checkpoint `step` holds random params (0.3 N(0, 1), seed 0) of
  config.model `cfg`; returns them."""
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
      train_state.abstract_params(cfg))
  save_workdir(workdir, {'cfg': cfg, 'params': params}, {step: 1.0})
  return params


def test_cli_on_training_workdir(setup, hf_dirs, tmp_path, capsys):
  """WORKDIR/checkpoints/<step>/{state,meta} as the trainer writes them (state: the train
  state's fields; meta: the config json); the tokenizer given with --tokenizer."""
  save_workdir(tmp_path, setup, {1: 0.5, 2: 1.0})  # step 2: the real params
  texts = ['line 3']  # batch 1, as the trainer's sample below: compiled once for both
  argv = [a for t in texts for a in ('--prompt', t)]
  assert gen.main([
      '--checkpoint',
      str(tmp_path), '--tokenizer',
      str(hf_dirs / 'tok.model'), *argv, '--max_new_tokens',
      str(NEW), '--json'
  ]) == 0
  recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  from yuanjax.data.tokenizer import Tokenizer
  tok = Tokenizer(hf_dirs / 'tok.model')
  want = gen.generate(setup['model'], setup['params'], [tok.encode(t) for t in texts],
                      max_new_tokens=NEW, eod_id=tok.eod_id, vocab_limit=tok.vocab_size)
  assert [r['tokens'] for r in recs] == want
  # An earlier checkpoint by step (router saturation reads them); a missing one is named.
  tok_path = str(hf_dirs / 'tok.model')
  _, p1, _ = loader.load_checkpoint(str(tmp_path), step=1, tokenizer=tok_path)
  half = jax.tree_util.tree_map(lambda a: a / 2, setup['params'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, p1, half)
  with pytest.raises(FileNotFoundError, match='no checkpoint of step 3'):
    loader.load_checkpoint(str(tmp_path), step=3, tokenizer=tok_path)


def test_trainer_sample_uses_cached_generation(setup):
  from yuanjax.evals import sample
  greedy = setup['greedy'][2]
  eod = greedy[3] if greedy[3] not in greedy[:3] else None
  got = sample.greedy(setup['model'], setup['params'], setup['prompts'][2], NEW, eod_id=eod)
  assert got == (greedy[:3] if eod is not None else greedy)
  assert sample.greedy(setup['model'], setup['params'], [1], 0) == []


def test_workdir_relative_path_and_fallback_from_unreadable_newest(setup, hf_dirs, tmp_path, capsys,
                                                                   monkeypatch):
  """`--checkpoint workdir/demo` (relative, as after `make demo`) works, and a newest checkpoint
  that cannot be read falls back to the previous one (yuanjax.checkpoint owns both)."""
  import glob
  import os
  workdir = tmp_path / 'workdir' / 'demo'
  save_workdir(workdir, setup, {1: 1.0, 2: 0.5})  # step 1: the real params
  files = [
      f for f in glob.glob(str(workdir / 'checkpoints' / '2' / 'state' / '**'), recursive=True)
      if os.path.isfile(f)
  ]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  monkeypatch.chdir(tmp_path)
  assert gen.main([
      '--checkpoint', 'workdir/demo', '--tokenizer',
      str(hf_dirs / 'tok.model'), '--prompt', 'line 3', '--max_new_tokens',
      str(NEW), '--json'
  ]) == 0
  recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  from yuanjax.data.tokenizer import Tokenizer
  tok = Tokenizer(hf_dirs / 'tok.model')
  want = gen.generate(setup['model'], setup['params'], [tok.encode('line 3')], max_new_tokens=NEW,
                      eod_id=tok.eod_id, vocab_limit=tok.vocab_size)
  assert [r['tokens'] for r in recs] == want


def test_workdir_saved_before_the_added_fields(setup, tmp_path):
  """A checkpoint whose config.model was saved before the fields added since (a dict without
  any of them) loads through config_lib.upgrade: each gets its old behaviour, and the model
  computes the logits it computed then."""
  from tests.test_config import OLD_BEHAVIOUR, plain, without_added_fields
  save_workdir(tmp_path, setup, {1: 1.0}, saved_model=without_added_fields(setup['cfg']))
  m, params = loader.load(str(tmp_path))
  assert {
      k: plain(m[k]) for k in OLD_BEHAVIOUR if '.' not in k
  } == {
      k: v for k, v in OLD_BEHAVIOUR.items() if '.' not in k
  }
  assert (m.moe.grouped_matmul, tuple(m.moe.megablox_tiling)) == ('ragged_dot', (128, 128, 128))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, setup['params'])
  tokens = setup['seqs']
  np.testing.assert_array_equal(
      Transformer(m).apply({'params': params}, tokens)[0],
      setup['model'].apply({'params': setup['params']}, tokens)[0])


def test_load_restores_into_target_shardings(setup, hf_dirs, tmp_path):
  """loader.load(path, shardings=fn): the params come back as jax.Arrays in fn(config.model)'s
  shardings and param_dtype, with the values of a plain load (workdir, converted and HF dir)."""
  save_workdir(tmp_path, setup, {1: 1.0})
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
  spec = lambda a: jax.sharding.PartitionSpec('x') if a.ndim >= 2 else jax.sharding.PartitionSpec()
  target = lambda m: jax.tree_util.tree_map(lambda a: jax.sharding.NamedSharding(mesh, spec(a)),
                                            train_state.abstract_params(m))
  for path in (tmp_path, hf_dirs / 'yj', hf_dirs / 'hf'):
    m, got = loader.load(str(path), shardings=target)
    _, want = loader.load(str(path))
    for a, b, s in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                       jax.tree_util.tree_leaves(target(m))):
      assert isinstance(a, jax.Array) and a.sharding == s and a.dtype == jnp.dtype(m.param_dtype)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_bad_dtype_names_the_flag_before_loading(capsys):
  """--dtype float33 is refused by name before the checkpoint is opened (it does not exist)."""
  with pytest.raises(SystemExit) as e:
    gen.main(['--checkpoint', '/nonexistent', '--prompt', 'x', '--dtype', 'float33'])
  assert e.value.code == 2
  assert "argument --dtype: invalid choice: 'float33'" in capsys.readouterr().err
