"""launch.sweep: the `:arg` reaches sweep(arg), the manifest, resumable re-runs, --parallel
(with a failed variant that does not stop the others). Runs a fake training module."""
import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from launch import common, sweep  # pylint: disable=g-import-not-at-top
from yuanjax import workdir  # pylint: disable=g-import-not-at-top

CONFIG = textwrap.dedent('''\
    def get_config(arg=None):
      return {'arg': arg}


    def sweep(arg=None):
      n = 3 if arg == 'three' else 2
      return [{'train.seed': s, 'fail': s == 1} for s in range(n)]
    ''')

# Appends its argv to WORKDIR/calls (one line per start) and fails when told to.
FAKE_TRAIN = textwrap.dedent('''\
    import os, sys
    workdir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir='))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'calls'), 'a') as f:
      f.write(' '.join(sys.argv[1:]) + '\\n')
    print('fake run', workdir)
    sys.exit(5 if '--config.fail=True' in sys.argv else 0)
    ''')


@pytest.fixture
def cfg(tmp_path):
  path = tmp_path / 'exp.py'
  path.write_text(CONFIG)
  return str(path)


def test_config_arg_reaches_sweep(cfg):
  assert workdir.split_config_spec(f'{cfg}:three') == (cfg, 'three')
  assert workdir.split_config_spec(cfg) == (cfg, None)
  assert len(sweep.parse([f'--config={cfg}:three', '--workdir=/w']).variants) == 3
  assert len(sweep.parse([f'--config={cfg}', '--workdir=/w']).variants) == 2
  # A sweep() without a parameter (configs/demo.py) is still called without one.
  plain = os.path.join(os.path.dirname(cfg), 'plain.py')
  with open(plain, 'w') as f:
    f.write('def sweep():\n  return [{"a": 1}]\n')
  assert sweep.parse([f'--config={plain}:x', '--workdir=/w']).variants == [{'a': 1}]


def run_sweep(tmp_path, cfg, *flags):
  mods = tmp_path / 'mods'
  mods.mkdir(exist_ok=True)
  (mods / 'fake_train.py').write_text(FAKE_TRAIN)
  env = dict(os.environ, PYTHONPATH=str(mods))
  argv = [
      sys.executable, '-m', 'launch.sweep', '--backend=local', f'--config={cfg}:three',
      f'--workdir={tmp_path / "sw"}', '--num_processes=1', '--module=fake_train', '--force', *flags
  ]
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def calls(tmp_path, name):
  path = tmp_path / 'sw' / name / 'calls'
  return path.read_text().splitlines() if path.exists() else []


def test_parallel_manifest_and_resume(tmp_path, cfg):
  r = run_sweep(tmp_path, cfg, '--parallel=2')
  assert r.returncode == 1, r.stderr
  names = [f'train.seed={s}+fail={s == 1}' for s in range(3)]
  manifest = json.loads((tmp_path / 'sw' / 'sweep.json').read_text())
  assert manifest['arg'] == 'three' and manifest['backend'] == 'local'
  assert [(r['name'], r['status'], r['returncode']) for r in manifest['runs']
         ] == [(names[0], 'done', 0), (names[1], 'failed', 5), (names[2], 'done', 0)]
  assert manifest['runs'][2]['overrides'] == {'train.seed': 2, 'fail': False}
  assert all(len(calls(tmp_path, n)) == 1 for n in names)  # the failure stopped nothing
  ports = {
      c.split('--coordinator_address=')[1].split()[0] for n in names for c in calls(tmp_path, n)
  }
  assert len(ports) == 3  # variants at once: own ports
  assert (tmp_path / 'sw' / names[0] / 'logs' / 'process_0.log').read_text().startswith('fake')
  # Again: the finished runs are skipped, the failed one runs again.
  r = run_sweep(tmp_path, cfg, '--parallel=2')
  assert r.returncode == 1
  assert [len(calls(tmp_path, n)) for n in names] == [1, 2, 1]
  assert r.stderr.count('done before, skipped') == 2


def test_sequential_is_the_default(tmp_path, cfg):
  r = run_sweep(tmp_path, cfg, '--port=7001')
  assert r.returncode == 1, r.stderr
  ports = [
      c.split('--coordinator_address=')[1].split()[0]
      for s in range(3)
      for c in calls(tmp_path, f'train.seed={s}+fail={s == 1}')
  ]
  assert ports == ['127.0.0.1:7001'] * 3


def test_bad_parallel(capsys, cfg):
  with pytest.raises(SystemExit):
    sweep.parse([f'--config={cfg}', '--workdir=/w', '--parallel=0'])
  assert '--parallel=0: must be at least 1' in capsys.readouterr().err


def test_a_backend_is_one_registry_entry(monkeypatch, cfg, capsys):
  """A launcher module, how variants get names of their own and what it refuses: no other
  edit of launch.sweep."""
  fake = types.SimpleNamespace(parse=lambda argv: argparse.Namespace(argv=argv, tag=None),
                               plan=lambda run: common.Plan(steps=[['run', run.tag, *run.argv]]))

  def distinct(args, named):
    for i, (name, run) in enumerate(named):
      run.tag = f'{args.backend}-{i}-{name}'

  refuse = lambda args: f'--parallel={args.parallel}: not here' if args.parallel > 1 else None
  monkeypatch.setitem(sweep.BACKENDS, 'fake', sweep.Backend(fake, distinct, refuse))
  assert sweep.main([f'--config={cfg}:three', '--workdir=/w', '--backend=fake', '--dry-run']) == 0
  names = [f'train.seed={s}+fail={s == 1}' for s in range(3)]
  assert capsys.readouterr().out.splitlines() == [
      shlex.join([
          'run', f'fake-{s}-{n}', f'--config={cfg}:three', f'--workdir=/w/{n}',
          f'--config.train.seed={s}', f'--config.fail={s == 1}'
      ]) for s, n in enumerate(names)
  ]
  with pytest.raises(SystemExit):
    sweep.parse([f'--config={cfg}', '--workdir=/w', '--backend=fake', '--parallel=2'])
  assert '--parallel=2: not here' in capsys.readouterr().err


def test_a_variant_the_launcher_refuses_fails_alone(monkeypatch, cfg, tmp_path, capsys):
  """A launcher that refuses one variant (e.g. its pre-flight: exit 2) fails that variant,
  recorded in the manifest, and the others still run; refusing every variant is the sweep's
  own exit 2 (its flags)."""

  def parse(argv):
    if '--config.fail=True' in argv:
      raise SystemExit(2)
    return argparse.Namespace(argv=argv)

  fake = types.SimpleNamespace(parse=parse, plan=lambda run: common.Plan(steps=[['true']]))
  monkeypatch.setitem(sweep.BACKENDS, 'fake', sweep.Backend(fake, lambda args, named: None))
  assert sweep.main([f'--config={cfg}:three', f'--workdir={tmp_path}', '--backend=fake']) == 1
  runs = json.loads((tmp_path / 'sweep.json').read_text())['runs']
  assert [(r['status'], r['returncode']) for r in runs] == [('done', 0), ('failed', 2), ('done', 0)]
  assert 'train.seed=1+fail=True refused by the launcher' in capsys.readouterr().err
  monkeypatch.setattr(fake, 'parse', lambda argv: parse(argv + ['--config.fail=True']))
  with pytest.raises(SystemExit) as e:
    sweep.main([f'--config={cfg}:three', f'--workdir={tmp_path}/all', '--backend=fake'])
  assert e.value.code == 2


def test_manifest_is_published_whole(tmp_path, cfg):
  """sweep.json is replaced atomically (yuanjax.publish): no temporary left, umask modes."""
  old = os.umask(0o022)
  try:
    assert run_sweep(tmp_path, cfg).returncode == 1
  finally:
    os.umask(old)
  assert sorted(n for n in os.listdir(tmp_path / 'sw') if 'sweep' in n) == ['sweep.json']
  assert os.stat(tmp_path / 'sw' / 'sweep.json').st_mode & 0o777 == 0o644
