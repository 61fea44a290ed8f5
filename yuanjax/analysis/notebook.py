"""What the notebooks (notebooks/*.py) share: the smoke switch, where they write, the small
model they train (a workdir is read back with yuanjax.workdir).

  YUANJAX_NOTEBOOK_SMOKE=1   shrink everything to seconds (CI runs the notebooks this way)
  YUANJAX_NOTEBOOK_DIR       where the notebooks train (default: $TMPDIR/yuanjax-notebooks)
"""
from __future__ import annotations

import glob
import os
import tempfile

import ml_collections

from yuanjax import config_lib, workdir as workdir_lib


def smoke() -> bool:
  """True when YUANJAX_NOTEBOOK_SMOKE=1 (tiny model, a few steps)."""
  return os.environ.get('YUANJAX_NOTEBOOK_SMOKE', '0') == '1'


def workdir(name: str) -> str:
  """$YUANJAX_NOTEBOOK_DIR/<name> (-smoke in smoke mode), shared by the notebooks."""
  root = os.environ.get('YUANJAX_NOTEBOOK_DIR',
                        os.path.join(tempfile.gettempdir(), 'yuanjax-notebooks'))
  return os.path.join(root, name + ('-smoke' if smoke() else ''))


def quickstart_config(is_smoke: bool) -> ml_collections.ConfigDict:
  """configs/tiny.py's model with 4 layers: a few minutes of training on 2 CPU cores, with a
  checkpoint every 50 steps (router saturation needs several). Smoke: 2 layers, 4 steps."""
  config = config_lib.base_config()
  config.model = config_lib.tiny_model()
  config.model.num_layers = 2 if is_smoke else 4
  config.data.update(dict(vocab_size=512, max_bytes=1_000_000))
  config.train.update(
      dict(num_steps=300, batch_size=8, seq_len=128, log_every=10, eval_every=100, eval_steps=4,
           sample_tokens=0, progress=False))
  config.optimizer.update(dict(lr=2e-3, warmup_steps=30))
  config.checkpoint.update(dict(every=50, keep=10))
  if is_smoke:
    config.train.update(
        dict(num_steps=4, batch_size=2, seq_len=32, log_every=1, eval_every=2, eval_steps=1))
    config.checkpoint.every = 2
  return config


def train_or_open(config: ml_collections.ConfigDict, path: str) -> bool:
  """Trains `config` into workdir `path` unless it already holds the last step (resuming a run
  that stopped early). Returns whether it trained."""
  steps = workdir_lib.checkpoint_steps(path)
  if steps and steps[-1] >= config.train.num_steps:
    return False
  from yuanjax import trainer  # pylint: disable=g-import-not-at-top  (heavy)
  trainer.train_and_evaluate(config, path)
  return True


def markdown_table(header, rows) -> str:
  """A Markdown table (IPython.display.Markdown renders it; GitHub shows it)."""
  fmt = lambda x: f'{x:.4g}' if isinstance(x, float) else str(x)
  lines = ['| ' + ' | '.join(map(str, header)) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(fmt(x) for x in row) + ' |' for row in rows]
  return '\n'.join(lines)


def token_pieces(tokenizer, ids) -> list[str]:
  """The text of each token, as it reads in the decoded string (spaces, newlines, bytes)."""
  pieces, prev = [], ''
  for i in range(len(ids)):
    text = tokenizer.decode(ids[:i + 1])
    pieces.append(text[len(prev):] if text.startswith(prev) else tokenizer.decode(ids[i:i + 1]))
    prev = text
  return pieces


# ---------------------------------------------------------------- executing the notebooks

NOTEBOOKS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'notebooks')


def sources(directory: str = NOTEBOOKS_DIR) -> list[str]:
  """The jupytext sources (notebooks/NN_*.py), in order."""
  return sorted(glob.glob(os.path.join(directory, '[0-9][0-9]_*.py')))


def execute(source: str, timeout: int = 1800):
  """Runs the jupytext source `source` top to bottom in a fresh kernel (cwd: its folder) and
  returns the executed notebook; raises nbclient's CellExecutionError on any error."""
  import jupytext  # pylint: disable=g-import-not-at-top  (notebook extras)
  import nbclient
  nb = jupytext.read(source)
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={
      'metadata': {
          'path': os.path.dirname(source)
      }
  }).execute()
  return nb


def main(argv=None) -> int:
  """`python -m yuanjax.analysis.notebook [NAME ...]`: executes the notebooks (all by default;
  smoke mode if YUANJAX_NOTEBOOK_SMOKE=1) and writes each paired .ipynb with its outputs."""
  import sys  # pylint: disable=g-import-not-at-top
  import time
  import jupytext
  names = (argv if argv is not None else sys.argv[1:])
  todo = [s for s in sources() if not names or any(n in os.path.basename(s) for n in names)]
  if names and not todo:
    raise SystemExit(f'no notebook matches {names} in {NOTEBOOKS_DIR}')
  for source in todo:
    start = time.time()
    nb = execute(source)
    jupytext.write(nb, source[:-3] + '.ipynb', fmt='ipynb')
    print(f'{os.path.basename(source)}: executed in {time.time() - start:.0f} s', flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
