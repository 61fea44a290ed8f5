"""config.train.init_from (yuanjax.finetune): a run started from an HF dir, a converted dir or
a training workdir's checkpoint has, at its first step, exactly the source model's loss on that
batch; a restart resumes the run's own checkpoint; the source's architecture is kept."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.multidevice import finetune_cases as cases
from yuanjax import checkpoint, finetune, train_state, trainer
from yuanjax import workdir as workdir_lib
from yuanjax.data import streams
from yuanjax.model import Transformer


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp('source')
  params = cases.write_source(str(root))
  return dict(root=root, params=params, cache=str(tmp_path_factory.mktemp('cache')))


@pytest.fixture(scope='module')
def uninterrupted(source, tmp_path_factory):
  """4 steps fine-tuned from the HF dir, checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  trainer.train_and_evaluate(cases.config(str(source['root'] / 'hf'), source['cache'], 4), workdir)
  return workdir


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if r['kind'] == 'train'}


def _direct_loss(config, params):
  """The lm loss of `params` on the run's first batch, computed here."""
  batch = jax.tree.map(jnp.asarray, next(streams.make_data(config)[0]))
  _, out = trainer.loss_fn(params, Transformer(config.model), batch, jax.random.key(0))
  return float(out['lm_loss'])


def _workdir_params(workdir, step):
  abstract = lambda meta: train_state.abstract_params(cases.config(workdir, '/unused').model)
  return checkpoint.restore_params(workdir, abstract, step)[1]


@pytest.mark.parametrize('kind', ['hf', 'yj', 'workdir'])
def test_first_step_loss_is_the_source_models(kind, source, uninterrupted, tmp_path):
  if kind == 'workdir':
    init_from, params = f'{uninterrupted}@2', _workdir_params(uninterrupted, 2)
  else:
    init_from, params = str(source['root'] / kind), source['params']
  config = cases.config(init_from, source['cache'], steps=1)
  trainer.train_and_evaluate(config, str(tmp_path))
  want = _direct_loss(config, params)
  assert _losses(str(tmp_path))[1] == pytest.approx(want, rel=1e-6, abs=0)
  if kind == 'workdir':  # trained params, not the HF source's
    assert want != pytest.approx(_direct_loss(config, source['params']), rel=1e-3)


def test_restart_resumes_its_own_checkpoint(source, uninterrupted, tmp_path, caplog):
  hf_dir = str(source['root'] / 'hf')
  trainer.train_and_evaluate(cases.config(hf_dir, source['cache'], 2), str(tmp_path))
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(cases.config(hf_dir, source['cache'], 4), str(tmp_path))
  assert 'is ignored: the run resumes from its own checkpoint' in caplog.text
  assert _losses(str(tmp_path)) == _losses(uninterrupted)


def test_killed_run_reruns_to_the_uninterrupted_losses(source, uninterrupted, tmp_path):
  """`python -m yuanjax.train` fine-tuning from the HF dir, SIGKILLed once it has a checkpoint
  past step 0, then the same command again: the losses of the uninterrupted run."""
  from tests.test_train import _wait, start_train
  config_py, workdir = tmp_path / 'config.py', str(tmp_path / 'run')
  config_py.write_text('from tests.multidevice import finetune_cases as cases\n\n'
                       'def get_config():\n'
                       f'  return cases.config({str(source["root"] / "hf")!r}, '
                       f'{source["cache"]!r}, 4)\n')
  flags = [f'--config={config_py}', f'--workdir={workdir}']
  p = start_train(flags)
  _wait(lambda: max(workdir_lib.checkpoint_steps(workdir), default=0) > 0, p)
  p.kill()
  p.wait()
  assert max(_losses(workdir)) < 4  # killed mid-run
  p = start_train(flags)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out[-3000:]
  assert 'is ignored: the run resumes from its own checkpoint' in out
  assert _losses(workdir) == _losses(uninterrupted)


def test_every_train_line_logs_its_loss_tokens(uninterrupted):
  train = workdir_lib.read_metrics(uninterrupted)['train']
  assert [r['loss_tokens'] for r in train] == [4 * 32] * 4  # plain shards: every target scored


@pytest.mark.parametrize('field,value', [('num_layers', 3), ('router.top_k', 1),
                                         ('attention_type', 'standard')])
def test_architecture_differing_from_the_source_is_refused(field, value, source, tmp_path):
  config = cases.config(str(source['root'] / 'yj'), source['cache'])
  finetune.config_lib.override(config.model, {field: value})
  with pytest.raises(ValueError, match=rf'config\.model\.{field}={value!r} but the model of '):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # refused before anything was written


def test_non_architectural_fields_are_the_configs(source):
  config = cases.config(str(source['root'] / 'hf'), source['cache'])
  config.model.update(dict(remat='full', max_seq_len=1024))
  config.model.moe.dispatch = 'dense'
  config.model.splash.block_q = 256
  finetune.resolve_model(config)
  assert config.model.splash.block_q == 256
  assert (config.model.remat, config.model.max_seq_len, config.model.moe.dispatch,
          config.model.dtype) == ('full', 1024, 'dense', 'float32')
  assert config.model.num_layers == cases.source_model().num_layers


@pytest.mark.parametrize('init_from,match', [('nowhere', 'neither an HF'),
                                             ('{wd}@7', 'no checkpoint of step 7')])
def test_missing_source_is_refused(init_from, match, source, uninterrupted, tmp_path):
  config = cases.config(str(source['root'] / 'hf'), source['cache'])
  config.train.init_from = init_from.format(wd=uninterrupted)
  with pytest.raises(ValueError, match=rf'config\.train\.init_from=.*{match}'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))


def test_parse():
  assert finetune.parse('/a/b@12') == ('/a/b', 12)
  assert finetune.parse('/a/b') == ('/a/b', None)
  assert finetune.parse('/a/b@x') == ('/a/b@x', None)


def test_data_made_with_another_tokenizer_is_refused(source, tmp_path):
  hf_dir = tmp_path / 'hf'
  shutil.copytree(source['root'] / 'hf', hf_dir)
  (hf_dir / 'tokenizer.model').write_bytes(b'another tokenizer')
  with pytest.raises(
      ValueError, match=rf'the data was tokenized with .*tokenizer.model \(sha256 '
      rf'.*uses {hf_dir}/tokenizer.model \(sha256'):
    trainer.train_and_evaluate(cases.config(str(hf_dir), source['cache']), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
