"""lm-eval-harness on a yuanjax checkpoint (yuanjax.evals.lm_eval_model), offline.

A tiny Yuan HF checkpoint with a sentencepiece tokenizer; local tasks written here (YAML + jsonl,
found through include_path). What lm-eval reports must equal what the model computes directly:
each loglikelihood the sum of the continuation's log-probs from one unpadded-batch forward, a
multiple-choice accuracy the count of questions whose gold choice has the highest of them,
loglikelihood_rolling the sum over lm-eval's windows, and generate_until the greedy tokens of
yuanjax.generate cut at the first stop string. On a mesh of 8 CPU devices (model_arg mesh),
the same requests give the one-device answers.
"""
import glob
import json
import os
import socket
import sys
import types

import jax
import numpy as np
import pytest

os.environ['HF_DATASETS_OFFLINE'] = '1'  # local data files only: no network
os.environ['HF_HUB_OFFLINE'] = '1'
# pylint: disable=g-import-not-at-top  (after the offline settings)
import lm_eval
from lm_eval.tasks import TaskManager

from tests import cpu_devices
from tests.interop import hf_reference as R
from yuanjax import generate as gen
from yuanjax import loader
from yuanjax.evals import lm_eval_model
from yuanjax.model import Transformer

# mesh_answers on 8 CPU devices, in a process of its own: its JSON as the last line.
ON_MESH = '''
import json, sys
from tests.evals import test_lm_eval
from yuanjax.evals import lm_eval_model
lm = lm_eval_model.YuanjaxLM(sys.argv[1], batch_size=3, mesh=sys.argv[2])
print(json.dumps(test_lm_eval.mesh_answers(lm)))
'''
WORDS = 'line of some text with more words on it'.split()
BATCH = 4
MAX_GEN = 8


@pytest.fixture(scope='module', autouse=True)
def no_network():
  """Any attempt to open an internet connection fails the test."""
  connect = socket.socket.connect

  def local_only(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
      raise AssertionError(f'network access to {address}')
    return connect(sock, address)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', local_only)
    yield


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  """A tiny Yuan HF dir (max_seq_len 64) with its tokenizer, the loaded model, a jitted
  one-row forward over max_seq_len tokens, and a folder for the task files."""
  root = tmp_path_factory.mktemp('lm_eval')
  rng = np.random.default_rng(0)
  lines = [' '.join(rng.choice(WORDS, 6)) + f' {i % 10}' for i in range(300)]
  R.write_yuan_dir_with_tokenizer(root / 'hf', lines, seed=3)
  model, params, tok = loader.load_checkpoint(str(root / 'hf'))
  (root / 'tasks').mkdir()
  return dict(root=root, path=str(root / 'hf'), **direct_setup(model, params, tok))


def direct_setup(model, params, tok):
  """What `direct` needs: the model, its params and tokenizer, and a jitted forward."""
  full = Transformer(gen.generation_config(model.config))
  forward = jax.jit(lambda p, t: full.apply({'params': p}, t)[0])
  return dict(model=model, params=params, tok=tok, forward=forward, S=model.config.max_seq_len)


def direct(ckpt, tokens, n):
  """(sum of the log-probs of the last n tokens, each given all tokens before it; whether each
  was the argmax): one row, right-padded to max_seq_len, log_softmax in float64."""
  row = np.zeros((1, ckpt['S']), np.int32)
  row[0, :len(tokens) - 1] = tokens[:-1]
  logits = np.asarray(ckpt['forward'](ckpt['params'], row)[0], np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  pos = range(len(tokens) - 1 - n, len(tokens) - 1)
  return (sum(logp[i, tokens[i + 1]] for i in pos),
          all(np.argmax(logits[i]) == tokens[i + 1] for i in pos))


def pair_tokens(tok, context, continuation, max_length):
  """lm-eval's split: the whole text's tokens, the context's ones first (checked here); an empty
  context is the prefix token (<eod>: this tokenizer starts no text with a BOS)."""
  if not context:
    return [tok.eod_id] + tok.encode(continuation), len(tok.encode(continuation))
  ctx, whole = tok.encode(context), tok.encode(context + continuation)
  assert whole[:len(ctx)] == ctx
  return whole[-(max_length + 1):], len(whole) - len(ctx)


def write_task(ckpt, name, rows, **config):
  """A local task: NAME.jsonl and NAME.yaml (JSON is YAML) in the tasks folder."""
  folder = ckpt['root'] / 'tasks'
  (folder / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config = dict(
      task=name, dataset_path='json', test_split='test',
      dataset_kwargs=dict(data_files={'test': str(folder / f'{name}.jsonl')},
                          cache_dir=str(ckpt['root'] / 'hf_cache')), **config)
  (folder / f'{name}.yaml').write_text(json.dumps(config))


def text(rng, n_words):
  return ' '.join(rng.choice(WORDS, n_words))


@pytest.fixture(scope='module')
def mc_task(ckpt):
  """Eight questions (one longer than the model's context, one empty), four choices each (two
  of one word: choices of one token after the same question share a forward row); the gold
  choice is the directly most likely one for even questions and another for odd ones."""
  rng = np.random.default_rng(1)
  rows = []
  for q, n_words in enumerate([2, 5, 9, 14, 3, 70, 0, 4]):
    question = text(rng, n_words)
    choices = [text(rng, k) for k in (1, 1, 2, 3)]
    pairs = [pair_tokens(ckpt['tok'], question, ' ' + c, ckpt['S']) for c in choices]
    scores = [direct(ckpt, *p) for p in pairs]
    ranked = np.argsort([-s for s, _ in scores])
    rows.append(
        dict(question=question, choices=choices, label=int(ranked[q % 2]), scores=scores,
             one_token={c for c, (_, n) in zip(choices, pairs) if n == 1}))
  assert len(ckpt['tok'].encode(rows[5]['question'])) > ckpt['S']  # truncated from the left
  assert sum(len(r['one_token']) >= 2 for r in rows) >= 3
  write_task(ckpt, 'yj_mc', [{
      k: r[k] for k in ('question', 'choices', 'label')
  } for r in rows], output_type='multiple_choice', doc_to_text='question', doc_to_choice='choices',
             doc_to_target='label', metric_list=[dict(metric='acc')])
  return rows


@pytest.fixture(scope='module')
def gen_task(ckpt):
  """Three prompts; stop strings taken from the middle of two of their greedy outputs."""
  tok = ckpt['tok']
  prompts = ['line of some', 'text with more words on it line', 'on 3']
  outs = [
      tok.decode(gen.strip_eod(o, tok.eod_id)) for o in [
          gen.generate(ckpt['model'], ckpt['params'], [tok.encode(p)], max_new_tokens=MAX_GEN,
                       eod_id=tok.eod_id, vocab_limit=tok.vocab_size)[0] for p in prompts
      ]
  ]
  assert min(len(outs[0]), len(outs[1])) >= 6, outs
  stops = [outs[0][3:5], outs[1][4:6]]
  write_task(ckpt, 'yj_gen', [dict(prompt=p, target='') for p in prompts],
             output_type='generate_until', doc_to_text='prompt', doc_to_target='target',
             generation_kwargs=dict(until=stops, max_gen_toks=MAX_GEN,
                                    do_sample=False), metric_list=[dict(metric='exact_match')])
  cut = lambda s: s[:min([s.find(t) for t in stops if t in s] or [len(s)])]
  want = [cut(o) for o in outs]
  assert want[0] != outs[0] and want[1] != outs[1]  # the stops cut
  return want


@pytest.fixture(scope='module')
def cli_run(ckpt, mc_task, gen_task, tmp_path_factory):
  """`python -m yuanjax.evals.lm_eval_model` (lm-eval's CLI) on both tasks, in this process,
  with batch_size in model_args beside --batch_size (lm-eval's CLI always passes one)."""
  out = tmp_path_factory.mktemp('lm_eval_out')
  argv = [
      'lm_eval_model', '--model', 'yuanjax', '--model_args',
      f'checkpoint={ckpt["path"]},batch_size={BATCH}', '--batch_size', '1', '--tasks',
      'yj_mc,yj_gen', '--include_path',
      str(ckpt['root'] / 'tasks'), '--output_path',
      str(out), '--log_samples'
  ]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, 'argv', argv)
    lm_eval_model.main()
  (results,) = glob.glob(str(out / '**' / 'results_*.json'), recursive=True)
  samples = {}
  for task in ('yj_mc', 'yj_gen'):
    (path,) = glob.glob(str(out / '**' / f'samples_{task}_*.jsonl'), recursive=True)
    with open(path) as f:
      samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s['doc_id'])
  with open(results) as f:
    return json.load(f), samples


def test_loglikelihoods_equal_direct_log_probs(cli_run, mc_task):
  _, samples = cli_run
  for sample, row in zip(samples['yj_mc'], mc_task):
    got = [r[0] for r in sample['resps']]  # one (loglikelihood, is_greedy) per choice
    assert len(got) == len(row['scores'])
    for (ll, greedy), (want_ll, want_greedy) in zip(got, row['scores']):
      assert abs(float(ll) - want_ll) <= 1e-5 * abs(want_ll), (row['question'], ll, want_ll)
      assert (greedy in (True, 'True')) == want_greedy


def test_multiple_choice_accuracy_is_the_hand_count(cli_run, mc_task):
  results, samples = cli_run
  hand = np.mean([np.argmax([s for s, _ in r['scores']]) == r['label'] for r in mc_task])
  assert hand == 0.5  # the gold labels were chosen so
  assert results['results']['yj_mc']['acc,none'] == hand
  assert [s['acc'] for s in samples['yj_mc']] == [1.0, 0.0] * 4


def test_generate_until_is_greedy_generation_cut_at_the_stop(cli_run, gen_task):
  _, samples = cli_run
  assert [s['resps'][0][0] for s in samples['yj_gen']] == gen_task


def test_loglikelihood_rolling_sums_lm_eval_windows(ckpt):
  """max_length 16: a document of more tokens is scored in windows; the first predicts its
  first 16 tokens after the prefix token (<eod>), each next one the next 16 (or the rest)
  from the 16 tokens before its last."""
  tok, L = ckpt['tok'], 16
  docs = [text(np.random.default_rng(2), 40), 'line of']
  write_task(ckpt, 'yj_roll', [dict(text=d) for d in docs], output_type='loglikelihood_rolling',
             doc_to_text='', doc_to_target='text', metric_list=[dict(metric='word_perplexity')])
  out = lm_eval.simple_evaluate(
      model='yuanjax', model_args=dict(checkpoint=ckpt['path'], batch_size=BATCH, max_length=L),
      tasks=['yj_roll'], task_manager=TaskManager(include_path=str(ckpt['root'] / 'tasks'),
                                                  include_defaults=False), log_samples=True)
  got = [s['resps'][0][0] for s in sorted(out['samples']['yj_roll'], key=lambda s: s['doc_id'])]
  for doc, ll in zip(docs, got):
    tokens = tok.encode(doc)
    want = 0.0
    for start in range(0, len(tokens), L):
      end = min(start + L, len(tokens))
      seq = [tok.eod_id] + tokens[:end] if start == 0 else tokens[end - L - 1:end]
      want += direct(ckpt, seq, end - start)[0]
    assert abs(float(ll) - want) <= 1e-5 * abs(want), (doc, ll, want)
  n = len(tok.encode(docs[0]))
  assert n > 2 * L  # three windows
  whole = direct(ckpt, [tok.eod_id] + tok.encode(docs[0]), n)[0]
  assert abs(float(got[0]) - whole) > 1e-3 * abs(whole)  # the windows lose context


def test_bos_tokenizer_prefix(tmp_path):
  """A Mixtral checkpoint (Llama-style tokenizer: '<s>' starts every text): an empty context
  and a rolling window start from one '<s>', not two."""
  from tests.interop import checkpoints
  from tests.interop import mixtral_reference as MR
  config = MR.tiny_config()
  R.write_hf_dir(tmp_path / 'hf', MR.random_tensors(config, seed=4), config,
                 extra_files={'tokenizer.model': checkpoints.llama_style_tokenizer(tmp_path)})
  lm = lm_eval_model.YuanjaxLM(str(tmp_path / 'hf'), batch_size=2)
  bos, doc = lm.tok.sp.piece_to_id('<s>'), 'line 12 of some text'
  ids = lm.tok_encode(doc, add_special_tokens=False)
  assert lm.prefix_token_id == bos and lm.tok_encode(doc) == [bos] + ids and bos not in ids
  want = direct(direct_setup(lm.model, lm.params, lm.tok), [bos] + ids, len(ids))[0]
  request = lambda *args: types.SimpleNamespace(args=args)
  ((ll, _),) = lm.loglikelihood([request('', doc)])
  (rolled,) = lm.loglikelihood_rolling([request(doc)])
  assert abs(ll - want) <= 1e-5 * abs(want) and abs(rolled - want) <= 1e-5 * abs(want)


def test_int8_weights(ckpt):
  """quantize=int8: int8 weights on the device; a log-likelihood near the float model's (0.5%
  off here)."""
  doc = 'line of some text with more words'
  ids = ckpt['tok'].encode(doc)
  want = direct(ckpt, [ckpt['tok'].eod_id] + ids, len(ids))[0]
  lm = lm_eval_model.YuanjaxLM(ckpt['path'], batch_size=2, quantize='int8')
  assert any(a.dtype == np.int8 for a in jax.tree.leaves(lm.params))
  (got,) = lm.loglikelihood_rolling([types.SimpleNamespace(args=(doc,))])
  assert 1e-6 < abs(got - want) <= 0.02 * abs(want), (got, want)


def test_bad_model_args_name_the_field(ckpt):
  with pytest.raises(ValueError, match="batch_size='auto': must be an integer"):
    lm_eval_model.YuanjaxLM(ckpt['path'], batch_size='auto')
  with pytest.raises(ValueError, match='max_length=65: more than .*max_seq_len=64'):
    lm_eval_model.YuanjaxLM(ckpt['path'], max_length=65)
  with pytest.raises(ValueError, match="quantize='int4': expected one of"):
    lm_eval_model.YuanjaxLM(ckpt['path'], quantize='int4')
  lm = lm_eval_model.YuanjaxLM(ckpt['path'], max_length=16)
  request = lambda **kw: [types.SimpleNamespace(args=('line of', kw))]
  with pytest.raises(ValueError, match=r"generation kwargs \['num_beams'\]: not supported"):
    lm.generate_until(request(until=['x'], num_beams=4))
  with pytest.raises(ValueError, match='max_gen_toks=16: must be less than max_length=16'):
    lm.generate_until(request(until=['x'], max_gen_toks=16))


def mesh_answers(lm) -> dict:
  """Log-likelihoods of 5 pairs (an empty context among them: batches of 3 rows and of 2) and
  greedy generations of 4 prompts, from lm."""
  request = lambda *args: types.SimpleNamespace(args=args)
  pairs = [('line of', ' some'), ('', 'text with'), ('more words on', ' it 3'), ('on', ' 4'),
           ('with more words on it line of some', ' text')]
  until = dict(until=['\n'], max_gen_toks=6)
  prompts = ['line of some', 'text with more', 'on 3', 'words']
  return dict(ll=lm.loglikelihood([request(*p) for p in pairs]),
              gen=lm.generate_until([request(p, until) for p in prompts]))


def test_a_mesh_gives_the_one_device_answers(ckpt):
  """mesh=data=2/expert=4 (model_args' form): the checkpoint loaded onto 8 CPU devices, the
  rows split over data x expert and the experts over expert; log-likelihoods within float32
  reduction order of one device's, the same greedy flags and generations."""
  run = cpu_devices.run(8, ON_MESH, ckpt['path'], 'data=2/expert=4')
  got = json.loads(run.stdout.strip().splitlines()[-1])
  want = mesh_answers(lm_eval_model.YuanjaxLM(ckpt['path'], batch_size=3))
  assert [g for _, g in got['ll']] == [g for _, g in want['ll']]
  assert np.allclose([x for x, _ in got['ll']], [x for x, _ in want['ll']], rtol=1e-5, atol=0)
  assert got['gen'] == want['gen'] and any(want['gen'])
