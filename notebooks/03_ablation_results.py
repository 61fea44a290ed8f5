# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Router ablation: does the Attention Router beat the classical one?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/yuanjax/yuanjax/blob/main/notebooks/03_ablation_results.ipynb)
#
# The paper's Table 1 (Yuan2.0-M32, arXiv 2405.17976) compares routers with one run each. The
# ablation configs (`configs/router_ablation.py`, `configs/expert_count_ablation.py`) run every
# variant with several seeds through `launch.sweep`; `yuanjax.report` turns the sweep dirs into a
# table that says whether a gap exceeds the seed noise. This notebook draws the same data.
#
# `YUANJAX_SWEEP_DIRS=D1,D2`: the `--workdir`s of your sweeps, e.g. (in the repository's root)
#
#     python -m launch.sweep --backend=local --parallel=2 --num_processes=1 \
#         --config=configs/router_ablation.py --workdir=workdir/router
#
# Without it the notebook runs the study's `:smoke` variant itself (2 routers × 2 seeds on a tiny
# model; 60 steps each here, 4 in smoke mode): curves and table work, but the numbers answer
# nothing at that size. The sweep needs `launch/` and `configs/`, which a pip install does not
# ship: from a checkout it runs there, elsewhere (Colab) the notebook clones the repository
# first (`notebook.source_tree`). The outputs committed with this notebook are that smoke study;
# `docs/ablations.md` has the CPU studies' results (`yuanjax.report`'s tables and plots).

# %%
# Install yuanjax where it is missing (Colab); a no-op where it imports (CI, a local checkout).
try:
  import yuanjax  # noqa: F401
except ImportError:
  import subprocess
  import sys
  subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q',
                         'yuanjax[notebooks] @ git+https://github.com/yuanjax/yuanjax'])

# %%
import os

import numpy as np
from IPython.display import Markdown, display

from yuanjax import report
from yuanjax.analysis import notebook, plots

SMOKE = notebook.smoke()
SWEEP_DIRS = [d for d in os.environ.get('YUANJAX_SWEEP_DIRS', '').split(',') if d]

if not SWEEP_DIRS:
  SWEEP_DIRS = [notebook.workdir('router_ablation')]
  steps = [] if SMOKE else ['--config.train.num_steps=60', '--config.train.eval_every=20',
                            '--config.train.log_every=10']
  notebook.run_sweep('configs/router_ablation.py:smoke', SWEEP_DIRS[0],
                     ['--parallel=2', '--num_processes=1', *steps])

runs = [r for d in SWEEP_DIRS for r in report.load_runs(d)]
groups = report.group(runs)
short = lambda variant: variant.split()[0].replace('model.router.type=', '')   # legends
print(f'{len(runs)} runs in {len(groups)} variants from {SWEEP_DIRS}')

# %% [markdown]
# ## The table
#
# One row per variant (its runs' overrides minus the seed): mean eval loss over the finished
# seeds and its std, parameters, throughput and late-training routing statistics. Below it, each
# variant against the first: the difference, whether it exceeds twice the pooled seed std, and
# the same-seed differences (seeds share the data order, so these cancel part of the noise).
# Failed or unfinished runs are listed, never averaged in.

# %%
rows = [report.variant_row(v, rs) for v, rs in groups.items()]
display(Markdown(report.markdown(rows, report.compare(rows))))

# %% [markdown]
# ## Curves
#
# Eval loss against training tokens (mean over seeds, band: min..max; a marker per eval), then
# every run's training loss, one colour per variant (its seeds share it).

# %%
series = {}
for variant, rs in groups.items():
  if (curve := report.eval_curve(rs)) is not None:
    series[short(variant)] = curve
fig = plots.mean_with_band(series, title='eval loss')

# %%
fig = plots.curves({f'{short(r.variant)} seed {r.seed}':
                    ([x['step'] for x in r.train], [x['loss'] for x in r.train])
                    for r in runs if r.train}, title='training loss per run',
                   groups={f'{short(r.variant)} seed {r.seed}': short(r.variant) for r in runs})

# %% [markdown]
# ## Where the tokens went
#
# Relative expert load (load ÷ balanced load) per layer over the last quarter of training, one
# panel per variant on one colour scale (the `shared` variant's always-on experts are not in
# it). Each layer's experts are sorted by load before the mean over seeds: expert numbers are
# arbitrary per initialisation, and a mean by number would average the imbalance away.

# %%
fig = plots.relative_load_panels({short(row['variant']): np.array(row['relative_load_sorted'])
                                  for row in rows if 'relative_load_sorted' in row},
                                 sorted_experts=True)
