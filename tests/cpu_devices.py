"""Runs a Python snippet in a fresh process that sees N virtual CPU devices (XLA's host
platform device count is fixed at JAX's start, so a test of several devices needs its own
process)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(devices: int, code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -c code args` from the repository root on `devices` CPU devices; asserts that it
  exited 0 (showing the end of its stderr otherwise) and returns it (text output)."""
  flags = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=flags)
  done = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  return done
