"""A fine-tune from an HF dir on 8 virtual CPU devices, experts over 4 and data over 2 (a
process of its own): prints the per-step losses as JSON.

  python tests/multidevice/finetune_worker.py HF_DIR DATA_CACHE WORKDIR
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import json  # noqa: E402

import jax  # noqa: E402

from tests.multidevice import finetune_cases as cases  # noqa: E402
from yuanjax import trainer, workdir  # noqa: E402


def main(hf_dir, cache, wd):
  if jax.device_count() != 8:
    raise SystemExit(f'expected 8 CPU devices, got {jax.devices()}')
  trainer.train_and_evaluate(
      cases.config(hf_dir, cache, cases.MESH_STEPS, cases.MESH_BATCH, cases.MESH), wd)
  print(json.dumps({r['step']: r['loss'] for r in workdir.read_metrics(wd)['train']}))


if __name__ == '__main__':
  main(*sys.argv[1:])
