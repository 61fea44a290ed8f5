"""yuanjax.workdir: the layout, checkpoint steps, metrics.jsonl, config files; no JAX."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from yuanjax import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_the_standard_library_only():
  """launch/ imports it where JAX is not installed: nothing outside the standard library (and
  yuanjax's own stdlib-only modules) may come with it, nor with the launchers that use it."""
  code = textwrap.dedent('''\
      import sys
      before = set(sys.modules)
      import yuanjax.workdir, yuanjax.publish
      new = {m.split('.')[0] for m in set(sys.modules) - before}
      assert new - set(sys.stdlib_module_names) == {'yuanjax'}, sorted(new)
      import launch.progress, launch.sweep
      assert 'jax' not in sys.modules and 'numpy' not in sys.modules
      print('ok')
      ''')
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert r.returncode == 0 and r.stdout == 'ok\n', r.stderr


def test_layout():
  assert workdir.checkpoints_dir('w') == os.path.join('w', 'checkpoints')
  assert workdir.metrics_path('w') == os.path.join('w', 'metrics.jsonl')
  assert workdir.tensorboard_dir('w') == os.path.join('w', 'tb')
  assert workdir.logs_dir('w') == os.path.join('w', 'logs')
  assert workdir.sweep_manifest_path('s') == os.path.join('s', 'sweep.json')
  assert workdir.variant_dir('s', 'seed=1') == os.path.join('s', 'seed=1')


def test_read_metrics_and_checkpoint_steps(tmp_path):
  records = [{
      'step': 2,
      'kind': 'train',
      'loss': 2.0
  }, {
      'step': 1,
      'kind': 'train',
      'loss': 3.0
  }, {
      'step': 2,
      'kind': 'eval',
      'loss': 2.5
  }]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(map(json.dumps, records)) + '\n')
  m = workdir.read_metrics(str(tmp_path))
  assert [r['loss'] for r in m['train']] == [3.0, 2.0] and m['eval'][0]['loss'] == 2.5
  for d in ('10', '2', 'tmp-3', '8.unreadable-0', '12.orbax-checkpoint-tmp-1'):
    (tmp_path / 'checkpoints' / d).mkdir(parents=True)
  assert workdir.checkpoint_steps(str(tmp_path)) == [2, 10]
  assert workdir.steps_in(str(tmp_path / 'checkpoints')) == [2, 10]
  assert workdir.checkpoint_steps(str(tmp_path / 'nothing')) == []


def test_missing_metrics_named_unless_missing_ok(tmp_path):
  assert workdir.read_metrics(str(tmp_path), missing_ok=True) == {}
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    workdir.read_metrics(str(tmp_path))


def test_sweep_manifest(tmp_path):
  assert workdir.read_sweep_manifest(str(tmp_path)) is None
  (tmp_path / 'sweep.json').write_text('{"runs": []}')
  assert workdir.read_sweep_manifest(str(tmp_path)) == {'runs': []}


def test_config_file_loads_as_the_trainer_loads_it(tmp_path):
  """--config=FILE calls get_config(), FILE:ARG get_config(ARG) (ml_collections' rule)."""
  path = tmp_path / 'c.py'
  path.write_text('def get_config(arg="default"):\n  return {"arg": arg}\n')
  assert workdir.split_config_spec(f'{path}:x') == (str(path), 'x')
  assert workdir.split_config_spec(f'{path}:') == (str(path), '')
  assert workdir.load_config(*workdir.split_config_spec(str(path))) == {'arg': 'default'}
  assert workdir.load_config(*workdir.split_config_spec(f'{path}:x')) == {'arg': 'x'}
  assert workdir.load_config(str(path), '') == {'arg': ''}
  first, second = (workdir.load_config_module(str(path)) for _ in range(2))
  assert first is not second  # a fresh module each time: edits to the file are seen
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/none.py: no such config file'):
    workdir.load_config(str(tmp_path / 'none.py'))


def test_metrics_writer_round_trip_and_atomic_truncate(tmp_path):
  """MetricsWriter writes where the layout says; on resume truncate_after rewrites the file
  through yuanjax.publish (whole, umask modes, no temporary left)."""
  from yuanjax import metrics  # pylint: disable=g-import-not-at-top  (numpy, tensorboardX)
  old = os.umask(0o022)
  try:
    w = metrics.MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
      w.write(step, {'loss': float(step)})
    w.write(2, {'loss': 0.5}, kind='eval')
    w.truncate_after(2)
    w.close()
  finally:
    os.umask(old)
  m = workdir.read_metrics(str(tmp_path))
  assert [(r['step'], r['loss']) for r in m['train']] == [(1, 1.0), (2, 2.0)]
  assert [(r['step'], r['loss']) for r in m['eval']] == [(2, 0.5)]
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tb']
  assert os.path.isdir(workdir.tensorboard_dir(str(tmp_path)))
  assert os.stat(workdir.metrics_path(str(tmp_path))).st_mode & 0o777 == 0o644
