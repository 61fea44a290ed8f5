"""Training metrics: metrics.jsonl, TensorBoard event files (tensorboardX), console lines.

Also the router-collapse check. (FLOPs per token, MFU and device facts: `yuanjax.cost`.)
metrics.jsonl is strict JSON: a non-finite number (a loss that turned NaN) is written as `null`.
"""
from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

from yuanjax import publish, workdir as workdir_lib
from yuanjax.analysis import routing_stats


def strict(v):
  """A non-finite float -> None (JSON null); anything else unchanged."""
  return None if isinstance(v, float) and not math.isfinite(v) else v


def flatten(metrics: dict, prefix: str = '') -> dict[str, float]:
  """{'moe': {'load': [L, E]}} -> {'moe/load/layer_0/expert_0': ...}; scalars as float."""
  out = {}
  for k, v in metrics.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, name + '/'))
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      out[name] = float(a)
    elif a.ndim == 1:
      out.update({f'{name}/layer_{i}': float(x) for i, x in enumerate(a)})
    else:
      for i, row in enumerate(a.reshape(a.shape[0], -1)):
        out.update({f'{name}/layer_{i}/expert_{j}': float(x) for j, x in enumerate(row)})
  return out


class MetricsWriter:
  """Writes one JSON object per logged step to workdir/metrics.jsonl and scalars to
  workdir/tb. Only the main process writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir_lib.metrics_path(workdir)
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(workdir, exist_ok=True)
      self.tb = SummaryWriter(workdir_lib.tensorboard_dir(workdir))

  def truncate_after(self, step: int) -> None:
    """On resume: drop records of steps after `step` (they are recomputed identically)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
    publish.file(self.path, ''.join(keep).encode())

  def write(self, step: int, scalars: dict[str, float], kind: str = 'train') -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'kind': kind, **{k: strict(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, allow_nan=False) + '\n')
    for k, v in scalars.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(f'{kind}/{k}', v, step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def summary_line(step: int, num_steps: int, s: dict[str, float]) -> str:
  parts = [
      f'step {step}/{num_steps}', f"loss {s['loss']:.4f}", f"ppl {s['perplexity']:.2f}",
      f"lr {s['learning_rate']:.2e}", f"gnorm {s['grad_norm']:.3f}",
      f"tok/s {s['tokens_per_sec']:.0f}"
  ]
  if 'mfu' in s:
    parts.append(f"mfu {100 * s['mfu']:.1f}%")
  if 'moe/dropped_fraction' in s:
    parts.append(f"dropped {100 * s['moe/dropped_fraction']:.2f}%")
  if 'moe/entropy' in s:
    parts.append(f"router-H {s['moe/entropy']:.3f}")
  return ' | '.join(parts)


def log_collapse(step: int, load_LxE, top_k: int, threshold: float) -> list[tuple[int, float]]:
  """Warns about each MoE layer whose `top_k` most loaded experts take more than `threshold`
  of the routed slots (analysis.routing_stats.collapsed_layers); returns those layers."""
  bad = routing_stats.collapsed_layers(load_LxE, top_k, threshold)
  E = np.shape(load_LxE)[-1]
  for layer, share in bad:
    logging.warning(
        'step %d: router of MoE layer %d collapsed: its %d most loaded experts of %d take %.1f%% '
        'of the routed slots (balanced: %.1f%%; threshold %.0f%%)', step, layer, top_k, E,
        100 * share, 100 * top_k / E, 100 * threshold)
  return bad
