"""Shared by the launcher tests: the fake gcloud's folder (`Fake`, the `fake` fixture that puts
tests/launch/fakes first on PATH) and a tiny git repo standing in for this one."""
import json
import os
import re
import subprocess
import sys

import pytest

from launch import common

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKES = os.path.join(REPO, 'tests', 'launch', 'fakes')


class Fake:
  """The fake gcloud's folder: what it should do, and what it was asked."""

  def __init__(self, path):
    self.path = path

  def scenario(self, **kw):
    """A fresh fake (calls kept): slices, counters and buckets start again."""
    (self.path / 'scenario.json').write_text(json.dumps(kw))
    (self.path / 'state.json').unlink(missing_ok=True)

  def calls(self):
    text = (self.path / 'calls.jsonl').read_text() if (self.path / 'calls.jsonl').exists() else ''
    return [json.loads(line) for line in text.splitlines()]

  def kinds(self):
    return [kind(c) for c in self.calls()]


def kind(argv):
  """A short name for one gcloud call: 'create', 'qr delete', 'ssh start', 'storage ls'..."""
  if argv[0] == 'storage':
    return f'storage {argv[1]}'
  what = {'tpu-vm': '', 'queued-resources': 'qr '}[argv[2]] + argv[3]
  if argv[3] == 'ssh':
    command = next(a for a in argv if a.startswith('--command='))
    if m := re.search(r'tpu_worker.sh"? (\w+)', command):
      return f'ssh {m[1]}'
    return 'ssh write-check' if 'gcloud storage cp' in command else 'ssh'
  return what


@pytest.fixture(autouse=True)
def no_stop_left():
  """common.STOP is process-wide: an interrupted launch sets it; no test leaves it set."""
  yield
  common.STOP.clear()


def fake_state(fake):
  """The fake gcloud's state: slices that exist (server-side), runs, counters."""
  return json.loads((fake.path / 'state.json').read_text())


@pytest.fixture(scope='session')
def python3_dir(tmp_path_factory):
  """A folder whose `python3` is this interpreter, for the fakes' `#!/usr/bin/env python3`: a
  version manager's shim found first on PATH (pyenv's) costs ~0.5 s a call, ~10 s a test."""
  d = tmp_path_factory.mktemp('python3')
  (d / 'python3').symlink_to(sys.executable)
  return d


@pytest.fixture
def fake(tmp_path, monkeypatch, python3_dir):
  d = tmp_path / 'fake'
  d.mkdir()
  monkeypatch.setenv('FAKE_DIR', str(d))
  monkeypatch.setenv('PATH', f'{FAKES}:{python3_dir}:{os.environ["PATH"]}')
  return Fake(d)


def stand_in_repo(tmp_path, monkeypatch, config_name: str, config_text: str):
  """A tiny git repo with configs/<config_name> (what gets packed), as launch.common.REPO."""
  root = tmp_path / 'repo'
  (root / 'configs').mkdir(parents=True)
  (root / 'configs' / config_name).write_text(config_text)
  subprocess.run(['git', 'init', '-q', str(root)], check=True)
  subprocess.run(['git', '-C', str(root), 'add', 'configs'], check=True)  # tracked: packed
  monkeypatch.setattr(common, 'REPO', str(root))
  return root
