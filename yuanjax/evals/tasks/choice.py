"""The answer letter of a multiple-choice output, as Yuan2.0-M32's ARC and MMLU scorers read it.

tasks/ARC/score_arc.py and tasks/MMLU/score_mmlu.py share one rule (get_ans_gen_letter): after
LaTeX and full-width letters are undone, the first of five phrasings that occurs gives the letter
from its last occurrence ("the correct answer is (C).", "... answer is "..." C.", "option C ...
"..." ... the correct answer", "option C is the correct answer", " answer is ... C."); else a
letter A-K ending a phrase in the last line (or the one before). "none of the X options are
correct." (X one character, as Yuan's pattern has it) gives no letter.

Where Yuan's cascade is quirky it is kept: a "closest answer ... "..." C." match gives no letter
(its reduction pattern lacks "closest"); the fifth phrasing keeps its whole match when the
reduction fails on a `.`, its letter then being the last A-K in it; "I" counts as a letter ("I
think..." on the last line reads as I). Yuan's branch for "incorrect statement is C" when the
question asks for what is incorrect is never reached (the first phrasing matches its "correct
statement is C" first), so it is left out.
"""
from __future__ import annotations

import re

from yuanjax.evals import task
from yuanjax.evals.tasks import yuan_text

_JUDGES = r'(?:correct|most appropriate|most accurate|plausible|reasonable|best|closest)'
# (pattern, the same with the letter captured): the five phrasings, in the order tried.
_PHRASINGS = (
    (_JUDGES + r' (?:answer|option|Option|statement) (?:is|would be)[option\s<n>:*\(]*?'
     r'LETTER\s*[\),:\.]'),
    _JUDGES + r' answer [\sa-z]*? "[^"]*?"[isoption\s<n>:*\(]*?LETTER\s*[\),:\.]',
    r'(?:option|Option) LETTER\s*[\),:\.][\sa-z]*? "[^"]*?"[a-z\s]*?the correct answer',
    r'(?:option|Option) LETTER(?:\s*[\.\)][\s:a-zA-Z]{0,10}|) is the correct answer',
    r' answer (?:is|would be) .*?LETTER\s*[\)\.]',
)
# How each phrasing's last match is reduced to its letter (Yuan's second and fifth differ).
_REDUCTIONS = (
    _PHRASINGS[0],
    _PHRASINGS[1].replace(_JUDGES, _JUDGES.replace('|closest', '')),
    _PHRASINGS[2],
    _PHRASINGS[3],
    r' answer (?:is|would be) [^\.]*?LETTER\s*[\)\.]',
)
_LAST_LINE = r'(?:option|answer|Option|answer|)[a-z\s]*?LETTER[\s\.,:\)]'
_LATEX_LETTER = (
    (r'\\rm\s*\{([A-Z]+)\}', r'\1'),
    (r'\\mathrm\s*\{([A-Z]+)\}', r'\1'),
    (r'\\boxed\s*\{\s*([A-Z]+)\s*\}\s*', r'\1'),
    (r'\\text\s*\{[\(]?([A-Z]+)[\)]?\}', r'\1'),
    (r'<font[^>]*?>([A-K]+)</font>', r'\1'),
    (r'\\textbf\s*\{\(([A-Z]+)\)\}', r'\1.'),
    (r'\\mathbf\s*\{([^{]*?)\}', r'\1'),
)


def _find(pattern: str, text: str) -> list[str]:
  return re.findall(pattern.replace('LETTER', '[A-K]'), text)


def _reduce(pattern: str, match: str) -> str:
  return re.sub(pattern.replace('LETTER', '([A-K])'), r'\1', match)


def answer_text(output: str) -> str:
  """The output as the rule reads it: `<n>` lines, `$`, full-width and LaTeX letters undone."""
  text = yuan_text.drop_trailing_newlines(yuan_text.output_line(output)).split('[EOD]')[0]
  text = text.rstrip().replace('$', '')
  for wide, narrow in zip('ＡＢＣＤ', 'ABCD'):
    text = text.replace(wide, narrow)
  for pattern, replacement in _LATEX_LETTER:
    text = re.sub(pattern, replacement, text)
  return text


def _phrased(text: str) -> str | None:
  """What the first phrasing found reduces to (a letter, or the fifth's whole match); None."""
  for number, (pattern, reduction) in enumerate(zip(_PHRASINGS, _REDUCTIONS)):
    matches = _find(pattern, text)
    if matches:
      reduced = _reduce(reduction, matches[-1])
      # Yuan's later stages re-reduce the last character of an earlier stage's result.
      return reduced if number == len(_PHRASINGS) - 1 else reduced[-1]
  lines = text.split('<n>')
  for line in lines[-1:] if len(lines) < 2 else lines[:-3:-1]:
    matches = _find(_LAST_LINE, line)
    if matches:
      return _reduce(_LAST_LINE, matches[-1])
  return None


def letter(output: str) -> str | None:
  """The answer letter Yuan's rule reads from the output (None if none)."""
  text = answer_text(output)
  found = _phrased(text)
  if found is None or re.findall(r'none of the [a-z\s*] options are correct.', text):
    return None
  letters = re.findall(r'[A-K]', found)
  return letters[-1] if letters else None


def gold_letter(answer: str) -> str:
  """The gold as Yuan's scorer reads it: `Answer:`, dots and spaces removed."""
  for noise in ('Answer:', 'Answer：', '.', 'Answers:', 'Answers：'):
    answer = answer.replace(noise, '')
  return answer.strip()


class ChoiceTask(yuan_text.SepFileTask):
  """A `question<n>A.x<n>B.y...[SEP]C` task scored by the answer letter."""

  def item(self, id_: str, prompt_text: str, answer: str, question: str) -> task.Item:
    return super().item(id_, prompt_text, gold_letter(answer), question)

  def extract(self, output: str, item: task.Item) -> str | None:
    return letter(output)

  def correct(self, extracted: str | None, item: task.Item) -> bool:
    return extracted is not None and extracted == item.answer
