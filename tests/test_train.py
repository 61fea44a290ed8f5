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

from yuanjax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def _flags(workdir, cache, steps=STEPS, extra=()):
  return [
      f'--workdir={workdir}', '--config=configs/demo.py:runlocal',
      f'--config.data.cache_dir={cache}', '--config.data.max_bytes=300000',
      '--config.data.vocab_size=512', '--config.model.vocab_size=512',
      '--config.model.num_layers=2', '--config.model.hidden_size=64',
      f'--config.train.num_steps={steps}', '--config.train.log_every=1',
      '--config.checkpoint.every=2', '--config.train.sample_tokens=0',
      '--config.train.eval_steps=1', '--config.train.batch_size=4', '--config.train.seq_len=64',
      *extra
  ]


def start_train(flags, preexec_fn=None):
  """`python -m yuanjax.train FLAGS` on the CPU, in the background, its output piped."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, '-m', 'yuanjax.train', *flags], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=preexec_fn)


def _start(workdir, cache, steps=STEPS, extra=(), preexec_fn=None):
  return start_train(_flags(workdir, cache, steps, extra), preexec_fn)


def _run(workdir, cache, steps=STEPS, extra=(), returncode=0, preexec_fn=None):
  p = _start(workdir, cache, steps, extra, preexec_fn)
  out, _ = p.communicate(timeout=600)
  assert (p.returncode == 0) == (returncode == 0), out[-3000:]
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
  saved = workdir_lib.checkpoint_steps(workdir)
  assert 'saving step' in out
  assert saved and saved[-1] >= max(3, _max_logged_step(workdir)), saved  # the step reached
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
  latest = workdir_lib.checkpoint_steps(workdir)[-1]
  assert latest == STEPS
  files = [
      f for f in glob.glob(os.path.join(workdir, 'checkpoints', str(latest), 'state', '**'),
                           recursive=True) if os.path.isfile(f)
  ]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  out = _run(workdir, cache, steps=STEPS + 2)
  assert 'unreadable' in out and f'/{latest}' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', f'{latest}.unreadable-0'))  # kept
  got = _losses(workdir)
  assert {s: got[s] for s in range(1, STEPS + 1)} == want  # steps 9, 10 recomputed identically
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
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [1]


def _records(workdir):
  """metrics.jsonl as strict JSON: a bare NaN or Infinity is an error."""

  def refuse(name):
    raise ValueError(f'non-standard JSON constant {name}')

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


DIVERGE = [
    '--config.optimizer.lr=1e30', '--config.optimizer.warmup_steps=0',
    '--config.checkpoint.every=1', '--config.checkpoint.keep=3'
]


def test_nonfinite_halts_without_saving_then_resumes(tmp_path, cache):
  """lr=1e30 turns the loss NaN at step 2: the run stops there, non-zero, naming the step; the
  step-1 checkpoint (the last good one) is the newest and the same command resumes from it.
  (Step 1's update, finite but with lr=1e30, already wrecked those params, so here the resumed
  run halts at step 2 again, and nothing is saved or logged twice.)"""
  workdir = str(tmp_path)
  out = _run(workdir, cache, steps=8, extra=DIVERGE, returncode=1)
  assert 'step 2: loss and grad_norm not finite' in out and 'newest checkpoint is step 1' in out
  assert workdir_lib.checkpoint_steps(workdir) == [1]
  recs = _records(workdir)
  assert [r['step'] for r in recs] == [1, 2]
  assert recs[1]['nonfinite'] is True and recs[1]['halted'] is True and recs[1]['loss'] is None
  assert recs[0]['nonfinite'] is False and recs[0]['loss'] > 0
  out = _run(workdir, cache, steps=8, extra=DIVERGE + ['--config.optimizer.lr=1e-3'], returncode=1)
  assert 'resumed from step 1' in out and 'step 2: loss and grad_norm not finite' in out
  assert workdir_lib.checkpoint_steps(workdir) == [1]
  assert [(r['step'], r['nonfinite']) for r in _records(workdir)] == [(1, False), (2, True)]


def test_nonfinite_skip_counts_then_halts(tmp_path, cache):
  """on_nonfinite=skip: steps 2 and 3 are skipped (and may be saved: their state is step 1's
  update), the third non-finite step in a row exceeds max_skipped_in_a_row=2 and halts."""
  workdir = str(tmp_path)
  out = _run(
      workdir, cache, steps=8, returncode=1,
      extra=DIVERGE + ['--config.train.on_nonfinite=skip', '--config.train.max_skipped_in_a_row=2'])
  assert 'step 4: 3 steps in a row skipped' in out
  recs = _records(workdir)
  assert [(r['step'], r['skipped_steps'], r['nonfinite']) for r in recs[:3]] == [(1, 0, False),
                                                                                 (2, 1, True),
                                                                                 (3, 2, True)]
  assert recs[3]['step'] == 4 and recs[3]['halted'] is True
  assert workdir_lib.checkpoint_steps(workdir) == [1, 2, 3]


def test_failed_checkpoint_write_keeps_old_ones_and_resumes_exactly(tmp_path, cache, reference):
  """A disk that refuses writes (RLIMIT_FSIZE: any file over 512 KiB fails) during a save: a
  clear error, the earlier checkpoints intact, and the same command resumes exactly."""
  import resource
  ref_dir, want = reference
  workdir = str(tmp_path / 'run')
  subprocess.run(['cp', '-r', ref_dir, workdir], check=True)
  limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))
  out = _run(workdir, cache, steps=STEPS + 2, returncode=1, preexec_fn=limit)
  assert f'saving step {STEPS + 2}' in out or 'a checkpoint save' in out, out[-3000:]
  assert 'failed' in out and 'intact' in out
  assert workdir_lib.checkpoint_steps(workdir)[-1] == STEPS
  partial = _losses(workdir)
  out = _run(workdir, cache, steps=STEPS + 2)
  assert f'resumed from step {STEPS}' in out
  got = _losses(workdir)
  assert {s: got[s] for s in range(1, STEPS + 1)} == want
  assert {s: got[s] for s in partial if s > STEPS} == {s: partial[s] for s in partial if s > STEPS}


def test_two_identical_runs_give_bitwise_identical_losses(tmp_path, cache, reference):
  _, want = reference
  _run(str(tmp_path), cache)
  assert _losses(str(tmp_path)) == want


def test_unwritable_workdir_is_an_error_before_anything_runs(tmp_path):
  sys.path.insert(0, REPO)
  import configs.demo as demo
  from yuanjax import trainer
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='--workdir=.*file/run: not a writable directory'):
    trainer.train_and_evaluate(demo.get_config('runlocal'), str(tmp_path / 'file' / 'run'))


def test_bad_data_is_an_error_naming_it_before_any_compile(tmp_path, cache):
  sys.path.insert(0, REPO)
  import configs.demo as demo
  from yuanjax import trainer
  config = demo.get_config('runlocal')
  config.data.path = str(tmp_path / 'no_shards')
  with pytest.raises(ValueError, match='data.path: .*no_shards: no such directory'):
    trainer.train_and_evaluate(config, str(tmp_path / 'w1'))
  (tmp_path / 'empty').mkdir()
  config.data.path = str(tmp_path / 'empty')
  with pytest.raises(ValueError, match='empty/manifest.json: no such file'):
    trainer.train_and_evaluate(config, str(tmp_path / 'w2'))
  config = demo.get_config('runlocal')
  config.data.update(dict(cache_dir=cache, max_bytes=300000, vocab_size=512))
  config.model.vocab_size = 256
  with pytest.raises(
      ValueError, match=r'model.vocab_size=256 is smaller than the tokenizer .*512, '
      r'.*tokenizer.model\): add --config.model.vocab_size=512 '):
    trainer.train_and_evaluate(config, str(tmp_path / 'w3'))
  assert not os.path.exists(tmp_path / 'w3' / 'checkpoints')
