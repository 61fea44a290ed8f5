"""A real 2-process run on this CPU machine: two `python -m yuanjax.train` processes joined
by jax.distributed (127.0.0.1 coordinator, gloo collectives), one CPU device each, mesh
data=2. The run is preempted (SIGTERM to one process only: both must stop and save the same
step), then the same command resumes it to the end. Every logged loss, train and eval, must
equal those of one process driving 2 CPU devices with the same two input streams
(train.data_shards=2): the same global batch, the same program.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 200  # steps are milliseconds here: enough that the preemption lands mid-run
TIMEOUT = 240  # per run, seconds


def _flags(workdir, cache):
  return [
      f'--workdir={workdir}', '--config=configs/demo.py:runlocal',
      f'--config.data.cache_dir={cache}', '--config.data.max_bytes=300000',
      '--config.data.vocab_size=512', '--config.model.vocab_size=512',
      '--config.model.num_layers=1', '--config.model.hidden_size=64',
      '--config.model.num_experts=4', f'--config.train.num_steps={STEPS}',
      '--config.train.log_every=1', '--config.checkpoint.every=50',
      '--config.train.sample_tokens=0', '--config.train.eval_steps=1',
      '--config.train.batch_size=4', '--config.train.seq_len=32', '--config.mesh.data=2',
      '--config.train.data_shards=2'
  ]


def _env(tmp, **extra):
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
              JAX_COMPILATION_CACHE_DIR=str(tmp / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **extra)


def _start(argv, env, log):
  return subprocess.Popen([sys.executable, '-m', 'yuanjax.train', *argv], cwd=REPO, env=env,
                          stdout=open(log, 'w'), stderr=subprocess.STDOUT, start_new_session=True)


def _start_pair(workdir, cache, tmp, tag):
  port, = common.free_ports()
  procs, logs = [], []
  for i in range(2):
    logs.append(tmp / f'{tag}_{i}.log')
    procs.append(
        _start(
            _flags(workdir, cache) +
            [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
            _env(tmp), logs[-1]))
  return procs, logs


def _finish(procs, logs, timeout=TIMEOUT):
  """Waits for every process; on a failure or timeout kills them all and shows the logs."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  outs = [open(log).read() for log in logs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, '\n'.join(o[-3000:] for o in outs)
  return outs


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(line) for line in f]
  train = {r['step']: r['loss'] for r in recs if r['kind'] == 'train'}
  evals = {r['step']: r['loss'] for r in recs if r['kind'] == 'eval'}
  return train, evals


def _max_step(workdir):
  try:
    return max(_metrics(workdir)[0])
  except (FileNotFoundError, ValueError, json.JSONDecodeError):
    return 0


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One process, 2 CPU devices: also builds the data cache the 2-process runs then share."""
  tmp = tmp_path_factory.mktemp('multihost')
  cache, workdir = str(tmp / 'data_cache'), str(tmp / 'reference')
  p = _start(
      _flags(workdir, cache),
      _env(tmp,
           XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'),
      tmp / 'reference.log')
  _finish([p], [tmp / 'reference.log'])
  train, evals = _metrics(workdir)
  assert sorted(train) == list(range(1, STEPS + 1)) and list(evals) == [STEPS]
  return tmp, cache, train, evals


def test_two_processes_preempted_and_resumed_match_one_process(reference):
  tmp, cache, want_train, want_eval = reference
  workdir = str(tmp / 'two_processes')

  # 1. Preemption reaches process 1 only; both stop at the same step, save it, exit 0.
  procs, logs = _start_pair(workdir, cache, tmp, 'preempted')
  deadline = time.time() + TIMEOUT
  while _max_step(workdir) < 3:
    assert all(p.poll() is None for p in procs) and time.time() < deadline, \
        '\n'.join(open(log).read()[-3000:] for log in logs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs, logs)
  stopped = _max_step(workdir)
  assert 3 <= stopped < STEPS, stopped
  for out in outs:
    assert f'saving step {stopped} and exiting' in out, out[-3000:]
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert ckpts[-1] == stopped, ckpts
  data = os.listdir(os.path.join(workdir, 'checkpoints', str(stopped), 'data'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data)  # grain state per process

  # 2. The same command resumes both processes from that checkpoint and finishes the run.
  procs, logs = _start_pair(workdir, cache, tmp, 'resumed')
  outs = _finish(procs, logs)
  assert f'resumed from step {stopped}' in outs[0] and f'resumed from step {stopped}' in outs[1]

  got_train, got_eval = _metrics(workdir)
  assert sorted(got_train) == list(range(1, STEPS + 1))
  steps = sorted(want_train)
  np.testing.assert_allclose([got_train[s] for s in steps], [want_train[s] for s in steps],
                             rtol=1e-5, atol=0)
  np.testing.assert_allclose(got_eval[STEPS], want_eval[STEPS], rtol=1e-5)
  # Only process 0 writes metrics and TensorBoard: one line per step, no duplicates.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert sum(1 for _ in f) == STEPS + 1


def test_several_streams_per_process_resume_exactly(reference):
  """One process reading 2 of the streams (as the reference run does): one grain-checkpointable
  iterator whose state restores both streams."""
  sys.path.insert(0, REPO)
  import configs.demo as demo
  from yuanjax.data import streams
  _, cache, _, _ = reference
  config = demo.get_config('runlocal')
  config.data.update(dict(cache_dir=cache, max_bytes=300000, vocab_size=512))
  config.train.update(dict(batch_size=4, seq_len=32, data_shards=2))
  it, make_eval, _ = streams.make_data(config)
  other, _, _ = streams.make_data(config)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as grain.checkpoint stores it
  want = [next(it) for _ in range(2)]
  other.set_state(state)
  got = [next(other) for _ in range(2)]
  for w, g in zip(want, got):
    assert w['inputs'].shape == (4, 32)
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  assert next(make_eval())['inputs'].shape == (4, 32)
