"""yuanjax.publish: atomic directory and file publishing with one permission rule."""
import os

import pytest

from yuanjax import publish


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def _write(tmp):
  with open(os.path.join(tmp, 'a.txt'), 'w') as f:
    f.write('a')
  return 'done'


def test_directory_published_whole_with_umask_modes(tmp_path, umask_022):
  dst = tmp_path / 'out'
  assert publish.directory(str(dst), _write) == 'done'
  assert (dst / 'a.txt').read_text() == 'a'
  assert os.stat(dst).st_mode & 0o777 == 0o755 and os.stat(dst / 'a.txt').st_mode & 0o777 == 0o644
  assert sorted(os.listdir(tmp_path)) == ['out']  # no temporary left
  with pytest.raises(FileExistsError, match='out exists; pass --overwrite'):
    publish.directory(str(dst), _write)


def test_failure_leaves_nothing_and_overwrite_replaces(tmp_path):
  dst = tmp_path / 'out'

  def fail(tmp):
    _write(tmp)
    raise RuntimeError('disk full')

  with pytest.raises(RuntimeError, match='disk full'):
    publish.directory(str(dst), fail)
  assert os.listdir(tmp_path) == []
  publish.directory(str(dst), _write)
  publish.directory(str(dst), lambda tmp: (tmp_path / 'marker').write_text(tmp), overwrite=True)
  assert os.listdir(dst) == [] and sorted(os.listdir(tmp_path)) == ['marker', 'out']
  with pytest.raises(RuntimeError):
    publish.directory(str(dst), fail, overwrite=True)
  assert os.listdir(dst) == []  # the old one kept whole


def test_keep_existing_discards_ours(tmp_path):
  dst = tmp_path / 'cache'
  publish.directory(str(dst), _write)
  publish.directory(str(dst), lambda tmp: (open(os.path.join(tmp, 'b'), 'w').close()),
                    keep_existing=True)
  assert os.listdir(dst) == ['a.txt'] and sorted(os.listdir(tmp_path)) == ['cache']


def test_file_atomic_with_umask_mode(tmp_path, umask_022):
  path = tmp_path / 'x.model'
  publish.file(str(path), b'123')
  publish.file(str(path), b'45')
  assert path.read_bytes() == b'45' and os.stat(path).st_mode & 0o777 == 0o644
  assert os.listdir(tmp_path) == ['x.model']
