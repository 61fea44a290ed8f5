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
# # 02 · Router inspection: what the Attention Router does
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/yuanjax/yuanjax/blob/main/notebooks/02_router_inspection.ipynb)
#
# Opens a checkpoint and draws what an MoE researcher looks at first: relative expert load per
# layer, a text coloured by each token's first-choice expert (Mixtral §5), expert co-activation
# (OLMoE), the Attention Router's expert×expert matrix (what sets Yuan's router apart), entropy
# and diversity per layer, domain specialisation (code vs. prose), and router saturation over
# training (OLMoE).
#
# `YUANJAX_CHECKPOINT=PATH`: a training workdir, a converted (`python -m yuanjax.convert from-hf`)
# or a raw Hugging Face directory of Yuan2-M32 or Mixtral (float32 params: ~160 GB of host
# memory for the 40 B M32, ~190 GB for Mixtral-8x7B). Without it, notebook 01's workdir is
# opened (trained first if missing). Run the notebook once per checkpoint to put the routing of
# two released MoEs side by side: every panel but the Attention Router's (Yuan only) is drawn
# for Mixtral's linear router too, on the same text sets.
# `YUANJAX_TEXT_SETS=a.txt,b.txt`: compare two text files of your own instead of code vs. prose.

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

from yuanjax import config_lib, loader, workdir
from yuanjax.analysis import notebook, plots, texts
from yuanjax.analysis import routing as routing_lib
from yuanjax.analysis import routing_stats
from yuanjax.data import corpus

SMOKE = notebook.smoke()
CHECKPOINT = os.environ.get('YUANJAX_CHECKPOINT')
TEXT_SETS = os.environ.get('YUANJAX_TEXT_SETS')
ROWS, SEQ_LEN = (2, 32) if SMOKE else (16, 256)       # texts per domain, tokens per text
COLLAPSE_SHARE = config_lib.base_config().train.collapse_top_k_share   # the trainer's flag

if CHECKPOINT is None:
  CHECKPOINT = notebook.workdir('quickstart')
  notebook.train_or_open(notebook.quickstart_config(SMOKE), CHECKPOINT)
model, params, tok = loader.load_checkpoint(CHECKPOINT)
cfg = model.config
E, K = cfg.num_experts, cfg.router.top_k
print(f'{CHECKPOINT}: {cfg.num_layers} layers, {E} experts, top-{K}, {cfg.router.type} router')

# %% [markdown]
# ## Two text sets
#
# By default: Python code and the prose inside it (docstrings and comments), split by
# `yuanjax.analysis.texts` from standard-library files past the first 1 MB that the quickstart
# model trained on.

# %%
if TEXT_SETS:
  paths = TEXT_SETS.split(',')
  domains = {}
  for p in paths:
    with open(p, encoding='utf-8') as f:
      domains[os.path.basename(p)] = f.read()
else:
  files = corpus.stdlib_sources(max_bytes=3_000_000)[-60:]
  code, prose = texts.code_and_prose(files, max_chars=ROWS * SEQ_LEN * 6)
  domains = {'code': code, 'prose': prose}
rows = {name: texts.chunks(text, ROWS, SEQ_LEN * 4) for name, text in domains.items()}
names = list(rows)
tokens, segment_ids = routing_lib.batch_texts(tok, sum(rows.values(), []), SEQ_LEN)
r = routing_lib.routing(model, params, tokens, segment_ids)
row_domain = np.repeat(np.arange(len(names)), [len(rows[n]) for n in names])
print({n: len(rows[n]) for n in names}, 'rows of', SEQ_LEN, 'tokens;',
      int(r.mask_BxL.sum()), 'real tokens;', len(r.layers_M), 'MoE layers')

# %% [markdown]
# ## Relative expert load per layer
#
# Each expert's share of the routed slots divided by the balanced share k/E (DeepSeek-V3):
# 1 (white) is balanced, red overloaded, blue starved. MaxVio = max ÷ mean − 1. The top-k share
# is what the k most loaded experts take: k/E when balanced, 1 when every token goes to the same
# k experts; above `config.train.collapse_top_k_share` (0.9) the layer is flagged collapsed, as
# the trainer's log flags it.

# %%
load = routing_stats.expert_load(r.experts_MxBxLxK, E, r.mask_BxL)
fig = plots.relative_load_heatmap(routing_stats.relative_load(load), r.layers_M)
entropy = routing_stats.router_entropy(r.probs_MxBxLxE, r.mask_BxL)
margin = routing_stats.top1_margin(r.probs_MxBxLxE, r.mask_BxL)
same = routing_stats.same_expert_as_previous(r.experts_MxBxLxK, r.mask_BxL)
collapsed = dict(routing_stats.collapsed_layers(load, K, COLLAPSE_SHARE))
table = zip(r.layers_M, routing_stats.max_vio(load), routing_stats.dead_experts(load),
            routing_stats.top_k_load_share(load, K), entropy,
            routing_stats.expert_diversity(entropy, E), margin, same)
display(Markdown(notebook.markdown_table(
    ['layer', 'MaxVio', 'dead experts', f'top-{K} share', 'collapsed', 'router entropy (nats)',
     'diversity exp(H)/E', 'top-1 margin p1−p2', 'same 1st expert as previous token'],
    [[int(layer), float(v), int(d), float(sh), 'yes' if m in collapsed else 'no', float(h),
      float(dv), float(mg), float(s)]
     for m, (layer, v, d, sh, h, dv, mg, s) in enumerate(table)])))

# %% [markdown]
# ## Tokens coloured by their first-choice expert (Mixtral §5)
#
# Mixtral found little topic specialisation but strong syntax-driven patterns (indentation,
# keywords, consecutive tokens sharing an expert). First and last MoE layer of one text:

# %%
row = 0
n = int(r.mask_BxL[row].sum())
pieces = notebook.token_pieces(tok, tokens[row, :n].tolist())
for m in sorted({0, len(r.layers_M) - 1}):
  fig = plots.colored_tokens(pieces, r.experts_MxBxLxK[m, row, :n, 0], E,
                             title=f'{names[0]}, layer {r.layers_M[m]}: first-choice expert')

# %% [markdown]
# ## Expert co-activation (OLMoE)
#
# P(expert j fires | expert i fires) over the tokens routed to i. With top-2 routing a bright
# cell means i and j are usually picked together: they may have learned overlapping skills.

# %%
coact = routing_stats.coactivation(r.experts_MxBxLxK, E, r.mask_BxL)
fig = plots.matrix_grid(coact, r.layers_M, title='co-activation P(j | i)', label='P(j | i)',
                        vmin=0.0, vmax=1.0)

# %% [markdown]
# ## The Attention Router's expert × expert matrix
#
# Yuan's router computes q, k, v ∈ R^E from the token and the expert logits as
# `softmax_row(q kᵀ) v`: row i says how much expert i's logit borrows from every expert's value,
# so the router can model how experts relate (a linear router scores each expert alone). Below:
# that matrix averaged over the real tokens. A diagonal-heavy matrix behaves like a linear router;
# off-diagonal mass is the correlation the paper argues for.

# %%
if r.attention_MxExE is not None:
  fig = plots.matrix_grid(r.attention_MxExE, r.layers_M, title='mean softmax(q kᵀ)',
                          label='attention weight', cmap='magma', vmin=0.0)
  diag = np.diagonal(r.attention_MxExE, axis1=1, axis2=2).mean(-1)
  print('mean diagonal weight per layer:', np.round(diag, 3), f'(uniform: {1 / E:.3f})')
else:
  print(f'{cfg.router.type} router: no expert x expert matrix (Attention Router only)')

# %% [markdown]
# ## Router entropy, expert diversity and the top-1 margin per layer
#
# Entropy of the router's probabilities (log E = uniform) and exp(H)/E: the share of experts the
# router effectively spreads its probability over. Low values mean confident routing.
#
# Entropy and diversity describe each token's probabilities, not where the tokens go. A layer
# can show an entropy near log E (diversity near 1) beside a load where every token goes to the
# same k experts: the probabilities are nearly uniform, but a small preference shared by all
# tokens still puts the same experts on top. The top-1 margin p1 − p2 (the largest probability
# minus the second, mean over tokens) shows it: near 0 the choice hangs on a sliver (and the
# combine weights are nearly equal); near 1 the router is sure. A collapsed load with a small
# margin is that case; a collapsed load with a large margin is a router that learned to prefer
# those experts.
#
# In the run stored with this notebook (notebook 01's 300 steps), layer 1 is the first case in
# the making: diversity 0.998 and a margin of 0.002, yet its two busiest experts take 64% of
# the routed slots (25% when balanced). Layers 0 and 2 are the second: margins near 0.1,
# 86–88% of the slots on two experts, two or three experts never chosen. None crosses the
# collapse flag's 90% at the last checkpoint; the training log flagged every layer on the way.

# %%
fig = plots.per_layer({'entropy (nats)': entropy}, r.layers_M, ylabel='nats',
                      title='router entropy', hlines={f'log E = {np.log(E):.2f}': np.log(E)})
fig = plots.per_layer({'diversity exp(H)/E': routing_stats.expert_diversity(entropy, E),
                       'top-1 margin p1 − p2': margin,
                       'same first expert as previous token': same}, r.layers_M,
                      ylabel='fraction', title='diversity, top-1 margin, consecutive agreement',
                      hlines={'1/E (chance agreement)': 1 / E})

# %% [markdown]
# ## Domain specialisation (OLMoE)
#
# Each expert's share of the tokens of each text set; the dashed line is the uniform k/E. An
# expert far above it on one set and not the other specialises in that domain.

# %%
for m in sorted({0, len(r.layers_M) - 1}):
  shares = {name: routing_stats.token_share(r.experts_MxBxLxK[m:m + 1],
                                            E, r.mask_BxL & (row_domain == i)[:, None])[0]
            for i, name in enumerate(names)}
  fig = plots.domain_bars(shares, K / E, title=f'layer {r.layers_M[m]}: share of tokens per expert')

# %% [markdown]
# ## Router saturation over training (OLMoE)
#
# For each checkpoint of a training workdir: the share of the final checkpoint's top-k choices
# (same tokens) that this checkpoint already makes. OLMoE saw it pass 60% within 1% of training;
# where it stays low the routing is still moving.

# %%
steps = workdir.checkpoint_steps(CHECKPOINT)
if len(steps) >= 2:
  sat = []
  for step in steps:
    m_s, p_s, _ = loader.load_checkpoint(CHECKPOINT, step=step)
    r_s = routing_lib.routing(m_s, p_s, tokens, segment_ids)
    sat.append(routing_stats.saturation(r_s.experts_MxBxLxK, r.experts_MxBxLxK, r.mask_BxL))
  fig = plots.over_steps(steps, np.array(sat), r.layers_M, ylabel='saturation',
                         title='router saturation vs. the final checkpoint')
  print('saturation at the first checkpoint:', np.round(sat[0], 3))
else:
  print('one checkpoint only: saturation needs a training workdir with several')
