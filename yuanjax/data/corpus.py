"""Raw text inputs: expanding file arguments, reading documents, the embedded default corpus.

Input formats, chosen by extension (local files or URLs such as `gs://BUCKET/*.parquet`):

* `.txt`   one document per file (the whole file, decoded as UTF-8); or, with
  `txt_format='yuan'`, Yuan's format: one document per line, `<n>` standing for a newline;
* `.jsonl`, `.jsonl.gz`, `.jsonl.zst` one document per line: a JSON object whose `text_key`
  field (default `text`) holds the document. Blank lines are skipped.
* `.parquet` (what HF datasets ship) the `text_key` column, one document per row (a null is
  skipped and counted, like a document that is not UTF-8).

Every problem is reported as `InputError` (a `ValueError`) whose message starts with the
file (and line) at fault, e.g. `data/a.jsonl:17: no 'text' field`.

The embedded default corpus (`stdlib_sources`) is the `*.py` source of the running
Python's own standard library: every machine has it and nothing is downloaded.

  python -c "from yuanjax.data import corpus; print(len(corpus.stdlib_sources()))"
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import io
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence

from yuanjax.data import storage

SUFFIXES = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')
TXT_FORMATS = ('document', 'yuan')  # .txt: a document per file, or Yuan's document per line
YUAN_NEWLINE = '<n>'

# Standard-library directories left out of the default corpus: tests (large, repetitive, some
# deliberately malformed), vendored third-party code and caches.
_SKIP_DIRS = frozenset({
    'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__'
})


class InputError(ValueError):
  """Bad input data; the message names the file (and line) at fault."""


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  path: str
  line: int | None  # 1-based line (row for .parquet) number, None for a whole-file .txt
  nbytes: int  # size of the raw record on disk (for progress bars)
  error: str | None = None  # why the record was skipped (read_documents(skip_invalid=True))

  @property
  def where(self) -> str:
    return self.path if self.line is None else f'{self.path}:{self.line}'


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
  """Expands files and glob patterns (`**` allowed) into a sorted, de-duplicated file list.

  Raises InputError naming the argument when a path does not exist, a pattern matches no
  file, or a file has an unsupported extension."""
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  inputs = [os.fspath(x) for x in inputs]
  if not inputs:
    raise InputError('no input files given')
  files: list[str] = []
  for arg in inputs:
    if storage.is_url(arg):
      files.extend(_expand_url(arg))
    elif glob.has_magic(arg):
      matched = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
      if not matched:
        raise InputError(f'{arg}: pattern matches no file')
      files.extend(matched)
    elif os.path.isfile(arg):
      files.append(arg)
    elif os.path.isdir(arg):
      raise InputError(f"{arg}: is a directory; pass files or a glob like '{arg}/**/*.jsonl'")
    else:
      raise InputError(f'{arg}: no such file')
  for path in files:
    if not path.endswith(SUFFIXES):
      raise InputError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
  return list(dict.fromkeys(files))


def _expand_url(arg: str) -> list[str]:
  fs, path = storage.filesystem(arg)
  with storage.errors(arg, 'file'):
    if glob.has_magic(arg):
      matched = sorted(fs.unstrip_protocol(p) for p in fs.glob(path) if fs.isfile(p))
      if not matched:
        raise InputError(f'{arg}: pattern matches no file')
      return matched
    if not fs.isfile(path):
      raise InputError(f'{arg}: no such file')
  return [arg]


@contextlib.contextmanager
def _open(path: str):
  """A binary file object over `path` (local or URL), decompressed for .gz / .zst."""
  try:
    if storage.is_url(path):
      fs, p = storage.filesystem(path)
      f = fs.open(p, 'rb')
    else:
      f = open(path, 'rb')
  except (OSError, ValueError) as e:
    raise InputError(f'{path}: cannot read ({getattr(e, "strerror", None) or e})') from e
  with f:
    if path.endswith('.gz'):
      yield gzip.GzipFile(fileobj=f)
    elif path.endswith('.zst'):
      import zstandard
      yield io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))
    else:
      yield f


@contextlib.contextmanager
def _reading(path: str):
  """Errors while reading (a truncated or corrupt compressed file) name the file."""
  try:
    yield
  except InputError:
    raise
  except (OSError, EOFError) as e:
    raise InputError(f'{path}: cannot read ({e})') from e
  except Exception as e:
    if type(e).__module__.split('.')[0] in ('zstandard', 'pyarrow'):
      raise InputError(f'{path}: cannot read ({e})') from e
    raise


def _invalid_text(text: str) -> str | None:
  """Why `text` cannot be written as UTF-8 (lone surrogates from JSON escapes), or None."""
  if text.isascii():
    return None
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    return f'not UTF-8 ({e.reason})'
  return None


def read_documents(files: Sequence[str], text_key: str = 'text', skip_invalid: bool = False,
                   txt_format: str = 'document') -> Iterator[Document]:
  """Yields the documents of `files` in order, streaming (one document in memory at a time).

  Raises InputError for unreadable or undecodable files, a file holding no document, bad
  JSON, or a JSON line (parquet file) without a string `text_key` field (column). Empty
  documents (`""` in a jsonl line) are yielded too; callers decide what to do with them. With
  `skip_invalid`, a document that is not valid UTF-8 (a .txt file or a line) or a null parquet
  value is yielded with empty text and `error` set instead of raising."""
  if txt_format not in TXT_FORMATS:
    raise InputError(f'txt_format={txt_format!r}: expected one of {TXT_FORMATS}')
  for path in files:
    with _reading(path):
      if path.endswith('.parquet'):
        yield from _check_found(path, _read_parquet(path, text_key, skip_invalid))
      elif path.endswith('.txt') and txt_format == 'yuan':
        yield from _check_found(path, _read_lines(path, _yuan_record, skip_invalid))
      elif path.endswith('.txt'):
        yield _read_txt(path, skip_invalid)
      else:
        parse = lambda raw, where: _json_record(raw, where, text_key)
        yield from _check_found(path, _read_lines(path, parse, skip_invalid))


def _read_txt(path: str, skip_invalid: bool) -> Document:
  with _open(path) as f:
    raw = f.read()
  if not raw:
    raise InputError(f'{path}: empty file')
  try:
    return Document(raw.decode('utf-8'), path, None, len(raw))
  except UnicodeDecodeError as e:
    if not skip_invalid:
      raise InputError(f'{path}: not UTF-8 ({e.reason} at byte {e.start})') from e
    return Document('', path, None, len(raw), f'not UTF-8 ({e.reason} at byte {e.start})')


def _check_found(path: str, docs: Iterator[Document]) -> Iterator[Document]:
  found = False
  for doc in docs:
    found = True
    yield doc
  if not found:
    raise InputError(f'{path}: no documents (empty file)')


def _json_record(raw: bytes, where: str, text_key: str) -> str:
  """The text of one jsonl line (UnicodeDecodeError for bytes that are not UTF-8)."""
  try:
    record = json.loads(raw)
  except json.JSONDecodeError as e:
    raise InputError(f'{where}: invalid JSON ({e.msg}, column {e.colno})') from e
  if not isinstance(record, dict) or text_key not in record:
    raise InputError(f'{where}: no {text_key!r} field')
  text = record[text_key]
  if not isinstance(text, str):
    raise InputError(f'{where}: field {text_key!r} is {type(text).__name__}, not a string')
  return text


def _yuan_record(raw: bytes, where: str) -> str:
  """One line of Yuan's format: `<n>` stands for a newline inside the document."""
  del where
  return raw.rstrip(b'\r\n').decode('utf-8').replace(YUAN_NEWLINE, '\n')


def _read_lines(path: str, parse, skip_invalid: bool) -> Iterator[Document]:
  """One document per non-blank line, its text `parse(raw line, 'file:line')`."""
  with _open(path) as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        text = parse(raw, where)
      except UnicodeDecodeError as e:
        if not skip_invalid:
          raise InputError(f'{where}: not UTF-8 ({e.reason})') from e
        yield Document('', path, lineno, len(raw), f'not UTF-8 ({e.reason})')
        continue
      yield _checked(text, path, lineno, len(raw), skip_invalid)


def _checked(text: str, path: str, line: int, nbytes: int, skip_invalid: bool) -> Document:
  invalid = _invalid_text(text)
  if invalid and not skip_invalid:
    raise InputError(f'{path}:{line}: {invalid}')
  return Document('' if invalid else text, path, line, nbytes, invalid)


def _read_parquet(path: str, text_key: str, skip_invalid: bool) -> Iterator[Document]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  with _open(path) as f:
    try:
      pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
      raise InputError(f'{path}: not a parquet file ({e})') from e
    schema = pf.schema_arrow
    if text_key not in schema.names:
      raise InputError(f'{path}: no {text_key!r} column (columns: {", ".join(schema.names)})')
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise InputError(f'{path}: column {text_key!r} is {kind}, not a string')
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
      for text in batch.column(0).to_pylist():
        row += 1
        if text is None:
          if not skip_invalid:
            raise InputError(f'{path}:{row}: {text_key!r} is null')
          yield Document('', path, row, 0, f'{text_key!r} is null')
        else:
          yield _checked(text, path, row, len(text.encode()), skip_invalid)


def stdlib_root() -> str:
  """The running Python's standard-library directory."""
  return sysconfig.get_paths()['stdlib']


def stdlib_sources(max_bytes: int = 8_000_000, root: str | None = None) -> list[str]:
  """The embedded default corpus: standard-library `*.py` files, sorted, capped in bytes.

  Files are taken in sorted path order (deterministic on a given Python build), skipping test
  directories, site-packages, empty files and files that are not UTF-8, until the total size
  reaches `max_bytes` (the file that crosses the cap is included)."""
  if max_bytes <= 0:
    raise ValueError(f'max_bytes must be positive, got {max_bytes}')
  root = root or stdlib_root()
  candidates = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith('.'))
    candidates.extend(os.path.join(dirpath, n) for n in filenames if n.endswith('.py'))
  files, total = [], 0
  for path in sorted(candidates):
    try:
      with open(path, 'rb') as f:
        raw = f.read()
      raw.decode('utf-8')
    except (OSError, UnicodeDecodeError):
      continue
    if not raw.strip():
      continue
    files.append(path)
    total += len(raw)
    if total >= max_bytes:
      break
  if not files:
    raise InputError(f'{root}: no usable *.py files for the default corpus')
  return files


def stdlib_documents(files: Sequence[str]) -> Iterator[Document]:
  """Reads standard-library `.py` files as one document each."""
  for path in files:
    with open(path, 'rb') as f:
      raw = f.read()
    yield Document(raw.decode('utf-8'), path, None, len(raw))
