"""launch.sweep on the cloud backends, against fake `gcloud` and `xpk` on PATH: TPU variants
on N slices at once, or queued on one reused slice; xpk workloads."""
import hashlib
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKES = os.path.join(REPO, 'tests', 'launch', 'fakes')
sys.path.insert(0, REPO)

from launch import sweep  # pylint: disable=g-import-not-at-top
from tests.launch.test_launchers import dry_run  # pylint: disable=g-import-not-at-top
from tests.launch.conftest import kind, stand_in_repo  # pylint: disable=g-import-not-at-top

CONFIG = textwrap.dedent('''\
    def get_config(arg=None):
      return {}


    def sweep():
      return [{'train.seed': 0}, {'train.seed': 1}]
    ''')


@pytest.fixture
def cfg(tmp_path, monkeypatch):
  return str(stand_in_repo(tmp_path, monkeypatch, 'sw.py', CONFIG) / 'configs' / 'sw.py')


def tpu_sweep(cfg, tmp_path, *flags):
  return sweep.main([
      f'--config={cfg}', '--workdir=gs://b/sw', '--backend=tpu', '--name=sw', '--zone=z',
      '--accelerator_type=v4-8', f'--local_dir={tmp_path}/stage', '--poll_s=0.02', '--force', *flags
  ])


def events(fake):
  """(kind, slice) per gcloud call, in order."""
  return [(kind(c), c[4]) for c in fake.calls() if c[0] != 'storage']


def test_tpu_variants_on_slices_at_once(fake, cfg, tmp_path):
  fake.scenario(runs=[{'exit_at_poll': 4}])
  assert tpu_sweep(cfg, tmp_path, '--parallel=2') == 0
  ev = events(fake)
  creates = [ev.index(('create', f'sw-{i}')) for i in (0, 1)]
  deletes = [ev.index(('delete', f'sw-{i}')) for i in (0, 1)]
  assert max(creates) < min(deletes)  # both slices asked for before either is done
  assert {os.path.basename(p) for p in os.listdir(tmp_path / 'stage')} == {'sw-0', 'sw-1'}


def test_tpu_variants_one_after_another_without_parallel(fake, cfg, tmp_path):
  fake.scenario(runs=[{'exit_at_poll': 1}])
  assert tpu_sweep(cfg, tmp_path) == 0
  ev = events(fake)
  assert ev.index(('delete', 'sw-0')) < ev.index(('create', 'sw-1'))


def test_tpu_reuse_queues_the_variants_on_one_slice(fake, cfg, tmp_path):
  fake.scenario(existing=['sw'], runs=[{'exit_at_poll': 1}])
  assert tpu_sweep(cfg, tmp_path, '--reuse') == 0
  ev = events(fake)
  assert [e for e in ev if e[0] in ('create', 'delete', 'ssh start')] == [('ssh start', 'sw'),
                                                                          ('ssh start', 'sw')]
  starts = [c for c in fake.calls() if kind(c) == 'ssh start']
  assert [
      '--workdir=gs://b/sw/train.seed=0' in starts[0][6], '--workdir=gs://b/sw/train.seed=1'
      in starts[1][6]
  ] == [True, True]


def test_tpu_reuse_refuses_parallel(capsys, cfg, tmp_path):
  with pytest.raises(SystemExit) as e:
    tpu_sweep(cfg, tmp_path, '--reuse', '--parallel=2')
  assert e.value.code == 2 and 'with --reuse the variants queue on the one slice' in (
      capsys.readouterr().err)


def xpk_argv(cfg, *flags):
  return [
      f'--config={cfg}', '--workdir=gs://b/sw', '--backend=xpk', '--cluster=c1', '--workload=wl',
      '--tpu_type=v5p-64', '--docker_image=gcr.io/p/yuanjax:1', '--zone=us-east5-a', '--project=p',
      '--env=A=b c', '--config.train.num_steps=9', '--force', *flags
  ]


def test_xpk_dry_run(capsys, cfg):
  cmds = dry_run(capsys, sweep, xpk_argv(cfg, '--libtpu_init_args=--xla_x=1'))
  flags = lambda i: [
      '--config=configs/sw.py', f'--workdir=gs://b/sw/train.seed={i}', '--config.train.num_steps=9',
      f'--config.train.seed={i}'
  ]
  assert cmds == [[
      'xpk', 'workload', 'create', '--cluster=c1', f'--workload=wl-{i}', '--tpu-type=v5p-64',
      '--num-slices=1', '--docker-image=gcr.io/p/yuanjax:1', '--max-restarts=3',
      '--termination-grace-period-seconds=300', '--zone=us-east5-a', '--project=p',
      '--env=LIBTPU_INIT_ARGS=--xla_x=1', '--env=A=b c',
      '--command=' + shlex.join(['python3', '-u', '-m', 'yuanjax.train', *flags(i)]) +
      '; rc=$?; if [ "$rc" -ne 0 ]; then exit "$rc"; fi; ' +
      shlex.join(['python3', '-m', 'launch.progress', *flags(i)]) +
      '; rc=$?; if [ "$rc" -eq 3 ]; then exit 42; fi; exit "$rc"'
  ] for i in (0, 1)]


def test_xpk_submits_each_variant(fake, cfg, tmp_path):
  base = [a for a in xpk_argv(cfg) if not a.startswith('--docker_image')]
  (tmp_path / 'repo' / '.dockerignore').write_text('.venv\n.git/\n')
  assert sweep.main(
      base +
      ['--base_docker_image=python:3.11', f'--script_dir={tmp_path}/repo', '--parallel=2']) == 0
  calls = [json.loads(l) for l in (fake.path / 'xpk.jsonl').read_text().splitlines()]
  assert sorted(c[3] for c in calls) == ['--workload=wl-0', '--workload=wl-1']
  for c in calls:
    assert f'--script-dir={tmp_path}/repo' in c and '--base-docker-image=python:3.11' in c
    assert c[-1].startswith('--command=if [ "$(cat setup.py constraints.txt | sha256sum)" = ')
    assert "else pip install -q -c constraints.txt . 'jax[tpu]'; fi && python3 -u -m" in c[-1]


@pytest.mark.parametrize('flags, message', [
    (['--docker_image=a', '--base_docker_image=b'], 'give one of --docker_image'),
    (['--workload=Bad_Name'], '--workload=Bad_Name'),
])
def test_xpk_bad_input(capsys, cfg, flags, message):
  argv = [a for a in xpk_argv(cfg) if not a.startswith(('--docker_image', '--workload'))]
  if not any(f.startswith('--workload') for f in flags):
    argv.append('--workload=wl')
  with pytest.raises(SystemExit) as e:
    sweep.main(argv + flags + ['--dry-run'])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_xpk_base_image_needs_a_dockerignore(capsys, cfg, tmp_path):
  """Without one, xpk's build would copy .venv and .git (and whatever else) into the image."""
  argv = [a for a in xpk_argv(cfg) if not a.startswith('--docker_image')]
  argv += ['--base_docker_image=python:3.11', f'--script_dir={tmp_path}/repo', '--dry-run']
  with pytest.raises(SystemExit) as e:
    sweep.main(argv)
  assert e.value.code == 2 and '.dockerignore must leave out .venv and .git' in (
      capsys.readouterr().err)
  (tmp_path / 'repo' / '.dockerignore').write_text('.git\n')
  with pytest.raises(SystemExit):
    sweep.main(argv)
  (tmp_path / 'repo' / '.dockerignore').write_text('.git\n.venv/\n')
  assert sweep.main(argv) == 0
  assert os.path.exists(os.path.join(REPO, '.dockerignore'))  # this repo's, for the default


# The container's python3: the trainer (exit FAKE_RC after writing checkpoint FAKE_STEP), or
# the real interpreter for launch/progress.py (or, with FAKE_PROGRESS_RC, progress.py failing
# with that status).
FAKE_PY = textwrap.dedent('''\
    #!/bin/bash
    if [[ $1 == -u ]]; then
      mkdir -p "$FAKE_WORKDIR/checkpoints/$FAKE_STEP"
      exit "$FAKE_RC"
    fi
    [[ -z ${FAKE_PROGRESS_RC:-} ]] || exit "$FAKE_PROGRESS_RC"
    exec %s "$@"
    ''') % shlex.quote(sys.executable)


@pytest.mark.parametrize(
    'step, rc, status, progress_rc',
    [
        (9, 0, 0, ''),  # done: the JobSet completes
        (4, 0, 42, ''),  # SIGTERM (preemption) saved step 4 of 9 and exited 0: xpk restarts on 42
        (4, 3, 3, ''),  # a failure keeps its status
        (4, 0, 1, '1'),  # progress.py's traceback (an unreadable workdir): passed on, no restart
        (4, 0, 2, '2'),  # progress.py's bad input: passed on
    ])
def test_xpk_command_exit_status(cfg, tmp_path, step, rc, status, progress_rc):
  from launch import xpk  # pylint: disable=g-import-not-at-top
  args = xpk.parse([
      f'--config={cfg}', '--workdir=gs://b/x', '--cluster=c1', '--workload=wl', '--tpu_type=v5p-64',
      '--docker_image=i', '--config.train.num_steps=9', '--force'
  ])
  args.workdir = str(tmp_path / 'wd')  # a local stand-in for gs://
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'python3').write_text(FAKE_PY)
  (tmp_path / 'bin' / 'python3').chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path}/bin:{os.environ["PATH"]}', FAKE_RC=str(rc),
             FAKE_STEP=str(step), FAKE_WORKDIR=args.workdir, FAKE_PROGRESS_RC=progress_rc)
  r = subprocess.run(['bash', '-c', xpk.command(args)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == status, r.stdout + r.stderr


@pytest.mark.parametrize(
    'stamp, installs',
    [
        (None, True),  # a plain base image: installed at the pod's start
        ('current', False),  # built with launch/xpk-base.Dockerfile from these files: skipped
        ('stale', True),  # setup.py or constraints.txt changed since the image was built
    ])
def test_xpk_base_image_install_only_when_the_image_lacks_it(cfg, tmp_path, stamp, installs):
  from launch import xpk  # pylint: disable=g-import-not-at-top
  (tmp_path / 'repo' / '.dockerignore').write_text('.venv\n.git\n')
  args = xpk.parse([
      f'--config={cfg}', '--workdir=gs://b/x', '--cluster=c1', '--workload=wl', '--tpu_type=v5p-64',
      '--base_docker_image=python:3.11', f'--script_dir={tmp_path}/repo', '--force'
  ])
  bin_dir, stamp_file = tmp_path / 'bin', tmp_path / 'deps.sha256'
  bin_dir.mkdir()
  for name, body in (('pip', 'echo "pip $*" >>"$LOG"'), ('python3', 'exit 0')):
    (bin_dir / name).write_text(f'#!/bin/bash\n{body}\n')
    (bin_dir / name).chmod(0o755)
  if stamp:  # what the Dockerfile writes: the hash of the files it installed from
    files = ('setup.py', 'constraints.txt') if stamp == 'current' else ('setup.py',)
    data = b''.join(open(os.path.join(REPO, f), 'rb').read() for f in files)
    stamp_file.write_text(hashlib.sha256(data).hexdigest() + '  -\n')
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', LOG=str(tmp_path / 'log'),
             YUANJAX_DEPS_STAMP=str(stamp_file))
  r = subprocess.run(['bash', '-c', xpk.command(args)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  log = (tmp_path / 'log').read_text() if (tmp_path / 'log').exists() else ''
  assert log == ("pip install -q -c constraints.txt . jax[tpu]\n" if installs else '')
  with open(os.path.join(REPO, 'launch', 'xpk-base.Dockerfile')) as f:
    assert 'cat setup.py constraints.txt | sha256sum > ' + xpk.DEPS_STAMP in f.read()
