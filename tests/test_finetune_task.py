"""A tiny M32 fine-tuned from its HF dir (configs/finetune_m32.py:runlocal) on the synthetic
instruction `reverse: abc<sep>cba` answers held-out prompts, through the chat template, with
>= 90% exact match after a few CPU minutes: the loss mask, packing and init_from together. The
same for a tiny Mixtral (configs/finetune_mixtral.py:runlocal) in Mixtral-Instruct's template
(`<s>[INST] reverse: abc [/INST] cba</s>`), stopping at `</s>`."""
import os

import pytest

from yuanjax import config_lib, finetune, generate, loader, trainer, workdir
from yuanjax.data import sft

STEPS = 500


@pytest.fixture(scope='module', params=['finetune_m32.py', 'finetune_mixtral.py'])
def config_module(request):
  return workdir.load_config_module(
      os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', request.param))


def test_reverse_task_learned(config_module, tmp_path, monkeypatch):
  monkeypatch.setenv('YUANJAX_CACHE', str(tmp_path / 'cache'))
  config = config_module.get_config('runlocal')
  config_lib.short_run(config, num_steps=STEPS, log_every=50, checkpoint_every=STEPS)
  config.train.sample_tokens = 0
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  train = workdir.read_metrics(str(tmp_path / 'run'))['train']
  assert all(0 < r['loss_tokens'] < 16 * 64 for r in train)  # responses only
  model, params, tok = loader.load_checkpoint(str(tmp_path / 'run'))
  held_out = finetune.reverse_task()[1]
  outs = generate.generate(model, params, [sft.prompt_ids(tok, p) for p, _ in held_out],
                           max_new_tokens=8, eod_id=tok.eod_id)
  answers = [tok.decode(generate.strip_eod(o, tok.eod_id)) for o in outs]
  right = sum(a == r for a, (_, r) in zip(answers, held_out))
  assert right >= 0.9 * len(held_out), list(zip(held_out, answers))[:10]
