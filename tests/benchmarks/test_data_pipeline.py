"""benchmarks/data_pipeline.py on a tiny shards directory, disk only: the figures it prints and
the ratio against a v5p host's consumption."""
import json

import pytest

from benchmarks import data_pipeline as bench
from yuanjax import cost
from yuanjax.data import corpus
from yuanjax.data import prepare as prepare_lib
from yuanjax.data import tokenizer as tokenizer_lib


def test_disk_figures_and_the_ratio(tmp_path, capsys):
  text = 'def f(x):\n    return x + 1\n'
  tok = tokenizer_lib.train_from_documents([corpus.Document(text * 30, 'm', None, 0)],
                                           tmp_path / 'tokenizer', 300)
  docs = [corpus.Document(f'# {i}\n' + text * (i % 4 + 1), 'm', i, 0) for i in range(30)]
  prepare_lib.prepare_documents(tok, lambda: docs, tmp_path / 'shards', progress=False)
  assert bench.main([
      '--seconds=0.3', '--threads=2', '--skip_emulator', f'--shards={tmp_path / "shards"}',
      '--shuffle_rows=8'
  ]) == 0
  out = capsys.readouterr().out.splitlines()
  result = json.loads(out[-1])
  assert list(result) == ['storage', 'pipeline'] and list(result['storage']) == ['local']
  local = result['storage']['local']
  assert local['reads_per_s'] > 0 and local['mb_per_s'] > 0
  f = result['pipeline']
  assert (f['seq_len'], f['fim_rate']) == (4096, 0.5)  # configs/yuan_m32.py's data settings
  assert f['pipeline_tokens_per_s'] > 0 and f['first_batch_s'] > 0
  consumed = 4 * cost.peak_flops('TPU v5') * 0.5 / f['train_flops_per_token']
  assert f['v5p_host_tokens_per_s_at_50pct_mfu'] == pytest.approx(consumed)
  assert f['ratio'] == pytest.approx(f['pipeline_tokens_per_s'] / consumed)
  assert f'ratio {f["ratio"]:.1f} (target >= 3)' in out[-2]
