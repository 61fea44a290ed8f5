"""benchmarks/attention.py --interpret: one JSON record per backend whose output and gradients
equal the xla backend's (splash in Pallas interpret mode), its FLOP count, bad backends
refused before anything compiles."""
import json

import pytest

from benchmarks import attention as bench


def test_interpret_mode_records_match_xla(capsys):
  bench.main(['--interpret'])
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r['backend'] for r in records] == ['splash', 'dot_product_attention']
  for r in records:
    assert (r['seq_len'], r['head_dim'], r['measured']) == (256, 256, False)
    assert r['rel_err'] < 1e-5, r  # output and d/d(q, k, v) against xla, float32
    flops = bench.useful_flops(r['batch'], r['heads'], r['seq_len'], r['head_dim'])
    assert r['useful_tflops'] == pytest.approx(flops / (r['ms'] / 1e3) / 1e12)


def test_useful_flops_are_the_causal_half_three_times():
  # Forward: QK^T and PV, 2 L^2 K multiply-adds each over the whole square, half of it causal.
  assert bench.useful_flops(batch=2, heads=3, seq_len=4,
                            head_dim=5) == 3 * 2 * (2 * 2 * 3 * 16 * 5) / 2


def test_unknown_backend_is_refused():
  with pytest.raises(SystemExit, match='flash'):
    bench.main(['--backends=flash', '--interpret'])
