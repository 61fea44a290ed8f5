"""launch.gpu_slurm: the sbatch script, run for real under fake sbatch/srun/scontrol and a
fake interpreter: pre-flight, CPUs, the training step, requeue until train.num_steps."""
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKES = os.path.join(REPO, 'tests', 'launch', 'fakes')
sys.path.insert(0, REPO)

from launch import gpu_slurm, progress  # pylint: disable=g-import-not-at-top
from tests.launch.test_launchers import (  # pylint: disable=g-import-not-at-top
    TRICKY, dry_run, shellcheck)


@pytest.fixture
def cfg(tmp_path):
  path = tmp_path / 'configs' / 'fake.py'
  path.parent.mkdir()
  path.write_text('def get_config(arg=None):\n  return None\n')
  return str(path)


def test_script(capsys, cfg, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cmds = dry_run(capsys, gpu_slurm, [
      f'--config={cfg}', '--workdir=/shared/m32', '--nodes=4', '--time=24:00:00', '--partition=gpu',
      '--account=proj', '--job_name=m32', '--mem=0', '--setup=module load cuda/12.4',
      '--setup=source /shared/venv/bin/activate', '--env=NCCL_DEBUG=WARN',
      '--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.8', '--config.mesh.data=4', '--config.mesh.shape=1,2',
      TRICKY, '--force'
  ])
  path = str(tmp_path / 'slurm_logs' / 'm32.sbatch')
  assert cmds == [['mkdir', '-p', str(tmp_path / 'slurm_logs')], ['sbatch', path]]
  text = open(path).read()
  lines = text.splitlines()
  for line in [
      '#SBATCH --job-name=m32', '#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1',
      '#SBATCH --gpus-per-node=8', '#SBATCH --requeue', '#SBATCH --exclusive',
      '#SBATCH --signal=TERM@300', '#SBATCH --open-mode=append', '#SBATCH --mem=0',
      '#SBATCH --time=24:00:00', '#SBATCH --partition=gpu', '#SBATCH --account=proj',
      f'#SBATCH --output={tmp_path}/slurm_logs/%x-%j.out', '  module load cuda/12.4',
      '  source /shared/venv/bin/activate', 'export NCCL_DEBUG=WARN',
      'export XLA_PYTHON_CLIENT_MEM_FRACTION=0.8', 'export CUDA_DEVICE_MAX_CONNECTIONS=1',
      "export XLA_FLAGS='" + ' '.join(gpu_slurm.GPU_XLA_FLAGS) + "'",
      'coordinator="${nodes[0]}:$((10000 + SLURM_JOB_ID % 20000))"', 'python=(python3)',
      'args=(' + shlex.join([f'--config={cfg}', '--workdir=/shared/m32', '--config.mesh.data=4']) +
      " '--config.mesh.shape=1,2' " + shlex.quote(TRICKY) + ')'
  ]:
    assert line in lines, line
  assert 'export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9' not in lines  # --env replaced the default
  assert not any(l.startswith('#SBATCH --cpus-per-task') for l in lines)  # from the node, below
  assert lines.index('  source /shared/venv/bin/activate') < lines.index('python=(python3)')
  shellcheck(tmp_path, text, 'job.sbatch')


def test_gpu_env_leaves_nccl_its_choices():
  """NCCL_PROTO forced LL128 (unsafe on some H100 topologies) and the -2 buffer sizes (NCCL's
  "default" anyway) are gone; one process drives 8 GPUs: NCCL_LAUNCH_MODE=GROUP; MaxText's A3
  combine thresholds."""
  env = gpu_slurm.GPU_ENV
  assert not {'NCCL_PROTO', 'NCCL_LL_BUFFSIZE', 'NCCL_LL128_BUFFSIZE'} & set(env)
  assert env['NCCL_LAUNCH_MODE'] == 'GROUP'
  flags = dict(f[2:].split('=') for f in env['XLA_FLAGS'].split())
  assert [
      flags[f'xla_gpu_{c}_combine_threshold_bytes']
      for c in ('all_reduce', 'all_gather', 'reduce_scatter')
  ] == [str(2**30), str(2**27), str(2**27)]


def test_a_config_that_does_not_fit_submits_nothing(capsys, tmp_path, monkeypatch):
  """The M32 config at remat none, grad_accum 1 on 4 x 8 H100 (the old README example)."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('PATH', f'{FAKES}:{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_DIR', str(tmp_path))
  argv = [
      f'--config={REPO}/configs/yuan_m32.py', '--workdir=/w', '--nodes=4', '--job_name=j',
      '--config.mesh.fsdp=4', '--config.mesh.expert=8', '--config.train.grad_accum=8'
  ]
  with pytest.raises(SystemExit) as e:
    gpu_slurm.main(argv)  # 4 nodes without data.path: refused first
  assert 'data.path is not set: a 4-process gpu run' in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    gpu_slurm.main(argv + ['--config.data.path=/shared/shards'])
  err = capsys.readouterr().err
  assert e.value.code == 2 and 'usable on 32 x H100-80G' in err
  assert 'it fits with --config.' in err and '--config.train.grad_accum=' in err
  assert not (tmp_path / 'slurm_logs').exists() and not (tmp_path / 'sbatch.log').exists()


def test_port_is_below_the_ephemeral_range():
  for job_id in range(0, 100_000, 997):
    assert 1024 < 10000 + job_id % 20000 < 32768  # Linux: ip_local_port_range 32768 60999


FAKE_PY = textwrap.dedent('''\
    #!/bin/bash
    # Stands in for the nodes' python: the pre-flight, the trainer; progress.py runs for real.
    if [[ $1 == -c ]]; then
      echo "preflight task $SLURM_PROCID wants $3 GPUs"
      exit "${FAKE_PREFLIGHT_RC:-0}"
    elif [[ -n ${FAKE_PROGRESS_RC:-} && $1 == *progress.py ]]; then
      exit "$FAKE_PROGRESS_RC"
    elif [[ $1 == -u ]]; then
      echo "train task $SLURM_PROCID: ${*:4}"
      mkdir -p "$FAKE_CKPT"
    else
      exec %s "$@"
    fi
    ''') % shlex.quote(sys.executable)


def run_job(tmp_path, cfg, step, *flags, **env):
  """Writes the script for a 2-node job and runs it as SLURM would on its first node."""
  py = tmp_path / 'fakepy'
  py.write_text(FAKE_PY)
  py.chmod(0o755)
  fake = tmp_path / 'fake'
  fake.mkdir(exist_ok=True)
  args = gpu_slurm.parse([
      f'--config={cfg}', f'--workdir={tmp_path}/wd', '--nodes=2', '--port=1234', f'--python={py}',
      '--config.train.num_steps=10', TRICKY, '--force', *flags
  ])
  script = tmp_path / 'job.sbatch'
  script.write_text(gpu_slurm.script(args))
  e = dict(os.environ, PATH=f'{FAKES}:{os.environ["PATH"]}', FAKE_DIR=str(fake),
           SLURM_JOB_NODELIST='node-[a-b]', SLURM_JOB_NUM_NODES='2', SLURM_JOB_ID='77',
           SLURM_CPUS_ON_NODE='96', FAKE_CKPT=f'{tmp_path}/wd/checkpoints/{step}', **env)
  r = subprocess.run(['bash', str(script)], env=e, capture_output=True, text=True, timeout=120)
  logs = {
      n: (fake / f'{n}.log').read_text().splitlines() if (fake / f'{n}.log').exists() else []
      for n in ('srun', 'scontrol')
  }
  return r, logs


def test_job_trains_and_stops_at_num_steps(cfg, tmp_path):
  r, logs = run_job(tmp_path, cfg, 10)
  assert r.returncode == 0, r.stderr
  out = r.stdout.splitlines()
  assert out[1:3] == ['preflight task 0 wants 8 GPUs', 'preflight task 1 wants 8 GPUs']
  train = [
      f'--config={cfg}', f'--workdir={tmp_path}/wd', '--config.train.num_steps=10', TRICKY,
      '--coordinator_address=node-a:1234', '--num_processes=2'
  ]
  assert out[3:5] == [f'train task {i}: ' + ' '.join(train + [f'--process_id={i}']) for i in (0, 1)]
  assert '[progress] newest checkpoint: step 10; train.num_steps: 10' in out
  step = ('--nodes=2 --ntasks-per-node=1 --cpus-per-task=96 --kill-on-bad-exit=1 --label '
          'SRUN_CPUS_PER_TASK=96')
  assert logs == {'srun': [step, step], 'scontrol': []}  # pre-flight, train; no requeue


def test_job_requeues_until_num_steps(cfg, tmp_path):
  r, logs = run_job(tmp_path, cfg, 6, '--cpus_per_task=24', '--mem=500G')
  assert r.returncode == 0, r.stderr
  assert logs['scontrol'] == ['requeue 77']
  assert logs['srun'][0].startswith('--nodes=2 --ntasks-per-node=1 --cpus-per-task=24 --mem=500G')
  assert logs['srun'][0].endswith('SRUN_CPUS_PER_TASK=24')
  r, logs = run_job(tmp_path, cfg, 6, '--max_requeues=3', SLURM_RESTART_COUNT='3')
  assert r.returncode == 1 and 'not at train.num_steps after 3 requeues' in r.stderr
  assert logs['scontrol'] == ['requeue 77']  # the first run's only


@pytest.mark.parametrize('rc', [1, 2])
def test_a_failing_progress_check_is_no_reason_to_requeue(cfg, tmp_path, rc):
  """progress.py's traceback (1) or bad input (2) is passed through; only NOT_DONE requeues."""
  r, logs = run_job(tmp_path, cfg, 6, FAKE_PROGRESS_RC=str(rc))
  assert r.returncode == rc and 'launch/progress.py failed' in r.stderr
  assert logs['scontrol'] == []


def test_preflight_failure_stops_before_training(cfg, tmp_path):
  r, logs = run_job(tmp_path, cfg, 10, FAKE_PREFLIGHT_RC='1')
  assert r.returncode == 1
  assert 'train task' not in r.stdout and len(logs['srun']) == 1 and not logs['scontrol']


def test_gpu_xla_flags_exist_in_this_jaxlib():
  """An XLA flag jaxlib does not know aborts every process: each default must parse."""

  def runs(flags):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
    code = 'import jax; jax.numpy.ones(1).block_until_ready()'
    return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                          timeout=120).returncode == 0

  assert runs(gpu_slurm.GPU_ENV['XLA_FLAGS'])
  assert not runs('--xla_gpu_enable_async_collectives=true')  # removed from XLA: caught


def test_submit_calls_sbatch(cfg, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('PATH', f'{FAKES}:{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_DIR', str(tmp_path))
  assert gpu_slurm.main([f'--config={cfg}', '--workdir=/w', '--job_name=j', '--force']) == 0
  assert (tmp_path / 'sbatch.log').read_text() == f'{tmp_path}/slurm_logs/j.sbatch\n'


@pytest.mark.parametrize('argv, message', [
    (['--env=NOEQUALS'], "--env='NOEQUALS': must be KEY=VALUE"),
    (['--cpus_per_task=0'], '--cpus_per_task=0: must be at least 1'),
    (['--mem=1 G'], "--mem='1 G'"),
    (['--signal_s=-1'], '--signal_s=-1'),
])
def test_bad_input(capsys, cfg, argv, message):
  with pytest.raises(SystemExit) as e:
    gpu_slurm.main([f'--config={cfg}', '--workdir=/w', *argv, '--dry-run'])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_progress_reads_the_newest_checkpoint(tmp_path):
  cfg = tmp_path / 'c.py'
  cfg.write_text(
      textwrap.dedent('''\
      import types
      def get_config(arg=None):
        return types.SimpleNamespace(train=types.SimpleNamespace(num_steps=int(arg or 8)))
      '''))
  wd = tmp_path / 'wd'
  assert progress.main([f'--config={cfg}', f'--workdir={wd}']) == progress.NOT_DONE == 3  # none
  for name in ('4', '8.unreadable-1', 'tmp'):
    (wd / 'checkpoints' / name).mkdir(parents=True)
  assert progress.main([f'--config={cfg}', f'--workdir={wd}']) == progress.NOT_DONE
  assert progress.main([f'--config={cfg}:4', f'--workdir={wd}']) == 0
  assert progress.main([f'--config={cfg}', f'--workdir={wd}', '--config.train.num_steps=3']) == 0
