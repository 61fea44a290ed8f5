"""Evaluate a checkpoint on a benchmark task, or score outputs already generated.

  python -m yuanjax.evaluate --checkpoint PATH --task TASK --data DATA [--limit N] [--batch B] \\
      [--out DIR] [--dtype bfloat16] [--tokenizer FILE] [--quantize int8] \\
      [--mesh data=2,tensor=2,expert=2]
  python -m yuanjax.evaluate score --task TASK --data DATA --outputs FILE

PATH: an HF dir, a converted dir or a training workdir (yuanjax.loader). TASK: a registered task
(yuanjax.evals.tasks; docs/evaluate.md says where each one's DATA comes from). The items (the
first N with --limit) are decoded greedily in batches of B rows, to `<eod>` or the task's
max_new_tokens (yuanjax.evals.generative); --quantize int8: with int8 weights (yuanjax.quantize);
--mesh: the checkpoint loaded straight onto that device mesh and decoded there (yuanjax.generate's
--mesh: NAME=SIZE,... over data, fsdp, expert, tensor, the sizes multiplying to the device
count, checked against the checkpoint's config before any weight is read); the batch is padded
to the devices it splits over. DIR/outputs.jsonl gets one record per item (id,
prompt, output, extracted, correct, tokens, seconds), appended and flushed after every batch:
run again, the same command skips the ids already there and continues. DIR/results.json
(accuracy, n, correct, the 95% Wilson interval ci95_low..ci95_high, seconds, tokens,
tokens_per_sec, over all of outputs.jsonl) is published atomically at the end, and printed.

`score` judges the outputs of a file again: this runtime's outputs.jsonl, the
`question[SEP]output` text file Yuan's own runtime writes (lines matched to items by question),
or the samples.jsonl of its HumanEval script ({task_id, completion}), and prints its results
JSON as the last line, so both runtimes can be compared on the same outputs.

Everything is checked before the model loads: the task's name, its data file (a missing one is
an error naming the path and where the files come from), the limits, the mesh, the output
directory, and
that outputs already in DIR belong to these items.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import tqdm

from yuanjax import config_lib, generate, loader, publish, quantize
from yuanjax.evals import generative
from yuanjax.evals import task as task_lib

OUTPUTS, RESULTS = 'outputs.jsonl', 'results.json'


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value}: must be >= 1')
  return value


def _parse_run(argv):
  p = argparse.ArgumentParser(prog='python -m yuanjax.evaluate', description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True,
                 help='HF dir, converted (from-hf) dir, or yuanjax training workdir')
  p.add_argument('--task', required=True, help='a registered task, e.g. gsm8k')
  p.add_argument('--data', required=True, help="the task's data file (or directory)")
  p.add_argument('--limit', type=_positive, default=None, help='the first N items only')
  p.add_argument('--batch', type=_positive, default=8, help='rows per generate call')
  p.add_argument('--out', default=None, help='output directory (default: workdir/eval/TASK)')
  p.add_argument('--dtype', default=None, choices=config_lib.DTYPES,
                 help="compute dtype override (default: the checkpoint's)")
  p.add_argument('--tokenizer', default=None,
                 help="a sentencepiece .model instead of the checkpoint's")
  p.add_argument('--quantize', default='none', choices=quantize.MODES,
                 help='int8: int8 matmul weights, per-channel scales (yuanjax.quantize)')
  p.add_argument('--mesh', default=None,
                 help='decode on a device mesh, e.g. data=2,tensor=2,expert=2 (yuanjax.generate)')
  return p.parse_args(argv)


def _parse_score(argv):
  p = argparse.ArgumentParser(prog='python -m yuanjax.evaluate score',
                              description='Score an outputs file; print its results JSON.')
  p.add_argument('--task', required=True)
  p.add_argument('--data', required=True)
  p.add_argument('--outputs', required=True,
                 help='an outputs.jsonl, or a question[SEP]output file of Yuan\'s runtime')
  return p.parse_args(argv)


def _items(task_name: str, data: str, limit: int | None):
  """(task, its items), the data file checked first."""
  task = task_lib.get(task_name)
  task.check_data(data)
  items = task.load(data)[:limit]
  if not items:
    raise ValueError(f'{data}: no {task_name} items')
  ids = [item.id for item in items]
  if len(set(ids)) < len(ids):
    raise ValueError(f'{data}: {task_name} gives two items the same id')
  return task, items


def _read_done(path: str, items) -> list[dict]:
  """The records already in outputs.jsonl, each checked against its item. A last line cut short
  (a run killed while writing it) is dropped from the file."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines(keepends=True)
  prompts, records = {item.id: item.prompt for item in items}, []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise ValueError(f'{path}:{number}: not a JSON line') from None
      publish.file(path, ''.join(lines[:-1]).encode())
  for r in records:
    if prompts.get(r.get('id')) != r.get('prompt'):
      raise ValueError(f'{path}: record {r.get("id")!r} is not of these items (another task, '
                       'data file or --limit?): use another --out')
  return records


def _check_out(out: str) -> None:
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--out={out}: cannot create it ({e.strerror or e})') from e
  if not os.access(out, os.W_OK):
    raise ValueError(f'--out={out}: not writable')


def _generate(args, mesh, task, todo, outputs_path: str, done: int) -> list[dict]:
  """Decodes the items not done yet (on `mesh` unless None), appending each batch's records to
  outputs.jsonl; returns them."""
  overrides = {'dtype': args.dtype} if args.dtype else {}
  model, params, tok = loader.load_checkpoint(args.checkpoint, overrides=overrides,
                                              tokenizer=args.tokenizer, quantize=args.quantize,
                                              shardings=generate.load_shardings(mesh))
  bar = tqdm.tqdm(total=done + len(todo), initial=done, desc=task.name, dynamic_ncols=True)
  new = []
  with open(outputs_path, 'a', encoding='utf-8') as f:
    for records in generative.run(model, params, tok, task, todo, args.batch, mesh):
      f.write(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records))
      f.flush()
      bar.update(len(records))
      new += records
  bar.close()
  return new


def _run(args) -> dict:
  task, items = _items(args.task, args.data, args.limit)
  mesh = None if args.mesh is None else generate.mesh_for(args.checkpoint, args.mesh)
  out = args.out or os.path.join('workdir', 'eval', task.name)
  _check_out(out)
  outputs_path = os.path.join(out, OUTPUTS)
  done = _read_done(outputs_path, items)
  done_ids = {r['id'] for r in done}
  todo = [item for item in items if item.id not in done_ids]
  # outputs.jsonl now holds exactly these records (_read_done dropped a cut-short last line).
  records = done + (_generate(args, mesh, task, todo, outputs_path, len(done)) if todo else [])
  results = {
      **generative.results(task.name, records),
      **generative.speed(records), 'checkpoint': args.checkpoint,
      'data': args.data
  }
  publish.file(os.path.join(out, RESULTS), (json.dumps(results, indent=2) + '\n').encode())
  return results


def _score(args) -> dict:
  task, items = _items(args.task, args.data, None)
  if not os.path.isfile(args.outputs):
    raise FileNotFoundError(f'--outputs={args.outputs}: no such file')
  return generative.score_file(task, items, args.outputs)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  scoring = argv[:1] == ['score']
  args = _parse_score(argv[1:]) if scoring else _parse_run(argv)
  try:
    results = _score(args) if scoring else _run(args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(results, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
