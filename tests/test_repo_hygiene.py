"""No path of the machine a file was made on is committed: not in docs, code, configs, launch
listings, nor in the outputs stored in notebooks.

Rule, in every tracked text file: no home or work directory of a machine (`/work/`, `/home/NAME`,
`/Users/NAME`, `/root/`, macOS's `/private/var/` and `/var/folders/`) and no path pytest or
tempfile made (`/tmp/pytest-of-USER`, `/tmp/tmpXXXXXXXX`). Example commands may name `/tmp/run`
or `/data/shards`: a reader types those. In a notebook's stored outputs, which only a run on a
machine wrote, no absolute path under a system root (`/tmp`, `/usr`, `/opt`, `/content` ...)
either: outputs must show paths relative to the working directory.
"""
import json
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), REPO)  # its examples are the patterns
_START = r'(?<![\w.~/-])'  # a path's start: not inside a word, a URL or a relative path
MACHINE_PATH = re.compile(_START + r'(?:/work/|/home/\w|/Users/\w|/root/|/private/var/|'
                          r'/var/folders/|/tmp/pytest-of-|/tmp/tmp\w{8})[^\s\'"\\,)]*')
OUTPUT_PATH = re.compile(_START + r'/(?:tmp|work|home|Users|root|usr|opt|var|mnt|private|srv|'
                         r'content|data)/[^\s\'"\\]*')


def tracked_files() -> list[str]:
  """The repository's files as git tracks them (relative paths)."""
  out = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, check=True)
  return [p for p in out.stdout.decode().split('\0') if p]


def read_text(path: str) -> str | None:
  """The file's text, or None for a binary file (NUL bytes or not UTF-8)."""
  with open(os.path.join(REPO, path), 'rb') as f:
    data = f.read()
  try:
    return None if b'\0' in data else data.decode('utf-8')
  except UnicodeDecodeError:
    return None


def notebook_outputs(text: str) -> list[tuple[int, str]]:
  """(cell index, its outputs as JSON text) for each cell of a notebook with outputs."""
  cells = json.loads(text)['cells']
  return [(i, json.dumps(c['outputs'])) for i, c in enumerate(cells) if c.get('outputs')]


def machine_paths(path: str, text: str) -> list[str]:
  """'<path>: <what>' for each machine path in the file's text (and notebook outputs)."""
  bad = [f'{path}: {m}' for m in sorted(set(MACHINE_PATH.findall(text)))]
  if path.endswith('.ipynb'):
    for cell, outputs in notebook_outputs(text):
      bad += [f'{path}: cell {cell} output: {m}' for m in sorted(set(OUTPUT_PATH.findall(outputs)))]
  return bad


def test_no_machine_paths_in_tracked_files():
  files = tracked_files()
  assert 'README.md' in files and any(f.endswith('.ipynb') for f in files)
  bad = []
  for path in files:
    text = read_text(path) if path != SELF else None
    bad += machine_paths(path, text) if text is not None else []
  assert not bad, '\n'.join(bad)


def test_machine_paths_are_caught_and_examples_are_not():
  doc = ('python -m yuanjax.train --workdir=/tmp/run --config.data.path=/data/shards\n'
         'pip install -e ~/yuanjax; see gs://b/work/x and workdir/home/y\n'
         'from /work/wt-10/workdir, /home/ann/x, /Users/bo/y, /root/.cache/z, '
         '/tmp/pytest-of-root/p0, /tmp/tmpab12cd34/f\n')
  assert machine_paths('x.md', doc) == [
      'x.md: /Users/bo/y', 'x.md: /home/ann/x', 'x.md: /root/.cache/z',
      'x.md: /tmp/pytest-of-root/p0', 'x.md: /tmp/tmpab12cd34/f', 'x.md: /work/wt-10/workdir'
  ]
  notebook = json.dumps({
      'cells': [{
          'source': 'run(workdir="/tmp/run")',
          'outputs': []
      }, {
          'source': 'print(path)',
          'outputs': [{
              'text': 'opened /tmp/run/x (relative: workdir/x)\n'
          }]
      }]
  })
  assert machine_paths('n.ipynb', notebook) == ['n.ipynb: cell 1 output: /tmp/run/x']
