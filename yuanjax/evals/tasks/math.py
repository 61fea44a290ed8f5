"""MATH as Yuan2.0-M32 evaluates it: 4-shot `Question:`/`Answer:` prompt, greedy, its own judge.

Data: datasets/MATH/math.txt (`question[SEP]answer` lines, LaTeX answers). The rule
(tasks/MATH/score_Math.py) is a judgement of the output against the gold, not a comparison of an
extracted answer, so `extract` gives {'answer': the text the rule looked in, 'credited': verdict}.
The output is normalised (LaTeX spacing, `\\left`, `$`, degree signs, `tfrac`/`dfrac` dropped) and
its answer is the text after ` answer is` or `# Answer`, else its last line with a digit (the text
after its last `=`). The gold decides how it is compared:

* one number (`\\frac{a}{b}`, `a\\frac{b}{c}` and braces undone): it must stand alone there, or one
  of the last three numbers there (those of the prompt skipped, percentages and square roots
  included) must equal it to max(5, its decimals) places; a few guards veto (two numbers that
  are neither the gold nor in the prompt; a longer list than the gold counts; the gold more than
  five times);
* a list of numbers: the digits must appear there, `,`/`and`/`or` and spaces removed;
* `\\text{...}`: the word must appear (case-insensitive, at most five times), a `\\text{(C)}`
  letter as `(C)`;
* anything else: the gold LaTeX (or its fraction form, or an equivalent spelling for `\\cot x`,
  complex numbers, `x=5`, `a_b`) must stand alone in the answer with spaces removed.

An output that repeats its last lines over and over is wrong. Not reproduced: the conversion of
`\\frac{..pi..}{..}` to degrees when the output says 度数 (Chinese outputs only).
"""
from __future__ import annotations

import ast
import math
import operator
import re

from yuanjax.evals import task
from yuanjax.evals.tasks import yuan_text

_NUM4 = r'[-]?\d+/\d+|[-]?\d+\.\d+|\d{1,5}(?:,\d{3})+(?:\.\d+)*?|[-]?\d+'
_NUM5 = r'[-]?\d+\.?\d+/\d+\.?\d+|' + _NUM4
# A number in braces or parentheses; the gold's and the numeric answer's allow `-` before `a_b`.
_NUM_U = (r'([-]?\d+\.?\d+/\d+\.?\d+|[-]?\d+/\d+|[-]?\d+\.\d+|\d{1,5}(?:,\d{3})+(?:\.\d+)*?'
          r'|SIGN\d+\_\d+|[-]?\d+)')
_NUM_SIGNED_U = _NUM_U.replace('SIGN', '[-]?')
_NUM_PLAIN_U = _NUM_U.replace('SIGN', '')
_GOLD_NUMBER = (r'(?<![\d*+\-/{^(])(?:' + _NUM4 + r')'
                r'(?![}\d).+\-*/=√₀²³‰¼½¾_×¬^,!:±×÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_PROMPT_NUMBER = (r'(?<![\d*+\-/({\[^><≤≥_√])(?:' + _NUM5 + r')'
                  r'(?![}\d+)\]\}\-*/=√₀²³‰¼½¾_×¬^,!:±÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_LIST = r'^((?:' + _NUM4 + r')[,]?)+$'
_BRACED_DIGITS = r'(?<![a-z\d^}])[{]([\d=,\\._+\-*/()]+)[}](?![\d])'
_BRACED_FRACTION = r'(?<![a-z\d^])[{]+([-]?\d+\.?\d+/\d+\.?\d+)[}]+(?![\d])'
_FRACTION_RE = re.compile(r'\\[d]?frac\{([\d,.\\pi]+)\}\{([\d,.]+)\}')
_OPERATOR = r'.*+\-/(\(\)\{\}^\[\]_=√₀²³‰¼½¾×¬^!π:±÷∶∧∨∑∏∪∷√≡≠><≤≥'
# The numbers of an answer line after Yuan's answer mark (A), without it (B), and failing both (C).
_CANDIDATE_A = (r'(?<![a-zA-Z\d*+\-/({^\[_><≤≥√])(?:' + _NUM5 + r')'
                r'(?![a-zA-Z}\d+)\-*/=_\]\}√₀²³‰¼½¾×¬^!π:±÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_CANDIDATE_B = (r'(?<![\d*+\-/({^\[_><≤≥√])(?:' + _NUM5 + r')'
                r'(?![}\d+)\-*/=_\]\}√₀²³‰¼½¾×¬^!π:±÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_CANDIDATE_C = (r'(?<![\d*+\-/({^\[_])(?:' + _NUM5 + r')'
                r'(?![}\d+)\-*/=\]\}√₀²³‰¼½¾×¬^!π:±÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_GOLD_A = (r'(?<![a-zA-Z.\d*+\-/({^\[_><≤≥√])',
           r'(?![a-zA-Z}\d.+\-*/=)\]\}\\√₀²³‰¼½¾_×¬^!π±÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_GOLD_B = (r'(?<![\d*+\-/({^\[_><≤≥√])', r'(?![}\d.+\-*/=)\]\}\\√₀²³‰¼½¾_×¬^!π±÷∶∧∨∑∏∪∷√≡≠><≤≥])')
_GOLD_LIST = (r'(?<=[^\d+\-*/^><≤≥])', r'(?![\d.+\-*/=√₀²³‰¼½¾_×¬^!±×÷∧∨∑∏∪∷√≡≠><≤≥])')
_GOLD_EXPRESSION = (r'(?<![\d+\-*/^><≤≥∩∪^{])', r'(?![\d+\-*/=√₀}²³‰¼½¾_×¬^!±×÷∧∨∑∏∪∷√≡≠><≤≥])')
_ANSWER_MARK = '答案为'


def _sub_all(text: str, *rules: tuple[str, str]) -> str:
  for pattern, replacement in rules:
    text = re.sub(pattern, replacement, text)
  return text


def _replace_all(text: str, *pairs: tuple[str, str]) -> str:
  for old, new in pairs:
    text = text.replace(old, new)
  return text


def yuan_escape(text: str) -> str:
  """Yuan's regex escape of an answer: backslashes doubled, `[](){}.*+?^-` escaped (not `|$`)."""
  return re.sub(r'([\[\]\(\)\{\}\.\*\+\?\^\-])', r'\\\1', text.replace('\\', '\\\\'))


def fractions_as_braces(text: str) -> str:
  r"""`\frac{a}{b}` (numbers, or `\pi` above) as `{a/b}`, unless `}}}` occurs."""
  if 'frac' not in text or re.search(r'(?:\s*\}){3,}', text):
    return text
  return _FRACTION_RE.sub(r'{\1/\2}', text)


def fix_fracs(text: str) -> str:
  r"""`\frac12` and `\frac1{2}` as `\frac{1}{2}` (MATH's own normaliser); text unchanged if cut."""
  head, *tails = text.split('\\frac')
  for tail in tails:
    head += '\\frac'
    if tail.startswith('{'):
      head += tail
    elif len(tail) < 2:
      return text
    elif tail[1] == '{':
      head += '{' + tail[0] + '}' + tail[1:]
    else:
      head += '{' + tail[0] + '}{' + tail[1] + '}' + tail[2:]
  return head


def fix_sqrt(text: str) -> str:
  r"""`\sqrt2` as `\sqrt{2}` (an IndexError when `\sqrt` ends the text, as in MATH's own)."""
  head, *tails = text.split('\\sqrt')
  return head + ''.join(
      '\\sqrt' + (tail if tail[0] == '{' else '{' + tail[0] + '}' + tail[1:]) for tail in tails)


_SAFE_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def number_of(text: str) -> float:
  """Python's eval of `+ - * /` on numbers and `math.sqrt(...)` (ValueError for anything else).

  Yuan's scorer evals the text as it is; numbers are all it gets but inside `\\sqrt{...}`.
  """

  def walk(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _SAFE_BINARY:
      return _SAFE_BINARY[type(node.op)](walk(node.left), walk(node.right))
    if (isinstance(node, ast.Call) and ast.unparse(node.func) == 'math.sqrt' and
        len(node.args) == 1):
      return math.sqrt(walk(node.args[0]))
    raise ValueError(f'not a number: {text!r}')

  return walk(ast.parse(text, mode='eval').body)


def output_text(output: str) -> str:
  """The output as the rule reads it (`ans_all`): `<n>` lines, LaTeX decorations dropped."""
  text = yuan_text.drop_trailing_newlines(yuan_text.output_line(output))
  text = re.sub(r'\\boxed{\s*([\d.,/]+)\s*}[.]?', r'\1', text).strip()
  text = _replace_all(text, ('<br>', '<n>'), ('\\!', ''), ('\\;', ''), ('\\,', ''), ('$', ''),
                      ('≈', '='), ('</n>', '<n>'))
  text = re.sub(r'(<n>\s*)+', '<n>', text)
  text = _replace_all(text, ('^{\\circ}', ''), ('^\\circ', ''), ('tfrac', 'frac'),
                      ('dfrac', 'frac'), ('\\left', ''), ('\\right', ''), ('等于', '='), ('，', ','),
                      ('\\(', ''), ('\\)', ''), ('\\]', ''), ('\\[', ''), ('\\cup', '∪'),
                      ('<n>。', ''))
  text = re.sub(r'(<n>)+$', '', re.sub(r'\.$', '', text))
  return re.sub(r'(?<![\\])sqrt', r'\\sqrt', text) if 'sqrt' in text else text


def gold_forms(gold: str, text: str) -> tuple[str, str]:
  """The gold as written (`ans_true_yuan`) and as a number where it is one (`ans_true_text`)."""
  if 'sqrt' in gold:
    gold = fix_sqrt(gold)
  gold = _replace_all(gold, ('^{\\circ}', ''), ('^\\circ', ''), ('\\$', ''), ('$', ''), (' ', ''),
                      ('tfrac', 'frac'), ('dfrac', 'frac'), ('\\left', ''), ('\\right', ''),
                      ('\\!', ''), ('\\mbox{inches}^2', ''))
  number = fractions_as_braces(fix_fracs(gold)) if 'frac' in gold else gold
  mixed = re.findall(r'\d+\{\d+/\d+\}', number)
  if mixed and mixed[0] == number:
    whole, numerator, denominator = (int(n) for n in re.findall(r'\d+', number))
    improper = f'{whole * denominator + numerator}/{denominator}'
    number = improper if improper in text else number
  braced = r'(?<![a-z\d^}])\{' + _NUM_SIGNED_U + r'\}(?![\d])'
  return gold, _sub_all(number, (braced, r'\1'), (_BRACED_DIGITS, r'\1'))


def marked_answer(text: str) -> str:
  """The text after ` answer is` or `<n># Answer<n>`, marked as Yuan marks it; else ''."""
  for mark in (' answer is', '<n># Answer<n>'):
    if mark in text:
      return '答案为：' + text.split(mark)[-1] + '。'
  return ''


def repeats(lines: list[str], text: str) -> bool:
  """Whether the output loops: its two lines before the last occur over eight times."""
  tail = '<n>'.join(lines[-3:-1])
  return len(lines) > 10 and text.count(tail) > 8 and len(tail) > 15


def _wordy(line: str) -> bool:
  return bool(line) and not re.search(r'\d', line) and not re.search(r'答案为|answer', line)


def last_numeric_line(lines: list[str], text: str) -> str:
  """The last line, or the one (two) before when it has no digit and does not say `answer`."""
  if len(lines) == 1:
    return text
  end = lines[-1]
  if _wordy(end):
    end = lines[-2]
    if _wordy(end) and len(lines) > 2:
      end = lines[-3]
  return end


def number_line(end: str) -> str:
  """The answer line normalised for numbers: after `=`, fractions, braces and spaces undone."""
  if '=' in end:
    end = _ANSWER_MARK + end.split('=')[-1] + '。'
  end = _replace_all(end, ('\\%', '%'), ('\\leq', '≤'), ('\\le', '≤'), ('\\geq', '≥'),
                     ('\\ge', '≥'), ('\\frac ', '\\frac'), ('\\pi', 'π'))
  return _sub_all(fractions_as_braces(end), (_BRACED_FRACTION, r'\1'),
                  (r'(?<![a-z\d^}])[{]+' + _NUM_SIGNED_U + r'[}]+(?![\d])', r'\1'),
                  (r'(?<![a-z\d^}])[(]+' + _NUM_SIGNED_U + r'[)]+(?![\d])', r'\1'),
                  (r'\\sqrt\s*\{\[\}(?=\d+\])', r'\\sqrt['),
                  (r'(\\sqrt)\s*\[\s*(\d+)s*\](\d+)', r'\1[\2]{\3}'),
                  (r'(?<=[' + _OPERATOR + r'])\s+(?=[a-zA-Z\d])', ''),
                  (r'(?<=\d)\s+(?=[' + _OPERATOR + '])', ''))


def candidates(end: str) -> tuple[list[str], bool]:
  """The numbers of the answer line the rule compares, latest last (percentages, roots first).

  And whether the list is complete: Yuan's int() of a percentage with decimals fails, which stops
  it there and leaves the gold unmatched in the line.
  """
  found = re.findall(_CANDIDATE_A if _ANSWER_MARK in end else _CANDIDATE_B, end)
  found = found or re.findall(_CANDIDATE_C, end)
  for percent in re.findall(r'(?<![\d*+\-/({^\[_])(?:[-]?\d+\.\d+|[-]?\d+)%', end):
    if not re.fullmatch(r'[-]?\d+', percent[:-1]):
      return found, False
    found.insert(0, str(int(percent[:-1]) / 100))
  if 'sqrt' in end:
    for root in re.findall(r'(?<![\d{+\-*/])\\sqrt\{[^}]*?\}(?![}+\-*/])', end):
      found.insert(0, root)
  return found, True


_NOT_A_NUMBER = (ValueError, ZeroDivisionError, SyntaxError, TypeError, OverflowError)


def _as_number(candidate: str) -> float:
  candidate = candidate.replace(',', '').replace(' ', '')
  if 'sqrt' in candidate:
    candidate = re.sub(r'sqrt\{([^}]*)\}', r'math.sqrt(\1)', candidate.replace('\\', ''))
  if '/' in candidate:
    numerator, denominator = candidate.split('/')[:2]
    return float(numerator) / float(denominator)
  return number_of(candidate)


def _target(gold_number: str) -> tuple[float, int]:
  """The gold's value and the places numbers are rounded to: max(5, its decimals)."""
  target: float | str = gold_number.replace(',', '').replace(' ', '').replace('\\', '')
  if len(target.split('/')) == 2:
    target = float(target.split('/')[0]) / float(target.split('/')[1])
  places = max(len(str(target).split('.')[1]), 5) if '.' in str(target) else 5
  return (number_of(target) if isinstance(target, str) else target), places


def numbers_agree(found: list[str], gold_number: str, gold: str, prompt_numbers: list[str]) -> bool:
  """Whether one of the last three numbers (those of the prompt skipped) equals the gold.

  As Yuan's: the first one that is not a number ends the search.
  """
  try:
    target, places = _target(gold_number)
  except _NOT_A_NUMBER:
    return False
  agree = False
  for candidate in reversed(found[-3:]):
    if candidate in prompt_numbers and candidate != gold:
      continue
    try:
      agree = agree or round(_as_number(candidate), places) == round(target, places)
    except _NOT_A_NUMBER:
      break
  return agree


def judge_number(end: str, gold: str, gold_number: str, prompt: str) -> tuple[bool, str]:
  """The rule for a gold that is one number (the answer line `end` chosen)."""
  prompt = re.sub(r'(?<![a-z\d^}])[{(]+' + _NUM_SIGNED_U + r'[})]+(?![\d])', r'\1',
                  fractions_as_braces(prompt))
  prompt_numbers = re.findall(_PROMPT_NUMBER, prompt)
  end = number_line(end)
  found, complete = candidates(end)
  before, after = _GOLD_A if _ANSWER_MARK in end else _GOLD_B
  matches = re.findall(before + yuan_escape(gold_number) + after, end) if complete else []
  lists = re.findall(r'(?:[-]?\d+\s*[、，,]){2,}[-]?\s*\d+', end)
  if re.match(r'^-?\d+$', gold) and lists and (len(lists[-1].split('、')) > int(gold) or len(
      lists[-1].replace('，', '').split(',')) > int(gold)):
    return False, end  # a list longer than the count asked for
  if gold.isdigit() and (len(matches) > 5 or
                         len(found) == 2 and found[-1] not in prompt_numbers and found[-1] != gold):
    return False, end
  return bool(matches) or numbers_agree(found, gold_number, gold, prompt_numbers), end


def judge_list(end: str, gold: str) -> bool:
  """The rule for a gold that is a list of numbers: their digits in the line, `,` dropped."""
  end = _replace_all(end, (' and ', ','), (' or ', ','), (',', ''), (' ', ''))
  before, after = _GOLD_LIST
  return bool(re.findall(before + gold.replace(',', '') + after, end))  # unescaped, as Yuan's


def judge_text(end: str, gold: str, lines: list[str]) -> tuple[bool, str]:
  r"""The rule for a `\text{...}` gold: the word in the line; a `\text{(C)}` letter as `(C)`."""
  credited = False
  words = re.findall(r'(?<=\\text\{)[^()}]+(?=\})', gold)
  if words:
    hits = re.findall(words[0], end, re.IGNORECASE)
    credited = bool(hits) and len(hits) <= 5 and '无法确定' not in end
  if not re.findall(r'[A-F]+', end) and len(lines) > 1:
    end = lines[-2]
  letters = re.findall(r'(?<=^\\text\{\()[A-F]+(?=\)\}$)', gold)
  if letters:
    credited = bool(
        re.findall(f'[（(]{letters[0]}[)）]', end) or
        re.findall(f'[^a-zA-Z]{letters[0]}[^a-zA-Z+\\-*/]', end))
  return credited, end


def _expression_line(end: str, gold_number: str, lines: list[str]) -> str:
  if not re.findall(r'[\d]+', end) and len(lines) > 1:
    end = lines[-2]
  if '=' not in gold_number and '=' in end:
    end = _ANSWER_MARK + end.split('=')[-1] + '。'
  end = re.sub(r'√(?=\d)', r'\\sqrt', end.replace('π', '\\pi').replace(' ', ''))
  try:
    end = fix_sqrt(end)
  except IndexError:
    pass
  braced = r'(?<![a-z\d^}]){' + _NUM_PLAIN_U + r'}(?![\d])'
  return _sub_all(fractions_as_braces(end), (_BRACED_FRACTION, r'\1'), (braced, r'\1'),
                  (braced, r'\1'), (r'(?<![a-z\d^}])[(]+' + _NUM_PLAIN_U + r'[)]+(?![\d])', r'\1'),
                  (r'(?<![a-z\d^}])[{(](\([\d=,._+\-*/()]+\))[})](?![\d])', r'\1'),
                  (_BRACED_DIGITS, r'\1'))


def expression_forms(gold: str, gold_number: str) -> list[str]:
  """The spellings of an expression gold the rule accepts."""
  gold = gold.replace('x\\in', '')
  if 'frac' in gold:
    return [gold, gold_number]
  if gold_number == '\\cotx':
    return [gold_number, '1/tan(x)', '1/tanx', '\\cot x', '1/tan x']
  if re.fullmatch(r'[-]?\d+[+\-]\d+[ij]', gold):
    z = complex(gold.replace('i', 'j'))
    swapped = f'{int(z.imag)}j+{int(z.real)}'.replace('+-', '-')
    return [gold, swapped.replace('j', 'i') if 'i' in gold else swapped]
  if re.fullmatch(r'[a-zA-Z]=\d+', gold):
    return [gold, re.findall(r'\d+', gold)[0]]
  if re.fullmatch(r'\d+_\d+', gold):
    return [gold, gold.split('_')[0]]
  return [gold]


def judge_expression(end: str, gold: str, gold_number: str, lines: list[str]) -> tuple[bool, str]:
  """The rule for any other gold: one of its spellings stands alone in the line, no spaces."""
  end = _expression_line(end, gold_number, lines)
  before, after = _GOLD_EXPRESSION
  return any(
      re.findall(before + yuan_escape(form.replace(' ', '')) + after, end)
      for form in expression_forms(gold, gold_number)), end


def judge(output: str, gold: str, prompt: str) -> tuple[bool, str]:
  """Whether Yuan's rule credits the output for the gold, and the answer text it looked in.

  `prompt` is the item's prompt: numbers that occur in it do not count as an answer.
  """
  text = output_text(output)
  end = marked_answer(text)
  lines = text.split('<n>')
  if repeats(lines, text):
    return False, end or lines[-1]
  try:
    gold, gold_number = gold_forms(gold, text)
    if re.findall(_GOLD_NUMBER, gold_number) == [gold_number]:
      return judge_number(end or last_numeric_line(lines, text), gold, gold_number,
                          yuan_text.squeeze_newlines(prompt.removesuffix('<sep>')))
    end = end or lines[-1]
    if re.findall(_LIST, gold):
      return judge_list(end, gold), end
    if '\\text' in gold:
      return judge_text(end, gold, lines)
    return judge_expression(end, gold, gold_number, lines)
  except (re.error, IndexError, ValueError):  # Yuan's scorer counts any error as wrong
    return False, end


@task.register
class Math(yuan_text.SepFileTask):
  name = 'math'
  data_file = 'math.txt'
  shots = 'math'

  def extract(self, output: str, item: task.Item) -> dict[str, object]:
    credited, answer = judge(output, item.answer, item.prompt)
    return {'answer': answer, 'credited': credited}

  def correct(self, extracted: dict[str, object], item: task.Item) -> bool:
    return bool(extracted['credited'])
