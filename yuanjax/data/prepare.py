"""Token shards on disk: writing them (`prepare`), reading them, and the embedded default.

Write shards from .txt files (one document each) and .jsonl files (one document per line):

  python -m yuanjax.data prepare --tokenizer out/tok.model --input 'corpus/*.jsonl' \
      --output out/shards
  python -m yuanjax.data default            # build (once) and print the embedded default

Layout of a shards directory:

  manifest.json           format, tokenizer, vocab_size, eod_id, newline_token, counts, shards
  shard_00000.bin         flat uint32 tokens; every document is followed by <eod>
  shard_00000.idx.npy     int64 document start offsets into the .bin, plus the end (n_docs + 1)
  ...

Documents never span shards; a shard is closed once it holds `shard_tokens` tokens or more.
Empty documents (`""` in a jsonl line) are skipped and counted (`num_skipped_empty`), and
so are documents that are not valid UTF-8 (a .txt file or a jsonl line;
`num_skipped_invalid`): the CLI prints both counts at the end.

Guarantees: every input is validated (missing file, bad JSON, missing `text` field, empty file)
before anything is written, and the error names the file and line. Shards are written into a
temporary sibling directory that is renamed into place only when complete, so an output
directory that exists is always whole. Memory is bounded: documents are streamed and shards are
flushed as they fill.

Embedded default: `ensure_default_data` trains a tokenizer on the running Python's
standard library (`corpus.stdlib_sources`) and prepares shards, once, cached under
`$YUANJAX_CACHE` (default `~/.cache/yuanjax`) in a directory keyed by Python version,
vocab size and byte cap. Concurrent callers are safe: a lock file serialises builders, and the
result is published by one atomic rename.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from yuanjax import publish
from yuanjax.data import corpus, storage
from yuanjax.data.tokenizer import Tokenizer, train_from_documents

log = logging.getLogger(__name__)
FORMAT = 'yuanjax-shards-v1'
SFT_FORMAT = 'yuanjax-shards-v2'  # v1 + a loss mask per shard (yuanjax.data.sft)
MANIFEST = 'manifest.json'
TOKEN_DTYPE = np.uint32
INDEX_DTYPE = np.int64
DEFAULT_SHARD_TOKENS = 1 << 27  # 512 MiB of uint32 per shard
_ENCODE_BATCH_BYTES = 1 << 20  # text per encoding task (one SentencePiece call)


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def tokenizer_fingerprint(tokenizer_path: str, vocab_size: int) -> dict:
  """What identifies a tokenizer in a manifest: its vocabulary size and the sha256 of its model
  file. Shards whose manifest records another fingerprint were made with another tokenizer."""
  return dict(vocab_size=vocab_size, tokenizer_sha256=_file_sha256(tokenizer_path))


def make_manifest(tok: Tokenizer, tokenizer: str, shards: list[dict], skipped: dict,
                  **layout) -> dict:
  """A shards directory's manifest: the tokenizer (`tokenizer` is the path recorded; `tok` the
  model read), the shards and their totals, the documents `skipped` (`empty`, `invalid`), and
  how shards were cut (`layout`: `cut` and its settings, the input's)."""
  return dict(
      format=FORMAT,
      tokenizer=tokenizer,
      **tokenizer_fingerprint(tok.model_path, tok.vocab_size),
      eod_id=tok.eod_id,
      newline_token=tok.newline_token,
      dtype=np.dtype(TOKEN_DTYPE).name,
      num_docs=sum(s['num_docs'] for s in shards),
      num_tokens=sum(s['num_tokens'] for s in shards),
      num_skipped_empty=skipped['empty'],
      num_skipped_invalid=skipped['invalid'],
      shards=shards,
      **layout,
  )


def manifest_fingerprint(manifest: dict) -> dict:
  return {k: manifest.get(k) for k in ('vocab_size', 'tokenizer_sha256')}


class _ShardWriter:
  """Appends documents to `shard_NNNNN.bin` files, rolling over at `shard_tokens`."""

  def __init__(self, out_dir: str, shard_tokens: int):
    self.out_dir, self.shard_tokens = out_dir, shard_tokens
    self.shards: list[dict] = []
    self._file = None

  def _open(self):
    name = f'shard_{len(self.shards):05d}'
    self._name = name
    self._file = open(os.path.join(self.out_dir, name + '.bin'), 'wb')
    self._offsets = [0]

  def add(self, ids: np.ndarray):
    if self._file is None:
      self._open()
    self._file.write(ids.tobytes())
    self._offsets.append(self._offsets[-1] + len(ids))
    if self._offsets[-1] >= self.shard_tokens:
      self.close()

  def close(self):
    if self._file is None:
      return
    self._file.close()
    self._file = None
    np.save(os.path.join(self.out_dir, self._name + '.idx.npy'),
            np.asarray(self._offsets, INDEX_DTYPE))
    self.shards.append(
        dict(tokens=self._name + '.bin', index=self._name + '.idx.npy',
             num_docs=len(self._offsets) - 1, num_tokens=int(self._offsets[-1])))


def encode_texts(tok: Tokenizer, texts: list[str], num_threads: int):
  """(flat uint32 tokens with `<eod>` after each text, per-text lengths) of one batch."""
  ids = [np.asarray(x + [tok.eod_id], TOKEN_DTYPE) for x in tok.encode_batch(texts, num_threads)]
  return np.concatenate(ids), np.asarray([len(x) for x in ids], np.int64)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str, newline_token: str | None):
  global _worker_tokenizer
  _worker_tokenizer = Tokenizer(tokenizer_path, newline_token=newline_token)


def _encode_in_worker(texts: list[str]):
  return encode_texts(_worker_tokenizer, texts, 1)


def _encoded(batches: Iterable[list[str]], tok: Tokenizer, newline_token: str | None,
             workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`encode_texts` of every batch, in order, on `workers` cores: 1 here, on one thread; more
  in that many processes, each encoding ahead (at most 2 batches each in flight, so memory
  stays bounded)."""
  if workers == 1:
    yield from (encode_texts(tok, texts, 1) for texts in batches)
    return
  ctx = multiprocessing.get_context('spawn')  # no fork of a process that may hold JAX threads
  with ctx.Pool(workers, _init_worker, (tok.model_path, newline_token)) as pool:
    pending = collections.deque()
    for texts in batches:
      pending.append(pool.apply_async(_encode_in_worker, (texts,)))
      if len(pending) >= 2 * workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


def text_batches(docs: Iterable[corpus.Document], counts: dict, bar) -> Iterator[list[str]]:
  """The non-empty, valid texts of `docs` in batches of about `_ENCODE_BATCH_BYTES`; empty and
  invalid documents are counted in `counts` (the first few invalid ones logged)."""
  batch, batch_bytes = [], 0
  for doc in docs:
    if doc.error:
      counts['invalid'] += 1
      if counts['invalid'] <= 5:
        log.warning('%s: %s; skipped', doc.where, doc.error)
    elif not doc.text:
      counts['empty'] += 1
    else:
      batch.append(doc.text)
      batch_bytes += len(doc.text)
      if batch_bytes >= _ENCODE_BATCH_BYTES:
        yield batch
        batch, batch_bytes = [], 0
    bar.update(doc.nbytes)
  if batch:
    yield batch


def default_workers() -> int:
  """The cores this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def prepare_documents(
    tokenizer_path: str,
    documents: Callable[[], Iterable[corpus.Document]],
    output_dir: str | os.PathLike,
    *,
    newline_token: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
    manifest_tokenizer: str | None = None,
    extra: dict | None = None,
    workers: int = 1,
) -> dict:
  """Tokenizes `documents()` into shards in `output_dir`; returns the manifest.

  `documents` is called twice: a validation pass (nothing written yet) and the writing pass.
  `workers` processes encode (the output is byte-identical for any number).
  `manifest_tokenizer` overrides the tokenizer path recorded in the manifest (relative paths
  are resolved against the shards directory when read)."""
  output_dir = os.path.abspath(os.fspath(output_dir))
  if shard_tokens < 1:
    raise ValueError(f'shard_tokens must be positive, got {shard_tokens}')
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
    raise ValueError(f'workers must be a positive integer, got {workers!r}')
  tok = Tokenizer(tokenizer_path, newline_token=newline_token)
  if os.path.exists(output_dir) and not overwrite:
    raise ValueError(
        f'{output_dir}: already exists (pass overwrite=True / --overwrite to replace it)')

  # Pass 1: validate everything before writing anything.
  total_bytes = num_docs = 0
  for doc in documents():
    total_bytes += doc.nbytes
    num_docs += bool(doc.text)
  if num_docs == 0:
    raise corpus.InputError('no non-empty documents in the input')

  def write(tmp):
    writer = _ShardWriter(tmp, shard_tokens)
    counts = dict(empty=0, invalid=0)
    bar = tqdm.tqdm(total=total_bytes, unit='B', unit_scale=True, desc='prepare',
                    disable=not progress)
    batches = text_batches(documents(), counts, bar)
    for flat, lengths in _encoded(batches, tok, newline_token, workers):
      for start, stop in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
        writer.add(flat[start:stop])
    writer.close()
    bar.close()

    manifest = make_manifest(
        tok,
        manifest_tokenizer or os.path.abspath(tokenizer_path),
        writer.shards,
        counts,
        cut='tokens',  # a shard closes at shard_tokens tokens or more (beam_prepare: by files)
        shard_tokens=shard_tokens,
        **(extra or {}))
    with open(os.path.join(tmp, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)
    return manifest

  return publish.directory(output_dir, write, overwrite=overwrite)


def prepare(
    tokenizer_path: str,
    inputs: str | Sequence[str],
    output_dir: str | os.PathLike,
    *,
    text_key: str = 'text',
    txt_format: str = 'document',
    **kwargs,
) -> dict:
  """Tokenizes files or globs (local or URLs; formats in `corpus`) into shards (see
  `prepare_documents`)."""
  if txt_format not in corpus.TXT_FORMATS:
    raise corpus.InputError(f'txt_format={txt_format!r}: expected one of {corpus.TXT_FORMATS}')
  files = corpus.expand_inputs(inputs)
  return prepare_documents(
      tokenizer_path,
      lambda: corpus.read_documents(files, text_key, skip_invalid=True, txt_format=txt_format),
      output_dir,
      extra=dict(text_key=text_key, txt_format=txt_format, num_inputs=len(files)),
      **kwargs,
  )


def load_manifest(shards_dir: str | os.PathLike) -> dict:
  """Reads and checks `manifest.json` (a local directory or a URL); raises ValueError naming
  the directory or file."""
  shards_dir = os.fspath(shards_dir)
  path = storage.join(shards_dir, MANIFEST)
  if storage.is_url(shards_dir):
    names = storage.listing(shards_dir)
    if MANIFEST not in names:
      raise ValueError(f'data.path: {path}: no such object (not a prepared shards directory?)')
    text = storage.read_bytes(path)
  else:
    if not os.path.isdir(shards_dir):
      raise ValueError(f'data.path: {shards_dir}: no such directory')
    if not os.path.isfile(path):
      raise ValueError(f'data.path: {path}: no such file (not a prepared shards directory?)')
    try:
      with open(path, 'rb') as f:
        text = f.read()
    except OSError as e:
      raise ValueError(f'{path}: unreadable manifest ({e})') from e
  try:
    manifest = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: unreadable manifest ({e})') from e
  if manifest.get('format') not in (FORMAT, SFT_FORMAT):
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} or "
                     f'{SFT_FORMAT!r}')
  return manifest


def manifest_tokenizer_path(shards_dir: str, manifest: dict) -> str:
  """The manifest's tokenizer path, relative paths resolved against the shards directory."""
  if storage.is_url(shards_dir) and os.path.isabs(manifest['tokenizer']):
    return manifest['tokenizer']  # a path on the machine that prepared the shards
  return storage.join(shards_dir, manifest['tokenizer'])


class _RemoteTokens:
  """A token file in a bucket, read by ranged requests (`tokens[a:b]`); never opened whole."""

  def __init__(self, url: str, dtype: str, nbytes: int):
    self.url, self.dtype, self.itemsize = url, np.dtype(dtype), np.dtype(dtype).itemsize
    self._len = nbytes // self.itemsize
    self._fs = None

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, s: slice) -> np.ndarray:
    if self._fs is None:  # opened by the first read: a process touches only what it reads
      self._fs, self._path = storage.filesystem(self.url)
    with storage.errors(self.url):
      raw = storage.read_range(self._fs, self._path,
                               int(s.start) * self.itemsize,
                               int(s.stop) * self.itemsize)
    return np.frombuffer(raw, self.dtype)


class ShardedDocuments:
  """Random access to the documents of a shards directory (a grain data source).

  `docs[i]` is document `i` (global order: shard by shard) as an int32 array that ends
  with `<eod>`. Local token files are memory-mapped; in a bucket (`gs://...`) a document is
  one ranged read and the index files are copied once into the local cache (`cache_dir`,
  default `$YUANJAX_CACHE`). Nothing is read until asked for. A token file whose size is not a
  whole number of tokens, or that disagrees with its index, is an error at open; a document
  holding a token id >= the manifest's `vocab_size` is an error when read (both name the
  file)."""

  def __init__(self, shards_dir: str | os.PathLike, cache_dir: str | None = None):
    shards_dir = os.fspath(shards_dir)
    self.remote = storage.is_url(shards_dir)
    self.path = shards_dir.rstrip('/') if self.remote else os.path.abspath(shards_dir)
    self.manifest = load_manifest(self.path)
    objects = storage.listing(self.path) if self.remote else None
    self._tokens, self._offsets, self._masks = [], [], []
    for shard in self.manifest['shards']:
      tokens, offsets = self._open_shard(shard, objects, cache_dir)
      if len(offsets) != shard['num_docs'] + 1 or offsets[-1] != len(tokens):
        raise ValueError(f"{storage.join(self.path, shard['tokens'])}: size does not match its "
                         f'index / {MANIFEST}')
      self._tokens.append(tokens)
      self._offsets.append(offsets)
      if 'loss_mask' in shard:  # SFT shards (yuanjax.data.sft): 1 byte per token
        mask = storage.join(self.path, shard['loss_mask'])
        if self.remote:
          mask = storage.cached_copy(mask, objects[shard['loss_mask']], cache_dir)
        self._masks.append(np.memmap(mask, np.uint8, 'r'))
        if len(self._masks[-1]) != len(tokens):
          raise ValueError(f"{mask}: size does not match {shard['tokens']}")
    self._first_doc = np.cumsum([0] + [s['num_docs'] for s in self.manifest['shards']])

  def _open_shard(self, shard: dict, objects: dict | None, cache_dir: str | None):
    """(tokens, offsets) of one shard, after checking its files exist and hold whole tokens
    (`objects`: the remote directory's listing)."""
    tokens_path, index_path = (storage.join(self.path, shard[k]) for k in ('tokens', 'index'))
    for name, p in ((shard['tokens'], tokens_path), (shard['index'], index_path)):
      if not (name in objects if self.remote else os.path.isfile(p)):
        raise ValueError(f'{p}: missing shard file (listed in {MANIFEST})')
    nbytes = objects[shard['tokens']]['size'] if self.remote else os.path.getsize(tokens_path)
    dtype = self.manifest['dtype']
    if nbytes % np.dtype(dtype).itemsize:
      raise ValueError(f'{tokens_path}: {nbytes} bytes is not a whole '
                       f'number of {dtype} tokens (truncated or corrupt)')
    if not self.remote:
      return np.memmap(tokens_path, dtype=dtype, mode='r'), np.load(index_path, mmap_mode='r')
    local_index = storage.cached_copy(index_path, objects[shard['index']], cache_dir)
    return _RemoteTokens(tokens_path, dtype, nbytes), np.load(local_index)

  def __len__(self) -> int:
    return int(self._first_doc[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'document {index} out of range [0, {len(self)})')
    shard = int(np.searchsorted(self._first_doc, index, side='right')) - 1
    local = index - self._first_doc[shard]
    start, stop = self._offsets[shard][local], self._offsets[shard][local + 1]
    doc = self._tokens[shard][start:stop]
    if doc.size and int(doc.max()) >= self.manifest['vocab_size']:
      raise ValueError(f"{storage.join(self.path, self.manifest['shards'][shard]['tokens'])}: "
                       f'document {local} holds token id {int(doc.max())} >= vocab_size='
                       f"{self.manifest['vocab_size']} ({MANIFEST}); the shard is corrupt "
                       'or was written with another tokenizer')
    return doc.astype(np.int32)

  def loss_mask(self, index: int) -> np.ndarray:
    """1 where document `index`'s token is scored (SFT shards, yuanjax.data.sft)."""
    shard = int(np.searchsorted(self._first_doc, index, side='right')) - 1
    local = index - self._first_doc[shard]
    return self._masks[shard][self._offsets[shard][local]:self._offsets[shard][local + 1]]

  @property
  def loss_masked(self) -> bool:
    return bool(self._masks)

  def doc_lengths(self) -> np.ndarray:
    """Token count (`<eod>` included) of every document, int64 [num_docs]."""
    return np.concatenate([np.diff(np.asarray(o)) for o in self._offsets])

  def __repr__(self) -> str:
    return (f'ShardedDocuments({self.path!r}, docs={len(self)}, '
            f"tokens={self.manifest['num_tokens']})")


# --------------------------------------------------------------------------- embedded default


def default_data_key(vocab_size: int, max_bytes: int) -> str:
  return f'stdlib-py{platform.python_version()}-v{vocab_size}-b{max_bytes}-{FORMAT}'


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive advisory lock (no-op where fcntl is unavailable; the rename stays atomic)."""
  try:
    import fcntl
  except ImportError:  # pragma: no cover - non-POSIX
    yield
    return
  with open(path, 'a+') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_default_data(
    cache_dir: str | None = None,
    vocab_size: int = 4096,
    max_bytes: int = 8_000_000,
    *,
    progress: bool = False,
) -> tuple[str, str]:
  """Builds (once) the embedded default: a tokenizer and shards from the Python stdlib.

  Returns `(tokenizer_path, shards_dir)` under `<cache>/<key>/` where the cache is
  `cache_dir` or `$YUANJAX_CACHE` or `~/.cache/yuanjax` and the key includes the Python
  version, `vocab_size` and `max_bytes`. Safe to call from many processes at once."""
  root = storage.cache_root(cache_dir)
  key = default_data_key(vocab_size, max_bytes)
  final = os.path.join(root, key)
  result = (os.path.join(final, 'tokenizer.model'), os.path.join(final, 'shards'))
  if os.path.isfile(os.path.join(result[1], MANIFEST)):
    return result
  os.makedirs(root, exist_ok=True)
  with _file_lock(os.path.join(root, f'.{key}.lock')):
    if os.path.isfile(os.path.join(result[1], MANIFEST)):  # another process built it meanwhile
      return result
    t0 = time.perf_counter()
    files = corpus.stdlib_sources(max_bytes)

    def write(tmp):
      model = train_from_documents(corpus.stdlib_documents(files), os.path.join(tmp, 'tokenizer'),
                                   vocab_size)
      prepare_documents(
          model,
          lambda: corpus.stdlib_documents(files),
          os.path.join(tmp, 'shards'),
          progress=progress,
          manifest_tokenizer='../tokenizer.model',
          extra=dict(source='python-stdlib', stdlib=corpus.stdlib_root(), num_inputs=len(files),
                     max_bytes=max_bytes, build_seconds=None),
      )
      mpath = os.path.join(tmp, 'shards', MANIFEST)
      with open(mpath) as f:
        manifest = json.load(f)
      manifest['build_seconds'] = round(time.perf_counter() - t0, 2)
      with open(mpath, 'w') as f:
        json.dump(manifest, f, indent=1)

    publish.directory(final, write, keep_existing=True)  # lost a race: the other copy is kept
  return result
