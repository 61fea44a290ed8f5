"""Weighted data mixtures (data.mixture): validation, exact token shares, resume, per-source eval.

    .venv/bin/python -m pytest -q tests/data/test_mixture.py
"""
import json
import os
import sys

import numpy as np
import pytest

from yuanjax.data import Tokenizer, corpus, data_config, make_datasets
from yuanjax.data import pipeline as pl
from yuanjax.data import prepare as prepare_lib
from yuanjax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = {'alpha': 'apple avocado almond ', 'beta': 'banana berry bread '}


def _docs(word, n):
  return [corpus.Document(f'{i} ' + WORDS[word] * (i % 5 + 2), 'm', i, 0) for i in range(n)]


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """Two sources made with one tokenizer, and a third made with another tokenizer."""
  d = tmp_path_factory.mktemp('mix')
  train = [corpus.Document(' '.join(WORDS.values()) * 40 + '0123456789', 'm', None, 0)]
  tok = tokenizer_lib.train_from_documents(train, d / 'tok', 300)
  other = tokenizer_lib.train_from_documents(train * 2 + _docs('alpha', 3), d / 'other', 300)
  for word in WORDS:
    prepare_lib.prepare_documents(tok, lambda w=word: _docs(w, 30), d / word, progress=False)
  prepare_lib.prepare_documents(other, lambda: _docs('beta', 30), d / 'foreign', progress=False)
  return tok, {name: str(d / name) for name in (*WORDS, 'foreign')}


def _cfg(paths, weights, **kw):
  cfg = data_config()
  cfg.mixture = tuple(dict(path=paths[n], weight=w) for n, w in weights.items())
  cfg.update({**dict(eval_fraction=0.1, shuffle_rows=0, fim_rate=0.0), **kw})
  return cfg


def _make(cfg, **kw):
  return make_datasets(cfg, global_batch_size=4, seq_len=16, process_index=0, process_count=1, **kw)


@pytest.mark.parametrize('weight', [0, -1.0, float('nan'), 'x'])
def test_bad_weight_is_an_error_naming_the_source(sources, weight):
  _, paths = sources
  with pytest.raises(ValueError, match=r"data.mixture\[1\] \(beta\): weight must be a positive"):
    pl.mixture_sources(_cfg(paths, {'alpha': 1, 'beta': weight}))


def test_mixture_config_errors(sources):
  _, paths = sources
  cfg = _cfg(paths, {'alpha': 1, 'beta': 1})
  cfg.path = paths['alpha']
  with pytest.raises(ValueError, match='data.path and data.mixture are both set'):
    pl.mixture_sources(cfg)
  cfg = data_config()
  cfg.mixture = (dict(path=paths['alpha'], weight=1), dict(path=paths['alpha'], weight=2))
  with pytest.raises(ValueError, match='names .* repeat'):
    pl.mixture_sources(cfg)
  cfg.mixture = (dict(path=paths['alpha'], wieght=1),)
  with pytest.raises(ValueError, match=r'data.mixture\[0\]: expected \{path, weight'):
    pl.mixture_sources(cfg)
  assert [m['weight'] for m in pl.mixture_sources(_cfg(paths, {
      'alpha': 3,
      'beta': 1
  }))] == [0.75, 0.25]


def test_source_made_with_another_tokenizer_is_an_error_naming_it(sources):
  _, paths = sources
  with pytest.raises(
      ValueError, match="data.mixture source 'foreign': .*foreign/manifest.json: "
      'prepared with another tokenizer'):
    _make(_cfg(paths, {'alpha': 1, 'foreign': 1}))


def test_rows_come_in_the_weights_and_from_their_source(sources):
  tok_path, paths = sources
  tok = Tokenizer(tok_path)
  train, make_eval, _ = _make(_cfg(paths, {'alpha': 3, 'beta': 1}))
  batches = [next(train) for _ in range(10)]
  ids = np.concatenate([b['source'] for b in batches])
  assert np.count_nonzero(ids == 0) == 30 and np.count_nonzero(ids == 1) == 10  # exactly 3:1
  seen = set()
  for b in batches:
    for row, source in zip(b['inputs'], b['source']):
      words = set(tok.decode(row).split())
      assert not words & set(WORDS['beta' if source == 0 else 'alpha'].split())
      seen |= words
  assert set(' '.join(WORDS.values()).split()) <= seen
  evals = list(make_eval())
  assert [int(b['source'][0]) for b in evals] == [0, 1] * (len(evals) // 2)  # round-robin
  assert all(len(set(b['source'])) == 1 for b in evals)
  train.close()


def test_mixture_resumes_exactly_through_json_state(sources):
  _, paths = sources
  cfg = _cfg(paths, {'alpha': 2, 'beta': 1}, shuffle_rows=6, fim_rate=0.5)
  train, _, _ = _make(cfg)
  [next(train) for _ in range(5)]
  state = json.loads(json.dumps(train.get_state()))
  expected = [next(train) for _ in range(6)]
  resumed, _, _ = _make(cfg)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(6)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  train.close()
  resumed.close()


def _train(config, workdir, steps):
  from yuanjax import trainer
  config.train.num_steps = steps
  trainer.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_trainer_logs_shares_and_eval_loss_per_source_and_resumes_exactly(sources, tmp_path):
  sys.path.insert(0, REPO)
  import configs.demo as demo
  _, paths = sources
  config = demo.get_config('runlocal')
  mix = _cfg(paths, {'alpha': 3, 'beta': 1}, shuffle_rows=8, fim_rate=0.5)
  config.data.update({k: mix[k] for k in ('mixture', 'eval_fraction', 'shuffle_rows', 'fim_rate')})
  config.model.update(dict(vocab_size=300, num_layers=2, hidden_size=64))
  config.train.update(dict(sample_tokens=0, eval_steps=1, batch_size=4, log_every=1))
  config.checkpoint.every = 2
  recs = _train(config, str(tmp_path / 'a'), 2)  # stops at step 2 (its checkpoint) ...
  last = [r for r in recs if r['kind'] == 'train'][-1]
  assert (last['data/share/alpha'], last['data/share/beta']) == (0.75, 0.25)
  [ev] = [r for r in recs if r['kind'] == 'eval']
  a, b = ev['eval_loss/alpha'], ev['eval_loss/beta']
  assert np.isfinite(a) and np.isfinite(b) and a != b
  assert min(a, b) <= ev['loss'] <= max(a, b)
  losses = lambda recs: {r['step']: r['loss'] for r in recs if r['kind'] == 'train'}
  resumed = losses(_train(config, str(tmp_path / 'a'), 4))  # ... and is run again to step 4
  assert resumed == losses(_train(config, str(tmp_path / 'b'), 4))
  assert sorted(resumed) == [1, 2, 3, 4]


def test_mixture_run_killed_after_a_checkpoint_resumes_with_the_same_losses(sources, tmp_path):
  """`python -m yuanjax.train` on a mixture, SIGKILLed once a checkpoint is on disk, then run
  again: the per-step losses of an uninterrupted run (the data iterator's state resumes)."""
  from tests.test_train import _losses, _run, _start, _wait
  from yuanjax import workdir as workdir_lib
  _, paths = sources
  mixture = tuple(dict(path=paths[n], weight=w) for n, w in (('alpha', 3.0), ('beta', 1.0)))
  extra = (f'--config.data.mixture={mixture!r}', '--config.data.shuffle_rows=8')
  flags = lambda d: (str(tmp_path / d), str(tmp_path / 'cache'), 6, extra)
  _run(*flags('whole'))
  want = _losses(str(tmp_path / 'whole'))
  assert sorted(want) == [1, 2, 3, 4, 5, 6]
  killed = str(tmp_path / 'killed')
  p = _start(*flags('killed'))
  _wait(lambda: workdir_lib.checkpoint_steps(killed), p)
  p.kill()
  p.wait()
  assert max(_losses(killed)) < 6  # killed mid-run
  _run(*flags('killed'))
  assert _losses(killed) == want
