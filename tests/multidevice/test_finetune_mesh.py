"""init_from an HF dir on 8 devices (expert 4 x data 2; `finetune_worker.py`, a process of its
own) gives the losses of the same fine-tune on one device: the params arrived on their shards
as they are."""
import json
import os
import subprocess
import sys

import jax
import pytest

from tests.multidevice import finetune_cases as cases
from yuanjax import trainer, workdir


def test_expert_and_data_parallel_fine_tune_equals_one_device(tmp_path):
  cases.write_source(str(tmp_path))
  hf_dir, cache = str(tmp_path / 'hf'), str(tmp_path / 'cache')
  script = os.path.join(os.path.dirname(__file__), 'finetune_worker.py')
  run = subprocess.run([sys.executable, script, hf_dir, cache,
                        str(tmp_path / 'mesh')], capture_output=True, text=True, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stderr[-4000:]
  mesh = {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
  trainer.train_and_evaluate(cases.config(hf_dir, cache, cases.MESH_STEPS, cases.MESH_BATCH),
                             str(tmp_path / 'one'))
  one = {r['step']: r['loss'] for r in workdir.read_metrics(str(tmp_path / 'one'))['train']}
  assert jax.device_count() == 1
  assert sorted(mesh) == sorted(one) == [1, 2]
  for step in one:
    assert mesh[step] == pytest.approx(one[step], rel=2e-6), (mesh, one)
