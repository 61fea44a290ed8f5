"""Sharded generation (`yuanjax.generate` with mesh=): a workdir checkpoint loaded straight onto
3 meshes of 8 virtual CPU devices (`generate_worker.py`, a process of its own) gives one
device's greedy tokens; its params and the decode cache are split as the rules say; a mesh the
devices or the model do not fit is refused by name before any weight is read."""
import json
import os
import subprocess
import sys

import pytest

from tests.model.helpers import tiny
from tests.multidevice import generate_cases as cases
from tests.test_generate import save_random_workdir
from yuanjax import generate as gen
from yuanjax import loader

BATCH = ['data', 'fsdp', 'expert']  # sharding.BATCH_AXES: rows over every non-tensor axis


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(one device's tokens, the worker's JSON) for a workdir holding random tiny-M32 params
  (vocabulary 96: the embedding splits over tensor=2)."""
  path = tmp_path_factory.mktemp('gen_mesh') / 'workdir'
  save_random_workdir(path, tiny(**{'vocab_size': 96, 'moe.dispatch': 'capacity'}))
  worker = os.path.join(os.path.dirname(__file__), 'generate_worker.py')
  proc = subprocess.Popen([sys.executable, worker, str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    model, loaded = loader.load_model(str(path))
    one = gen.generate(model, loaded, cases.PROMPTS, max_new_tokens=cases.NEW)
    out, err = proc.communicate(timeout=900)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-4000:]
  return path, one, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh', cases.MESHES)
def test_greedy_tokens_equal_one_devices(run, mesh):
  _, one, out = run
  assert len({tuple(t) for t in one}) == len(cases.PROMPTS)  # rows really differ
  assert out[mesh]['tokens'] == one


def test_params_and_cache_are_sharded(run):
  out = run[2]['data=2,tensor=2,expert=2']
  assert out['embedding'] == ['tensor', 'fsdp']  # vocab over tensor
  assert out['wq'] == [None, 'fsdp', 'tensor', None]  # [layers, D, H, K]: heads over tensor
  assert out['w1'] == [None, 'expert', 'fsdp', 'tensor']  # [layers, E, D, 2F]
  # KV cache [layers, B, G, S, K]: rows over data x expert (x fsdp), heads over tensor.
  assert out['k'] == [None, BATCH, 'tensor', None, None]
  cfg = tiny()
  assert out['k_shard'] == [cfg.num_layers, 8 // 4, cfg.num_heads // 2, 32, cfg.head_dim]
  assert out['u_prev'] == [None, BATCH, None, None]  # LFA state: rows split
  assert run[2]['tensor=2,data=4']['k'] == [None, BATCH, 'tensor', None, None]


@pytest.mark.parametrize('mesh', sorted(cases.REFUSED))
def test_a_bad_mesh_is_refused_before_loading(run, mesh):
  assert cases.REFUSED[mesh] in run[2]['refused'][mesh]


def test_cli_refuses_a_bad_mesh_before_loading(tmp_path, capsys, monkeypatch):
  """One device here: a mesh of 2 is refused, naming --mesh, before the checkpoint (which
  does not exist) is looked at."""
  monkeypatch.setattr(loader, 'load_checkpoint', lambda *a, **k: pytest.fail('loaded'))
  for mesh, message in (('data=2', '--mesh data=2,fsdp=1,expert=1,tensor=1: 2 devices, but '
                         'there are 1'), ('tensor=x', "tensor='x' must be a positive integer"),
                        ('layers=1', "unknown axis 'layers'")):
    assert gen.main(['--checkpoint', str(tmp_path), '--prompt', 'x', '--mesh', mesh]) == 1
    assert message in capsys.readouterr().err
