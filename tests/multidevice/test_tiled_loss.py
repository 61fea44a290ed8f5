"""The tiled loss with the batch split over 8 devices (`loss_worker.py`, a process of its own):
the same value and gradients as the one-piece loss, and no collective per chunk (the head
gradient is accumulated per batch shard and reduced once, after the loop)."""
import json
import os
import subprocess
import sys


def test_tiled_loss_on_a_data_parallel_mesh():
  worker = os.path.join(os.path.dirname(__file__), 'loss_worker.py')
  run = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stderr[-4000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert len(out['rel']) == 3 and max(out['rel']) < 1e-5, out  # loss, d hidden, d head
  assert out['loop_all_reduces'] == 0, out
