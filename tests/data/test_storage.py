"""Shards in a bucket: a local GCS emulator (127.0.0.1 only) serves them; reads, errors, training.

    .venv/bin/python -m pytest -q tests/data/test_storage.py
"""
import json
import os
import sys

import numpy as np
import pytest

from yuanjax.data import ShardedDocuments, corpus, data_config, make_datasets
from yuanjax.data import prepare as prepare_lib
from yuanjax.data import storage
from yuanjax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = 'yuanjax-test'


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  """A tokenizer and two-shard shards directory side by side (the manifest names the tokenizer
  relatively, as the embedded default's does), in one local folder."""
  d = tmp_path_factory.mktemp('local')
  text = 'def f(x):\n    return x + 1  # comment\n\nclass A:\n    pass\n'
  tok = tokenizer_lib.train_from_documents([corpus.Document(text * 30, 'm', None, 0)],
                                           d / 'tokenizer', 320)
  docs = [corpus.Document(f'# doc {i}\n' + text * (i % 4 + 1), 'm', i, 0) for i in range(40)]
  prepare_lib.prepare_documents(tok, lambda: docs, d / 'shards', shard_tokens=600, progress=False,
                                manifest_tokenizer='../tokenizer.model')
  return str(d)


@pytest.fixture(scope='module')
def bucket(local):
  with storage.emulator(BUCKET):
    storage.upload_tree(local, f'gs://{BUCKET}/data')
    yield f'gs://{BUCKET}/data'


def test_emulator_binds_loopback_and_skips_the_grpc_probe(bucket):
  assert os.environ[storage.EMULATOR_ENV].startswith('http://127.0.0.1:')
  fs, _ = storage.filesystem(bucket)
  assert type(fs).__name__ == 'GCSFileSystem'  # not gcsfs's probing ExtendedGcsFileSystem


def test_remote_documents_equal_local(local, bucket, tmp_path):
  here = ShardedDocuments(os.path.join(local, 'shards'))
  there = ShardedDocuments(f'{bucket}/shards', cache_dir=str(tmp_path))
  assert there.remote and len(here.manifest['shards']) > 1
  assert len(there) == len(here) == 40
  for i in range(len(here)):
    np.testing.assert_array_equal(there[i], here[i])
  np.testing.assert_array_equal(there.doc_lengths(), here.doc_lengths())
  cached = [f for _, _, fs in os.walk(tmp_path / 'remote') for f in fs]
  assert sorted(cached) == sorted(s['index'] for s in here.manifest['shards'])  # no token file


def test_remote_batches_equal_local(local, bucket, tmp_path):
  batches = []
  for path in (os.path.join(local, 'shards'), f'{bucket}/shards'):
    cfg = data_config()
    cfg.update(dict(path=path, eval_fraction=0.1, cache_dir=str(tmp_path), shuffle_rows=8))
    train, make_eval, _ = make_datasets(cfg, global_batch_size=2, seq_len=32, process_index=0,
                                        process_count=1)
    batches.append([next(train) for _ in range(6)] + list(make_eval()))
    train.close()  # stop its read-ahead before the emulator stops
  for a, b in zip(*batches, strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_object_and_bucket_name_the_url(local, bucket, tmp_path):
  with pytest.raises(ValueError, match=f'{bucket}/nothing: no such directory'):
    ShardedDocuments(f'{bucket}/nothing')
  with pytest.raises(ValueError, match=f'{bucket}/shards/manifest.json/manifest.json: no such'):
    ShardedDocuments(f'{bucket}/shards/manifest.json')
  with pytest.raises(
      ValueError, match="gs://no-such-bucket-x/shards: bucket 'no-such-bucket-x' "
      'does not exist'):
    ShardedDocuments('gs://no-such-bucket-x/shards')
  storage.upload_tree(os.path.join(local, 'shards'), f'{bucket}/broken')
  fs, path = storage.filesystem(f'{bucket}/broken')
  fs.rm(f'{path}/shard_00001.bin')
  with pytest.raises(ValueError, match=f'{bucket}/broken/shard_00001.bin: missing shard file'):
    ShardedDocuments(f'{bucket}/broken', cache_dir=str(tmp_path))


def test_missing_credentials_name_the_url(monkeypatch):
  monkeypatch.delenv(storage.EMULATOR_ENV, raising=False)
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', '/nonexistent/key.json')
  storage._check_credentials.cache_clear()
  try:
    with pytest.raises(
        ValueError, match='gs://some-bucket/shards: permission denied .*no Google '
        'Cloud credentials'):
      ShardedDocuments('gs://some-bucket/shards')
  finally:
    storage._check_credentials.cache_clear()


def _train(config, workdir):
  from yuanjax import trainer
  trainer.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


def test_demo_trains_from_the_bucket_with_the_local_losses(local, bucket, tmp_path):
  sys.path.insert(0, REPO)
  import configs.demo as demo
  losses = []
  for path in (os.path.join(local, 'shards'), f'{bucket}/shards'):
    config = demo.get_config('runlocal')
    config.data.update(
        dict(path=path, cache_dir=str(tmp_path / 'cache'), eval_fraction=0.1, shuffle_rows=8))
    config.model.update(dict(vocab_size=320, num_layers=2, hidden_size=64))
    config.train.update(dict(num_steps=3, sample_tokens=0, eval_steps=1))
    losses.append(_train(config, str(tmp_path / path.replace('/', '_'))))
  assert len(losses[0]) == 3 and np.all(np.isfinite(losses[0]))
  assert losses[1] == losses[0]


def test_prepare_reads_inputs_from_the_bucket(local, bucket, tmp_path):
  lines = ''.join(json.dumps({'text': f'doc {i}\n' * (i + 1)}) + '\n' for i in range(5))
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'a.jsonl').write_text(lines)
  (tmp_path / 'in' / 'b.jsonl').write_text(lines)
  storage.upload_tree(str(tmp_path / 'in'), f'{bucket}/raw')
  tok = os.path.join(local, 'tokenizer.model')
  here = prepare_lib.prepare(tok, str(tmp_path / 'in' / '*.jsonl'), tmp_path / 'l', progress=False)
  there = prepare_lib.prepare(tok, f'{bucket}/raw/*.jsonl', tmp_path / 'r', progress=False)
  assert here['num_docs'] == there['num_docs'] == 10
  assert (tmp_path / 'l' / 'shard_00000.bin').read_bytes() == (tmp_path / 'r' /
                                                               'shard_00000.bin').read_bytes()
  with pytest.raises(ValueError, match=f'{bucket}/raw/none.jsonl: no such file'):
    prepare_lib.prepare(tok, f'{bucket}/raw/none.jsonl', tmp_path / 'x', progress=False)


def test_rewritten_object_of_the_same_size_is_fetched_again(bucket, tmp_path, monkeypatch):
  """Shards re-prepared at the same URL with the same document count: the index has the same
  size but new boundaries; the cache (keyed on the object's generation) serves the new one."""
  url = f'{bucket}/again/shard_00000.idx.npy'
  fs, path = storage.filesystem(url)
  copies = []
  for content in (b'first-index!', b'second-index'):
    with fs.open(path, 'wb') as f:
      f.write(content)
    fs.invalidate_cache()
    [info] = storage.listing(f'{bucket}/again').values()
    copies.append(storage.cached_copy(url, info, str(tmp_path)))
    assert open(copies[-1], 'rb').read() == content
  assert copies[0] != copies[1]
  assert storage.cached_copy(url, cache_dir=str(tmp_path)) == copies[1]  # info asked for: same

  def fail(_):
    raise ValueError(f'{url}: cannot read')

  monkeypatch.setattr(storage, 'read_bytes', fail)
  with fs.open(path, 'wb') as f:
    f.write(b'third-index!')
  with pytest.raises(ValueError, match='cannot read'):
    storage.cached_copy(url, cache_dir=str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'remote')) == sorted(
      os.path.basename(os.path.dirname(c)) for c in copies)  # no empty file left for the third
