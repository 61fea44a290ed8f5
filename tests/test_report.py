"""yuanjax.report end to end: the smoke router study (2 routers x 2 seeds, 4 steps) through
launch.sweep, plus one run that fails; the report's numbers recomputed from metrics.jsonl."""
import json
import os

import numpy as np
import pytest
import scipy.stats

from yuanjax import report
from yuanjax.analysis import routing_stats


@pytest.fixture(scope='module')
def study(smoke_study):
  """The smoke study with one failed run (tests/conftest.py), and its report."""
  return smoke_study, report.report([str(smoke_study)])


def final_eval(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r['kind'] == 'eval']
  return evals[-1], [r for r in records if r['kind'] == 'train']


def test_report_numbers_match_metrics(study):
  sw, rows = study
  assert [r['variant'] for r in rows] == ['model.router.type=attention', 'model.router.type=linear']
  for row, router in zip(rows, ('attention', 'linear')):
    assert row['seeds'] == [0, 1]
    evals = [final_eval(sw / f'model.router.type={router}+train.seed={s}') for s in (0, 1)]
    losses = [e['loss'] for e, _ in evals]
    assert all(e['step'] == 4 for e, _ in evals)  # the smoke variant's 4 steps
    np.testing.assert_allclose(row['eval_loss_mean'], np.mean(losses), rtol=1e-12)
    np.testing.assert_allclose(row['eval_loss_std'], np.std(losses, ddof=1), rtol=1e-12)
    assert row['eval_tokens'] == evals[0][0]['tokens'] == 2 * 4 * 32  # eval_steps x batch x seq
    assert row['tokens'] == 4 * 4 * 32
    # Relative load of the late-training load (steps > 3 of 4: step 4), per seed. The row used
    # to hold its mean over seeds by expert index, which averages unaligned experts (issue 25);
    # it now holds each seed's map, and the mean over seeds of the maps sorted per layer.
    loads = [report.load_matrix(train[-1], 2, 8) for _, train in evals]
    rels = [routing_stats.relative_load(l) for l in loads]
    for seed, rel in zip((0, 1), rels):
      np.testing.assert_allclose(row['relative_load_by_seed'][str(seed)], rel, rtol=1e-12)
    expected = np.mean([-np.sort(-rel, axis=-1) for rel in rels], axis=0)
    np.testing.assert_allclose(row['relative_load_sorted'], expected, rtol=1e-12)
    np.testing.assert_allclose(
        np.array(row['relative_load_sorted'])[:, 0], np.mean([rel.max(-1) for rel in rels], axis=0),
        rtol=1e-12)
    np.testing.assert_allclose(row['max_load'], np.mean([rel.max() for rel in rels]))
    np.testing.assert_allclose(
        row['collapsed_layers'],
        np.mean([len(routing_stats.collapsed_layers(l, 2, 0.9)) for l in loads]))
    entropy = [train[-1]['moe/entropy'] for _, train in evals]
    np.testing.assert_allclose(row['expert_diversity'], np.mean(np.exp(entropy) / 8))
  assert rows[1]['router_params'] == rows[0]['router_params'] // 3  # W vs Wq, Wk, Wv


def test_expert_load_heatmap_keeps_each_seeds_imbalance(tmp_path, monkeypatch):
  """Two seeds that overload different experts: the heatmap's data is the mean of each seed's
  layer sorted by load, so the overload survives (a mean by expert index would halve it)."""
  drawn = {}
  monkeypatch.setattr(report, '_save', lambda fig, path: drawn.setdefault(path, fig))
  rel = {0: np.array([[4.0, 0, 0, 0]]), 1: np.array([[0, 0, 0, 4.0]])}
  runs = [report.Run(f'r{s}', 'base', s, 'done', None, [], [dict(step=1, loss=1.0)]) for s in rel]
  monkeypatch.setattr(
      report, 'run_stats', lambda run: dict(eval_loss=1.0, eval_tokens=1, tokens=1, tokens_per_s=
                                            1.0, relative_load=rel[run.seed], max_load=4.0))
  monkeypatch.setattr(report, 'eval_curve', lambda runs: (np.array([1]), np.ones((2, 1))))
  row = report.variant_row('base', runs)
  np.testing.assert_array_equal(row['relative_load_sorted'], [[4.0, 0, 0, 0]])  # not [2, 0, 0, 2]
  report.write_plots({'base': runs}, [row], [], str(tmp_path))
  (image,) = drawn[str(tmp_path / 'expert_load.png')].axes[0].images
  np.testing.assert_array_equal(image.get_array(), [[4.0, 0, 0, 0]])
  assert image.get_array().max() == row['max_load']


def test_eval_curve_is_every_finished_seeds_evals(study):
  """The plotted curve: eval steps 2 and 4 of the smoke study, in tokens, one row per seed;
  the failed linear run is not among them."""
  sw, _ = study
  for variant, runs in report.group(report.load_runs(str(sw))).items():
    tokens, losses = report.eval_curve(runs)
    np.testing.assert_array_equal(tokens, [2 * 4 * 32, 4 * 4 * 32])
    router = variant.split('=')[1]
    for seed, row in zip((0, 1), losses):
      with open(sw / f'model.router.type={router}+train.seed={seed}' / 'metrics.jsonl') as f:
        want = [json.loads(l)['loss'] for l in f if json.loads(l)['kind'] == 'eval']
      np.testing.assert_array_equal(row, want)
    assert losses.shape == (2, 2)


def test_failed_run_is_flagged_not_averaged(study):
  sw, rows = study
  assert rows[0]['runs_not_finished'] == []
  assert rows[1]['runs_not_finished'] == ['model.router.type=linear+train.seed=bad (failed)']
  text = (sw / 'report.md').read_text()
  assert 'model.router.type=linear+train.seed=bad (failed)' in text
  diff = rows[1]['eval_loss_mean'] - rows[0]['eval_loss_mean']
  assert f'{diff:+.4f}' in text
  (c,) = json.loads((sw / 'comparisons.json').read_text())
  assert c['paired_seeds'] == [0, 1]
  np.testing.assert_allclose(c['paired_diffs'],
                             np.subtract(rows[1]['eval_losses'], rows[0]['eval_losses']))
  saved = json.loads((sw / 'report.json').read_text())
  assert [r['eval_loss_mean'] for r in saved] == [r['eval_loss_mean'] for r in rows]
  for png in ('eval_loss.png', 'expert_load.png'):
    assert (sw / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_paired_gap_recomputed_from_metrics(study):
  """comparisons.json's paired mean, 95% t interval and gap at every eval token count,
  recomputed here from each run's metrics.jsonl with SciPy's t quantile."""
  sw, _ = study
  (c,) = json.loads((sw / 'comparisons.json').read_text())

  def evals(router, seed):
    with open(sw / f'model.router.type={router}+train.seed={seed}' / 'metrics.jsonl') as f:
      return [json.loads(l)['loss'] for l in f if json.loads(l)['kind'] == 'eval']

  d = np.array([np.subtract(evals('linear', s), evals('attention', s)) for s in (0, 1)])
  half = scipy.stats.t.ppf(0.975, 1) * d.std(0, ddof=1) / np.sqrt(2)
  assert [g['tokens'] for g in c['gap_by_tokens']] == [2 * 4 * 32, 4 * 4 * 32]
  for i, g in enumerate(c['gap_by_tokens']):
    assert g['n'] == 2
    np.testing.assert_allclose([g['mean'], g['low'], g['high']],
                               [d[:, i].mean(), d[:, i].mean() - half[i], d[:, i].mean() + half[i]],
                               rtol=1e-12)
  np.testing.assert_allclose([c['paired_mean'], c['paired_low'], c['paired_high']],
                             [c['gap_by_tokens'][-1][k] for k in ('mean', 'low', 'high')])
  assert c['detectable_diff'] > half[-1] / 2  # 80% power needs more than the half interval
  text = (sw / 'report.md').read_text()
  assert f'paired mean (95% t interval, 2 seeds): {c["paired_mean"]:+.4f}' in text
  for g in c['gap_by_tokens']:
    assert f'| {g["tokens"]:,} | {g["mean"]:+.4f} [{g["low"]:+.4f}, {g["high"]:+.4f}] |' in text
  assert (sw / 'paired_gap.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_unfinished_run_is_flagged(study, tmp_path):
  """A run that exited 0 without its last eval (preempted) is `unfinished`, not averaged."""
  sw, _ = study
  manifest = json.loads((sw / 'sweep.json').read_text())
  name = 'model.router.type=attention+train.seed=1'
  (tmp_path / name).mkdir()
  _, train = final_eval(sw / name)
  with open(tmp_path / name / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in train)  # no eval lines at all
  for run in manifest['runs']:
    if run['name'] == name:
      run['workdir'] = str(tmp_path / name)
  (tmp_path / 'sweep.json').write_text(json.dumps(manifest))
  rows = report.report([str(tmp_path)])
  assert rows[0]['seeds'] == [0]
  assert rows[0]['runs_not_finished'] == [f'{name} (unfinished)']
  eval0, _ = final_eval(sw / 'model.router.type=attention+train.seed=0')
  assert rows[0]['eval_loss_mean'] == eval0['loss']
  assert np.isnan(rows[0]['eval_loss_std'])
  saved = json.loads((tmp_path / 'report.json').read_text(), parse_constant=pytest.fail)
  assert saved[0]['eval_loss_std'] is None and saved[0]['eval_loss_mean'] == eval0['loss']


def test_pooled_std():
  assert report.pooled_std([1.0, 3.0], [3, 3]) == pytest.approx(np.sqrt(5.0))
  assert np.isnan(report.pooled_std([float('nan')], [1]))


def test_missing_manifest_is_named(tmp_path, capsys):
  with pytest.raises(SystemExit):
    report.main([str(tmp_path)])
  assert f'{tmp_path}/sweep.json: no sweep manifest' in capsys.readouterr().err
