"""config.evals: what the trainer evaluates every config.train.eval_every steps and at the end.

  config.evals.run         comma-separated names (default 'loss'):
                             loss        the held-out loss per mixture source (yuanjax.evals.loss)
                             TASK:LIMIT  a task (yuanjax.evals.tasks) on its first LIMIT items,
                                         greedy; logs TASK/accuracy, TASK/correct, TASK/n
  config.evals.data        TASK=PATH, comma-separated: each task's data file (where they come
                           from: docs/evaluate.md)
  config.evals.batch_size  rows per generate call of a task (default 8)

e.g. `--config.evals.run=loss,gsm8k:8 --config.evals.data=gsm8k=/data/datasets/GSM8K/gsm8k.txt`.
Every evaluation of a step goes into one metrics.jsonl line of kind 'eval' (TensorBoard: eval/...)
and one console line. A config without an `evals` section (one built before it existed) runs
the held-out loss, as runs did then. `specs` checks it all, data files included, before anything
compiles; errors name the field.
"""
from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import tqdm

from yuanjax.evals import evaluator, generative
from yuanjax.evals import loss  # pylint: disable=unused-import  (registers 'loss')
from yuanjax.evals import task as task_lib

DEFAULT_RUN = 'loss'


def _split(text: str) -> list[str]:
  return [part.strip() for part in (text or '').split(',') if part.strip()]


def _data_paths(data: str) -> dict[str, str]:
  """config.evals.data as {task: path}."""
  paths = {}
  for entry in _split(data):
    name, sep, path = entry.partition('=')
    if not sep or not path.strip():
      raise ValueError(f'config.evals.data: {entry!r} is not TASK=PATH')
    paths[name.strip()] = path.strip()
  return paths


def _task_spec(name: str, limit: str, data: dict[str, str]) -> evaluator.Spec:
  if not limit.isdigit() or int(limit) < 1:
    raise ValueError(f'config.evals.run: {name}:{limit} needs a number of items >= 1 '
                     f'({name}:LIMIT, e.g. {name}:8)')
  if name not in data:
    raise ValueError(f'config.evals.run: {name} needs its data file in config.evals.data '
                     f'({name}=PATH)')
  task_lib.get(name).check_data(data[name])
  return evaluator.Spec(name, int(limit), data[name])


def _spec(entry: str, data: dict[str, str]) -> evaluator.Spec:
  name, sep, limit = entry.partition(':')
  if name in evaluator.EVALUATORS:
    if sep:
      raise ValueError(f'config.evals.run: {entry!r}: {name} takes no item limit')
    return evaluator.Spec(name)
  if name in task_lib.TASKS:
    return _task_spec(name, limit, data)
  raise ValueError(f'config.evals.run: unknown evaluation {name!r}; known: evaluators '
                   f'{sorted(evaluator.EVALUATORS)}, tasks {sorted(task_lib.TASKS)} (TASK:LIMIT)')


def specs(config: ml_collections.ConfigDict) -> list[evaluator.Spec]:
  """config.evals checked (names, limits, data files), as Specs."""
  if 'evals' not in config:
    return [evaluator.Spec(DEFAULT_RUN)]
  evals = config.evals
  if not isinstance(evals.batch_size, int) or evals.batch_size < 1:
    raise ValueError(f'config.evals.batch_size={evals.batch_size!r}: must be a positive integer')
  data = _data_paths(evals.data)
  out = [_spec(entry, data) for entry in _split(evals.run)]
  names = [s.name for s in out]
  if len(set(names)) < len(names):
    raise ValueError(f'config.evals.run={evals.run!r}: names an evaluation twice')
  unused = sorted(set(data) - set(names))
  if unused:
    raise ValueError(f'config.evals.data names {unused}, which config.evals.run does not run')
  return out


def build(ctx: evaluator.Context, specs_: Sequence[evaluator.Spec]) -> list[evaluator.Evaluator]:
  """The evaluators of checked specs (a task's data is read here)."""
  make = lambda s: evaluator.EVALUATORS.get(s.name, generative.TaskEval)(ctx, s)
  return [make(s) for s in specs_]


def run(evaluators: Sequence[evaluator.Evaluator], params, step: int, writer, is_main: bool,
        num_steps: int) -> dict:
  """Runs every evaluator at `step`: one eval line, one console line; returns the summary's part."""
  scalars, parts, summary = {}, [], {}
  for e in evaluators:
    s = e(params)
    scalars.update(s)
    parts.append(e.console(s))
    summary.update(e.summary(s))
  if evaluators:
    writer.write(step, scalars, kind='eval')
  if evaluators and is_main:
    tqdm.tqdm.write(f'step {step}/{num_steps} | ' + ' | '.join(parts))
  return summary
