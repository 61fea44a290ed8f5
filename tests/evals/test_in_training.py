"""config.evals in a training run: a task evaluated every train.eval_every steps beside the
held-out loss, on one eval line per step (metrics.jsonl and TensorBoard); bad settings refused
before anything compiles."""
import glob
import json
import os

import pytest

from tests.evals.echo_task import echo  # pylint: disable=unused-import  (a fixture)
from yuanjax import loader, trainer, workdir
from yuanjax.evals import generative
from yuanjax.evals import task as task_lib


def _config(echo_task, run='loss,echo:5'):
  config = workdir.load_config(
      os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py'), 'runlocal')
  config.train.update(dict(num_steps=2, eval_every=1, batch_size=4, seq_len=64, sample_tokens=0))
  config.evals.update(dict(run=run, data=f'echo={echo_task[1]}', batch_size=3))
  return config


def test_a_task_eval_logs_its_accuracy(echo, tmp_path):
  """Steps 1 and 2 (the end) each log one eval line with the loss and echo/accuracy; the last
  equals the evaluation runtime's on the saved checkpoint."""
  summary = trainer.train_and_evaluate(_config(echo), str(tmp_path))
  evals = workdir.read_metrics(str(tmp_path))['eval']
  assert [e['step'] for e in evals] == [1, 2]
  for e in evals:
    assert e['loss'] > 0 and e['echo/n'] == 5 and e['echo/accuracy'] == e['echo/correct'] / 5
  assert summary['eval_loss'] == evals[-1]['loss']
  assert summary['echo/accuracy'] == evals[-1]['echo/accuracy']
  model, params, tok = loader.load_checkpoint(str(tmp_path))
  task = task_lib.get('echo')
  records = [
      r for b in generative.run(model, params, tok, task,
                                task.load(echo[1])[:5], 3) for r in b
  ]
  assert sum(r['correct'] for r in records) == evals[-1]['echo/correct']
  events = b''.join(open(f, 'rb').read() for f in glob.glob(str(tmp_path / 'tb' / '*')))
  assert b'eval/echo/accuracy' in events and b'eval/loss' in events


@pytest.mark.parametrize('run,data,error', [
    ('loss,nope:3', None, r"unknown evaluation 'nope'; known: evaluators \['loss'\], tasks .*echo"),
    ('loss,echo', None, 'echo:LIMIT'),
    ('loss:2', None, 'loss takes no item limit'),
    ('echo:2', 'echo=/no/such.txt', "no data at '/no/such.txt'; the files come from the test"),
    ('loss', None, r"config.evals.data names \['echo'\], which config.evals.run does not run"),
    ('echo:2', '', 'echo needs its data file in config.evals.data'),
])
def test_bad_evals_are_refused_before_anything_runs(echo, tmp_path, run, data, error):
  config = _config(echo, run)
  if data is not None:
    config.evals.data = data
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    trainer.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')
