"""A task run with a model, and its score: what `python -m yuanjax.evaluate` and a task in
config.evals.run (TaskEval) share.

Generation is Yuan's: each item's prompt (Item.prompt, tokenised as is: no BOS; Yuan's prompts
end with `<sep>`) is decoded greedily by yuanjax.generate up to the task's max_new_tokens,
stopping at `<eod>` (a prompt plus max_new_tokens may run past config.model.max_seq_len, as
the trainer's sample may); the output is the decoded new text, cut at the first of the task's
stop strings. Items go in batches of a fixed number of rows (a short last batch is padded with
copies of its last prompt and those rows dropped), so one program serves every batch of a
prompt-length bucket. A record is {id, prompt, output, extracted, correct, tokens, seconds}:
tokens generated (the `<eod>` included), and the batch's wall seconds shared out over its rows.

Results: accuracy over n records, with the 95% Wilson score interval (Wilson 1927: it stays
inside [0, 1] and keeps its coverage at small n and at accuracies near 0 or 1, where the normal
approximation does not).

Outputs of Yuan's own runtime (`question[SEP]output` per line, `<n>` for each newline, as its
tasks/*/eval_for_*.py write them) are matched to items as its scorers do: a line belongs to the
item whose question (Item.question) is a substring of the line's question part (the longest such
question here, where Yuan's take the first; newlines and runs of `<n>` compared as Yuan's
scorers key them: yuan_text). Every matched line is scored, as in Yuan's scorers; unmatched lines
are counted. Its HumanEval script writes samples.jsonl instead ({task_id, completion}): each
completion is judged as it is (Task.correct), for the item of that id.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence

from yuanjax import generate as generate_lib
from yuanjax import sharding
from yuanjax.evals import evaluator
from yuanjax.evals import task as task_lib
from yuanjax.evals import tasks  # pylint: disable=unused-import  (registers the tasks)
from yuanjax.evals.tasks import yuan_text

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def cut(text: str, stop: Sequence[str]) -> str:
  """text up to the first of the stop strings."""
  ends = [i for i in (text.find(s) for s in stop) if i >= 0]
  return text[:min(ends)] if ends else text


def complete(model, params, tokenizer, task: task_lib.Task, items: Sequence[task_lib.Item],
             rows: int, mesh=None, rules=None) -> list[tuple[str, int]]:
  """(output, tokens generated) of each item, uncut (`judge` cuts it at the task's stop
  strings): greedy, one generate call of `rows` rows (on `mesh` with `rules` when given:
  generate's, the params already on it)."""
  prompts = [tokenizer.encode(item.prompt) for item in items]
  prompts += [prompts[-1]] * (rows - len(prompts))
  m, N = model.config, task.max_new_tokens
  outs = generate_lib.generate(model, params, prompts, max_new_tokens=N, eod_id=tokenizer.eod_id,
                               max_len=max(max(map(len, prompts)) + N, m.max_seq_len),
                               vocab_limit=min(tokenizer.vocab_size,
                                               m.vocab_size), mesh=mesh, rules=rules)
  return [(tokenizer.decode(generate_lib.strip_eod(ids, tokenizer.eod_id)), len(ids))
          for ids in outs[:len(items)]]


def judge(task: task_lib.Task, item: task_lib.Item, output: str) -> dict:
  """The record of an item's output: its extracted answer and whether it is correct."""
  output = cut(output, task.stop)
  extracted = task.extract(output, item)
  return dict(id=item.id, prompt=item.prompt, output=output, extracted=extracted,
              correct=bool(task.correct(extracted, item)))


def run(model, params, tokenizer, task: task_lib.Task, items: Sequence[task_lib.Item], rows: int,
        mesh=None, rules=None) -> Iterator[list[dict]]:
  """Each batch's records, in item order, as it is done (mesh, rules: `complete`'s)."""
  for start in range(0, len(items), rows):
    batch = items[start:start + rows]
    t0 = time.perf_counter()
    done = complete(model, params, tokenizer, task, batch, rows, mesh, rules)
    seconds = (time.perf_counter() - t0) / len(batch)
    yield [
        dict(judge(task, item, output), tokens=n, seconds=seconds)
        for item, (output, n) in zip(batch, done)
    ]


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
  """The Wilson score interval of a proportion correct / n (n >= 1)."""
  p = correct / n
  centre = p + z * z / (2 * n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  scale = 1 + z * z / n
  return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def results(task_name: str, records: Sequence[dict]) -> dict:
  """Accuracy, n and the 95% Wilson interval of judged records."""
  n, k = len(records), sum(bool(r['correct']) for r in records)
  low, high = wilson(k, n) if n else (0.0, 1.0)
  return dict(task=task_name, n=n, correct=k, accuracy=k / n if n else None, ci95_low=low,
              ci95_high=high, interval='wilson')


def speed(records: Sequence[dict]) -> dict:
  """Generation seconds and tokens/s summed over records (runs resumed included)."""
  seconds = sum(r.get('seconds', 0.0) for r in records)
  tokens = sum(r.get('tokens', 0) for r in records)
  return dict(seconds=seconds, tokens=tokens, tokens_per_sec=tokens / seconds if seconds else None)


# ------------------------------------------------------------------ outputs files


def _flat(text: str) -> str:
  """Text as Yuan's scorers compare questions: newlines as <n>, runs of them squeezed."""
  return yuan_text.question_key(text.replace('\n', yuan_text.NEWLINE))


def _first_record(lines: Sequence[str]) -> dict:
  """The first non-blank line as a JSON object ({} when it is not one)."""
  first = next((line for line in lines if line.strip()), '')
  try:
    record = json.loads(first)
  except json.JSONDecodeError:
    return {}
  return record if isinstance(record, dict) else {}


def is_outputs_jsonl(lines: Sequence[str]) -> bool:
  """Whether lines are this runtime's outputs.jsonl."""
  return {'id', 'output'} <= set(_first_record(lines))


def is_yuan_samples(lines: Sequence[str]) -> bool:
  """Whether lines are the samples.jsonl of Yuan's HumanEval script."""
  return {'task_id', 'completion'} <= set(_first_record(lines))


def judge_jsonl(task, items, lines: Sequence[str], path: str) -> tuple[list[dict], int]:
  """(records, unmatched) of an outputs.jsonl's lines: each output judged again."""
  by_id = {item.id: item for item in items}
  records, unmatched = [], 0
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number}: not a JSON line ({e})') from e
    item = by_id.get(str(record['id']))
    if item is None:
      unmatched += 1
      continue
    records.append({**record, **judge(task, item, record['output'])})
  return records, unmatched


def judge_yuan(task, items, lines: Sequence[str], path: str) -> tuple[list[dict], int]:
  """(records, unmatched) of a file of Yuan's runtime: each line matched by its question."""
  questions = [(_flat(item.question), item) for item in items]
  if not all(q for q, _ in questions):
    raise ValueError(f'{path}: task {task.name!r} gives its items no question '
                     '(Item.question) to match the lines of a question[SEP]output file by')
  questions.sort(key=lambda qi: -len(qi[0]))  # the longest (most specific) question first
  records, unmatched = [], 0
  for line in lines:
    if not line.strip():
      continue
    head, _, output = line.strip().partition(yuan_text.SEP)
    head = _flat(head)
    item = next((item for q, item in questions if q in head), None)
    if item is None:
      unmatched += 1
      continue
    records.append(judge(task, item, output.strip().replace(yuan_text.NEWLINE, '\n')))
  return records, unmatched


def judge_yuan_samples(task, items, lines: Sequence[str], path: str) -> tuple[list[dict], int]:
  """(records, unmatched) of Yuan's HumanEval samples.jsonl: each completion judged as it is."""
  by_id = {item.id: item for item in items}
  records, unmatched = [], 0
  for sample in (json.loads(line) for line in lines if line.strip()):
    item = by_id.get(sample['task_id'])
    if item is None:
      unmatched += 1
      continue
    code = sample['completion']
    records.append(
        dict(id=item.id, prompt=item.prompt, output=code, extracted=code,
             correct=bool(task.correct(code, item))))
  return records, unmatched


def score_file(task, items, path: str) -> dict:
  """results() of an outputs.jsonl, a Yuan-format text file or Yuan's HumanEval samples.jsonl,
  with the number of `unmatched` lines."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  judge_lines = (judge_jsonl if is_outputs_jsonl(lines) else
                 judge_yuan_samples if is_yuan_samples(lines) else judge_yuan)
  records, unmatched = judge_lines(task, items, lines, path)
  return dict(results(task.name, records), unmatched=unmatched)


class TaskEval(evaluator.Evaluator):
  """A task in config.evals.run (TASK:LIMIT): greedy accuracy on its first LIMIT items, logged
  as <task>/accuracy, <task>/correct and <task>/n."""

  def __init__(self, ctx: evaluator.Context, spec: evaluator.Spec):
    super().__init__(ctx, spec)
    self.task = task_lib.get(spec.name)
    self.items = self.task.load(spec.data)[:spec.limit]
    if not self.items:
      raise ValueError(f'config.evals.run: {spec.name}: no items in {spec.data}')
    self.rows = min(ctx.config.evals.batch_size, len(self.items))

  def __call__(self, params) -> dict[str, float]:
    batches = list(
        run(self.ctx.model, params, self.ctx.tokenizer, self.task, self.items, self.rows,
            self.ctx.mesh, sharding.rules(self.ctx.config.mesh)))
    records = [r for batch in batches for r in batch]
    out = results(self.task.name, records)
    name = self.task.name
    return {
        f'{name}/accuracy': out['accuracy'],
        f'{name}/correct': out['correct'],
        f'{name}/n': out['n']
    }

  def console(self, scalars):
    name = self.task.name
    return (f"{name} {scalars[f'{name}/accuracy']:.3f} "
            f"({scalars[f'{name}/correct']}/{scalars[f'{name}/n']})")
