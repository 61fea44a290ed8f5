"""The text conventions of IEIT-Yuan/Yuan2.0-M32's evaluation scripts, shared by the tasks.

Data files hold one item a line, `question[SEP]answer`, with `<n>` for a newline inside the
question. A prompt is a few-shot text (prompts/NAME.txt, already with real newlines), the question
and `<sep>`, with every `<n>` a newline. Yuan's runtime writes each result as one line, prompt and
output joined by `[SEP]`, newlines back to `<n>` (runs of them squeezed), `<pad>`/`<eod>` dropped;
its scorers read the output from that line. `output_line` gives our runtime's output the same form,
so a scorer sees the same text from either runtime.
"""
from __future__ import annotations

import importlib.resources
import os
import re
from typing import ClassVar

from yuanjax.evals import task

SEP = '[SEP]'
NEWLINE = '<n>'
SOURCE = 'https://github.com/IEIT-Yuan/Yuan2.0-M32'
_TRAILING_NEWLINES_RE = re.compile(r'(\s*<n>\s*)+?$')


def few_shot(name: str) -> str:
  """The few-shot text prompts/NAME.txt shipped with the package (it ends with `Question:`)."""
  return importlib.resources.files(__package__).joinpath(f'prompts/{name}.txt').read_text('utf-8')


def read_sep_file(path: str) -> list[tuple[int, str, str]]:
  """(line number from 1, question, answer) of each non-blank `question[SEP]answer` line.

  The question is as the file spells it (`<n>`s included), the answer has its spaces removed, as
  Yuan's scorers read it. A line without `[SEP]` is an error (Yuan's loader would silently cut
  its last character and prompt with the rest).
  """
  rows = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if SEP not in line:
        raise ValueError(f'{path}:{number}: no {SEP} between question and answer')
      question, answer = line.split(SEP)[:2]
      rows.append((number, question, answer.replace(' ', '')))
  return rows


def prompt(shots: str, question: str) -> str:
  """What Yuan's eval_for_*.py gives the model: shots, question, `<sep>`, `<n>` as newlines."""
  return (shots + question + '<sep>').replace(NEWLINE, '\n')


def question_key(question: str) -> str:
  """How Yuan's scorers key an item: runs of `<n>` squeezed, ends stripped (`Item.question`).

  A line of Yuan's output belongs to the item whose key is in its text before `[SEP]`.
  """
  return re.sub(r'(<n>)+', NEWLINE, question).strip()


def squeeze_newlines(text: str) -> str:
  """Yuan's clean_tab: newlines as `<n>`, then three passes of `<n><n>` -> `<n>`."""
  text = text.replace('\n', NEWLINE)
  for _ in range(3):
    text = text.replace(NEWLINE * 2, NEWLINE)
  return text


def output_line(output: str) -> str:
  """The output as a line of Yuan's runtime shows it after its `[SEP]`, up to any later `[SEP]`.

  Idempotent, so the output part of a Yuan result line passes through unchanged.
  """
  text = output.rstrip().replace('<pad>', '').replace('<eod>', '').replace('<sep>', SEP)
  return squeeze_newlines(text).rstrip().split(SEP)[0]


def drop_trailing_newlines(text: str) -> str:
  """Yuan's scorers' first step: the `<n>`s (and spaces) at the end go."""
  return _TRAILING_NEWLINES_RE.sub('', text)


class SepFileTask(task.Task):
  """A task whose data is one `question[SEP]answer` file and whose prompt is `shots` + question.

  `data_path` is the file, or the directory holding it under its Yuan name (`data_file`).
  """
  data_file: ClassVar[str]
  shots: ClassVar[str]  # the name of the few-shot text in prompts/
  source = SOURCE
  max_new_tokens = 1023  # Yuan's max_len 1024 minus len(tokens), its batch size (1), not length
  stop = ('<eod>',)

  def load(self, data_path: str) -> list[task.Item]:
    self.check_data(data_path)
    if os.path.isdir(data_path):
      data_path = os.path.join(data_path, self.data_file)
      self.check_data(data_path)
    shots = few_shot(self.shots)
    return [
        self.item(str(number - 1), prompt(shots, question), answer, question)
        for number, question, answer in read_sep_file(data_path)
    ]

  def item(self, id_: str, prompt_text: str, answer: str, question: str) -> task.Item:
    return task.Item(id_, prompt_text, answer, question_key(question))
