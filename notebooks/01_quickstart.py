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
# # 01 · Quickstart: a Yuan2.0-M32-style MoE on a CPU
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/yuanjax/yuanjax/blob/main/notebooks/01_quickstart.ipynb)
#
# The released Yuan2.0-M32 in numbers, then a small model of the same structure (LFA attention,
# the Attention Router, top-2 of 8 experts) trained for a few hundred steps on the embedded
# corpus (this Python's standard library), its loss, its expert load, and some text from it.
#
# `YUANJAX_NOTEBOOK_SMOKE=1` shrinks everything to a few seconds (CI runs it so);
# `YUANJAX_WORKDIR=/path/to/workdir` opens an existing training workdir instead of training.

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

from yuanjax import config_lib, cost, generate, loader, workdir
from yuanjax.analysis import notebook, plots
from yuanjax.analysis import routing_stats

SMOKE = notebook.smoke()
GIVEN = os.environ.get('YUANJAX_WORKDIR')
WORKDIR = GIVEN or notebook.workdir('quickstart')
print(f'smoke={SMOKE} workdir={WORKDIR}')

# %% [markdown]
# ## The model: Yuan2.0-M32 and our small one
#
# Counted from abstract shapes (nothing is allocated): M32 has 40 B parameters of which 3.7 B
# are active per token (2 of 32 experts), 7.4 GFLOPs per token (the paper's convention).

# %%
config = notebook.quickstart_config(SMOKE)
rows = []
for name, m in [('Yuan2.0-M32', config_lib.m32_model()), ('this notebook', config.model)]:
  f = cost.model_facts(m)
  rows.append([name, m.num_layers, m.hidden_size, m.num_experts, m.router.top_k,
               m.router.type, f"{f['total_params'] / 1e6:,.1f} M",
               f"{f['active_params'] / 1e6:,.1f} M",
               f"{f['forward_flops_per_token'] / 1e9:.4g}"])
display(Markdown(notebook.markdown_table(
    ['model', 'layers', 'hidden', 'experts', 'top-k', 'router', 'params', 'active params',
     'GFLOPs/token'], rows)))

# %% [markdown]
# ## Train (or open a workdir)
#
# `notebook.train_or_open` runs `yuanjax.trainer.train_and_evaluate`, the same loop as
# `python -m yuanjax.train`: checkpoints every 50 steps, `metrics.jsonl`, exact resume (run the
# cell again after an interruption and it continues). Its log line every 10 steps: loss,
# perplexity, learning rate, gradient norm, throughput, the share of routed slots `dropped` by
# the capacity dispatch, and the router's mean entropy `router-H`. Opening a workdir that
# already holds the run prints the same lines from its `metrics.jsonl`.

# %%
if GIVEN or not notebook.train_or_open(config, WORKDIR):   # trains, printing its log
  print(f'opening {WORKDIR}; its log, from metrics.jsonl:')
  notebook.print_log(WORKDIR)
print('checkpoints:', workdir.checkpoint_steps(WORKDIR))

# %% [markdown]
# ## Loss

# %%
metrics = workdir.read_metrics(WORKDIR)
train, evals = metrics['train'], metrics.get('eval', [])
runs = {'train': ([r['step'] for r in train], [r['loss'] for r in train])}
if evals:
  runs['eval'] = ([r['step'] for r in evals], [r['loss'] for r in evals])
fig = plots.curves(runs, ylabel='cross-entropy (nats/token)', title='loss')
print(f"last train loss {train[-1]['loss']:.3f}" +
      (f", eval loss {evals[-1]['loss']:.3f}" if evals else ''))

# %% [markdown]
# ## Expert load at the last logged step
#
# `metrics.jsonl` logs each MoE layer's load (the fraction of routed slots per expert). Divided by
# the balanced share it gives DeepSeek-V3's relative load: 1 (white) is balanced, red overloaded,
# blue starved. Like the released M32, this model trains without a balance loss, so the load
# drifts apart and the `capacity` dispatch drops the overflow (`dropped` in the log above; the
# `dropless` dispatch or `--config.model.router.load_balance_weight` change that). The log's
# warnings flag a layer as collapsed when its 2 busiest experts take more than 90% of the
# routed slots (`config.train.collapse_top_k_share`); early in this run most layers do.
# Notebook 02 goes much further.

# %%
last = train[-1]
E = config.model.num_experts if not GIVEN else 1 + max(
    int(k.rsplit('_', 1)[1]) for k in last if k.startswith('moe/load/layer_0/'))
M = 1 + max(int(k.split('/')[2].split('_')[1]) for k in last if k.startswith('moe/load/'))
load = np.array([[last[f'moe/load/layer_{m}/expert_{e}'] for e in range(E)] for m in range(M)])
fig = plots.relative_load_heatmap(routing_stats.relative_load(load),
                                  title=f"relative expert load, step {last['step']}")
print('MaxVio per layer:', np.round(routing_stats.max_vio(load), 3))

# %% [markdown]
# ## Generate
#
# `yuanjax.generate` prefills a KV cache (and LFA's convolution state) and decodes one token per
# step in a jitted `while_loop`: greedy at temperature 0, else top-k / top-p sampling.

# %%
model, params, tok = loader.load_checkpoint(WORKDIR)
prompts = ['def __init__(self', 'import os\n', '    """Return the']
n_new = 8 if SMOKE else 48
greedy = generate.generate(model, params, [tok.encode(p) for p in prompts],
                           max_new_tokens=n_new, eod_id=tok.eod_id)
sampled = greedy if SMOKE else generate.generate(      # smoke: one compile, not two
    model, params, [tok.encode(p) for p in prompts], max_new_tokens=n_new, temperature=0.8,
    top_p=0.95, seed=0, eod_id=tok.eod_id)
for p, g, s in zip(prompts, greedy, sampled):
  print('=' * 60, '\nprompt :', repr(p))
  print('greedy :', repr(tok.decode(generate.strip_eod(g, tok.eod_id))))
  print('sampled:', repr(tok.decode(generate.strip_eod(s, tok.eod_id))))

# %% [markdown]
# The greedy continuations are degenerate, and that is expected of this model, not a decoding
# bug: a few minutes of training on 1 MB leaves it near 4.5 nats per token, so its single most
# likely next token is usually something frequent in Python source: a space (indentation), a
# common letter, `_`. Greedy decoding takes that token at every step, and once a few of them are
# in the context they make themselves more likely still: runs of spaces, one letter repeated.
# Sampling (temperature 0.8, top-p 0.95) draws from the whole distribution instead and shows
# what the model has picked up so far: keywords, `self`, indentation and newlines, not yet code.
# A longer run (`python -m yuanjax.train --config=configs/demo.py`, README's quick start) or a
# converted checkpoint (notebook 02's `YUANJAX_CHECKPOINT`) gives fluent greedy text.
