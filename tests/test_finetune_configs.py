"""configs/finetune_m32.py and configs/finetune_mixtral.py: Yuan's SFT hyperparameters, meshes
the planner says fit, a learning-rate sweep, and a runlocal variant made on the fly."""
import os

import pytest

from yuanjax import plan, workdir

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')


def _module(name):
  return workdir.load_config_module(os.path.join(CONFIGS, name))


@pytest.mark.parametrize('name', ['finetune_m32.py', 'finetune_mixtral.py'])
@pytest.mark.parametrize('variant,kind', [(None, 'TPU v5p'), ('gpu', 'H100-80G')])
def test_sft_fits_its_mesh(name, variant, kind):
  module = _module(name)
  config = module.get_config(variant)
  t, o = config.train, config.optimizer
  assert (t.seq_len, t.batch_size, t.num_steps, o.lr, o.min_lr_ratio, o.weight_decay, o.clip_norm,
          o.warmup_steps) == (16384, 1152, 4220, 8e-5, 1.0, 0.1, 1.0, 0)
  assert (config.model.remat, config.data.fim_rate) == ('full', 0.0)
  r = plan.plan(config, devices=module.MESHES[variant][2], device_kind=kind)
  assert r['fits'] == {kind: True}, r['per_device']


def test_m32_sft_on_one_host_of_8_h100_does_not_fit():
  config = _module('finetune_m32.py').get_config('gpu')
  config.mesh.fsdp = 1
  config.train.grad_accum = 144
  r = plan.plan(config, devices=8, device_kind='H100-80G')
  assert r['fits'] == {'H100-80G': False}
  assert r['per_device']['total'] - r['per_device']['activations'] > 0.85 * 80 * 2**30


@pytest.mark.parametrize('name', ['finetune_m32.py', 'finetune_mixtral.py'])
def test_sweep_over_the_learning_rate(name):
  sweep = _module(name).sweep()
  assert len(sweep) >= 3 and all(list(s) == ['optimizer.lr'] for s in sweep)


@pytest.mark.parametrize('name', ['finetune_m32.py', 'finetune_mixtral.py'])
def test_runlocal_fine_tunes_a_source_made_on_the_fly(name, tmp_path, monkeypatch):
  monkeypatch.setenv('YUANJAX_CACHE', str(tmp_path))
  config = _module(name).get_config('runlocal')
  assert os.path.isfile(os.path.join(config.train.init_from, 'config.json'))
  assert os.path.isfile(os.path.join(config.data.path, 'manifest.json'))
  assert config.train.num_steps <= 10


def test_mixtral_runlocal_trains_in_the_mistral_template(tmp_path, monkeypatch):
  """Mixtral's :runlocal: a Llama-style tokenizer (<s> </s>, no <sep>) read as HF reads Mixtral's;
  each sample is `<s>[INST] reverse: w [/INST] w'</s>` with exactly the answer's tokens and the
  `</s>` scored (training it on responses only: tests/test_finetune_task.py)."""
  from yuanjax import finetune  # pylint: disable=g-import-not-at-top
  from yuanjax.data import ShardedDocuments, pipeline, sft  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('YUANJAX_CACHE', str(tmp_path))
  config = _module('finetune_mixtral.py').get_config('runlocal')
  assert config.data.chat_template == 'mistral'
  (docs,), tok = pipeline.resolve_data(config.data)
  assert not tok.has_piece('<sep>') and tok.eod_piece == '</s>'
  assert sft.chat_template(tok).name == 'mistral'
  train = finetune.reverse_task()[0]
  assert len(docs) == len(train)
  for i in (0, 1, len(train) - 1):
    prompt, answer = train[i]
    p, a = sft.prompt_ids(tok, prompt), tok.encode(answer, add_bos=False)
    assert p[0] == tok.token_id('<s>') and tok.decode(p) == f'[INST] {prompt} [/INST]'
    assert docs[i].tolist() == p + a + [tok.eod_id]
    assert docs.loss_mask(i).tolist() == [0] * len(p) + [1] * (len(a) + 1)
