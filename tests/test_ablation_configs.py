"""configs/router_ablation.py and configs/expert_count_ablation.py: variants, sweeps, and the
`shared` router's parameter matching."""
import os

import pytest

from yuanjax import config_lib, cost, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return workdir.load_config_module(os.path.join(REPO, 'configs', f'{name}.py'))


@pytest.mark.parametrize('arg', [None, 'smoke', 'gpu', 'long'])
def test_shared_matches_params_within_1_percent(arg):
  ablation = load('router_ablation')
  facts = {}
  for overrides in ablation.sweep(arg):
    if overrides['train.seed'] == 0:
      config = ablation.get_config(arg)
      config_lib.override(config, overrides)
      config_lib.validate(config)
      facts[overrides['model.router.type']] = cost.model_facts(config.model)
  assert set(facts) == ({'attention', 'linear'}
                        if arg == 'smoke' else {'attention', 'linear', 'shared'})
  if 'shared' in facts:
    for other in ('attention', 'linear'):
      for key in ('total_params', 'active_params'):
        assert abs(facts['shared'][key] / facts[other][key] - 1) < 0.01, (other, key)


@pytest.mark.parametrize('arg', [None, 'runlocal'])
def test_router_ablation_on_the_mixtral_block(arg):
  """configs/mixtral_8x7b.py's sweep: linear, attention and shared routers on Mixtral's
  block; the shared variant keeps total and active params within 1%."""
  mixtral = load('mixtral_8x7b')
  facts = {}
  for overrides in mixtral.sweep(arg):
    config = mixtral.get_config(arg)
    config_lib.override(config, overrides)
    config_lib.validate(config)
    assert config.model.attention_type == 'standard' and not config.model.tie_embeddings
    facts[overrides['model.router.type']] = cost.model_facts(config.model)
  assert set(facts) == {'attention', 'linear', 'shared'}
  for key in ('total_params', 'active_params'):
    assert abs(facts['shared'][key] / facts['linear'][key] - 1) < 0.01, key


def test_sweeps():
  router, experts = load('router_ablation'), load('expert_count_ablation')
  assert len(router.sweep()) == 9 and len(router.sweep('smoke')) == 4
  assert {v['train.seed'] for v in router.sweep()} == {0, 1, 2}
  assert [v['model.num_experts'] for v in experts.sweep()] == [8] * 3 + [16] * 3 + [32] * 3
  assert len(experts.sweep('smoke')) == 4
  # Both studies train and evaluate the same way.
  assert experts.get_config().to_dict() == router.get_config().to_dict()
  assert experts.get_config('smoke').train.num_steps == 4
  for arg in (None, 'gpu', 'long'):  # an eval curve of a few points, each marked, not 2
    t = router.get_config(arg).train
    assert t.num_steps % t.eval_every == 0 and t.num_steps // t.eval_every >= 4


def test_long_study_is_paired_seed_by_seed():
  """`long`: dropless, ~1M tokens, the same eval tokens at 6 points; attention and linear
  with LONG_SEEDS (>= 8), shared with 3; every prefix of the run order is paired."""
  router = load('router_ablation')
  config = router.get_config('long')
  t = config.train
  assert config.model.moe.dispatch == 'dropless'
  assert t.num_steps * t.batch_size * t.seq_len == 983_040
  assert t.eval_steps * t.batch_size * t.seq_len == 65_536 and t.num_steps // t.eval_every == 6
  runs = [(v['model.router.type'], v['train.seed']) for v in router.sweep('long')]
  seeds = {r: [s for rr, s in runs if rr == r] for r in ('attention', 'linear', 'shared')}
  assert seeds['attention'] == seeds['linear'] == list(router.LONG_SEEDS)
  assert len(router.LONG_SEEDS) >= 8 and seeds['shared'] == [0, 1, 2]
  assert runs[:6] == [('attention', 0), ('linear', 0), ('shared', 0), ('attention', 1),
                      ('linear', 1), ('shared', 1)]


@pytest.mark.parametrize('name', ['router_ablation', 'expert_count_ablation'])
def test_unknown_variant_is_named(name):
  with pytest.raises(ValueError, match=f"configs/{name}.py: unknown variant 'big'"):
    load(name).get_config('big')
  with pytest.raises(ValueError, match='unknown variant'):
    load(name).sweep('big')
