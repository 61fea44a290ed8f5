"""Turns sweep directories into an answer: a table over seeds, and two plots.

  python -m yuanjax.report D [D2 ...] [--out=DIR]

Reads each D/sweep.json (written by `launch.sweep`), and per run its metrics.jsonl and its
config (the sweep's config file, `:arg` and overrides, rebuilt as the trainer built it).
Runs are grouped by variant: their overrides minus `train.seed`. Writes to --out (default:
the first D):

  report.json      a list of rows, one per variant (fields below)
  report.md        the same as a table; each variant's difference from the first one, and
                   whether it exceeds twice the pooled seed std, with the same-seed
                   differences (seeds share the data order); failed/unfinished runs
  comparisons.json those differences; per variant against the first, the paired (same-seed)
                   mean difference with its 95% t interval, the difference the study's
                   seeds detect with 80% power, and both at every evaluated token count
  eval_loss.png    eval loss vs training tokens, per variant: mean over seeds, band min..max
  expert_load.png  relative expert load (load / balanced load) per layer, each layer's experts
                   sorted by load (most loaded first) before the mean over seeds, one panel per
                   MoE variant on one colour scale (not written when no variant has MoE)
  paired_gap.png   the paired gap to the first variant vs training tokens, 95% t band

and prints the table. Only finished runs (status `done` in the manifest and an eval line
at the last step) are averaged; the others are listed by name with their status, never
averaged in. Load statistics are those of yuanjax.analysis.routing_stats, over the train steps
logged in the last quarter of training (one batch per logged step), then over seeds.

Row fields: variant, seeds (finished), runs_not_finished, tokens (training tokens per run),
eval_tokens, eval_loss_mean, eval_loss_std (over seeds, ddof 1), eval_losses, total_params,
active_params, router_params (yuanjax.cost), tokens_per_s (train, mean over seeds; the
first logged interval, which includes compilation, left out), max_load (max relative load
over layers x experts), max_vio (mean over layers), expert_diversity (exp(router entropy)/E),
dropped_fraction, dead_experts and collapsed_layers (summed over layers; collapsed: the top-k
experts take more than train.collapse_top_k_share of the slots), each per seed, then the mean
over seeds; relative_load_by_seed ({seed: [L, E]}) and relative_load_sorted (each seed's
[L, E] with every layer sorted largest first, then the mean over seeds). Expert indices are
not aligned across seeds (each initialisation numbers its experts arbitrarily), so an [L, E]
map averaged over seeds would average the imbalance away; the sorted one keeps it: its first
column is each layer's max load, averaged over seeds. In report.json and comparisons.json a
non-finite number (the std of one seed) is null, as in metrics.jsonl.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import math
import os
import sys

import numpy as np

from yuanjax import config_lib, cost, metrics, publish, workdir
from yuanjax.analysis import routing_stats, significance

SEED_KEY = 'train.seed'
LATE_FRACTION = 0.25  # load statistics over the last quarter of training


@dataclasses.dataclass
class Run:
  """One run of a sweep: its manifest entry, config, metrics and whether it finished."""
  name: str
  variant: str
  seed: int | None
  status: str  # done, failed, unfinished, pending, running
  config: object
  train: list[dict]
  evals: list[dict]


# ---------------------------------------------------------------------------- reading runs


def _literal(text: str):
  """A --config.KEY=VALUE value as the command line gives it: a Python literal, else a str."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def run_config(manifest: dict, overrides: dict, base_dir: str):
  """The config a run trained with: get_config(arg), the common overrides, the run's."""
  path = workdir.split_config_spec(manifest['config'])[0]
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(base_dir, path)
  config = workdir.load_config(path, manifest.get('arg'))
  common = {}
  for flag in manifest.get('overrides', []):
    key, _, value = flag[len('--config.'):].partition('=')
    common[key] = _literal(value)
  config_lib.override(config, {**common, **overrides})
  return config


def variant_of(overrides: dict) -> str:
  rest = {k: v for k, v in overrides.items() if k != SEED_KEY}
  return ' '.join(f'{k}={v}' for k, v in rest.items()) or 'base'


def load_runs(sweep_dir: str) -> list[Run]:
  path, manifest = workdir.sweep_manifest_path(sweep_dir), workdir.read_sweep_manifest(sweep_dir)
  if manifest is None:
    raise FileNotFoundError(f'{path}: no sweep manifest (is {sweep_dir} a launch.sweep --workdir?)')
  out = []
  for r in manifest['runs']:
    status = r['status']
    try:
      config = run_config(manifest, r['overrides'], os.getcwd())
    except (TypeError, ValueError, KeyError) as e:
      if status == 'done':
        raise ValueError(f'{path}: run {r["name"]}: its config cannot be rebuilt: {e}') from e
      config = None  # a run that failed on its own overrides
    run_dir = r['workdir'] if os.path.isabs(r['workdir']) else workdir.variant_dir(
        sweep_dir, os.path.basename(r['workdir']))
    records = workdir.read_metrics(run_dir, missing_ok=True)
    train, evals = records.get('train', []), records.get('eval', [])
    if status == 'done' and not any(e['step'] == config.train.num_steps for e in evals):
      status = 'unfinished'  # exited 0 without an eval at the last step (preempted)
    out.append(
        Run(r['name'], variant_of(r['overrides']), r['overrides'].get(SEED_KEY), status, config,
            train, evals))
  return out


# ------------------------------------------------------------------------------ statistics


def load_matrix(record: dict, num_layers: int, num_experts: int) -> np.ndarray:
  """metrics.jsonl's moe/load/layer_<l>/expert_<e> -> [L, E]."""
  return np.array([[record[f'moe/load/layer_{l}/expert_{e}']
                    for e in range(num_experts)]
                   for l in range(num_layers)])


def late_records(run: Run) -> list[dict]:
  start = (1.0 - LATE_FRACTION) * run.config.train.num_steps
  late = [r for r in run.train if r['step'] > start]
  return late or run.train[-1:]


def num_moe_layers(run: Run) -> int:
  m = run.config.model
  return m.num_layers // m.moe_every if m.moe_every else 0


def run_stats(run: Run) -> dict:
  """Per-run figures: final eval, throughput and late-training routing statistics."""
  m, t = run.config.model, run.config.train
  final = next(e for e in run.evals if e['step'] == t.num_steps)
  speeds = [r['tokens_per_sec'] for r in run.train[1:]] or [run.train[-1]['tokens_per_sec']]
  out = dict(eval_loss=final['loss'], eval_tokens=final.get('tokens'),
             tokens=t.num_steps * t.batch_size * t.seq_len, tokens_per_s=float(np.mean(speeds)))
  late = late_records(run)
  if num_moe_layers(run):
    load = np.mean([load_matrix(r, num_moe_layers(run), m.num_experts) for r in late], axis=0)
    rel = routing_stats.relative_load(load)
    collapsed = routing_stats.collapsed_layers(load, m.router.top_k, t.collapse_top_k_share)
    out.update(
        relative_load=rel, max_load=float(rel.max()), max_vio=float(
            routing_stats.max_vio(load).mean()), dead_experts=int(
                routing_stats.dead_experts(load).sum()), collapsed_layers=len(collapsed),
        expert_diversity=float(
            np.mean(routing_stats.expert_diversity([r['moe/entropy'] for r in late],
                                                   m.num_experts))),
        dropped_fraction=float(np.mean([r['moe/dropped_fraction'] for r in late])))
  return out


def pooled_std(stds: list[float], counts: list[int]) -> float:
  """sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)); nan without any degree of freedom."""
  dof = sum(n - 1 for n in counts)
  if dof <= 0:
    return float('nan')
  return math.sqrt(sum((n - 1) * s * s for s, n in zip(stds, counts) if n > 1) / dof)


def variant_row(variant: str, runs: list[Run]) -> dict:
  done = [r for r in runs if r.status == 'done']
  row = dict(variant=variant, seeds=[r.seed for r in done],
             runs_not_finished=[f'{r.name} ({r.status})' for r in runs if r.status != 'done'])
  config = next((r.config for r in runs if r.config is not None), None)
  if config is not None:
    facts = cost.model_facts(config.model)
    row.update(total_params=facts['total_params'], active_params=facts['active_params'],
               router_params=facts['router_params'])
  if not done:
    return row
  per_run = [run_stats(r) for r in done]
  losses = [s['eval_loss'] for s in per_run]
  row.update(tokens=per_run[0]['tokens'], eval_tokens=per_run[0]['eval_tokens'], eval_losses=losses,
             eval_loss_mean=float(np.mean(losses)),
             eval_loss_std=float(np.std(losses, ddof=1)) if len(losses) > 1 else float('nan'),
             tokens_per_s=float(np.mean([s['tokens_per_s'] for s in per_run])))
  for key in ('max_load', 'max_vio', 'expert_diversity', 'dropped_fraction', 'dead_experts',
              'collapsed_layers'):
    if key in per_run[0]:
      row[key] = float(np.mean([s[key] for s in per_run]))
  if 'relative_load' in per_run[0]:
    row['relative_load_by_seed'] = {
        str(r.seed): s['relative_load'].tolist() for r, s in zip(done, per_run)
    }
    row['relative_load_sorted'] = np.mean(
        [routing_stats.sorted_by_load(s['relative_load']) for s in per_run], axis=0).tolist()
  tokens, curves = eval_curve(runs)
  row['eval_curve'] = dict(tokens=tokens.tolist(), losses={
      str(r.seed): c.tolist() for r, c in zip(done, curves)
  })
  return row


def compare(rows: list[dict]) -> list[dict]:
  """Each variant vs the first: difference of means, pooled seed std, |diff| > 2 std?"""
  base = rows[0]
  out = []
  for row in rows[1:]:
    if 'eval_loss_mean' not in row or 'eval_loss_mean' not in base:
      out.append(dict(variant=row['variant'], diff=None, pooled_std=None, exceeds=None))
      continue
    diff = row['eval_loss_mean'] - base['eval_loss_mean']
    std = pooled_std([base['eval_loss_std'], row['eval_loss_std']],
                     [len(base['seeds']), len(row['seeds'])])
    out.append(
        dict(variant=row['variant'], diff=diff,
             pooled_std=std, exceeds=bool(abs(diff) > 2 * std) if math.isfinite(std) else None,
             **paired(base, row)))
  return out


def paired(base: dict, row: dict) -> dict:
  """Same-seed differences (the seed sets init and router noise; the data order is shared)
  over the seeds both variants finished: the differences, their mean with its 95% t
  interval, the difference these seeds detect with 80% power (analysis.significance), and
  the same interval at every training-token count both evaluated (`gap_by_tokens`)."""
  losses = [dict(zip(r['seeds'], r['eval_losses'])) for r in (base, row)]
  common = [s for s in base['seeds'] if s in losses[1]]
  d = [losses[1][s] - losses[0][s] for s in common]
  stat = significance.paired_interval(d)
  return dict(paired_seeds=common, paired_diffs=d, paired_std=stat['std'], paired_mean=stat['mean'],
              paired_low=stat['low'],
              paired_high=stat['high'], detectable_diff=significance.detectable_difference(
                  stat['std'], len(d)), gap_by_tokens=gap_by_tokens(base, row, common))


def gap_by_tokens(base: dict, row: dict, seeds: list) -> list[dict]:
  """The paired difference's mean and 95% interval at each token count both curves have."""
  curves = [r.get('eval_curve') for r in (base, row)]
  if None in curves:
    return []
  out = []
  for i, tokens in enumerate(curves[0]['tokens']):
    if tokens in curves[1]['tokens']:
      j = curves[1]['tokens'].index(tokens)
      d = [curves[1]['losses'][str(s)][j] - curves[0]['losses'][str(s)][i] for s in seeds]
      out.append(dict(tokens=tokens, **significance.paired_interval(d)))
  return out


def group(runs: list[Run]) -> dict[str, list[Run]]:
  groups: dict[str, list[Run]] = {}
  for r in runs:
    groups.setdefault(r.variant, []).append(r)
  return groups


# --------------------------------------------------------------------------------- output


def _fmt(v, spec):
  return 'n/a' if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


COLUMNS = [('variant', 'variant', 's'), ('seeds', 'seeds', 's'), ('tokens', 'tokens', ',d'),
           ('eval_tokens', 'eval tokens', ',.0f'), ('eval_loss_mean', 'eval loss', '.4f'),
           ('eval_loss_std', '± std', '.4f'), ('total_params', 'params', ',d'),
           ('active_params', 'active', ',d'), ('router_params', 'router', ',d'),
           ('tokens_per_s', 'tok/s', ',.0f'), ('max_load', 'max load', '.2f'),
           ('expert_diversity', 'diversity', '.3f'), ('dropped_fraction', 'dropped', '.3f'),
           ('dead_experts', 'dead', '.1f'), ('collapsed_layers', 'collapsed', '.1f')]


def markdown(rows: list[dict], comparisons: list[dict]) -> str:
  lines = ['| ' + ' | '.join(h for _, h, _ in COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for row in rows:
    cells = []
    for key, _, spec in COLUMNS:
      v = row.get(key)
      cells.append(','.join(map(str, v)) if key == 'seeds' else _fmt(v, spec))
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
      '', f'Differences from `{rows[0]["variant"]}` (eval loss; pooled seed std; '
      'exceeds 2 x pooled std?):', ''
  ]
  for c in comparisons:
    verdict = {True: 'yes', False: 'no', None: 'n/a'}[c['exceeds']]
    lines.append(f'- `{c["variant"]}`: {_fmt(c["diff"], "+.4f")} '
                 f'(pooled std {_fmt(c["pooled_std"], ".4f")}; exceeds 2 std: {verdict})')
    if c.get('paired_diffs'):
      lines.append(f'  same-seed differences: '
                   f'{", ".join(_fmt(d, "+.4f") for d in c["paired_diffs"])} '
                   f'(std {_fmt(c["paired_std"], ".4f")})')
      lines += paired_lines(c)
  missing = [m for row in rows for m in row['runs_not_finished']]
  lines += ['', 'Runs not finished (not averaged): ' + (', '.join(missing) if missing else 'none')]
  return '\n'.join(lines) + '\n'


def _interval(stat: dict) -> str:
  return (f'{_fmt(stat["mean"], "+.4f")} [{_fmt(stat["low"], "+.4f")}, '
          f'{_fmt(stat["high"], "+.4f")}]')


def paired_lines(c: dict) -> list[str]:
  """The paired mean with its 95% interval, the detectable difference, the gap by tokens."""
  n = len(c['paired_diffs'])
  stat = dict(mean=c['paired_mean'], low=c['paired_low'], high=c['paired_high'])
  lines = [
      f'  paired mean (95% t interval, {n} seeds): {_interval(stat)}; detectable with 80% '
      f'power at n={n}: {_fmt(c["detectable_diff"], ".4f")}'
  ]
  if len(c['gap_by_tokens']) > 1:
    lines += ['', '  | training tokens | paired gap [95% interval] |', '  |---|---|']
    lines += [f'  | {g["tokens"]:,} | {_interval(g)} |' for g in c['gap_by_tokens']]
    lines.append('')
  return lines


def short_label(variant: str) -> str:
  """'model.router.type=shared model.num_experts=14' -> 'type=shared num_experts=14'."""
  return ' '.join(
      item.split('=', 1)[0].rsplit('.', 1)[-1] + '=' +
      item.split('=', 1)[1] if '=' in item else item for item in variant.split(' '))


def eval_curve(runs: list[Run]):
  """(training tokens [S], eval losses [seeds, S]) over the eval steps every finished run of a
  variant has, or None when none finished."""
  done = [r for r in runs if r.status == 'done']
  if not done:
    return None
  t = done[0].config.train
  steps = sorted(set.intersection(*[{e['step'] for e in r.evals} for r in done]))
  losses = np.array(
      [[next(e['loss'] for e in r.evals if e['step'] == s) for s in steps] for r in done])
  return np.array(steps) * t.batch_size * t.seq_len, losses


def _labels(variants) -> dict[str, str]:
  """{variant: its short_label}, or the variants themselves if short labels would collide."""
  short = {v: short_label(v) for v in variants}
  return short if len(set(short.values())) == len(short) else {v: v for v in variants}


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (plots only)
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=120)
  plt.close(fig)
  publish.file(path, png.getvalue())


def _columns(gaps: list[dict]) -> tuple:
  """gap_by_tokens -> (tokens, mean, low, high) columns."""
  return tuple([g[k] for g in gaps] for k in ('tokens', 'mean', 'low', 'high'))


def write_plots(groups: dict[str, list[Run]], rows: list[dict], comparisons: list[dict],
                out_dir: str) -> None:
  """eval_loss.png, paired_gap.png (with more than one variant) and, when some variant has
  MoE layers, expert_load.png (analysis.plots)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (plots only)
  matplotlib.use('Agg')
  from yuanjax.analysis import plots  # pylint: disable=g-import-not-at-top
  label = _labels(groups)
  curves = {label[v]: c for v, runs in groups.items() if (c := eval_curve(runs)) is not None}
  _save(plots.mean_with_band(curves, title='Eval loss (mean, band: min..max)'),
        os.path.join(out_dir, 'eval_loss.png'))
  loads = {
      f'{label[r["variant"]]} (mean of {len(r["seeds"])} seeds)': r['relative_load_sorted']
      for r in rows
      if 'relative_load_sorted' in r
  }
  if loads:
    _save(plots.relative_load_panels(loads, sorted_experts=True),
          os.path.join(out_dir, 'expert_load.png'))
  gaps = {
      f'{label[c["variant"]]} ({g[-1]["n"]} seeds)': _columns(g)
      for c in comparisons
      if (g := c.get('gap_by_tokens'))
  }
  if gaps:
    fig = plots.lines_with_bands(gaps, ylabel=f'eval loss - {label[rows[0]["variant"]]}',
                                 title='Paired gap (same seeds; band: 95% t interval)',
                                 zero_line=True)
    _save(fig, os.path.join(out_dir, 'paired_gap.png'))


def strict_json(obj) -> str:
  """JSON text with every non-finite float as null (a one-seed std is nan), as metrics.jsonl."""

  def clean(v):
    if isinstance(v, dict):
      return {k: clean(x) for k, x in v.items()}
    return [clean(x) for x in v] if isinstance(v, (list, tuple)) else metrics.strict(v)

  return json.dumps(clean(obj), indent=1, allow_nan=False)


def report(sweep_dirs: list[str], out_dir: str | None = None) -> list[dict]:
  """Reads the sweeps, writes report.json/.md and the plots to out_dir; returns the rows."""
  runs = [r for d in sweep_dirs for r in load_runs(d)]
  out_dir = out_dir or sweep_dirs[0]
  groups = group(runs)
  rows = [variant_row(v, rs) for v, rs in groups.items()]
  comparisons = compare(rows)
  os.makedirs(out_dir, exist_ok=True)
  text = markdown(rows, comparisons)
  for name, data in (('report.json', strict_json(rows)),
                     ('comparisons.json', strict_json(comparisons)), ('report.md', text)):
    publish.file(os.path.join(out_dir, name), data.encode())
  write_plots(groups, rows, comparisons, out_dir)
  print(text)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('sweep_dirs', nargs='+', help='launch.sweep --workdir directories')
  p.add_argument('--out', default=None, help='where the report goes (default: the first dir)')
  args = p.parse_args(argv)
  try:
    report(args.sweep_dirs, args.out)
  except (FileNotFoundError, ValueError) as e:
    p.error(str(e))
  return 0


if __name__ == '__main__':
  sys.exit(main())
