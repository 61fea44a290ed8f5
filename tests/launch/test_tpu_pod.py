"""launch.tpu_pod against a fake `gcloud` on PATH (tests/launch/fakes/gcloud) that records its
calls and fails on cue, and launch/tpu_worker.sh run for real on this machine."""
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKES = os.path.join(REPO, 'tests', 'launch', 'fakes')
sys.path.insert(0, REPO)

from launch import common, tpu_pod  # pylint: disable=g-import-not-at-top
from tests.launch.conftest import (  # pylint: disable=g-import-not-at-top
    fake_state, kind, stand_in_repo)


@pytest.fixture
def repo(tmp_path, monkeypatch):
  """A tiny git repo standing in for this one (what gets packed)."""
  return stand_in_repo(tmp_path, monkeypatch, 'fake.py', 'def get_config(arg=None):\n  return {}\n')


def argv(repo, tmp_path, *extra):
  return [
      f'--config={repo}/configs/fake.py', '--workdir=gs://bucket/m32 run', '--name=m32-a',
      '--zone=us-east5-a', '--accelerator_type=v5p-64', f'--local_dir={tmp_path}/stage',
      '--poll_s=0', '--force', '--config.mesh.expert=8', *extra
  ]


SETUP = [
    'storage cp', 'storage rm', 'describe', 'create', 'describe', 'ssh write-check', 'scp',
    'ssh install', 'storage rm', 'ssh start'
]


def test_already_exists_deletes_nothing(fake, repo, tmp_path, capsys):
  """Someone else's slice of that name: refused before any create, and nothing is deleted;
  one made between that check and the create (ALREADY_EXISTS) is not deleted either."""
  fake.scenario(create_error='ALREADY_EXISTS: node m32-a already exists', existing=['m32-a'])
  assert tpu_pod.main(argv(repo, tmp_path)) == 1
  assert fake.kinds() == ['storage cp', 'storage rm', 'describe']
  assert 'm32-a already exists in us-east5-a: not created, and not deleted' in (
      capsys.readouterr().err)
  fake.scenario(create_error='ALREADY_EXISTS', existing=['m32-a'])
  assert tpu_pod.main(argv(repo, tmp_path, '--queued')) == 1
  fake.scenario(create_error='ALREADY_EXISTS: node m32-a already exists', create_makes=True)
  assert tpu_pod.main(argv(repo, tmp_path)) == 1
  assert fake.kinds()[-2:] == ['describe', 'create']
  assert not any('delete' in k for k in fake.kinds())
  assert fake_state(fake)['slices'] == ['m32-a']
  assert not os.path.exists(tmp_path / 'stage' / 'created.json')


@pytest.mark.parametrize('queued', [False, True])
def test_a_failed_create_that_made_the_slice_deletes_it(fake, repo, tmp_path, capsys, queued):
  """gcloud fails (not ALREADY_EXISTS) after the server began the create: the slice is there
  and bills; it is recorded and deleted, and the launch fails with gcloud's status."""
  fake.scenario(create_error='INTERNAL: operation polling failed', create_makes=True)
  assert tpu_pod.main(argv(repo, tmp_path, *(['--queued'] if queued else []))) == 1
  prefix = 'qr ' if queued else ''
  assert fake.kinds()[2:] == [f'{prefix}{k}' for k in ('describe', 'create', 'describe', 'delete')]
  assert fake_state(fake)['slices'] == []
  assert not os.path.exists(tmp_path / 'stage' / 'created.json')
  err = capsys.readouterr().err
  assert 'INTERNAL: operation polling failed' in err  # gcloud's own message still shown
  assert 'm32-a exists all the same' in err and 'creating m32-a failed with exit status 1' in err


@pytest.mark.parametrize('queued', [False, True])
def test_a_timed_out_create_deletes_the_slice(fake, repo, tmp_path, monkeypatch, queued):
  """The create outlives its timeout (gcloud is killed, the server goes on): deleted."""
  monkeypatch.setitem(tpu_pod.LONG_TIMEOUT_S, 'create', 5)
  fake.scenario(create_sleep=120)
  assert tpu_pod.main(argv(repo, tmp_path, *(['--queued'] if queued else []))) == 124
  assert fake.kinds()[-2:] == ['qr describe', 'qr delete'] if queued else ['describe', 'delete']
  assert fake_state(fake)['slices'] == []


def test_bucket_not_writable_creates_nothing(fake, repo, tmp_path):
  fake.scenario(bucket_denied=True)
  assert tpu_pod.main(argv(repo, tmp_path)) == 1
  assert fake.kinds() == ['storage cp']


def test_dropped_ssh_does_not_end_the_run(fake, repo, tmp_path):
  """ssh exits 255 after starting the run: retried, the run goes on, the slice stays."""
  fake.scenario(ssh_drop='start', runs=[{'exit_at_poll': 3}])
  assert tpu_pod.main(argv(repo, tmp_path, '--libtpu_init_args=--xla_tpu_x=1')) == 0
  assert fake.kinds() == [
      *SETUP, 'ssh start', 'storage ls', 'describe', 'storage ls', 'describe', 'storage ls',
      'delete'
  ]
  start = next(c for c in fake.calls() if kind(c) == 'ssh start')
  command = shlex.split(start[6][len('--command='):].split('; ', 1)[1])
  assert command[:8] == [
      'env', 'YUANJAX_EXIT_WAIT_S=420', 'bash', '$HOME/yuanjax/launch/tpu_worker.sh', 'start',
      'gs://bucket/m32 run/worker_logs', 'gcloud compute tpus tpu-vm delete m32-a --quiet '
      '--zone=us-east5-a --async', '--'
  ]
  assert command[8:] == [
      'env', 'LIBTPU_INIT_ARGS=--xla_tpu_x=1', '.venv/bin/python', '-u', '-m', 'yuanjax.train',
      '--config=configs/fake.py', '--workdir=gs://bucket/m32 run', '--config.mesh.expert=8'
  ]


def test_spot_preemption_resubmits_and_resumes(fake, repo, tmp_path):
  fake.scenario(qr_states=['WAITING_FOR_RESOURCES', 'ACTIVE'], runs=[{
      'preempt_at_poll': 1
  }, {
      'exit_at_poll': 1
  }])
  assert tpu_pod.main(
      argv(repo, tmp_path, '--queued', '--spot', '--valid_until_duration=6h',
           '--service_account=sa@p.iam', '--scopes=cloud-platform')) == 0
  kinds = fake.kinds()
  assert [k for k in kinds if k.startswith(('qr create', 'qr delete', 'ssh start'))
         ] == ['qr create', 'ssh start', 'qr delete', 'qr create', 'ssh start', 'qr delete']
  assert 'ssh stop' not in kinds  # preempted: no trainer left to stop
  create = next(c for c in fake.calls() if kind(c) == 'qr create')
  assert create[4:] == [
      'm32-a', '--node-id=m32-a', '--accelerator-type=v5p-64', '--runtime-version=v2-alpha-tpuv5',
      '--spot', '--valid-until-duration=6h', '--service-account=sa@p.iam',
      '--scopes=https://www.googleapis.com/auth/cloud-platform', '--zone=us-east5-a'
  ]  # a short scope name becomes its full URI


def test_preemptions_beyond_max_restarts_fail(fake, repo, tmp_path):
  fake.scenario(runs=[{'preempt_at_poll': 1}])
  assert tpu_pod.main(argv(repo, tmp_path, '--queued', '--spot', '--max_restarts=1')) == 1
  assert [k for k in fake.kinds() if k in ('qr create', 'qr delete')
         ] == ['qr create', 'qr delete', 'qr create', 'qr delete']


def test_queue_timeout_deletes_its_own_request(fake, repo, tmp_path):
  fake.scenario(qr_states=['WAITING_FOR_RESOURCES'])
  assert tpu_pod.main(argv(repo, tmp_path, '--queued', '--queue_timeout_s=0')) == 1
  assert fake.kinds()[-2:] == ['qr describe', 'qr delete']
  assert 'ssh install' not in fake.kinds()


def test_failed_worker_stops_the_others_then_deletes(fake, repo, tmp_path):
  fake.scenario(runs=[{'exit_at_poll': 1, 'rcs': [0, 3]}])
  assert tpu_pod.main(argv(repo, tmp_path)) == 1
  assert fake.kinds()[-3:] == ['storage ls', 'ssh stop', 'delete']


def test_reuse_never_deletes(fake, repo, tmp_path, capsys):
  fake.scenario(existing=['m32-a'], runs=[{'exit_at_poll': 1, 'rcs': [5]}])
  assert tpu_pod.main(argv(repo, tmp_path, '--reuse')) == 1
  assert fake.kinds() == [
      'storage cp', 'storage rm', 'describe', 'ssh write-check', 'scp', 'ssh install', 'storage rm',
      'ssh start', 'storage ls', 'ssh stop'
  ]
  start = next(c for c in fake.calls() if kind(c) == 'ssh start')
  assert " start 'gs://bucket/m32 run/worker_logs' '' -- " in start[6]  # no delete at the end
  fake.scenario(runs=[{'preempt_at_poll': 1}], existing=['m32-a'])
  assert tpu_pod.main(argv(repo, tmp_path, '--reuse')) == 1
  assert 'not resubmitted' in capsys.readouterr().err
  assert not any('delete' in k for k in fake.kinds())


def test_reuse_of_a_missing_slice_fails_before_install(fake, repo, tmp_path, capsys):
  fake.scenario()
  assert tpu_pod.main(argv(repo, tmp_path, '--reuse')) == 1
  assert fake.kinds() == ['storage cp', 'storage rm', 'describe']
  assert '--reuse: no READY slice m32-a' in capsys.readouterr().err


# In this repo (the config must be), without a mesh: the pre-flight warns (--force), fast.
FAKE_CONFIG = os.path.relpath(os.path.join(FAKES, 'config.py'), REPO)


def launcher(tmp_path, *extra):
  """launch.tpu_pod as its own process, in a process group of its own as a terminal gives it."""
  cmd = [
      sys.executable, '-m', 'launch.tpu_pod', f'--config={FAKE_CONFIG}', '--force',
      '--workdir=gs://bucket/run', '--name=m32-a', '--zone=z', '--accelerator_type=v4-8',
      f'--local_dir={tmp_path}/stage', '--poll_s=0.05', '--stop_grace_s=7', *extra
  ]
  return subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_call(fake, proc, what):
  deadline = time.monotonic() + 180
  while what not in fake.kinds():
    assert time.monotonic() < deadline and proc.poll() is None, (fake.kinds(), proc.poll())
    time.sleep(0.05)


def test_sigterm_to_the_launcher_stops_trainers_before_delete(fake, tmp_path):
  """The launcher as its own process, SIGTERM mid-run: trainers first, then the slice."""
  fake.scenario(runs=[{}])  # runs until stopped
  proc = launcher(tmp_path)
  wait_for_call(fake, proc, 'storage ls')  # the run started and is being followed
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGTERM, err
  kinds = fake.kinds()
  assert kinds[-2:] == ['ssh stop', 'delete'], kinds
  stop = next(c for c in fake.calls() if kind(c) == 'ssh stop')
  assert stop[5:7] == ['--worker=all', '--command=bash "$HOME/yuanjax/launch/tpu_worker.sh" stop 7']


def test_stop_deletes_only_what_this_machine_created(fake, repo, tmp_path):
  where = ['--name=m32-a', '--zone=us-east5-a', f'--local_dir={tmp_path}/stage']
  fake.scenario(existing=['m32-a'])
  assert tpu_pod.main(['stop', *where]) == 0
  assert fake.kinds() == ['ssh stop']  # not created here: not deleted
  fake.scenario(runs=[{}])  # (someone's m32-a gone: a create would refuse its name)
  assert tpu_pod.main(argv(repo, tmp_path, '--detach')) == 0
  assert fake.kinds()[-1] == 'ssh start'  # detached: no poll, no delete
  assert tpu_pod.main(['stop', *where]) == 0
  assert fake.kinds()[-3:] == ['ssh stop', 'describe', 'delete']  # still the slice it created
  assert not os.path.exists(tmp_path / 'stage' / 'created.json')


def test_dry_run_prints_the_happy_path(repo, tmp_path, capsys, monkeypatch):

  def fail(*a, **k):
    raise AssertionError(f'dry run started a process: {a}')

  monkeypatch.setattr(subprocess, 'call', fail)
  monkeypatch.setattr(subprocess, 'run', fail)
  assert tpu_pod.main(argv(repo, tmp_path, '--queued', '--dry-run', '--project=p')) == 0
  lines = capsys.readouterr().out.splitlines()
  cmds = [shlex.split(line) for line in lines]
  assert lines == [shlex.join(c) for c in cmds]
  assert [c[:5] for c in cmds] == [
      [
          'gcloud', 'storage', 'cp', f'{tmp_path}/stage/write_check',
          'gs://bucket/m32 run/.write_check/launcher'
      ],
      ['gcloud', 'storage', 'rm', 'gs://bucket/m32 run/.write_check/launcher'],
      cmds[2][:5],  # pack (bash -c ...)
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'create'],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'],
      ['gcloud', 'storage', 'rm', 'gs://bucket/m32 run/worker_logs/*.exit-*'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'],
      ['gcloud', 'storage', 'ls', 'gs://bucket/m32 run/worker_logs/'],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe'],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete']
  ]
  assert cmds[2][:2] == ['bash', '-c'] and cmds[-1][-2:] == ['--zone=us-east5-a', '--project=p']


def test_ctrl_c_during_create_still_deletes_what_it_made(fake, tmp_path):
  """Ctrl-C reaches the whole foreground process group while `create` runs (the slice exists
  server-side already): gcloud lives to return, the create is recorded, the slice deleted."""
  fake.scenario(create_sleep=2, runs=[{}])
  proc = launcher(tmp_path)
  wait_for_call(fake, proc, 'create')
  os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  assert fake_state(fake)['slices'] == [], fake.kinds()  # nothing left billing
  assert 'ssh install' not in fake.kinds()


def test_second_signal_during_cleanup_still_deletes(fake, tmp_path):
  fake.scenario(runs=[{}], stop_sleep=2)
  proc = launcher(tmp_path)
  wait_for_call(fake, proc, 'storage ls')
  proc.send_signal(signal.SIGTERM)
  wait_for_call(fake, proc, 'ssh stop')
  proc.send_signal(signal.SIGTERM)  # impatient: again, while the trainers save
  _, err = proc.communicate(timeout=60)
  # A state poll started before the first signal may take the fake's lock (and be logged)
  # after the stop: read-only, it is left out of the order.
  assert [k for k in fake.kinds() if k != 'describe'][-2:] == ['ssh stop', 'delete'], err
  assert fake_state(fake)['slices'] == []


@pytest.fixture
def few_polls(monkeypatch):
  """follow() must end by itself: fail the test after 60 sleeps instead of hanging."""
  sleeps = []

  def sleep(s):
    sleeps.append(s)
    assert len(sleeps) < 60, 'still polling'

  monkeypatch.setattr(tpu_pod, 'time', types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
  return sleeps


def test_a_vanished_slice_ends_the_follow(fake, repo, tmp_path, capsys, few_polls):
  fake.scenario(runs=[{'vanish_at_poll': 2}])
  assert tpu_pod.main(argv(repo, tmp_path, '--max_restarts=0')) == 1
  assert 'm32-a is gone: preempted' in capsys.readouterr().err
  fake.scenario(runs=[{'vanish_at_poll': 2}, {'exit_at_poll': 1}])
  assert tpu_pod.main(argv(repo, tmp_path)) == 0  # asked for again, and done
  assert [k for k in fake.kinds() if k in ('create', 'ssh start')] == ['create', 'ssh start'] * 3


def test_a_slice_up_without_trainers_starts_them_again(fake, repo, tmp_path, few_polls):
  """READY after a maintenance reboot: no trainer, no exit file. Checked over ssh every
  CHECK_EVERY polls; the trainers start again on the same slice (no new create)."""
  fake.scenario(runs=[{'lost_at_poll': 1}, {'exit_at_poll': 1}])
  assert tpu_pod.main(argv(repo, tmp_path)) == 0
  kinds = fake.kinds()
  assert kinds.count('ssh status') == 1 and kinds.count('ssh start') == 2
  assert kinds.count('create') == 1 and kinds.count('ssh install') == 1


def test_sequential_tpu_sweep_stops_on_sigterm(fake, tmp_path):
  """Variants one after another: SIGTERM during the first starts no second slice."""
  fake.scenario(runs=[{}])
  cmd = [
      sys.executable, '-m', 'launch.sweep', '--backend=tpu', f'--config={FAKE_CONFIG}', '--force',
      '--workdir=gs://bucket/sw', '--name=sw', '--zone=z', '--accelerator_type=v4-8',
      f'--local_dir={tmp_path}/stage', '--poll_s=0.05', '--stop_grace_s=1'
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
  wait_for_call(fake, proc, 'storage ls')
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0, err
  creates = [c[4] for c in fake.calls() if kind(c) == 'create']
  assert creates == ['sw-0'], err
  assert fake_state(fake)['slices'] == []


def test_stop_keep_and_the_race_with_worker_0(fake, repo, tmp_path, capsys):
  where = ['--name=m32-a', '--zone=us-east5-a', f'--local_dir={tmp_path}/stage']
  fake.scenario(runs=[{}])
  assert tpu_pod.main(argv(repo, tmp_path, '--detach')) == 0
  assert tpu_pod.main(['stop', '--keep', *where]) == 0
  stop = next(c for c in fake.calls() if kind(c) == 'ssh stop')
  assert stop[6].endswith('tpu_worker.sh" stop 300 keep')  # worker 0 then deletes nothing
  assert fake.kinds()[-1] == 'ssh stop'
  # Worker 0 deletes the slice as the launcher does: gone already is not a failure.
  fake.scenario(runs=[{'exit_at_poll': 1}], worker0_deletes=True)
  assert tpu_pod.main(argv(repo, tmp_path)) == 0
  assert fake.kinds()[-2:] == ['delete', 'describe']
  assert 'delete it by hand' not in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'stage' / 'created.json')


def test_stop_never_deletes_another_slice_of_the_same_name(fake, repo, tmp_path, capsys):
  where = ['--name=m32-a', '--zone=us-east5-a', f'--local_dir={tmp_path}/stage']
  fake.scenario(runs=[{}])
  assert tpu_pod.main(argv(repo, tmp_path, '--detach')) == 0
  for verb in ('delete', 'create'):  # worker 0 deleted ours; someone made another m32-a
    subprocess.run(['gcloud', 'compute', 'tpus', 'tpu-vm', verb, 'm32-a', '--zone=us-east5-a'],
                   check=True)
  assert tpu_pod.main(['stop', *where]) == 0
  assert fake.kinds()[-2:] == ['ssh stop', 'describe']
  assert 'is not the one this machine created' in capsys.readouterr().err
  assert fake_state(fake)['slices'] == ['m32-a']
  assert not os.path.exists(tmp_path / 'stage' / 'created.json')
  assert tpu_pod.main(['stop', '--project=p', *where]) == 0  # another project: not ours
  assert 'delete' not in fake.kinds()[-1:]


def test_failed_queued_resource_says_why(fake, repo, tmp_path, capsys):
  fake.scenario(qr_states=['FAILED'], failed_error='no v5p capacity in us-east5-a')
  assert tpu_pod.main(argv(repo, tmp_path, '--queued')) == 1
  assert 'is FAILED: no v5p capacity in us-east5-a' in capsys.readouterr().err
  assert fake.kinds()[-1] == 'qr delete'


def test_dropped_scp_is_retried(fake, repo, tmp_path):
  fake.scenario(scp_drop=True)
  assert tpu_pod.main(argv(repo, tmp_path)) == 0
  assert fake.kinds().count('scp') == 2


def test_untracked_files_are_not_packed(fake, repo, tmp_path):
  (repo / 'secret.env').write_text('TOKEN=x\n')
  fake.scenario()
  assert tpu_pod.main(argv(repo, tmp_path)) == 0
  names = subprocess.run(['tar', '-tzf', str(tmp_path / 'stage' / 'yuanjax.tgz')],
                         capture_output=True, text=True, check=True).stdout.split()
  assert names == ['configs/fake.py']
  assert tpu_pod.main(argv(repo, tmp_path, '--include_untracked')) == 0
  names = subprocess.run(['tar', '-tzf', str(tmp_path / 'stage' / 'yuanjax.tgz')],
                         capture_output=True, text=True, check=True).stdout.split()
  assert sorted(names) == ['configs/fake.py', 'secret.env']


def test_gcloud_calls_time_out():
  g = tpu_pod.Gcloud('n', 'z')
  start = time.monotonic()
  assert g.run(['sleep', '30'], timeout=0.2) == (124, '')
  assert time.monotonic() - start < 10


# ------------------------------------------------------- pre-flight fit and multi-slice


@pytest.fixture
def tiny_repo(tmp_path, monkeypatch):
  """The stand-in repo with the real configs/tiny.py: the planner can run on it."""
  text = open(os.path.join(REPO, 'configs', 'tiny.py')).read()
  return stand_in_repo(tmp_path, monkeypatch, 'tiny.py', text)


def tiny_argv(repo, tmp_path, *extra):
  return [
      f'--config={repo}/configs/tiny.py', '--workdir=gs://b/run', '--name=ms', '--zone=z',
      '--accelerator_type=v5litepod-4', f'--local_dir={tmp_path}/stage', '--poll_s=0', *extra
  ]


def test_a_config_that_does_not_fit_creates_nothing(fake, tiny_repo, tmp_path, capsys):
  fake.scenario()
  with pytest.raises(SystemExit) as e:
    tpu_pod.main(tiny_argv(tiny_repo, tmp_path, '--config.train.batch_size=16384'))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'pre-flight: ' in err and 'usable on 4 x TPU v5e' in err and 'does not fit' in err
  assert 'it fits with --config.train.grad_accum=' in err and '--force launches anyway' in err
  assert fake.calls() == []  # nothing created, nothing written
  fake.scenario(runs=[{'exit_at_poll': 1}])
  assert tpu_pod.main(tiny_argv(tiny_repo, tmp_path, '--config.train.batch_size=16384',
                                '--force')) == 0
  assert 'launching anyway (--force)' in capsys.readouterr().err


def test_a_pod_without_data_path_creates_nothing(fake, tiny_repo, tmp_path, capsys):
  """More than one host without data.path would train on the embedded corpus: refused first."""
  fake.scenario()
  with pytest.raises(SystemExit) as e:
    tpu_pod.main(tiny_argv(tiny_repo, tmp_path, '--accelerator_type=v5litepod-16'))
  assert e.value.code == 2
  assert 'pre-flight: data.path is not set: a 4-process tpu run' in capsys.readouterr().err
  assert fake.calls() == []


@pytest.mark.parametrize('accelerator_type, slices, chips, hosts', [('v5p-8', 1, 4, 1),
                                                                    ('v5p-64', 1, 32, 8),
                                                                    ('v4-16', 2, 16, 4),
                                                                    ('v5litepod-8', 1, 8, 1),
                                                                    ('v5litepod-4', 2, 8, 2),
                                                                    ('v6e-16', 1, 16, 4)])
def test_tpu_target_counts_hosts(accelerator_type, slices, chips, hosts):
  target = common.tpu_target(accelerator_type, slices)
  assert (target.devices, target.hosts, target.platform) == (chips, hosts, 'tpu')


def test_dcn_must_match_num_slices(fake, tiny_repo, tmp_path, capsys):
  fake.scenario()
  with pytest.raises(SystemExit) as e:
    tpu_pod.main(tiny_argv(tiny_repo, tmp_path, '--queued', '--num_slices=2'))
  assert e.value.code == 2
  assert "its product is 1, but the launch has 2 slice(s); e.g. --config.mesh.dcn.data=2" in (
      capsys.readouterr().err)
  assert fake.calls() == []


def test_multi_slice(fake, tiny_repo, tmp_path):
  fake.scenario(runs=[{'exit_at_poll': 2}])
  assert tpu_pod.main(
      tiny_argv(tiny_repo, tmp_path, '--queued', '--num_slices=2', '--spot',
                '--config.mesh.dcn.data=2', '--config.data.path=gs://b/shards')) == 0
  calls = fake.calls()
  create = next(c for c in calls if kind(c) == 'qr create')
  assert create[4:8] == [
      'ms', '--node-count=2', '--node-prefix=ms', '--accelerator-type=v5litepod-4'
  ]
  scp = next(c for c in calls if kind(c) == 'qr scp')
  assert scp[4:] == [
      f'{tmp_path}/stage/yuanjax.tgz', 'ms:yuanjax.tgz', '--node=all', '--worker=all', '--zone=z'
  ]
  install = next(c for c in calls if kind(c) == 'ssh install')
  assert install[2:7] == ['queued-resources', 'ssh', 'ms', '--node=all', '--worker=all']
  starts = [c for c in calls if kind(c) == 'ssh start']
  assert [c[2:6] for c in starts] == [['tpu-vm', 'ssh', f'ms-{i}', '--worker=all'] for i in (0, 1)]
  for i, c in enumerate(starts):
    words = shlex.split(c[6][len('--command='):].split('; ', 1)[1])
    assert words[:7] == [
        'env', 'YUANJAX_EXIT_WAIT_S=420', 'MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080',
        'MEGASCALE_NUM_SLICES=2', 'MEGASCALE_PORT=8080', f'MEGASCALE_SLICE_ID={i}', 'bash'
    ]
  ls = os.listdir(fake.path / 'gcs' / 'b' / 'run' / 'worker_logs')
  assert sorted(ls) == sorted(
      f'slice-{s}-of-2-worker-{w}-of-2.exit-0' for s in (0, 1) for w in (0, 1))
  assert fake.kinds()[-1] == 'qr delete' and fake_state(fake)['slices'] == []
  fake.scenario(runs=[{}])
  assert tpu_pod.main(
      tiny_argv(tiny_repo, tmp_path, '--queued', '--num_slices=2', '--detach',
                '--config.mesh.dcn.data=2', '--config.data.path=gs://b/shards')) == 0
  where = ['--name=ms', '--zone=z', f'--local_dir={tmp_path}/stage']
  assert tpu_pod.main(['status', *where]) == 0  # every node's workers, from the record
  assert fake.calls()[-2][2:4] == ['queued-resources', 'describe']
  assert fake.calls()[-1][2:6] == ['queued-resources', 'ssh', 'ms', '--node=all']
  assert tpu_pod.main(['stop', *where]) == 0
  assert fake.kinds()[-3:] == ['ssh stop', 'qr describe', 'qr delete']
  assert fake.calls()[-3][2:6] == ['queued-resources', 'ssh', 'ms', '--node=all']


def test_num_slices_needs_queued(capsys, tiny_repo, tmp_path):
  with pytest.raises(SystemExit):
    tpu_pod.main(tiny_argv(tiny_repo, tmp_path, '--num_slices=2'))
  assert '--num_slices=2: needs --queued' in capsys.readouterr().err


# ------------------------------------------------------------- the worker script, for real

FAKE_TRAINER = textwrap.dedent('''\
    import signal, sys, time
    def save(*_):
      print('SIGTERM: checkpoint saved', flush=True)
      sys.exit(0)
    signal.signal(signal.SIGTERM, save)
    print('training', sys.argv[1:], flush=True)
    time.sleep(float(sys.argv[1]))
    sys.exit(int(sys.argv[2]))
    ''')


def worker(tmp_path, *args, **env):
  e = dict(os.environ, YUANJAX_RUN_DIR=str(tmp_path / 'run'), YUANJAX_WORKER_ID='0',
           YUANJAX_WORKER_COUNT='1', YUANJAX_UPLOAD_S='1', YUANJAX_EXIT_WAIT_S='5')
  e.update(env)
  return subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_worker.sh'), *args], env=e,
                        capture_output=True, text=True, timeout=60)


def wait_for(path, seconds=30):
  deadline = time.monotonic() + seconds
  while not os.path.exists(path) and time.monotonic() < deadline:
    time.sleep(0.05)
  return os.path.exists(path)


def test_worker_stop_lets_the_trainer_save(fake, tmp_path):
  """start returns at once; stop sends SIGTERM, the trainer saves, the exit is uploaded."""
  fake.scenario()
  (tmp_path / 'trainer.py').write_text(FAKE_TRAINER)
  marker = tmp_path / 'deleted'
  url = 'gs://b/run/worker_logs'
  r = worker(tmp_path, 'start', url, f'touch {marker}', '--', sys.executable,
             str(tmp_path / 'trainer.py'), '600', '0')
  assert r.returncode == 0 and 'started' in r.stdout, r.stderr
  assert 'running' in worker(tmp_path, 'status').stdout
  assert 'already going' in worker(tmp_path, 'start', url, '', '--', 'false').stdout
  assert wait_for_text(tmp_path / 'run' / 'worker-0-of-1.log', 'training')  # handler set
  r = worker(tmp_path, 'stop', '20')
  assert r.returncode == 0 and 'stopped' in r.stdout, r.stderr
  gcs = fake.path / 'gcs' / 'b' / 'run' / 'worker_logs'
  assert wait_for(gcs / 'worker-0-of-1.exit-0')
  assert 'SIGTERM: checkpoint saved' in (gcs / 'worker-0-of-1.log').read_text()
  assert wait_for(marker)  # worker 0 ran the exit command once every worker had finished
  assert 'exited with status 0' in worker(tmp_path, 'status').stdout


def test_worker_reports_a_failure(fake, tmp_path):
  fake.scenario()
  (tmp_path / 'trainer.py').write_text(FAKE_TRAINER)
  r = worker(tmp_path, 'start', 'gs://b/w', '', '--', sys.executable, str(tmp_path / 'trainer.py'),
             '0', '7')
  assert r.returncode == 0, r.stderr
  assert wait_for(fake.path / 'gcs' / 'b' / 'w' / 'worker-0-of-1.exit-7')


def test_worker_start_fails_when_the_metadata_server_does_not_answer(fake, tmp_path):
  """`curl -sf` failing used to kill the detached supervisor while `start` said "started"."""
  fake.scenario()
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'curl').write_text('#!/bin/bash\nexit 7\n')  # connection refused
  (bin_dir / 'curl').chmod(0o755)
  r = worker(tmp_path, 'start', 'gs://b/w', '', '--', 'sleep', '60', YUANJAX_WORKER_ID='',
             PATH=f'{bin_dir}:{os.environ["PATH"]}')
  assert r.returncode == 1 and 'started' not in r.stdout, r.stdout
  assert "cannot read this worker's number from the metadata server" in r.stderr
  assert 'no run' in worker(tmp_path, 'status').stdout


def test_worker_stop_keep_runs_no_exit_command(fake, tmp_path):
  fake.scenario()
  (tmp_path / 'trainer.py').write_text(FAKE_TRAINER)
  marker = tmp_path / 'deleted'
  r = worker(tmp_path, 'start', 'gs://b/k', f'touch {marker}', '--', sys.executable,
             str(tmp_path / 'trainer.py'), '600', '0')
  assert r.returncode == 0, r.stderr
  assert wait_for_text(tmp_path / 'run' / 'worker-0-of-1.log', 'training')  # handler set
  assert worker(tmp_path, 'stop', '20', 'keep').returncode == 0
  assert wait_for(fake.path / 'gcs' / 'b' / 'k' / 'worker-0-of-1.exit-0')
  assert wait_for_text(tmp_path / 'run' / 'supervisor.log', 'stopped with keep')
  assert not marker.exists()


def test_worker_reports_a_failed_exit_command(fake, tmp_path):
  """Worker 0's delete fails (its service account may not delete TPUs): the output is
  uploaded as LOG_URL/on_exit-failed, where `logs` and a person find it."""
  fake.scenario()
  r = worker(tmp_path, 'start', 'gs://b/f', 'echo PERMISSION_DENIED >&2; false', '--', 'true')
  assert r.returncode == 0, r.stderr
  failed = fake.path / 'gcs' / 'b' / 'f' / 'on_exit-failed'
  assert wait_for(failed) and 'PERMISSION_DENIED' in failed.read_text()


def test_worker_pid_file_from_before_a_reboot_is_no_run(fake, tmp_path):
  """A live pid (this test's) in a pid file of another boot is not a run: start starts."""
  fake.scenario()
  (tmp_path / 'run').mkdir()
  for stale in (f'{os.getpid()} 00000000-another-boot', f'{os.getpid()}'):
    (tmp_path / 'run' / 'pid').write_text(stale + '\n')
    assert 'no run' in worker(tmp_path, 'status').stdout
  lock = tmp_path / 'libtpu_lockfile'
  lock.write_text('')
  r = worker(tmp_path, 'start', 'gs://b/p', '', '--', 'true', YUANJAX_LIBTPU_LOCKFILE=str(lock))
  assert r.returncode == 0 and 'started worker-0-of-1' in r.stdout, r.stdout + r.stderr
  assert not lock.exists()  # libtpu's lock file of a dead process would block the trainer
  assert wait_for(fake.path / 'gcs' / 'b' / 'p' / 'worker-0-of-1.exit-0')


def wait_for_text(path, text, seconds=30):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if os.path.exists(path) and text in open(path).read():
      return True
    time.sleep(0.05)
  return False
