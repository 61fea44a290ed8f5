"""What the documentation tells a user to type: every `--config.X` names a field of the config
on its command line, the "own data" recipe (docs/data.md) runs as written, and every link of
README and docs/ stays inside the repository and finds its file."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from yuanjax import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = 'configs/demo.py'  # what a `--config.X` with no --config on its line means
PLACEHOLDERS = {'KEY', 'a.b', 'model.x'}  # written as the syntax, not as a field
DOCS = [
    'README.md', 'launch/README.md', 'docs/**/*.md', 'configs/*.py', 'launch/*.py',
    'yuanjax/**/*.py', 'benchmarks/*.py', 'notebooks/*.py'
]
FLAG = re.compile(r'--config\.([A-Za-z_][\w.]*\w)')
CONFIG_FILE = re.compile(r'--config[= ]([\w./-]+\.py(?::\w+)?)')


def command_lines(text: str) -> list[tuple[int, str]]:
  """(first line number, line) with backslash-continued lines joined into one."""
  out, start, parts = [], None, []
  for number, line in enumerate(text.splitlines(), 1):
    start = number if start is None else start
    parts.append(line.rstrip().rstrip('\\'))
    if not line.rstrip().endswith('\\'):
      out.append((start, ' '.join(parts)))
      start, parts = None, []
  return out


def has_field(config, dotted: str) -> bool:
  node = config
  for key in dotted.split('.'):
    if not isinstance(node, ConfigDict) or key not in node:
      return False
    node = node[key]
  return True


_CONFIGS: dict = {}


def config_of(spec: str):
  if spec not in _CONFIGS:
    _CONFIGS[spec] = workdir.load_config(*workdir.split_config_spec(os.path.join(REPO, spec)))
  return _CONFIGS[spec]


def unknown_flags(text: str, where: str) -> list[str]:
  """'<where>:<line>: --config.X: <config file> has no field X' for each such flag."""
  bad = []
  for number, line in command_lines(text):
    named = CONFIG_FILE.search(line)
    spec = named.group(1) if named and os.path.isfile(
        os.path.join(REPO,
                     named.group(1).split(':')[0])) else DEFAULT_CONFIG
    for field in FLAG.findall(line):
      if field not in PLACEHOLDERS and not has_field(config_of(spec), field):
        bad.append(f'{where}:{number}: --config.{field}: {spec} has no field {field}')
  return bad


def doc_files() -> list[str]:
  return sorted({p for g in DOCS for p in glob.glob(os.path.join(REPO, g), recursive=True)})


def test_every_config_flag_in_the_docs_names_a_field():
  files = doc_files()
  assert os.path.join(REPO, 'README.md') in files and len(files) > 20
  bad = []
  for path in files:
    with open(path, encoding='utf-8') as f:
      bad += unknown_flags(f.read(), os.path.relpath(path, REPO))
  assert not bad, '\n'.join(bad)


def test_a_flag_that_is_no_field_is_caught():
  """The check itself: `train.steps` is no field (it is `train.num_steps`), resolved against
  the config named on the same (continued) line, else configs/demo.py."""
  text = ('python -m launch.sweep --config=configs/router_ablation.py:smoke \\\n'
          '    --config.train.steps=20 --config.model.router.type=linear\n'
          'also --config.train.num_steps=3 and --config.KEY=VALUE\n'
          'python -m yuanjax.plan --config configs/yuan_m32.py --config.mesh.nope=2\n')
  assert unknown_flags(text, 'x.md') == [
      'x.md:1: --config.train.steps: configs/router_ablation.py:smoke has no field train.steps',
      'x.md:4: --config.mesh.nope: configs/yuan_m32.py has no field mesh.nope',
  ]


# ------------------------------------------------------------------------ own-data recipe

SMALL_VOCAB = 384
QUICK = ('--config.train.num_steps=2 --config.train.batch_size=2 --config.train.seq_len=32 '
         '--config.train.log_every=1 --config.train.eval_steps=1 --config.train.sample_tokens=0 '
         '--config.train.progress=False --config.checkpoint.every=2')

RECIPE_DOC = 'docs/data.md'


def own_data_recipe() -> list[str]:
  """The commands of RECIPE_DOC that train a tokenizer, prepare shards and train on them."""
  with open(os.path.join(REPO, RECIPE_DOC), encoding='utf-8') as f:
    lines = [line.strip() for _, line in command_lines(f.read())]
  steps = ('yuanjax.data tokenizer', 'yuanjax.data prepare', 'yuanjax.train')
  recipe, i = [], 0
  for step in steps:  # each the first such command after the one before
    i = next(
        (j for j in range(i, len(lines)) if lines[j].startswith('python') and step in lines[j]),
        len(lines))
    assert i < len(lines), f'{RECIPE_DOC}: no `{step}` command after {recipe}'
    recipe.append(lines[i])
  return recipe


def _value(argv: list[str], flag: str) -> str:
  """The value of `flag` in argv, as `flag=v` or `flag v`."""
  for i, arg in enumerate(argv):
    if arg.startswith(flag + '='):
      return arg.split('=', 1)[1]
    if arg == flag:
      return argv[i + 1]
  raise AssertionError(f'no {flag} in {argv}')


def test_own_data_recipe_vocab_fits_the_tokenizer():
  """As written (its full-size tokenizer is too slow to train here): the model that the train
  command builds holds every id of the tokenizer the first command trains."""
  tok_cmd, _, train_cmd = [shlex.split(c) for c in own_data_recipe()]
  tokens = int(_value(tok_cmd, '--vocab_size'))
  config = config_of(_value(train_cmd, '--config'))
  overrides = dict(
      a[len('--config.'):].split('=', 1) for a in train_cmd if a.startswith('--config.'))
  vocab = int(overrides.get('model.vocab_size', config.model.vocab_size))
  assert vocab >= tokens, f'{RECIPE_DOC} own-data recipe: model.vocab_size={vocab} < {tokens}'


def _localise(command: str, tmp, vocab: str) -> list[str]:
  """The command with the tokenizer size made small, absolute paths moved under tmp, and python
  the test's interpreter."""
  argv = shlex.split(command.replace(vocab, str(SMALL_VOCAB)))
  out = [sys.executable if argv[0] == 'python' else argv[0]]
  for arg in argv[1:]:
    flag, eq, value = arg.rpartition('=') if arg.startswith('--') else ('', '', arg)
    if value.startswith('/'):
      value = str(tmp) + value
      os.makedirs(os.path.dirname(value), exist_ok=True)  # the user's /data exists
    out.append(f'{flag}{eq}{value}')
  return out


def test_own_data_recipe_runs(tmp_path):
  """RECIPE_DOC's three commands, in a folder holding a small corpus (corpus/*.txt, *.jsonl) and
  configs/; only the tokenizer size (to SMALL_VOCAB, wherever the recipe writes it) and the
  training length (QUICK, appended) change."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  import json  # pylint: disable=g-import-not-at-top
  from yuanjax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  docs = [open(p, encoding='utf-8').read() for p in corpus_lib.stdlib_sources(400_000)]
  (corpus / 'code.txt').write_text('\n'.join(docs))
  (corpus / 'code.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  os.symlink(os.path.join(REPO, 'configs'), tmp_path / 'configs')
  recipe = own_data_recipe()
  vocab = _value(shlex.split(recipe[0]), '--vocab_size')
  env = dict(os.environ, PYTHONPATH=REPO)
  for i, command in enumerate(recipe):
    argv = _localise(command, tmp_path, vocab) + (shlex.split(QUICK) if i == 2 else [])
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f'{command}\n{done.stderr[-3000:]}'
  assert f'config.model.vocab_size={SMALL_VOCAB} for a tokenizer of {SMALL_VOCAB}' in done.stderr
  assert '"step": 2' in open(glob.glob(str(tmp_path / '**/metrics.jsonl'),
                                       recursive=True)[0]).read()


# ------------------------------------------------------------------------------- links

LINK = re.compile(r'\]\(([^)\s]+)\)')
MARKDOWN = ['README.md', 'launch/README.md', 'docs/**/*.md']


def anchors(text: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
  heads = re.findall(r'^#+ (.*)$', text, flags=re.M)
  return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in heads}


def bad_links(text: str, where: str) -> list[str]:
  """'<where>: <target>: why' for each relative link of a markdown file (at REPO/where) that
  leaves the repository, names no file, or names a heading the file does not have."""
  bad = []
  for target in LINK.findall(text):
    if re.match(r'[a-z]+:', target):  # https:, mailto:
      continue
    path, _, anchor = target.partition('#')
    full = os.path.normpath(
        os.path.join(REPO, os.path.dirname(where), path) if path else os.path.join(REPO, where))
    if os.path.relpath(full, REPO).startswith('..'):
      bad.append(f'{where}: {target}: outside the repository')
    elif not os.path.exists(full):
      bad.append(f'{where}: {target}: no such file')
    elif anchor and full.endswith('.md') and anchor not in anchors(
        open(full, encoding='utf-8').read()):
      bad.append(f'{where}: {target}: no heading #{anchor}')
  return bad


def markdown_files() -> list[str]:
  return sorted({
      os.path.relpath(p, REPO)
      for g in MARKDOWN
      for p in glob.glob(os.path.join(REPO, g), recursive=True)
  })


def test_links_stay_in_the_repository_and_resolve():
  files = markdown_files()
  assert 'README.md' in files and 'docs/data.md' in files
  bad = []
  for where in files:
    with open(os.path.join(REPO, where), encoding='utf-8') as f:
      bad += bad_links(f.read(), where)
  assert not bad, '\n'.join(bad)


def test_a_bad_link_is_caught():
  text = ('[a](../shared/notes.md) [b](docs/nope.md) [c](docs/data.md#no-such-heading) '
          '[d](docs/data.md#your-own-data) [e](https://example.com/x) [f](#faults)')
  assert bad_links(text, 'README.md') == [
      'README.md: ../shared/notes.md: outside the repository',
      'README.md: docs/nope.md: no such file',
      'README.md: docs/data.md#no-such-heading: no heading #no-such-heading',
      'README.md: #faults: no heading #faults',
  ]
  assert bad_links('[a](#faults) [b](data.md) [c](../../x.md) [d](../launch/README.md)',
                   'docs/training.md') == ['docs/training.md: ../../x.md: outside the repository']


def test_readme_maps_every_docs_page():
  """README's map of docs/ names every page there (studies' generated reports below docs/ are
  linked from the page that discusses them)."""
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    linked = set(LINK.findall(f.read()))
  pages = [p for p in markdown_files() if os.path.dirname(p) == 'docs']
  assert pages and not [p for p in pages if p not in linked]
