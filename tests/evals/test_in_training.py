"""config.evals in a training run: a task evaluated every train.eval_every steps beside the
held-out loss, on one eval line per step (metrics.jsonl and TensorBoard), with the params split
over two devices (the task and the end-of-run sample decoded on that mesh); bad settings refused
before anything compiles."""
import glob
import json
import os

import pytest

from tests import cpu_devices
from tests.evals.echo_task import echo  # pylint: disable=unused-import  (a fixture)
from yuanjax import loader, trainer, workdir
from yuanjax.evals import generative, sample
from yuanjax.evals import task as task_lib

SAMPLE_TOKENS = 8
# The run on two CPU devices, the params split over them (fsdp 2), in a process of its own.
TWO_DEVICES = '''
import json, sys
from tests.evals import echo_task, test_in_training
from yuanjax import trainer
from yuanjax.evals import task
task.TASKS['echo'] = echo_task.Echo
config = test_in_training.config(('echo', sys.argv[1]))
config.mesh.update(dict(data=1, fsdp=2))
config.train.sample_tokens = test_in_training.SAMPLE_TOKENS
print(json.dumps(trainer.train_and_evaluate(config, sys.argv[2]), default=float))
'''


def config(echo_task, run='loss,echo:5'):
  """configs/tiny.py:runlocal for 2 steps of 4 x 64 tokens, evaluated after each."""
  c = workdir.load_config(os.path.join(cpu_devices.REPO, 'configs', 'tiny.py'), 'runlocal')
  c.train.update(dict(num_steps=2, eval_every=1, batch_size=4, seq_len=64, sample_tokens=0))
  c.evals.update(dict(run=run, data=f'echo={echo_task[1]}', batch_size=3))
  return c


def test_a_task_eval_logs_its_accuracy_on_two_devices(echo, tmp_path):
  """Steps 1 and 2 (the end) each log one eval line with the loss and echo/accuracy; the last
  equals the evaluation runtime's on the saved checkpoint (here, on one device), and so does
  the end-of-run sample, decoded on the fsdp=2 mesh."""
  run = cpu_devices.run(2, TWO_DEVICES, echo[1], str(tmp_path))
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  evals = workdir.read_metrics(str(tmp_path))['eval']
  assert [e['step'] for e in evals] == [1, 2]
  for e in evals:
    assert e['loss'] > 0 and e['echo/n'] == 5 and e['echo/accuracy'] == e['echo/correct'] / 5
  assert summary['eval_loss'] == evals[-1]['loss']
  assert summary['echo/accuracy'] == evals[-1]['echo/accuracy']
  model, params, tok = loader.load_checkpoint(str(tmp_path))
  task = task_lib.get('echo')
  batches = generative.run(model, params, tok, task, task.load(echo[1])[:5], 3)
  assert sum(r['correct'] for b in batches for r in b) == evals[-1]['echo/correct']
  prompt = config(echo).train.sample_prompt
  assert len(summary['sample']) > len(prompt)
  assert summary['sample'] == sample.end_of_run(model, params, tok, prompt, SAMPLE_TOKENS)
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
  c = config(echo, run)
  if data is not None:
    c.evals.data = data
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')
