"""`prepare` as a Beam pipeline (DirectRunner) gives the local path's documents and tokens.

Apache Beam pins protobuf and pyarrow below the project's, so it lives in its own environment,
`.venv-beam` (`make venv-beam`; `make test` builds it). The pipeline runs there in a subprocess;
the comparison runs here.

    .venv/bin/python -m pytest -q tests/data/test_beam_prepare.py
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from yuanjax.data import ShardedDocuments, corpus
from yuanjax.data import prepare as prepare_lib
from yuanjax.data import storage
from yuanjax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEAM_PYTHON = os.environ.get('YUANJAX_BEAM_PYTHON', os.path.join(REPO, '.venv-beam', 'bin',
                                                                 'python'))


def _beam(*args):
  if not os.path.exists(BEAM_PYTHON):
    pytest.fail(f'{BEAM_PYTHON}: no Beam environment; run `make venv-beam`')
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([BEAM_PYTHON, '-m', 'yuanjax.data.beam_prepare', *args], env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """The embedded corpus (a slice of the stdlib) as .txt files, one document each, plus a
  jsonl file with an empty and a non-UTF-8 record (skipped and counted), and a tokenizer."""
  d = tmp_path_factory.mktemp('beam')
  files = corpus.stdlib_sources(150_000)
  for i, path in enumerate(files):
    shutil.copy(path, d / f'{i:03d}.txt')
  with open(d / 'z.jsonl', 'wb') as f:
    f.write(b'{"text": "last"}\n{"text": ""}\n{"text": "caf\xe9"}\n')
  tok = tokenizer_lib.train_from_documents(corpus.stdlib_documents(files), d / 'tok', 400)
  return tok, [str(d / '*.txt'), str(d / 'z.jsonl')], len(files) + 1


def test_beam_matches_local_prepare(inputs, tmp_path):
  tok, globs, num_docs = inputs
  local = prepare_lib.prepare(tok, globs, tmp_path / 'local', progress=False)
  run = _beam('--tokenizer', tok, '--input', *globs, '--output', str(tmp_path / 'beam'),
              '--files_per_shard', '4', '--', '--runner=DirectRunner')
  assert run.returncode == 0, run.stderr[-3000:]
  beam = json.loads((tmp_path / 'beam' / 'manifest.json').read_text())
  assert (beam['cut'], local['cut']) == ('input_files', 'tokens')
  assert len(beam['shards']) == -(-(num_docs) // 4) > len(local['shards'])
  for k in ('num_docs', 'num_tokens', 'num_skipped_empty', 'num_skipped_invalid', 'vocab_size',
            'tokenizer_sha256', 'eod_id'):
    assert beam[k] == local[k], k
  assert (beam['num_docs'], beam['num_skipped_empty'], beam['num_skipped_invalid']) == (num_docs, 1,
                                                                                        1)
  here, there = ShardedDocuments(tmp_path / 'local'), ShardedDocuments(tmp_path / 'beam')
  for i in range(len(here)):
    np.testing.assert_array_equal(there[i], here[i])
  assert not list((tmp_path / 'beam').glob('*.meta.json'))


def test_beam_bad_input_names_file_and_line(inputs, tmp_path):
  tok, _, _ = inputs
  (tmp_path / 'bad.jsonl').write_text('{"text": "a"}\n{"txt": "b"}\n')
  run = _beam('--tokenizer', tok, '--input', str(tmp_path / 'bad.jsonl'), '--output',
              str(tmp_path / 'out'))
  assert run.returncode != 0 and "bad.jsonl:2: no 'text' field" in run.stderr
  assert not (tmp_path / 'out' / 'manifest.json').exists()


def test_beam_bucket_output_is_refused_checked_then_replaced(inputs, tmp_path):
  """An existing gs:// output needs --overwrite; an input without documents is refused before
  anything is written; a replacing run deletes the old manifest first."""
  tok, _, _ = inputs
  (tmp_path / 'a.jsonl').write_text('{"text": "def f(): pass"}\n')
  (tmp_path / 'empty.jsonl').write_text('{"text": ""}\n')
  (tmp_path / 'bad.jsonl').write_text('{"text": "a"}\n{"txt": "b"}\n')
  with storage.emulator('beam'):
    url = 'gs://beam/shards'
    fs, path = storage.filesystem(url)
    beam = lambda name, *flags: _beam('--tokenizer', tok, '--input', str(tmp_path / name),
                                      '--output', url, *flags)
    run = beam('a.jsonl')
    assert run.returncode == 0, run.stderr[-3000:]
    first = sorted(fs.ls(path))
    assert f'{path}/manifest.json' in first and f'{path}/shard_00000.bin' in first
    run = beam('a.jsonl')
    assert run.returncode == 2 and f'{url}: already exists (pass --overwrite' in run.stderr
    run = beam('empty.jsonl', '--overwrite')
    assert run.returncode == 2 and 'no non-empty documents in the input' in run.stderr
    fs.invalidate_cache()
    assert sorted(fs.ls(path)) == first  # nothing touched
    run = beam('bad.jsonl', '--overwrite')
    assert run.returncode != 0 and "bad.jsonl:2: no 'text' field" in run.stderr
    fs.invalidate_cache()
    assert f'{path}/manifest.json' not in fs.ls(path)  # the old manifest went first
