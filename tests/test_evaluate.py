"""`python -m yuanjax.evaluate` on a tiny HF checkpoint with a toy task (tests/evals/echo_task.py):
an interrupted run resumes to the uninterrupted run's outputs and results, `score` gives the
run's results from its outputs.jsonl and from Yuan's `question[SEP]output` format, a run on a
mesh of 8 CPU devices gives the one-device run's outputs, and bad input is refused before the
model loads."""
import json
import os
import random

import pytest

from tests import cpu_devices
from tests.evals.echo_task import echo  # pylint: disable=unused-import  (a fixture)
from tests.test_generate import hf_dirs  # pylint: disable=unused-import  (a fixture)
from yuanjax import evaluate, loader
from yuanjax.evals import generative

# The run on 8 CPU devices (experts and rows split), in a process of its own.
ON_MESH = '''
import sys
from tests.evals import echo_task
from yuanjax import evaluate
from yuanjax.evals import task
task.TASKS['echo'] = echo_task.Echo
sys.exit(evaluate.main(sys.argv[1:]))
'''
SCORED = ('task', 'n', 'correct', 'accuracy', 'ci95_low', 'ci95_high', 'interval')


def _main(capsys, *argv):
  """(exit status, the last stdout line as JSON or None, stderr)."""
  status = evaluate.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  lines = out.strip().splitlines()
  return status, json.loads(lines[-1]) if status == 0 else None, err


def _records(out_dir):
  with open(os.path.join(out_dir, 'outputs.jsonl')) as f:
    return [json.loads(line) for line in f]


def _without_seconds(records):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in records]


@pytest.fixture(scope='module')
def full_run(hf_dirs, echo, tmp_path_factory):
  """One uninterrupted run of the 12 items in batches of 4: (its dir, results)."""
  out = tmp_path_factory.mktemp('full')
  status = evaluate.main([
      '--checkpoint',
      str(hf_dirs / 'hf'), '--task', echo[0], '--data', echo[1], '--batch', '4', '--out',
      str(out)
  ])
  assert status == 0
  with open(out / 'results.json') as f:
    return out, json.load(f)


def test_run_writes_every_item_and_its_results(full_run, echo):
  out, results = full_run
  records = _records(out)
  assert [r['id'] for r in records] == [f'e{n}' for n in range(12)]
  task = generative.task_lib.get(echo[0])
  for r, item in zip(records, task.load(echo[1])):
    assert r['prompt'] == item.prompt and '\n' not in r['output']  # cut at the stop string
    assert r['extracted'] == task.extract(r['output'], item)
    assert r['correct'] == task.correct(r['extracted'], item)
    assert 1 <= r['tokens'] <= task.max_new_tokens
  k = sum(r['correct'] for r in records)
  assert 0 < k < 12  # both kinds, so that the counts below can be wrong
  assert (results['n'], results['correct'], results['accuracy']) == (12, k, k / 12)
  assert results['ci95_low'] < k / 12 < results['ci95_high']
  assert results['tokens'] == sum(r['tokens'] for r in records)
  assert results['tokens_per_sec'] == pytest.approx(results['tokens'] / results['seconds'])


def test_resume_skips_done_ids_and_equals_one_run(full_run, hf_dirs, echo, tmp_path, capsys,
                                                  monkeypatch):
  out, want = full_run
  argv = [
      '--checkpoint', hf_dirs / 'hf', '--task', echo[0], '--data', echo[1], '--batch', 4, '--out',
      tmp_path
  ]
  assert _main(capsys, *argv, '--limit', 4)[0] == 0  # then killed while writing a line:
  with open(tmp_path / 'outputs.jsonl', 'a') as f:
    f.write('{"id": "e4", "prompt": "some te')
  status, results, _ = _main(capsys, *argv)
  assert status == 0
  assert _without_seconds(_records(tmp_path)) == _without_seconds(_records(out))
  assert {k: results[k] for k in SCORED} == {k: want[k] for k in SCORED}
  monkeypatch.setattr(loader, 'load_checkpoint', _no_load)  # all done: nothing to load
  assert _main(capsys, *argv)[1]['correct'] == want['correct']


def test_score_of_the_outputs_equals_the_run(full_run, echo, capsys):
  out, want = full_run
  status, got, _ = _main(capsys, 'score', '--task', echo[0], '--data', echo[1], '--outputs',
                         out / 'outputs.jsonl')
  assert status == 0
  assert {k: got[k] for k in SCORED} == {k: want[k] for k in SCORED} and got['unmatched'] == 0


def test_score_of_yuans_format(full_run, echo, tmp_path, capsys):
  """Yuan's runtime writes prompt[SEP]output, newlines as <n>, in any order; lines are matched
  by question ('line 1 of' is not taken for 'line 11 of'); an unknown question is counted."""
  out, want = full_run
  lines = [
      r['prompt'].replace('\n', '<n>') + '[SEP]' + r['output'].replace('\n', '<n>')
      for r in _records(out)
  ]
  random.Random(0).shuffle(lines)
  (tmp_path / 'samples_0.jsonl').write_text('\n'.join(lines + ['line 99 of[SEP]7']) + '\n')
  status, got, _ = _main(capsys, 'score', '--task', echo[0], '--data', echo[1], '--outputs',
                         tmp_path / 'samples_0.jsonl')
  assert status == 0
  assert {k: got[k] for k in SCORED} == {k: want[k] for k in SCORED} and got['unmatched'] == 1


def _no_load(*args, **kwargs):
  raise AssertionError('the checkpoint was loaded')


def test_bad_input_is_refused_before_loading(hf_dirs, echo, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(loader, 'load_checkpoint', _no_load)
  run = ['--checkpoint', hf_dirs / 'hf', '--out', tmp_path / 'out']
  status, _, err = _main(capsys, *run, '--task', echo[0], '--data', tmp_path / 'none.txt')
  assert status == 1 and 'none.txt' in err and 'the test that writes it' in err
  status, _, err = _main(capsys, *run, '--task', 'nope', '--data', echo[1])
  assert status == 1 and "unknown task 'nope'" in err and "'echo'" in err
  status, _, err = _main(capsys, *run, '--task', echo[0], '--data', echo[1], '--mesh=tensor:2')
  assert status == 1 and "--mesh 'tensor:2': unknown axis 'tensor:2'" in err
  status, _, err = _main(capsys, *run, '--task', echo[0], '--data', echo[1], '--mesh=data=2')
  assert status == 1 and '2 devices, but there are 1' in err
  assert not os.path.exists(tmp_path / 'out')
  status, _, err = _main(capsys, 'score', '--task', echo[0], '--data', tmp_path / 'none.txt',
                         '--outputs', tmp_path / 'o.jsonl')
  assert status == 1 and 'none.txt' in err


def test_quantize_reaches_the_loader(hf_dirs, echo, tmp_path, capsys, monkeypatch):
  asked = {}

  def load(path, **kwargs):
    asked.update(kwargs, path=path)
    raise ValueError('loaded')

  monkeypatch.setattr(loader, 'load_checkpoint', load)
  status, _, err = _main(capsys, '--checkpoint', hf_dirs / 'hf', '--task', echo[0], '--data',
                         echo[1], '--out', tmp_path, '--quantize', 'int8', '--dtype', 'bfloat16')
  assert status == 1 and 'loaded' in err
  assert asked['quantize'] == 'int8' and asked['overrides'] == {'dtype': 'bfloat16'}


def test_a_run_on_a_mesh_gives_the_one_device_outputs(full_run, hf_dirs, echo, tmp_path):
  """--mesh data=2,expert=4 on 8 CPU devices: the checkpoint loaded onto the mesh, batches of 4
  padded to the 8 rows; every record but its seconds is the one-device run's."""
  argv = [
      '--checkpoint', hf_dirs / 'hf', '--task', echo[0], '--data', echo[1], '--batch', '4', '--out',
      tmp_path, '--mesh', 'data=2,expert=4'
  ]
  cpu_devices.run(8, ON_MESH, *map(str, argv))
  assert _without_seconds(_records(tmp_path)) == _without_seconds(_records(full_run[0]))
