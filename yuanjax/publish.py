"""Atomic publishing: write into a temporary sibling, then rename into place.

  publish.directory(dst, write, overwrite=False)   # write(tmp_dir); tmp renamed to dst
  publish.file(path, data)                         # bytes to path, atomically

The one rule for every file the project writes whole or rewrites in place: yuanjax.interop.hf
(from-hf, to-hf), yuanjax.data.prepare (shards and the default-data cache),
yuanjax.data.tokenizer, yuanjax.metrics (metrics.jsonl cut back on resume), yuanjax.report
(its tables and plots) and launch.sweep (sweep.json). An output that exists is always whole: a
failure (or SIGKILL) leaves at most a hidden `.NAME.tmp-*` sibling, never a half-written
NAME; with overwrite the old NAME is moved aside before the rename and deleted after it.

One permission rule: what is published gets the modes the umask asks for (directories
0777 & ~umask, files 0666 & ~umask), as if created with open()/mkdir(); mkdtemp and mkstemp
would otherwise leave them private (0700 / 0600).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def set_modes(path: str) -> None:
  """The permission rule, applied to a directory and the plain files directly inside it (or
  to one file)."""
  mask = _umask()
  if not os.path.isdir(path):
    os.chmod(path, 0o666 & ~mask)
    return
  os.chmod(path, 0o777 & ~mask)
  for name in os.listdir(path):
    p = os.path.join(path, name)
    if os.path.isfile(p) and not os.path.islink(p):
      os.chmod(p, 0o666 & ~mask)


def check_absent(dst: str, overwrite: bool) -> None:
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f'{dst} exists; pass --overwrite (overwrite=True) to replace it')


def _rename_into_place(tmp: str, dst: str, overwrite: bool) -> None:
  check_absent(dst, overwrite)
  old = None
  if os.path.lexists(dst):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.old-', dir=os.path.dirname(dst))
    os.rename(dst, os.path.join(old, 'x'))
  os.rename(tmp, dst)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _rename_unless_present(tmp: str, dst: str) -> None:
  try:
    os.rename(tmp, dst)
  except OSError:
    if not os.path.lexists(dst):
      raise
    shutil.rmtree(tmp, ignore_errors=True)  # lost a race: the other copy is as good


def directory(dst: str, write: Callable[[str], object], overwrite: bool = False,
              keep_existing: bool = False):
  """Runs write(tmp) in a new temporary directory next to dst, then renames it to dst; returns
  what write returned. An existing dst is an error unless overwrite (replaced) or
  keep_existing (a cache another process filled meanwhile: ours is discarded)."""
  dst = os.path.abspath(dst)
  if not keep_existing:
    check_absent(dst, overwrite)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.tmp-', dir=parent)
  try:
    result = write(tmp)
    set_modes(tmp)
    if keep_existing:
      _rename_unless_present(tmp, dst)
    else:
      _rename_into_place(tmp, dst, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return result


def file(path: str, data: bytes) -> None:
  """Writes data to path atomically (a temporary sibling renamed over it)."""
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', dir=parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    set_modes(tmp)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
