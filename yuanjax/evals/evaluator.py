"""The in-training evaluator interface and its registry.

An evaluator is built once per training run, before anything compiles, from what the trainer
has made (`Context`), and is then called on the params every `config.train.eval_every` steps
and at the end of the run. It returns the scalars it adds to that step's eval line in
metrics.jsonl (kind 'eval'; TensorBoard tags eval/<name>); `console` and `summary` say what of
them goes to the console line and to the run's summary.

Registered by name (`@register('loss')`): `config.evals.run` names them
(yuanjax.evals.in_training); a name that is no evaluator's but a task's
(yuanjax.evals.task.TASKS) runs that task (yuanjax.evals.generative.TaskEval).
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Spec:
  """One entry of config.evals.run: a name, its item limit (tasks) and its data path (tasks)."""
  name: str
  limit: int | None = None
  data: str | None = None


@dataclasses.dataclass(frozen=True)
class Context:
  """What the trainer has built that an evaluator may use."""
  config: ml_collections.ConfigDict
  model: Any  # the Transformer
  tokenizer: Any
  mesh: Any
  param_shardings: Any  # the params' shardings on the mesh
  batch_sharding: Any  # a batch's sharding (split over the data-parallel axes)
  make_eval_iter: Callable[[], Iterator[dict]]  # a fresh pass over the held-out rows
  to_device: Callable[[dict], dict]  # this process's rows -> the global batch arrays
  sources: Sequence[str]  # the data mixture's source names (one unnamed source: [])


class Evaluator(abc.ABC):
  """One in-training evaluation."""

  def __init__(self, ctx: Context, spec: Spec):
    self.ctx, self.spec = ctx, spec

  @abc.abstractmethod
  def __call__(self, params) -> dict[str, float]:
    """The scalars this evaluation adds to the step's eval line."""

  @abc.abstractmethod
  def console(self, scalars: dict[str, float]) -> str:
    """Its part of the console line, e.g. 'eval loss 3.1234'."""

  def summary(self, scalars: dict[str, float]) -> dict[str, float]:
    """What the run's summary keeps of the final evaluation (default: every scalar)."""
    return dict(scalars)


EVALUATORS: dict[str, type[Evaluator]] = {}


def register(name: str):
  """Class decorator: registers an Evaluator under `name`."""

  def add(cls: type[Evaluator]) -> type[Evaluator]:
    if name in EVALUATORS:
      raise ValueError(f'evaluator {name!r} is registered twice')
    EVALUATORS[name] = cls
    return cls

  return add
