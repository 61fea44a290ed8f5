"""Raw text inputs: expanding file arguments, reading documents, the embedded default corpus.

Two input formats, chosen by extension:

* `.txt`   one document per file (the whole file, decoded as UTF-8);
* `.jsonl` one document per line: a JSON object whose `text_key` field (default `text`)
  holds the document. Blank lines are skipped.

Every problem is reported as `InputError` (a `ValueError`) whose message starts with the
file (and line) at fault, e.g. `data/a.jsonl:17: no 'text' field`.

The embedded default corpus (`stdlib_sources`) is the `*.py` source of the running
Python's own standard library: every machine has it and nothing is downloaded.

  python -c "from yuanjax.data import corpus; print(len(corpus.stdlib_sources()))"
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence

SUFFIXES = ('.txt', '.jsonl')

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
  line: int | None  # 1-based line number for .jsonl, None for .txt
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
    if glob.has_magic(arg):
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


def _invalid_text(text: str) -> str | None:
  """Why `text` cannot be written as UTF-8 (lone surrogates from JSON escapes), or None."""
  if text.isascii():
    return None
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    return f'not UTF-8 ({e.reason})'
  return None


def read_documents(files: Sequence[str], text_key: str = 'text',
                   skip_invalid: bool = False) -> Iterator[Document]:
  """Yields the documents of `files` in order, streaming (one document in memory at a time).

  Raises InputError for unreadable or undecodable files, a file holding no document, bad
  JSON, or a JSON line without a string `text_key` field. Empty documents (`""` in a
  jsonl line) are yielded too; callers decide what to do with them. With `skip_invalid`, a
  document that is not valid UTF-8 (a .txt file or a jsonl line) is yielded with empty text
  and `error` set instead of raising."""
  for path in files:
    if path.endswith('.txt'):
      try:
        with open(path, 'rb') as f:
          raw = f.read()
      except OSError as e:
        raise InputError(f'{path}: cannot read ({e.strerror or e})') from e
      if not raw:
        raise InputError(f'{path}: empty file')
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        if not skip_invalid:
          raise InputError(f'{path}: not UTF-8 ({e.reason} at byte {e.start})') from e
        yield Document('', path, None, len(raw), f'not UTF-8 ({e.reason} at byte {e.start})')
        continue
      yield Document(text, path, None, len(raw))
    else:
      yield from _read_jsonl(path, text_key, skip_invalid)


def _read_jsonl(path: str, text_key: str, skip_invalid: bool = False) -> Iterator[Document]:
  found = False
  try:
    f = open(path, 'rb')
  except OSError as e:
    raise InputError(f'{path}: cannot read ({e.strerror or e})') from e
  with f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        record = json.loads(raw)
      except UnicodeDecodeError as e:
        if not skip_invalid:
          raise InputError(f'{where}: not UTF-8 ({e.reason})') from e
        found = True
        yield Document('', path, lineno, len(raw), f'not UTF-8 ({e.reason})')
        continue
      except json.JSONDecodeError as e:
        raise InputError(f'{where}: invalid JSON ({e.msg}, column {e.colno})') from e
      if not isinstance(record, dict) or text_key not in record:
        raise InputError(f'{where}: no {text_key!r} field')
      text = record[text_key]
      if not isinstance(text, str):
        raise InputError(f'{where}: field {text_key!r} is {type(text).__name__}, not a string')
      found = True
      invalid = _invalid_text(text)
      if invalid and not skip_invalid:
        raise InputError(f'{where}: {invalid}')
      yield Document('' if invalid else text, path, lineno, len(raw), invalid)
  if not found:
    raise InputError(f'{path}: no documents (empty file)')


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
