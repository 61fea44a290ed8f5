"""Where data bytes live: local paths, or URLs such as `gs://BUCKET/PATH` (any fsspec protocol).

  fs, path = storage.filesystem('gs://bucket/shards')
  storage.read_range('gs://bucket/shards/shard_00000.bin', 0, 4096)

Google Cloud Storage goes through gcsfs. `STORAGE_EMULATOR_HOST` is honoured as Google's
client libraries do: requests go to that endpoint, anonymously (the tests run against the
`gcp-storage-emulator` package on 127.0.0.1). gcsfs >= 2026.3 first asks the bucket's type
(hierarchical namespace) over gRPC, which the emulator lacks, and waits out a 60 s timeout;
against an emulator we use gcsfs's plain `GCSFileSystem` (the probing subclass is only what
`gcsfs.GCSFileSystem` names while `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` is not `false`). Against
real GCS, missing Application Default Credentials are an error naming the URL (gcsfs would
otherwise fall back to anonymous access and fail later on a private bucket).

Every error is a ValueError whose message starts with the URL at fault.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath

EMULATOR_ENV = 'STORAGE_EMULATOR_HOST'


def is_url(path) -> bool:
  """True for `scheme://...` paths other than `file://` (those are read as local files)."""
  path = os.fspath(path)
  return '://' in path and not path.startswith('file://')


def join(base: str, *parts: str) -> str:
  """Joins path parts under a local directory or a URL (normalising `..`)."""
  if not is_url(base):
    return os.path.normpath(os.path.join(base, *parts))
  scheme, rest = base.split('://', 1)
  return f'{scheme}://{posixpath.normpath(posixpath.join(rest, *parts))}'


def _emulator() -> str | None:
  host = os.environ.get(EMULATOR_ENV, '')
  if host in ('', 'default'):
    return None
  return host if host.startswith(('http://', 'https://')) else f'http://{host}'


@functools.cache
def _check_credentials() -> None:
  import google.auth
  import google.auth.exceptions
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise PermissionError(f'no Google Cloud credentials ({e}); run `gcloud auth '
                          'application-default login` or set GOOGLE_APPLICATION_CREDENTIALS') from e


def filesystem(url: str):
  """`(fsspec filesystem, path within it)` for a URL or a local path."""
  import fsspec
  url = os.fspath(url)
  if not url.startswith(('gs://', 'gcs://')):
    return fsspec.core.url_to_fs(url)
  from gcsfs import core as gcsfs_core
  emulator = _emulator()
  if emulator:
    fs = gcsfs_core.GCSFileSystem(token='anon', endpoint_url=emulator)
  else:
    with errors(url):
      _check_credentials()
    fs = fsspec.filesystem('gs')
  return fs, fs._strip_protocol(url)


def _bucket_exists(fs, path: str) -> bool:
  try:
    return fs.exists(path.split('/', 1)[0])
  except OSError:
    return True  # cannot tell: report the object


@contextlib.contextmanager
def errors(url: str, what: str = 'object'):
  """Turns storage errors raised inside into ValueErrors that start with `url`."""
  try:
    yield
  except FileNotFoundError as e:
    if is_url(url):
      fs, path = filesystem(url)
      if not _bucket_exists(fs, path):
        raise ValueError(f"{url}: bucket {path.split('/', 1)[0]!r} does not exist") from e
    raise ValueError(f'{url}: no such {what}') from e
  except PermissionError as e:
    raise ValueError(f'{url}: permission denied ({e})') from e
  except OSError as e:
    raise ValueError(f'{url}: cannot read ({e})') from e


def listing(url: str) -> dict[str, dict]:
  """`{name: fsspec info}` of the objects directly under `url` (one request); each info's
  `size` is an int."""
  fs, path = filesystem(url)
  with errors(url, 'directory'):
    entries = fs.ls(path, detail=True)
  if not entries and not fs.exists(path):
    raise ValueError(f'{url}: no such directory')
  return {
      posixpath.basename(e['name'].rstrip('/')): dict(e, size=int(e['size'] or 0)) for e in entries
  }


def read_bytes(url: str) -> bytes:
  fs, path = filesystem(url)
  with errors(url):
    return fs.cat_file(path)


def read_range(fs, path: str, start: int, stop: int) -> bytes:
  """Bytes `[start, stop)` of one object: one ranged request."""
  return fs.cat_file(path, start=start, end=stop)


def cache_root(cache_dir: str | None = None) -> str:
  return os.path.expanduser(cache_dir or os.environ.get('YUANJAX_CACHE') or '~/.cache/yuanjax')


# What tells two versions of one object apart, most specific first (GCS: generation; S3: ETag).
_VERSION_KEYS = ('generation', 'md5Hash', 'etag', 'ETag', 'mtime', 'LastModified', 'updated')


def cached_copy(url: str, info: dict | None = None, cache_dir: str | None = None) -> str:
  """A local copy of a small object (an index, a tokenizer), downloaded once per version.

  Keyed by the URL, the object's version (its generation, else md5/etag/mtime, from `info`: an
  fsspec info or listing entry, asked for when None), its size and the emulator endpoint: an
  object rewritten at the same URL with the same size is fetched again. Written by an atomic
  rename once the read succeeded, so concurrent processes are safe."""
  if info is None:
    fs, path = filesystem(url)
    with errors(url):
      info = fs.info(path)
  version = next((info[k] for k in _VERSION_KEYS if info.get(k) is not None), None)
  size = int(info['size'])
  key = hashlib.sha256(f'{url}|{version}|{size}|{_emulator()}'.encode()).hexdigest()[:24]
  local = os.path.join(cache_root(cache_dir), 'remote', key, posixpath.basename(url))
  if os.path.isfile(local) and os.path.getsize(local) == size:
    return local
  data = read_bytes(url)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f'{local}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, local)
  return local


def upload_tree(local_dir: str, url: str) -> None:
  """Copies a local directory tree to `url` (e.g. prepared shards into a bucket)."""
  fs, path = filesystem(url)
  with errors(url, 'destination'):
    fs.put(os.path.join(os.path.abspath(local_dir), ''), path, recursive=True)


@contextlib.contextmanager
def emulator(bucket: str, port: int = 0):
  """Runs `gcp-storage-emulator` (in memory, on 127.0.0.1 only) with `bucket` created, and points
  `STORAGE_EMULATOR_HOST` at it; stops it and restores the environment on exit. For tests and
  benchmarks (needs the `gcs` extra)."""
  import socket
  import subprocess
  import sys
  import tempfile
  import time
  if not port:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
  log = tempfile.TemporaryFile()  # a file, not a pipe: the emulator logs every request
  proc = subprocess.Popen([
      sys.executable, '-m', 'gcp_storage_emulator', 'start', '--host=127.0.0.1', f'--port={port}',
      '--in-memory', f'--default-bucket={bucket}'
  ], stdout=log, stderr=subprocess.STDOUT)
  old = os.environ.get(EMULATOR_ENV)
  try:
    deadline = time.monotonic() + 30
    while True:
      with contextlib.suppress(OSError), socket.create_connection(('127.0.0.1', port), 0.2):
        break
      if proc.poll() is not None or time.monotonic() > deadline:
        log.seek(0)
        raise RuntimeError(f'gcp-storage-emulator did not start: {log.read()[-2000:]!r}')
      time.sleep(0.1)
    os.environ[EMULATOR_ENV] = f'http://127.0.0.1:{port}'
    yield os.environ[EMULATOR_ENV]
  finally:
    proc.terminate()
    proc.wait(10)
    log.close()
    if old is None:
      os.environ.pop(EMULATOR_ENV, None)
    else:
      os.environ[EMULATOR_ENV] = old
