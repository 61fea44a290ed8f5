"""The sandbox that runs model-written code: verdicts, limits, no network, no effect on its caller."""
import os
import socket
import tempfile
import textwrap

import pytest

from yuanjax.evals import sandbox

FAST = sandbox.Limits(timeout_s=1.0)


def run(source, limits=FAST):
  return sandbox.run(textwrap.dedent(source), limits)


def test_a_correct_program_passes_and_a_wrong_one_fails():
  assert run('def f(x):\n  return x + 1\nassert f(1) == 2\n') == sandbox.Result('passed')
  wrong = run('def f(x):\n  return x\nassert f(1) == 2, "f(1) is not 2"\n')
  assert wrong == sandbox.Result('failed', 'failed: AssertionError: f(1) is not 2')
  assert run('def f(:\n').reason.startswith('failed: SyntaxError')


def test_an_infinite_loop_times_out():
  result = run('while True:\n  pass\n')
  assert result == sandbox.Result('timed out', 'ran past 1 s')


def test_a_program_that_swallows_its_timer_is_stopped(monkeypatch):
  monkeypatch.setattr(sandbox, 'STARTUP_GRACE_S', 3.0)
  result = run('''
      while True:
        try:
          while True:
            pass
        except BaseException:
          pass
      ''')
  # By its CPU limit (timeout_s + 2 s) or, on a busy machine, killed at timeout_s + grace.
  assert result in (sandbox.Result('timed out', 'used its 3 s of CPU'),
                    sandbox.Result('timed out', 'still running 3 s after its 1 s (killed)'))


def test_a_memory_hog_is_stopped():
  result = run('blob = bytearray(2 << 30)\n', sandbox.Limits(timeout_s=5, memory_bytes=512 << 20))
  assert result.status == 'failed' and 'MemoryError' in result.reason


@pytest.mark.parametrize('namespace', [True, False], ids=['namespace', 'socket module'])
def test_the_network_is_out_of_reach(monkeypatch, namespace):
  if namespace and not sandbox.network_namespace():
    pytest.skip('no user namespaces on this host')
  monkeypatch.setattr(sandbox, 'network_namespace', lambda: namespace)
  with socket.create_server(('127.0.0.1', 0)) as server:
    result = run(f'''
        import socket
        socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)
        ''')
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # no connection is waiting to be accepted
      server.accept()
  assert result.status == 'failed' and 'Error' in result.reason


def test_isolation_is_reported():
  assert sandbox.isolation() in ('namespace', 'socket module')


def test_the_caller_is_unaffected(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  cwd, environ = os.getcwd(), dict(os.environ)
  result = run('''
      import os, sys
      open('left_behind.txt', 'w').write('x')
      sys.path.insert(0, '/nowhere')
      assert os.environ.get('HTTPS_PROXY') is None and 'PYTHONPATH' not in os.environ
      ''')
  assert result.passed
  assert os.getcwd() == cwd and dict(os.environ) == environ
  assert not os.path.exists(os.path.join(cwd, 'left_behind.txt'))
  assert not os.listdir(tmp_path)  # its temporary directory is gone


def test_destructive_calls_are_disabled_and_exits_do_not_pass(tmp_path):
  precious = tmp_path / 'precious.txt'
  precious.write_text('keep')
  assert run(f'import os\nos.remove({str(precious)!r})\n').status == 'failed'
  assert precious.read_text() == 'keep'
  assert run('import os\nos._exit(0)\n') == sandbox.Result('failed',
                                                           'exited before its tests finished')
  assert run('import sys\nsys.exit(0)\n').reason == 'failed: SystemExit: 0'
