"""End-to-end trainer tests: real runs in subprocesses, killed and resumed.

Every interrupted run must end with exactly the per-step losses of an uninterrupted run.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def _flags(workdir, cache, steps=STEPS):
  return [f'--workdir={workdir}', '--config=configs/demo.py:runlocal',
          f'--config.data.cache_dir={cache}', '--config.data.max_bytes=300000',
          '--config.data.vocab_size=512', '--config.model.vocab_size=512',
          '--config.model.num_layers=2', '--config.model.hidden_size=64',
          f'--config.train.num_steps={steps}', '--config.train.log_every=1',
          '--config.checkpoint.every=2', '--config.train.sample_tokens=0',
          '--config.train.eval_steps=1', '--config.train.batch_size=4', '--config.train.seq_len=64']


def _start(workdir, cache, steps=STEPS):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, '-m', 'yuanjax.train', *_flags(workdir, cache, steps)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir, cache, steps=STEPS):
  p = _start(workdir, cache, steps)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out[-3000:]
  return out


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(line) for line in f]
  train = [r for r in recs if r['kind'] == 'train']
  steps = [r['step'] for r in train]
  assert steps == sorted(set(steps)), f'duplicate or unordered steps: {steps}'
  return {r['step']: r['loss'] for r in train}


def _max_logged_step(workdir):
  try:
    return max(_losses(workdir))
  except (FileNotFoundError, ValueError, json.JSONDecodeError):
    return 0


def _wait(cond, proc, timeout=300):
  t = time.time()
  while not cond():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() - t < timeout, 'timed out'
    time.sleep(0.01)


def _checkpoint_steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
                if os.path.basename(p).isdigit())


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp('reference'))
  _run(workdir, cache)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert os.listdir(os.path.join(workdir, 'tb'))
  return workdir, losses


def test_sigterm_then_sigkill_then_resume_is_exact(tmp_path, cache, reference):
  _, want = reference
  workdir = str(tmp_path)
  # 1. Preemption: SIGTERM saves the current step and exits 0.
  p = _start(workdir, cache)
  _wait(lambda: _max_logged_step(workdir) >= 3, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  saved = _checkpoint_steps(workdir)
  assert 'saving step' in out
  assert saved and saved[-1] >= max(3, _max_logged_step(workdir)), saved   # the step reached
  # 2. SIGKILL while a checkpoint is being written (Orbax's temporary directory exists).
  p = _start(workdir, cache)
  tmp_glob = os.path.join(workdir, 'checkpoints', '*tmp*')
  _wait(lambda: glob.glob(tmp_glob) or _max_logged_step(workdir) >= STEPS - 1, p)
  p.kill()
  p.wait()
  # 3. SIGKILL at an arbitrary moment.
  p = _start(workdir, cache)
  time.sleep(12)
  if p.poll() is None:
    p.kill()
  p.wait()
  # 4. The same command again finishes the run.
  _run(workdir, cache)
  assert _losses(workdir) == want


def test_corrupt_latest_checkpoint_falls_back(tmp_path, cache, reference):
  ref_dir, want = reference
  workdir = str(tmp_path / 'run')
  subprocess.run(['cp', '-r', ref_dir, workdir], check=True)
  latest = _checkpoint_steps(workdir)[-1]
  assert latest == STEPS
  files = [f for f in glob.glob(os.path.join(workdir, 'checkpoints', str(latest), 'state', '**'),
                                recursive=True) if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  out = _run(workdir, cache, steps=STEPS + 2)
  assert 'unreadable' in out and f'/{latest}' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', f'{latest}.unreadable-0'))   # kept
  got = _losses(workdir)
  assert {s: got[s] for s in range(1, STEPS + 1)} == want   # steps 9, 10 recomputed identically
  assert max(got) == STEPS + 2


def test_one_step_on_real_demo_config(tmp_path):
  """The real demo config (model, data, embedded corpus), one step, in process."""
  sys.path.insert(0, REPO)
  import configs.demo as demo
  from yuanjax import trainer
  config = demo.get_config()
  config.train.num_steps, config.train.log_every, config.train.sample_tokens = 1, 1, 4
  config.train.eval_steps, config.train.progress = 1, False
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary['step'] == 1 and summary['train_loss'] > 0 and summary['eval_loss'] > 0
  rec = json.loads(open(tmp_path / 'metrics.jsonl').readline())
  assert rec['step'] == 1 and 'moe/load/layer_0/expert_0' in rec and 'grad_norm' in rec
  assert _checkpoint_steps(str(tmp_path)) == [1]
