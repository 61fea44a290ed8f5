"""benchmarks/decode.py on a tiny training workdir: the JSON record and the bytes it counts,
the roofline on a known device kind, and bad arguments refused before anything compiles."""
import json

import jax
import pytest

from benchmarks import decode
from tests.model.helpers import tiny
from tests.test_generate import save_random_workdir
from yuanjax import generate as gen
from yuanjax import cost, quantize

B, N, M = 3, 8, 4  # batch, context, timed steps


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A training workdir whose step-3 checkpoint holds random params of the tiny M32 (the dense
  dispatch, which generation keeps: the quickest to compile)."""
  cfg = tiny(**{'moe.dispatch': 'dense'})
  path = tmp_path_factory.mktemp('decode') / 'workdir'
  save_random_workdir(path, cfg, step=3)
  return path, cfg


def run(capsys, *argv):
  rc = decode.main([str(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_prints_the_record_and_no_roofline_on_cpu(workdir, capsys):
  path, cfg = workdir
  rc, out, err = run(capsys, '--checkpoint', path, '--step', 3, '--batch', f'1,{B}', '--context', N,
                     '--new_tokens', M)
  assert rc == 0, err
  lines = out.splitlines()  # per batch size: a line of text, a JSON record
  assert len(lines) == 4 and [json.loads(lines[i])['batch'] for i in (1, 3)] == [1, B]
  assert lines[0].endswith(' s') and ', batch 1: ' in lines[0]
  rec = json.loads(lines[-1])
  assert rec['device_kind'] == jax.devices()[0].device_kind
  assert rec['bandwidth'] is None and rec['roofline_fraction'] is None  # CPU: unknown
  assert rec['tokens_per_s'] == pytest.approx(B * 1e3 / rec['step_ms'])
  assert rec['prefill_s'] > 0 and rec['compile_s'] > 0
  k = cfg.router.top_k  # each layer routes B rows to top-k experts each step
  assert k <= rec['experts_per_layer'] <= min(cfg.num_experts, B * k)
  want = cost.decode_bytes_per_step(gen.generation_config(cfg), B, N + (M + 1) / 2,
                                    rec['experts_per_layer'])
  assert rec['bytes'] == pytest.approx(want)
  assert rec['bytes_per_step'] == pytest.approx(want['total'])


def test_int8_weights_halve_the_weight_bytes(workdir, capsys):
  """--quantize int8 against --param_dtype bfloat16: the weights read per step at
  `quantize.bytes_per_param` (1 byte + the scales and the float vectors: 1.148 for the tiny
  model's 32-wide inputs, 1.0015 for M32), the KV cache and LFA state unchanged."""
  path, cfg = workdir
  rc, out, err = run(capsys, '--checkpoint', path, '--batch', B, '--context', N, '--new_tokens', M,
                     '--param_dtype', 'bfloat16', '--quantize', 'int8')
  assert rc == 0, err
  print(out.splitlines()[0])
  rec = json.loads(out.splitlines()[-1])
  assert rec['quantize'] == 'int8'
  m = gen.generation_config(cfg)
  m.param_dtype = 'bfloat16'
  bf16 = cost.decode_bytes_per_step(m, B, N + (M + 1) / 2, rec['experts_per_layer'])
  per_param = quantize.bytes_per_param(m)
  assert rec['bytes'] == pytest.approx(
      cost.decode_bytes_per_step(m, B, N + (M + 1) / 2, rec['experts_per_layer'], per_param))
  for part in ('params', 'experts'):
    assert rec['bytes'][part] == pytest.approx(bf16[part] * per_param / 2)
  assert per_param / 2 < 0.58
  for part in ('kv_cache', 'lf_state'):
    assert rec['bytes'][part] == bf16[part]


def test_roofline_fraction_on_a_known_device_kind():
  cfg = gen.generation_config(tiny(**{'moe.dispatch': 'dense'}))
  timing = dict(decode_s=0.5, prefill_s=0.1, compile_s=1.0, experts_per_layer=2.0)
  rec = decode.report(cfg, B, N, 10, timing, 'NVIDIA H100 80GB HBM3')
  assert rec['bandwidth'] == 3.35e12
  assert rec['roofline_fraction'] == pytest.approx(rec['bytes_per_step'] / 0.05 / 3.35e12)
  assert rec['tokens_per_s'] == pytest.approx(B * 10 / 0.5)


@pytest.mark.parametrize('args, message', [
    (('--batch', 0), '--batch=0: must be >= 1'),
    (('--new_tokens', -1), '--new_tokens=-1: must be >= 1'),
    (('--context', 250), '--context=250 + --new_tokens=32 is longer than '
     'config.model.max_seq_len=256'),
    (('--step', 7), 'no checkpoint of step 7'),
    (('--dtype', 'float33'), 'float33'),
])
def test_bad_arguments_fail_before_compiling(workdir, capsys, monkeypatch, args, message):
  monkeypatch.setattr(decode, 'measure', lambda *a, **k: pytest.fail('measured'))
  argv = dict(zip(('--checkpoint', '--batch', '--context'), (workdir[0], B, N)))
  argv.update(dict(zip(args[::2], args[1::2])))
  rc, _, err = run(capsys, *[x for kv in argv.items() for x in kv])
  assert rc == 1 and message in err, err


def test_missing_checkpoint_is_named(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(decode, 'measure', lambda *a, **k: pytest.fail('measured'))
  rc, _, err = run(capsys, '--checkpoint', tmp_path / 'nowhere', '--batch', 1, '--context', 4)
  assert rc == 1 and f'{tmp_path / "nowhere"}: neither' in err, err
