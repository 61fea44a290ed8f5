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
