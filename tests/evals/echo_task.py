"""A toy task for the evaluation runtime's tests: `some text` then `line N of`; the answer is
the first number of the output, right when it has N's parity (so a random model gets some right
and some wrong)."""
import os
import re

import pytest

from yuanjax.evals import task as task_lib


class Echo(task_lib.Task):
  name = 'echo'
  source = 'the test that writes it'
  max_new_tokens = 6
  stop = ('\n',)

  def load(self, data_path):
    with open(data_path) as f:
      numbers = [int(line) for line in f if line.strip()]
    return [
        task_lib.Item(id=f'e{n}', prompt=f'some text\nline {n} of', answer=n,
                      question=f'line {n} of') for n in numbers
    ]

  def extract(self, output, item):
    found = re.search(r'\d+', output)
    return int(found.group()) if found else None

  def correct(self, extracted, item):
    return extracted is not None and extracted % 2 == item.answer % 2


@pytest.fixture(scope='module')
def echo(tmp_path_factory):
  """The task registered, and a data file of 12 items (questions 'line 1 of' and 'line 11 of'
  among them); (name, data path)."""
  task_lib.TASKS['echo'] = Echo
  path = os.path.join(tmp_path_factory.mktemp('echo'), 'echo.txt')
  with open(path, 'w') as f:
    f.write(''.join(f'{n}\n' for n in range(12)))
  yield 'echo', path
  del task_lib.TASKS['echo']
