"""Matplotlib figures of routing statistics (`yuanjax.analysis.routing_stats`).

Each function returns a Figure. Axis key: M MoE layers, E experts. Layer labels are the model
layers (`Routing.layers_M`).
"""
from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np

TITLE_CHARS_PER_INCH = 9  # a panel title wraps to its figure's width (no clipped variant names)


def _layer_labels(layers_M, m: int) -> list[str]:
  return [str(i) for i in (range(m) if layers_M is None else layers_M)]


def relative_load_heatmap(rel_load_MxE, layers_M=None, title='relative expert load'):
  """Layers × experts, 1 (white) = the balanced share k/E (DeepSeek-V3's heatmaps)."""
  return relative_load_panels({title: rel_load_MxE}, layers_M)


def relative_load_panels(rel_loads: Mapping[str, np.ndarray], layers_M=None,
                         sorted_experts: bool = False):
  """relative_load_heatmap for each {title: [M, E]} (e.g. one per variant of a sweep; their
  shapes may differ), stacked, on one colour scale. sorted_experts: each row holds a layer's
  loads largest first (`stats.sorted_by_load`, what a mean over seeds needs), not by index."""
  rels = [np.asarray(r) for r in rel_loads.values()]
  width = min(2 + 0.35 * max(r.shape[1] for r in rels), 14)
  heights = [1.2 + 0.3 * r.shape[0] for r in rels]
  fig, axes = plt.subplots(len(rels), 1, figsize=(width, sum(heights)), squeeze=False,
                           gridspec_kw=dict(height_ratios=heights))
  norm = mcolors.TwoSlopeNorm(vmin=0.0, vcenter=1.0,
                              vmax=float(max([2.0] + [r.max() for r in rels])))
  for ax, title, rel in zip(axes[:, 0], rel_loads, rels):
    M, E = rel.shape
    im = ax.imshow(rel, cmap='RdBu_r', aspect='auto', norm=norm)
    title = textwrap.fill(title, int(TITLE_CHARS_PER_INCH * width))
    ax.set(xlabel='experts by load, most loaded first' if sorted_experts else 'expert',
           ylabel='layer', title=title, xticks=range(E), yticks=range(M),
           xticklabels=range(1, E + 1) if sorted_experts else range(E), yticklabels=_layer_labels(
               layers_M, M))
    fig.colorbar(im, ax=ax, label='load ÷ balanced load')
  fig.tight_layout()
  return fig


def matrix_grid(mats_MxExE, layers_M=None, *, title='', label='', cmap='viridis', vmin=None,
                vmax=None, xlabel='expert j', ylabel='expert i', max_panels=6):
  """One E×E heatmap per layer (at most `max_panels`, spread over the depth)."""
  mats = np.asarray(mats_MxExE)
  M = mats.shape[0]
  picks = np.unique(np.linspace(0, M - 1, min(M, max_panels)).round().astype(int))
  labels = _layer_labels(layers_M, M)
  fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks) + 1, 3.4), squeeze=False)
  vmin = float(mats.min()) if vmin is None else vmin
  vmax = float(mats.max()) if vmax is None else vmax
  for ax, m in zip(axes[0], picks):
    im = ax.imshow(mats[m], cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set(title=f'layer {labels[m]}', xlabel=xlabel)
  axes[0, 0].set_ylabel(ylabel)
  fig.colorbar(im, ax=axes[0].tolist(), label=label, shrink=0.85)
  fig.suptitle(title)
  return fig


def per_layer(series: Mapping[str, Sequence[float]], layers_M=None, *, ylabel='', title='',
              hlines: Mapping[str, float] | None = None):
  """One line (with markers) per named series over the MoE layers; dashed reference lines."""
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for name, values in series.items():
    values = np.asarray(values)
    ax.plot(range(len(values)), values, marker='o', label=name)
  for name, y in (hlines or {}).items():
    ax.axhline(y, ls='--', c='gray', lw=1)
    ax.annotate(name, (0, y), textcoords='offset points', xytext=(2, 3), color='gray')
  M = len(next(iter(series.values())))
  ax.set(xlabel='layer', ylabel=ylabel, title=title, xticks=range(M),
         xticklabels=_layer_labels(layers_M, M))
  ax.legend()
  fig.tight_layout()
  return fig


def over_steps(steps: Sequence[int], values_SxM, layers_M=None, *, ylabel='', title=''):
  """One line per layer over checkpoints (OLMoE's router saturation)."""
  values = np.asarray(values_SxM)
  labels = _layer_labels(layers_M, values.shape[1])
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for m in range(values.shape[1]):
    ax.plot(steps, values[:, m], marker='o', label=f'layer {labels[m]}')
  ax.set(xlabel='step', ylabel=ylabel, title=title)
  ax.legend(fontsize='small')
  fig.tight_layout()
  return fig


def domain_bars(shares_by_domain: Mapping[str, np.ndarray], uniform: float, *, title=''):
  """Grouped bars: each expert's share of tokens per domain, dashed at the uniform k/E."""
  names = list(shares_by_domain)
  E = len(shares_by_domain[names[0]])
  width = 0.8 / len(names)
  fig, ax = plt.subplots(figsize=(min(2 + 0.45 * E, 14), 3.2))
  for i, name in enumerate(names):
    ax.bar(
        np.arange(E) + (i - (len(names) - 1) / 2) * width, shares_by_domain[name], width,
        label=name)
  ax.axhline(uniform, ls='--', c='gray', lw=1, label=f'uniform k/E = {uniform:.2f}')
  ax.set(xlabel='expert', ylabel='share of tokens', title=title, xticks=range(E))
  ax.legend(fontsize='small')
  fig.tight_layout()
  return fig


def expert_colors(num_experts: int) -> list:
  cmap = plt.get_cmap('tab20' if num_experts > 10 else 'tab10')
  return [cmap(e % cmap.N) for e in range(num_experts)]


def colored_tokens(pieces: Sequence[str], experts: Sequence[int], num_experts: int, *,
                   width: int = 90, title=''):
  """A text with each token's background the colour of its expert (Mixtral §5).

  pieces: the tokens' text (newlines break lines); experts: one id per piece (-1: grey).
  """
  colors = expert_colors(num_experts)
  rows, col, placed = 0, 0, []
  for piece, e in zip(pieces, experts):
    for j, part in enumerate(piece.split('\n')):
      if j:
        rows, col = rows + 1, 0
      if col + len(part) > width and col:
        rows, col = rows + 1, 0
      if part:
        placed.append((rows, col, part, e))
        col += len(part)
  fig, ax = plt.subplots(figsize=(0.095 * width + 0.4, 0.2 * (rows + 1) + 0.9))
  for row, c, part, e in placed:
    ax.text(
        c, row, part, family='monospace', fontsize=8, va='center', ha='left',
        bbox=dict(boxstyle='square,pad=0.08', lw=0, fc=colors[e] if e >= 0 else (0.85, 0.85, 0.85),
                  alpha=0.55))
  ax.set(xlim=(-0.5, width + 0.5), ylim=(rows + 0.7, -0.7), title=title)
  ax.axis('off')
  handles = [plt.Rectangle((0, 0), 1, 1, fc=colors[e], alpha=0.55) for e in range(num_experts)]
  ax.legend(handles, [f'expert {e}' for e in range(num_experts)], loc='upper left',
            bbox_to_anchor=(1.0, 1.0), fontsize='small', frameon=False)
  return fig


MARKED_POINTS = 20  # curves of at most this many points (eval curves) mark every point


def curves(runs: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel='step',
           ylabel='loss', title='', logy=False, groups: Mapping[str, str] | None = None):
  """One line per run: {name: (x, y)}; a run of at most MARKED_POINTS points marks each one (a
  2-point eval curve is two measurements, not a measured line). groups: {name: variant}: the
  runs of a variant share one colour and one legend entry (its seeds are not told apart)."""
  fig, ax = plt.subplots(figsize=(8, 3.5), layout='constrained')
  groups = groups or {name: name for name in runs}
  colors = {g: f'C{i}' for i, g in enumerate(dict.fromkeys(groups.values()))}
  labelled = set()
  for name, (x, y) in runs.items():
    group = groups[name]
    ax.plot(x, y, color=colors[group], marker='o' if len(x) <= MARKED_POINTS else None, ms=4,
            label=None if group in labelled else group)
    labelled.add(group)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if logy:
    ax.set_yscale('log')
  fig.legend(loc='outside lower center', fontsize='small')  # below: long labels keep the width
  return fig


def memory_bars(per_device_gib: Mapping[str, Mapping[str, float]], limits_gib: Mapping[str, float],
                *, title='memory per device'):
  """Stacked bars (params, optimizer, gradients, activations) per mesh; a dashed line at
  each accelerator's usable memory."""
  names = list(per_device_gib)
  parts = [p for p in next(iter(per_device_gib.values())) if p != 'total']
  fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 4))
  bottom = np.zeros(len(names))
  for part in parts:
    vals = np.array([per_device_gib[n][part] for n in names])
    ax.bar(range(len(names)), vals, bottom=bottom, label=part)
    bottom += vals
  for i, (kind, gib) in enumerate(limits_gib.items()):
    ax.axhline(gib, ls='--', lw=1, c=f'C{len(parts) + i}', label=f'{kind} ({gib:.0f} GiB usable)')
  ax.set(ylabel='GiB per device', title=title, xticks=range(len(names)))
  ax.set_xticklabels(names, rotation=30, ha='right', fontsize='small')
  ax.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  return fig


def mean_with_band(series: Mapping[str, tuple[Sequence[float], np.ndarray]], *,
                   xlabel='training tokens', ylabel='eval loss', title=''):
  """{name: (x [N], y [S, N])}: the mean over S seeds with a min..max band."""
  bands = {}
  for name, (x, y_SxN) in series.items():
    y = np.asarray(y_SxN, np.float64).reshape(-1, len(x))
    bands[f'{name} ({y.shape[0]} seeds)'] = (x, y.mean(0), y.min(0), y.max(0))
  return lines_with_bands(bands, xlabel=xlabel, ylabel=ylabel, title=title)


def lines_with_bands(series: Mapping[str, tuple[Sequence[float], ...]], *, xlabel='training tokens',
                     ylabel='', title='', zero_line=False):
  """{name: (x [N], middle [N], low [N], high [N])}: a marked line per name and its band."""
  fig, ax = plt.subplots(figsize=(8, 3.8), layout='constrained')
  if zero_line:
    ax.axhline(0.0, color='black', lw=0.8)
  for name, (x, middle, low, high) in series.items():
    line, = ax.plot(x, middle, marker='o', label=name)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  fig.legend(loc='outside lower center', fontsize='small')  # below: long labels keep the width
  return fig
