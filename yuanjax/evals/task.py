"""A benchmark task: what a generative evaluation knows about its data and its scoring.

A task turns its data file into `Item`s (an id, the prompt text exactly as the model sees it,
the gold answer), extracts an answer from the model's output text and judges it. It never
sees the model: the runtime (`python -m yuanjax.evaluate`) owns tokenisation, batching,
generation, outputs.jsonl and results.json.

Tasks register by name (`@register`), so the runtime, the trainer's `config.evals` and the
`score` command all find them in `TASKS`.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  prompt: str  # the full text given to the model (few-shot examples included)
  answer: Any  # the gold answer, JSON-serialisable
  question: str = ''  # the question alone: how an output line of Yuan's runtime is matched
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # what the scorer needs


class Task(abc.ABC):
  """One benchmark: its data, its prompt, and its rule for a correct answer."""
  name: ClassVar[str]
  source: ClassVar[str]  # where the data files come from (said when one is missing)
  max_new_tokens: ClassVar[int]
  stop: ClassVar[tuple[str, ...]] = ()  # the output is cut at the first of these

  @abc.abstractmethod
  def load(self, data_path: str) -> list[Item]:
    """The items of the data file (or directory) at data_path, in a fixed order."""

  @abc.abstractmethod
  def extract(self, output: str, item: Item) -> Any:
    """The answer the output gives (JSON-serialisable; None when it gives none)."""

  @abc.abstractmethod
  def correct(self, extracted: Any, item: Item) -> bool:
    """Whether the extracted answer counts as right."""

  def check_data(self, data_path: str) -> None:
    """A FileNotFoundError naming the path and where the task's files come from."""
    if not os.path.exists(data_path):
      raise FileNotFoundError(f'{self.name}: no data at {data_path!r}; the files come from '
                              f'{self.source}')


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
  if cls.name in TASKS:
    raise ValueError(f'task {cls.name!r} is registered twice')
  TASKS[cls.name] = cls
  return cls


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; known: {sorted(TASKS)}')
  return TASKS[name]()
