"""GSM8K as Yuan2.0-M32 evaluates it: 8-shot `Question:`/`Answer:` prompt, greedy, number match.

Data: datasets/GSM8K/gsm8k.txt (1,319 `question[SEP]answer` lines, integer answers). The rule
(tasks/GSM8K/score_gsm8k.py) reads the output with spaces and `$` removed and looks at its last
line (the one before when the last has no `=` and no digit, or the one before that): the text
after its last `=` when it has one. The answer is right when the gold number stands there on its
own (not inside a longer number or expression), or, failing that, when one of the last three
numbers there equals it as a float (`a/b` divided out); a lone `= gold` at the end of the line
before counts when the last line holds no number at all.
"""
from __future__ import annotations

import re

from yuanjax.evals import task
from yuanjax.evals.tasks import yuan_text

_NUMBER = (r'(?:[-+]?\d+\.?\d+/\d+\.?\d+|[-+]?\d+/\d+|[-+]?\d+\.\d+'
           r'|\d{1,5}(?:,\d{3})+(?:\.\d+)*?|[-+]?\d+)')
_CANDIDATE_RE = re.compile(_NUMBER + r'(?![\d+\-*/=()√₀²³‰¼½¾_×¬^:±÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_GOLD_BEFORE = r'(?<=[^0-9+\-*/])'
_GOLD_AFTER = r'(?![xyzXYZ\d.+\-*/=()√₀²³‰¼½¾_×¬^,!:±×÷∶∧∨∑∏∪∷√≡≠><≤≥])'
_BOXED_NUMBER_RE = re.compile(r'\\boxed{\s*([\d.,/]+)\s*}[.]?')
_FRACTION_RE = re.compile(r'\\d?frac\{([\d,.]+)\}\{([\d,.]+)\}')
_ANSWER_MARK = '答案为：'  # Yuan's marker before the text after an `=`, so a number there has a
# character before it (the gold pattern needs one)
_LAST_CANDIDATES = 3


def fractions_as_slashes(text: str) -> str:
  r"""`\frac{a}{b}` (digits) as `a/b`, unless the text has three closing braces in a row."""
  if 'frac' not in text or re.search(r'(?:\s*\}){3,}', text):
    return text
  return _FRACTION_RE.sub(r'\1/\2', text)


def value(number: str) -> float | None:
  """The float a candidate number stands for (`,` dropped, `a/b` divided); None if none."""
  number = number.replace(',', '').replace(' ', '')
  try:
    if '/' in number:
      numerator, denominator = number.split('/')[:2]
      return float(numerator) / float(denominator)
    return float(number)
  except (ValueError, ZeroDivisionError):
    return None


def answer_text(output: str) -> str:
  """The output as the rule reads it: `<n>` lines, no spaces, `$`, LaTeX spacing or boxes."""
  text = _BOXED_NUMBER_RE.sub(r'\1',
                              yuan_text.drop_trailing_newlines(yuan_text.output_line(output)))
  for old, new in (('<br>', '<n>'), ('\\!', ''), ('\\;', ''), ('\\,', ''), ('$$', ' '), ('$', ''),
                   (' ', ''), ('≈', '=')):
    text = text.replace(old, new)
  return text


def final_lines(text: str) -> tuple[str, str]:
  """The line the answer is looked for in, and `<n>` + the end of the line before (or '')."""
  lines = text.split('<n>')
  end = lines[-1]
  if len(lines) == 1 or '=' in end:  # Yuan also tests 'answer is ', never there without spaces
    return end, ''
  before = '<n>' + lines[-2].split('=')[-1]
  if end and not re.search(r'\d', end):
    end = lines[-2]
    if end and not re.search(r'\d', end) and len(lines) > 2:
      end = lines[-3]
  return end, before


def judge(output: str, gold: str) -> tuple[bool, str | None]:
  """Whether Yuan's rule credits the output, and the number it credits (else the last one)."""
  end, before = final_lines(answer_text(output))
  if '=' in end:  # Yuan's 'The answer is' test before this never fires: spaces are gone
    end = _ANSWER_MARK + end.split('=')[-1] + '。'
  end = fractions_as_slashes(end.replace('\\%', '%'))
  gold_re = re.compile(_GOLD_BEFORE + re.escape(gold) + _GOLD_AFTER)
  candidates = _CANDIDATE_RE.findall(end)
  if gold_re.search(end) or (not candidates and gold_re.search(fractions_as_slashes(before))):
    return True, gold
  gold_value = value(gold)
  for candidate in reversed(candidates[-_LAST_CANDIDATES:]):
    found = value(candidate)
    if found is None:  # Yuan's loop ends at the first number it cannot divide out
      break
    if found == gold_value:
      return True, candidate
  return False, candidates[-1] if candidates else None


@task.register
class GSM8K(yuan_text.SepFileTask):
  name = 'gsm8k'
  data_file = 'gsm8k.txt'
  shots = 'gsm8k'

  def extract(self, output: str, item: task.Item) -> str | None:
    return judge(output, item.answer)[1]

  def correct(self, extracted: str | None, item: task.Item) -> bool:
    if extracted is None:
      return False
    gold_value = value(item.answer)
    return extracted == item.answer or (gold_value is not None and value(extracted) == gold_value)
