"""The five Yuan2.0-M32 benchmarks: data files in Yuan's format, its prompts, its scoring rules.

The data lines are real ones from IEIT-Yuan/Yuan2.0-M32's datasets/. The expected prompts were
built by hand from the Yuan scripts (few-shot literal + question + `<sep>`, every `<n>` a newline);
the long few-shot texts are pinned by their SHA-256 and their ends. The expected verdicts follow
Yuan's score_*.py (checked against them on tens of thousands of generated outputs while writing).
"""
import gzip
import hashlib
import json
import os

import pytest

from yuanjax.evals import task
from yuanjax.evals.tasks import choice
from yuanjax.evals.tasks import humaneval as humaneval_lib
from yuanjax.evals.tasks import math as math_lib

GSM8K_LINES = [
    'Jayden had $70 from selling pictures he took as a hobby.  His sister Ava gave him half of her '
    '$90 allowance to help him buy a new camera that costs $200. How much more does Jayden need to '
    'buy the camera?[SEP]85',
    'Candy has 15 light blue spools of thread, 45 dark blue spools of thread, 40 light green spools '
    'of thread, and 50 dark green spools of thread. What percent of her spools are blue?[SEP]40',
    '',  # a blank line is skipped; ids stay line indices, as Yuan's task ids
    'Trent is 5 years older than Jane, and Jane is 3 years younger than Quinn. If Quinn is 30, how '
    'old is Trent?[SEP]32',
]
MATH_LINES = [
    'Positive integers a, b, and 2009, with a<b<2009, form a geometric sequence with an integer '
    'ratio. What is a?[SEP]41',
    'Point A lies somewhere within or on the square which has opposite corners at (0,0) and (2,2). '
    'Point B lies somewhere within or on the square which has opposite corners at points (4,2) and '
    '(5,3). What is the greatest possible value of the slope of the line containing points A and '
    'B? Express your answer as a common fraction.[SEP]\\frac{3}{2}',
]
ARC_LINES = [
    'An astronomer observes that a planet rotates faster after a meteorite impact. Which is the '
    'most likely effect of this increase in rotation?<n>A.Planetary density will decrease.<n>'
    'B.Planetary years will become longer.<n>C.Planetary days will become shorter.<n>D.Planetary '
    'gravity will become stronger.[SEP]C',
]
MMLU_FILES = {
    'abstract_algebra.txt': [
        'Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.<n>A.0'
        '<n>B.4<n>C.2<n>D.6[SEP]B',
        'Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.<n>A.8<n>B.2<n>C.24<n>'
        'D.120[SEP]C',
    ],
    'anatomy.txt': [
        'A lesion causing compression of the facial nerve at the stylomastoid foramen will cause '
        'ipsilateral<n>A.paralysis of the facial muscles.<n>B.paralysis of the facial muscles and '
        'loss of taste.<n>C.paralysis of the facial muscles, loss of taste and lacrimation.<n>'
        'D.paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.'
        '[SEP]A',
    ],
}
HUMANEVAL_PROBLEM = {
    'task_id': 'HumanEval/2',
    'prompt': 'def truncate_number(number: float) -> float:\n    """ Return the decimal part.\n'
              '    >>> truncate_number(3.5)\n    0.5\n    """\n',
    'entry_point': 'truncate_number',
    'canonical_solution': '    return number % 1.0\n',
    'test': '\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(3.5) == 0.5\n'
            '    assert abs(candidate(1.33) - 0.33) < 1e-6\n',
}
HUMANEVAL_PROMPT = ('Instruction: Given a positive floating point number, it can be decomposed into'
                    '\nand integer part (largest integer smaller than given number) and decimals\n'
                    '(leftover part always smaller than 1).\n\nReturn the decimal part of the '
                    'number.\n>>> truncate_number(3.5)\n0.5\nResponse:\n```python\ndef '
                    'truncate_number(number: float) -> float:\n')


def write_lines(path, lines):
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return str(path)


def load(name, tmp_path, lines, file_name='data.txt'):
  return task.get(name).load(write_lines(tmp_path / file_name, lines))


def make_item(answer, prompt='Question:Which is right?<sep>'):
  return task.Item('0', prompt, answer, 'q')


def verdict(name, output, item):
  t = task.get(name)
  return t.correct(t.extract(output, item), item)


def sha256(text):
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def test_importing_the_package_registers_the_five_tasks():
  import yuanjax.evals.tasks  # pylint: disable=import-outside-toplevel,unused-import
  assert {'gsm8k', 'math', 'arc', 'mmlu', 'humaneval'} <= set(task.TASKS)
  for name in ('gsm8k', 'math', 'arc', 'mmlu', 'humaneval'):
    t = task.get(name)
    assert t.max_new_tokens == 1023 and t.stop == ('<eod>',)


@pytest.mark.parametrize('name, lines, digest, length, shots, tail', [
    ('gsm8k', GSM8K_LINES, '68d653ef27283729617460a992b91379ffba61f6fc38cf2617acb996db69603b', 6277,
     8, 'Cary had 4 / 2 = 2 friends over.\nQuestion:' + GSM8K_LINES[0].split('[SEP]')[0]),
    ('math', MATH_LINES, '23cff865ea86fd05e3ebc011b62273737a92865d3ae1527ac86eb2a2a0fb24c5', 4413,
     4, 'The simplified expression is -x - 3.\nQuestion:' + MATH_LINES[0].split('[SEP]')[0]),
    ('arc', ARC_LINES, 'ba1b5436a62a1db8b575b706c106cb33ef2c528b0172018b632bb2b1c0253bb8', 29099,
     25, 'Question:An astronomer observes that a planet rotates faster after a meteorite impact. '
     'Which is the most likely effect of this increase in rotation?\nA.Planetary density will '
     'decrease.\nB.Planetary years will become longer.\nC.Planetary days will become shorter.\n'
     'D.Planetary gravity will become stronger.')
])
def test_few_shot_prompt_is_yuans(tmp_path, name, lines, digest, length, shots, tail):
  prompt = load(name, tmp_path, lines)[0].prompt
  assert prompt.endswith(tail + '<sep>')
  assert prompt.startswith('Question:') and prompt.count('Question:') == shots + 1
  assert '<n>' not in prompt and len(prompt) == length
  assert sha256(prompt) == digest


def test_gsm8k_items(tmp_path):
  items = load('gsm8k', tmp_path, GSM8K_LINES)
  assert [i.id for i in items] == ['0', '1', '3']
  assert [i.answer for i in items] == ['85', '40', '32']
  assert items[2].question == ('Trent is 5 years older than Jane, and Jane is 3 years younger than '
                               'Quinn. If Quinn is 30, how old is Trent?')
  assert items[0].prompt.endswith('Ava gave him half of her $90 allowance to help him buy a new '
                                  'camera that costs $200. How much more does Jayden need to buy '
                                  'the camera?<sep>')
  # the data directory as Yuan ships it works too
  write_lines(tmp_path / 'gsm8k.txt', GSM8K_LINES[:1])
  assert [i.answer for i in task.get('gsm8k').load(str(tmp_path))] == ['85']


@pytest.mark.parametrize(
    'output, gold, right',
    [
        ('Ava gave him 90 / 2 = 45.\nSo he needs 200 - 70 - 45 = 85.', '85', True),
        ('He needs 200 - 70 - 45 = 86.', '85', False),
        ('He needs 85 dollars more.\n\n', '85', True),  # trailing newlines dropped
        ('So the answer is $\\boxed{85}$.', '85', True),
        ('The total is 1,018 books.', '1018', True),  # thousands separator
        ('Each gets \\frac{3}{4} of a pie.', '0.75', True),  # a fraction equals the gold
        ('x = 7 + 11 = 18\nHope this helps!', '18', True),  # the last line without digits
        ('The answer is 185.', '18', False),  # the gold inside a longer number
        ('18 of them, then 1, 2 and 3 and 4 more.', '18', False),  # not among the last three
        ('-10 degrees is the result', '-10', True),
        ('The answer is 18<sep>22', '22', False),  # the output ends at a generated <sep>
        ('No number here.', '18', False),
    ])
def test_gsm8k_scoring(output, gold, right):
  item = make_item(gold)
  assert verdict('gsm8k', output, item) is right
  assert verdict('gsm8k', output.replace('\n', '<n>'), item) is right  # Yuan's line form


def test_gsm8k_extracted_answer():
  t = task.get('gsm8k')
  assert t.extract('So 3 + 4 = 7 apples.', make_item('9')) == '7'
  assert t.extract('Each gets 3/4.', make_item('0.75')) == '3/4'
  assert t.extract('Nothing', make_item('9')) is None


def test_math_items(tmp_path):
  items = load('math', tmp_path, MATH_LINES)
  assert [i.answer for i in items] == ['41', '\\frac{3}{2}']
  assert items[1].prompt.endswith('\nQuestion:Point A lies somewhere within or on the square which '
                                  'has opposite corners at (0,0) and (2,2).' +
                                  MATH_LINES[1].split('(2,2).')[1].split('[SEP]')[0] + '<sep>')


@pytest.mark.parametrize(
    'output, gold, right',
    [
        ('The slope is largest from (0,0) to (4,2)... so the answer is $\\frac{3}{2}$.',
         '\\frac{3}{2}', True),
        ('The greatest slope is 3/2.', '\\frac{3}{2}', True),
        ('The greatest slope is 1.5', '\\frac{3}{2}', True),  # equal as numbers
        ('The greatest slope is \\frac{2}{3}.', '\\frac{3}{2}', False),
        ('The ratio is 7, so a = 41.', '41', True),
        ('The ratio is 7 and a is 2009', '41', False),
        ('Simplify to get 6r^2 - 4r - 24.', '6r^2-4r-24', True),  # an expression, spaces ignored
        ('Simplify to get 6r^2 - 4r + 24.', '6r^2-4r-24', False),
        ('The answer is (C).', '\\text{(C)}', True),
        ('The answer is (D).', '\\text{(C)}', False),
        ('So z = 2i + 1', '1+2i', True),  # the complex number written the other way round
        ('The solutions are 1, 3 and 7', '1,3,7', True),  # a list: its digits in order
        ('Half of them: 50%', '0.5', True),  # a percentage as a decimal
        ('x = 2\\sqrt{5}', '2\\sqrt{5}', True),
        ('# Answer\n\n41', '41', True),
    ])
def test_math_scoring(output, gold, right):
  item = make_item(gold)
  assert verdict('math', output, item) is right


def test_math_numbers_of_the_prompt_do_not_count():
  # The question's own numbers are skipped when the answer line is compared as numbers.
  item = make_item('5', prompt='Question:What is 12 minus 7?<sep>')
  assert verdict('math', 'We take 12 and subtract: 12', item) is False
  assert verdict('math', 'We take 12 and subtract: 5', item) is True


def test_math_looping_output_is_wrong():
  lines = ['We keep adding the same two terms together', 'and then we add them again'] * 9
  looping = '\n'.join(lines + ['So the answer is 41.'])
  assert verdict('math', looping, make_item('41')) is False
  assert verdict('math', 'So the answer is 41.', make_item('41')) is True


def test_math_extract_says_what_it_looked_at():
  found = task.get('math').extract('Work.\nThe answer is 41.', make_item('41'))
  assert found == {'answer': '答案为： 41。', 'credited': True}


def test_math_helpers():
  assert math_lib.fix_fracs('\\frac12+\\frac1{3}') == '\\frac{1}{2}+\\frac{1}{3}'
  assert math_lib.fix_sqrt('\\sqrt2') == '\\sqrt{2}'
  assert math_lib.number_of('math.sqrt(4)*3') == 6.0
  with pytest.raises(ValueError):
    math_lib.number_of('__import__("os")')


def test_arc_items(tmp_path):
  (item,) = load('arc', tmp_path, ARC_LINES)
  assert item.answer == 'C' and item.id == '0'
  assert item.question == ARC_LINES[0].split('[SEP]')[0]  # `<n>` kept: how Yuan's lines name it


def test_mmlu_items_and_exact_prompt(tmp_path):
  for file_name, lines in MMLU_FILES.items():
    write_lines(tmp_path / file_name, lines)
  (tmp_path / 'README.md').write_text('not a subject')
  items = task.get('mmlu').load(str(tmp_path))
  assert [i.id for i in items] == ['abstract_algebra/0', 'abstract_algebra/1', 'anatomy/0']
  assert [i.answer for i in items] == ['B', 'C', 'A']
  assert items[2].prompt == (
      'Choose the correct answer from the options after each question.\n'
      'A lesion causing compression of the facial nerve at the stylomastoid foramen will cause '
      'ipsilateral\nA.paralysis of the facial muscles.\nB.paralysis of the facial muscles and loss '
      'of taste.\nC.paralysis of the facial muscles, loss of taste and lacrimation.\nD.paralysis of '
      'the facial muscles, loss of taste, lacrimation and decreased salivation.<sep>')
  one_subject = task.get('mmlu').load(str(tmp_path / 'anatomy.txt'))
  assert [i.id for i in one_subject] == ['anatomy/0']


@pytest.mark.parametrize(
    'output, letter',
    [
        ("Let's analyze each option.\nSo, the correct answer is (C).", 'C'),
        ('Therefore, the correct answer is **B. solar roof panels**.', 'B'),
        ('The most likely reason is the inherited information (Option C) is the correct answer',
         'C'),
        ('Option D. "Energy release" is the correct answer.', 'D'),
        ('Based on this, the answer is A. Done.', 'A'),
        ('The correct answer is \\boxed{D}.', 'D'),
        ('The correct answer is Ｃ.', 'C'),  # full-width letter
        ('Thinking about it.\nB. Wide and flat.', 'B'),  # a letter ending a phrase on the last line
        ('Thinking about it.\nB. Wide and flat.\nHope that helps!', 'B'),  # or on the line before
        ('The closest answer is "heat" C.', None),  # Yuan's reduction lacks "closest"
        ('The correct answer is C, but none of the x options are correct.', None),
        ('I do not know', 'I'),  # A-K includes I
        ('Hmm.', None),
    ])
def test_answer_letter(output, letter):
  assert choice.letter(output) == letter
  assert choice.letter(output.replace('\n', '<n>')) == letter  # Yuan's line form


def test_choice_correct_compares_letters(tmp_path):
  (item,) = load('arc', tmp_path, ARC_LINES)
  assert verdict('arc', 'Days get shorter, so the correct answer is C.', item) is True
  assert verdict('arc', 'The correct answer is D.', item) is False
  assert verdict('arc', 'Hmm.', item) is False


def write_humaneval(directory, problems=(HUMANEVAL_PROBLEM,), prompts=None):
  os.makedirs(directory, exist_ok=True)
  with gzip.open(os.path.join(directory, 'HumanEval.jsonl.gz'), 'wt', encoding='utf-8') as f:
    f.writelines(json.dumps(p) + '\n' for p in problems)
  prompts = prompts or [{'task_id': 'HumanEval/2', 'prompt': HUMANEVAL_PROMPT}]
  with open(os.path.join(directory, 'HumanEval-instructions.jsonl'), 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(p) + '\n' for p in prompts)
  return str(directory)


def test_humaneval_items(tmp_path):
  data = write_humaneval(tmp_path / 'HUMANEVAL')
  (item,) = task.get('humaneval').load(data)
  assert (item.id, item.question, item.prompt) == ('HumanEval/2', 'HumanEval/2', HUMANEVAL_PROMPT)
  assert item.extra == {'test': HUMANEVAL_PROBLEM['test'], 'entry_point': 'truncate_number'}
  (same,) = task.get('humaneval').load(os.path.join(data, 'HumanEval.jsonl.gz'))
  assert same == item


def test_humaneval_completion_is_cut_as_yuans():
  output = ('    """Drop the integer part."""\n    return number % 1.0\n```\n\n'
            'print(truncate_number(3.5))\n')
  assert humaneval_lib.completion(
      HUMANEVAL_PROMPT,
      output) == ('\ndef truncate_number(number: float) -> float:\n    \n    return number % 1.0')
  # The code starts after the output's own last ```python; what precedes the function is kept.
  fenced = 'pass\n```\nBetter:\n```python\nimport math\n\ndef f(x):\n    return x\n```\n'
  assert humaneval_lib.completion(HUMANEVAL_PROMPT,
                                  fenced) == ('\nimport math\n\ndef f(x):\n    return x')


def test_humaneval_runs_the_tests(tmp_path):
  (item,) = task.get('humaneval').load(write_humaneval(tmp_path))
  right = '    return number % 1.0\n```'
  wrong = '    return number // 1.0\n```'
  assert verdict('humaneval', right, item) is True
  assert verdict('humaneval', wrong, item) is False
  assert 'AssertionError' in task.get('humaneval').run(
      task.get('humaneval').extract(wrong, item), item).reason


def test_humaneval_needs_both_files(tmp_path):
  write_humaneval(tmp_path)
  os.remove(tmp_path / 'HumanEval-instructions.jsonl')
  with pytest.raises(FileNotFoundError, match='HumanEval-instructions.jsonl.*IEIT-Yuan'):
    task.get('humaneval').load(str(tmp_path))
  write_humaneval(tmp_path, prompts=[{'task_id': 'HumanEval/0', 'prompt': 'x'}])
  with pytest.raises(ValueError, match='no prompt for HumanEval/2'):
    task.get('humaneval').load(str(tmp_path))


@pytest.mark.parametrize('name', ['gsm8k', 'math', 'arc', 'mmlu', 'humaneval'])
def test_missing_data_names_the_path_and_the_source(tmp_path, name):
  missing = str(tmp_path / 'nowhere' / 'data.txt')
  with pytest.raises(FileNotFoundError,
                     match=f"{name}: no data at '{missing}'.*IEIT-Yuan/Yuan2.0-M32"):
    task.get(name).load(missing)


def test_a_line_without_sep_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r'data.txt:2: no \[SEP\]'):
    load('gsm8k', tmp_path, [GSM8K_LINES[0], 'a question without its answer'])


def test_empty_mmlu_directory_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'no subject files \(\*.txt\).*datasets/MMLU'):
    task.get('mmlu').load(str(tmp_path))
