"""HF -> yuanjax -> HF, for every family (Yuan, Mixtral) and layout (tests/interop/checkpoints.py).

The imported model's logits equal the family's NumPy reference forward (written from the HF
code, sharing nothing with yuanjax), whether loaded from the HF dir or its conversion; to-hf
gives back every tensor bit for bit, config.json, the shard index and the source's other files.
"""
import glob
import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from tests.conftest import rel_err
from tests.interop.checkpoints import KINDS, logits_of
from tests.interop.hf_reference import assert_same_tensors, read_all
from yuanjax import convert

SHARD_BYTES = {'yuan': 30_000, 'mixtral': 20_000}  # several shards for each family's tensors


@pytest.fixture(params=list(KINDS), ids='-'.join)
def case(request, hf_checkpoint):
  return hf_checkpoint(*request.param)


def test_logits_match_numpy_reference(case):
  ref = case.reference.forward(case.tensors, case.config, case.tokens)
  got = logits_of(case.dst, case.family)
  assert rel_err(got, ref) < 1e-5, case.kind
  np.testing.assert_array_equal(logits_of(case.src, case.family), got)  # the HF dir itself


def test_roundtrip_is_bit_exact(case, tmp_path):
  out = str(tmp_path / 'hf_out')
  limit = SHARD_BYTES[case.family]
  assert convert.main(['to-hf', case.dst, out, '--max-shard-size', f'{limit // 1000}KB', '-q']) == 0
  assert_same_tensors(read_all(out), case.tensors)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f) == case.config
  with open(os.path.join(out, 'model.safetensors.index.json')) as f:
    index = json.load(f)
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 1 and sorted(
      os.path.basename(p) for p in glob.glob(f'{out}/*.safetensors')) == shards
  assert set(index['weight_map']) == set(case.tensors)
  assert index['metadata']['total_size'] == sum(a.nbytes for a in case.tensors.values())
  for shard in shards:
    with safe_open(os.path.join(out, shard), framework='numpy') as f:
      assert f.metadata() == {'format': 'pt'}
      sizes = [f.get_tensor(n).nbytes for n in f.keys()]
    assert sum(sizes) <= limit or len(sizes) == 1
  for name in case.extra_files:  # hf_files travel back
    assert os.path.isfile(os.path.join(out, name)), name
  np.testing.assert_array_equal(logits_of(out, case.family), logits_of(case.dst, case.family))
