"""The scoring pieces of yuanjax.evals.generative that need no model: the Wilson interval, the
stop cut, and matching Yuan's `question[SEP]output` lines to items."""
import pytest

from tests.evals.echo_task import echo  # pylint: disable=unused-import  (a fixture)
from yuanjax.evals import generative
from yuanjax.evals import task as task_lib


@pytest.mark.parametrize(
    'k,n,want',
    [
        (5, 10, (0.2366, 0.7634)),  # statsmodels proportion_confint(5, 10, method='wilson')
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (1, 1, (0.2065, 1.0)),
    ])
def test_wilson_interval(k, n, want):
  assert generative.wilson(k, n) == pytest.approx(want, abs=1e-4)


def test_cut_at_the_first_stop_string():
  assert generative.cut('a\nb<eod>c', ('<eod>', '\n')) == 'a'
  assert generative.cut('abc', ('\n',)) == 'abc' and generative.cut('abc', ()) == 'abc'


def test_yuan_lines_matched_by_the_longest_question(echo):
  """Line questions carry the prompt (few-shot included), newlines as <n> (doubled ones
  once); a line of 'line 11 of' is not taken for 'line 1 of'; outputs get their newlines back
  and are cut at the task's stop string."""
  task = task_lib.get('echo')
  items = task.load(echo[1])
  lines = ['some text<n><n>line 11 of[SEP] 3<n>9', 'some text<n>line 1 of[SEP]4', 'x[SEP]1', '']
  records, unmatched = generative.judge_yuan(task, items, lines, 'f')
  assert [(r['id'], r['output'], r['correct']) for r in records] == [('e11', '3', True),
                                                                     ('e1', '4', False)]
  assert unmatched == 1
  assert not generative.is_outputs_jsonl(lines)
  assert generative.is_outputs_jsonl(['', '{"id": "e1", "output": "4"}'])


def test_yuans_humaneval_samples_are_judged_as_they_are(tmp_path):
  """samples.jsonl of Yuan's HumanEval script: {task_id, completion}, run against the tests."""
  import gzip
  import json
  problem = dict(task_id='HumanEval/0', prompt='def inc(x):\n',
                 canonical_solution='  return x + 1\n', test='def check(f):\n  assert f(1) == 2\n',
                 entry_point='inc')
  with gzip.open(tmp_path / 'HumanEval.jsonl.gz', 'wt') as f:
    f.write(json.dumps(problem) + '\n')
  (tmp_path / 'HumanEval-instructions.jsonl').write_text(
      json.dumps({
          'task_id': 'HumanEval/0',
          'prompt': 'Instruction: inc\nResponse:\n'
      }) + '\n')
  task = task_lib.get('humaneval')
  samples = [{
      'task_id': 'HumanEval/0',
      'completion': c
  } for c in ('def inc(x):\n  return x + 1\n', 'def inc(x):\n  return x\n')]
  lines = [json.dumps(s) for s in samples + [{'task_id': 'HumanEval/9', 'completion': ''}]]
  (tmp_path / 'samples.jsonl').write_text('\n'.join(lines) + '\n')
  got = generative.score_file(task, task.load(str(tmp_path)), str(tmp_path / 'samples.jsonl'))
  assert (got['n'], got['correct'], got['unmatched']) == (2, 1, 1)
