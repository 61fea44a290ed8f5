"""HumanEval as Yuan2.0-M32 evaluates it: instruction prompts, greedy, pass@1 by running the tests.

Data: datasets/HUMANEVAL/ (`data_path` is that directory, or its HumanEval.jsonl[.gz]): the 164
problems of HumanEval.jsonl.gz (tests, entry points) and, for each, the instruction-style prompt
of HumanEval-instructions.jsonl (`Instruction: ...\nResponse:\n```python\n<signature>\n`), the
prompt file examples/eval_humaneval_2x32B.sh uses.

The completion is cut from the prompt and the output as tasks/humaneval/eval_humaneval.py cuts it:
the text after the last "```python", blank-line and docstring clean-ups, the first function (with
what precedes it, the imports), and nothing from the first `print`, "```", `#` or `if` line on.
It is right when `completion + test + check(entry_point)` runs without error in the sandbox (the
program Yuan's modified human-eval runs: its docs drop the problem's prompt from it), within
human-eval's 3 s. Yuan's own samples.jsonl holds such completions: `correct` scores them as they
are.
"""
from __future__ import annotations

import gzip
import json
import os
import re

from yuanjax.evals import sandbox
from yuanjax.evals import task
from yuanjax.evals.tasks import yuan_text

PROBLEMS = 'HumanEval.jsonl.gz'
PROMPTS = 'HumanEval-instructions.jsonl'
_BLANK_LINE_FIXES = (('\nFIX = """\nAdd more test cases.\n"""', ''), ('\n\n\ndef', '\ndef'),
                     ('\n    \n\n    ', '\n    \n    '), ('\n\n    ', '\n    '), ('\n\n\n', '\n\n'),
                     ('"""\n        ', '"""\n    '), ('\n```python', ''))
_CUT_AT = ('\nprint', '\n# 示例', '\n```', '\n# 测试', '\n# 单元测试', '\n#', '\nif')


def _read_jsonl(path: str) -> list[dict]:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def first_function(code: str) -> str | None:
  """The first `def` line through the first blank line after it (None if no `def` after line 0).

  As Yuan's parse_first_func: a `def` on the first line is missed, a second `def` ends the search.
  """
  lines = code.split('\n')
  start = end = 0
  for number, line in enumerate(lines):
    if line.startswith('def '):
      if start:
        break
      start = number
    if line == '' and start:
      end = number
      break
  return '\n'.join(lines[start:(end or len(lines) - 1) + 1]) if start else None


def _drop_docstring(code: str) -> str:
  """Every copy of the first triple-quoted string (\"\"\" preferred), as Yuan's clean-up does."""
  for quotes in ('"""', "'''"):
    if code.count(quotes) >= 2:
      first = code.find(quotes)
      return code.replace(code[first:code.find(quotes, first + 1) + 3], '')
  return code


def completion(prompt: str, output: str) -> str:
  """The code Yuan's script takes from the prompt and the model's output."""
  text = prompt + output.removesuffix('<eod>')
  code = text[text.rfind('```python') + len('```python'):]
  for old, new in _BLANK_LINE_FIXES:
    code = code.replace(old, new)
  code = _drop_docstring(code)
  block = re.search(r'```python\n(.*?)\n```', code, re.DOTALL)
  function = block.group(1) if block else first_function(code)
  code = code[:code.find(function[:10])] + function if function is not None else code
  if (code.count('\ndef') > 1 and '\n```' not in code and '\n#' not in code and
      '\nif' not in code):  # a second function goes
    code = code.replace(code[code.find('\ndef', code.find('\ndef') + 1):], '\n')
  for marker in _CUT_AT:
    if code.find(marker) > 0:
      code = code[:code.find(marker)]
  return code


@task.register
class HumanEval(task.Task):
  name = 'humaneval'
  source = f'{yuan_text.SOURCE} (datasets/HUMANEVAL/{PROBLEMS} and {PROMPTS})'
  max_new_tokens = 1023  # Yuan's max_len 1024 minus its batch size (1), as for the other tasks
  stop = ('<eod>',)
  limits = sandbox.Limits()

  def load(self, data_path: str) -> list[task.Item]:
    self.check_data(data_path)
    directory = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
    problems_path = data_path if not os.path.isdir(data_path) else os.path.join(directory, PROBLEMS)
    prompts_path = os.path.join(directory, PROMPTS)
    self.check_data(problems_path)
    self.check_data(prompts_path)
    prompts = {row['task_id']: row['prompt'] for row in _read_jsonl(prompts_path)}
    items = []
    for problem in _read_jsonl(problems_path):
      if problem['task_id'] not in prompts:
        raise ValueError(f'{prompts_path}: no prompt for {problem["task_id"]}')
      items.append(
          task.Item(problem['task_id'], prompts[problem['task_id']], problem['canonical_solution'],
                    problem['task_id'], {
                        'test': problem['test'],
                        'entry_point': problem['entry_point']
                    }))
    return items

  def extract(self, output: str, item: task.Item) -> str:
    return completion(item.prompt, output)

  def correct(self, extracted: str, item: task.Item) -> bool:
    return self.run(extracted, item).passed

  def run(self, code: str, item: task.Item) -> sandbox.Result:
    """The sandbox's verdict on the completion against the item's tests."""
    program = f'{code}\n{item.extra["test"]}\ncheck({item.extra["entry_point"]})'
    return sandbox.run(program, self.limits)
