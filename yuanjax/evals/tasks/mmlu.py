"""MMLU as Yuan2.0-M32 evaluates it: zero-shot, one instruction line, answer letter.

Data: datasets/MMLU/, one `question<n>A.x<n>B.y<n>C.z<n>D.w[SEP]C` file per subject (57, 14,042
items). The prompt is "Choose the correct answer from the options after each question." and a
newline before the question (tasks/MMLU/eval_for_mmlu.py); the letter is read as score_mmlu.py
reads it (`choice.letter`). Accuracy is over all items together, as Yuan's scorer sums them.
"""
from __future__ import annotations

import dataclasses
import os

from yuanjax.evals import task
from yuanjax.evals.tasks import choice


@task.register
class MMLU(choice.ChoiceTask):
  """`data_path` is the directory of subject files (`*.txt`, by name), or one subject's file."""
  name = 'mmlu'
  shots = 'mmlu'

  def load(self, data_path: str) -> list[task.Item]:
    self.check_data(data_path)
    if not os.path.isdir(data_path):
      return self.load_subject(data_path)
    files = sorted(f for f in os.listdir(data_path) if f.endswith('.txt'))
    if not files:
      raise FileNotFoundError(f'mmlu: no subject files (*.txt) in {data_path!r}; the files come '
                              f'from {self.source} (datasets/MMLU/)')
    return [item for f in files for item in self.load_subject(os.path.join(data_path, f))]

  def load_subject(self, path: str) -> list[task.Item]:
    subject = os.path.splitext(os.path.basename(path))[0]
    return [dataclasses.replace(item, id=f'{subject}/{item.id}') for item in super().load(path)]
