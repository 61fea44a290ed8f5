"""What the notebooks (notebooks/*.py) share: the repository they install from, the smoke
switch, where they write, the small model they train (a workdir is read back with
yuanjax.workdir), the sweep notebook 03 runs.

  YUANJAX_NOTEBOOK_SMOKE=1   shrink everything to seconds (CI runs the notebooks this way)
  YUANJAX_NOTEBOOK_DIR       where the notebooks train (default: $TMPDIR/yuanjax-notebooks)
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile

import ml_collections

from yuanjax import config_lib, metrics, workdir as workdir_lib

# The repository: each notebook's Colab badge opens it and its install cell pip-installs it.
# The one place to change it (a fork, a move): `python -m yuanjax.analysis.notebook` writes it
# into the notebooks (stamp), and tests/notebooks fails while one names another.
REPOSITORY = 'https://github.com/yuanjax/yuanjax'
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS_DIR = os.path.join(CHECKOUT, 'notebooks')  # absent where yuanjax is pip-installed


def smoke() -> bool:
  """True when YUANJAX_NOTEBOOK_SMOKE=1 (tiny model, a few steps)."""
  return os.environ.get('YUANJAX_NOTEBOOK_SMOKE', '0') == '1'


def root() -> str:
  """$YUANJAX_NOTEBOOK_DIR, where the notebooks write (default: $TMPDIR/yuanjax-notebooks)."""
  return os.environ.get('YUANJAX_NOTEBOOK_DIR',
                        os.path.join(tempfile.gettempdir(), 'yuanjax-notebooks'))


def workdir(name: str) -> str:
  """<root>/<name> (-smoke in smoke mode), shared by the notebooks."""
  return os.path.join(root(), name + ('-smoke' if smoke() else ''))


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


def source_tree() -> str:
  """The repository's root, for what a pip install does not ship (launch/, configs/): the
  checkout yuanjax is imported from, else a shallow clone of REPOSITORY (made once, in root())."""
  if os.path.isfile(os.path.join(CHECKOUT, 'launch', 'sweep.py')):
    return CHECKOUT
  clone = os.path.join(root(), 'yuanjax-source')
  if not os.path.isdir(clone):
    subprocess.run(['git', 'clone', '-q', '--depth=1', REPOSITORY, clone], check=True)
  return clone


def run_sweep(config: str, sweep_dir: str, flags: list[str]) -> None:
  """`python -m launch.sweep --backend=local --config=<config> --workdir=<sweep_dir> <flags>`
  run in source_tree() (`config` is relative to it: configs/x.py[:ARG]); prints the command (the
  config as named in the repository's root), raises with the sweep's stderr if it fails."""
  print('python -m launch.sweep --backend=local', f'--config={config}', f'--workdir={sweep_dir}',
        *flags)
  tree = source_tree()
  done = subprocess.run([
      sys.executable, '-m', 'launch.sweep', '--backend=local',
      f'--config={os.path.join(tree, config)}', f'--workdir={os.path.abspath(sweep_dir)}', *flags
  ], cwd=tree, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f'the sweep failed ({done.returncode}):\n{done.stderr[-3000:]}')


def print_log(path: str) -> None:
  """Prints workdir `path`'s training log from its metrics.jsonl, as the trainer printed it."""
  records = workdir_lib.read_metrics(path)
  last = records['train'][-1]['step']
  evals = {r['step']: r for r in records.get('eval', [])}
  for r in records['train']:
    print(metrics.summary_line(r['step'], last, r))
    if r['step'] in evals:
      print(f"step {r['step']}/{last} | eval loss {evals[r['step']]['loss']:.4f}")


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


def sources(directory: str = NOTEBOOKS_DIR) -> list[str]:
  """The jupytext sources (notebooks/NN_*.py), in order."""
  return sorted(glob.glob(os.path.join(directory, '[0-9][0-9]_*.py')))


def colab_url(name: str) -> str:
  """The Colab address of notebooks/<name>.ipynb on REPOSITORY's main branch."""
  return REPOSITORY.replace('https://github.com/', 'https://colab.research.google.com/github/',
                            1) + f'/blob/main/notebooks/{name}.ipynb'


def stamp(text: str, name: str) -> str:
  """The jupytext source `text` of notebook `name` with REPOSITORY in its Colab badge and its
  install cell (`git+URL`)."""
  text = re.sub(r'https://colab\.research\.google\.com/github/[^)\s]+', colab_url(name), text)
  return re.sub(r'git\+https://[^\'"\s]+', 'git+' + REPOSITORY, text)


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
  import time  # pylint: disable=g-import-not-at-top
  import jupytext
  names = (argv if argv is not None else sys.argv[1:])
  todo = [s for s in sources() if not names or any(n in os.path.basename(s) for n in names)]
  if names and not todo:
    raise SystemExit(f'no notebook matches {names} in {NOTEBOOKS_DIR}')
  # The kernels run in notebooks/ and get their dir relative to it: no machine path in outputs.
  where = os.environ.get('YUANJAX_NOTEBOOK_DIR', os.path.join(CHECKOUT, 'workdir', 'notebooks'))
  os.environ['YUANJAX_NOTEBOOK_DIR'] = os.path.relpath(os.path.abspath(where), NOTEBOOKS_DIR)
  for source in todo:
    start = time.time()
    _stamp_file(source)
    nb = execute(source)
    jupytext.write(nb, source[:-3] + '.ipynb', fmt='ipynb')
    print(f'{os.path.basename(source)}: executed in {time.time() - start:.0f} s', flush=True)
  return 0


def _stamp_file(source: str) -> None:
  with open(source, encoding='utf-8') as f:
    text = f.read()
  stamped = stamp(text, os.path.basename(source)[:-3])
  if stamped != text:
    with open(source, 'w', encoding='utf-8') as f:
      f.write(stamped)


if __name__ == '__main__':
  raise SystemExit(main())
