"""Training metrics: metrics.jsonl, TensorBoard event files (tensorboardX), console lines.

Also: training FLOPs per token and MFU (peak FLOP/s per device kind), memory bandwidth per
device kind (the decode roofline, benchmarks/decode.py), and the router-collapse check.
metrics.jsonl is strict JSON: a non-finite number (a loss that turned NaN) is written as `null`.
"""
from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

from yuanjax import publish, workdir as workdir_lib
from yuanjax.analysis import stats

# Dense bf16 peak FLOP/s per chip, from vendor spec sheets (H100 SXM: 989 TF dense; we
# measured 797 TF/s for a bf16 8192^3 matmul through JAX, see ../shared notes). Matched like
# MEMORY_BANDWIDTH below: specific names first (JAX calls v5p 'TPU v5', v5e 'TPU v5 lite').
PEAK_FLOPS = (
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('L40', 181e12),
    ('L4', 121e12),
    ('TPU v6', 918e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
)


def _by_kind(table, device_kind: str) -> float | None:
  """The value of the first name in `table` that is a case-insensitive substring of
  jax's device_kind, or None."""
  return next((v for name, v in table if name.lower() in device_kind.lower()), None)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device, or None when unknown (CPU): MFU is then not reported."""
  return _by_kind(PEAK_FLOPS, device_kind)


# Memory (HBM) bandwidth per chip in bytes/s, from vendor spec sheets: NVIDIA's H200, H100 and
# A100 datasheets (H100 SXM 3.35 TB/s, PCIe 2.0, NVL 3.9; A100 80GB SXM 2,039 GB/s, 80GB PCIe
# 1,935, 40GB 1,555), L40/L40S 864 GB/s, L4 300 GB/s; Google Cloud's TPU pages
# (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e: 1200, 819, 2765 and 1638 GB/s). Matched as a
# case-insensitive substring of jax's device_kind, first match wins, so specific names come
# first: JAX calls v5e 'TPU v5 lite', v5p 'TPU v5' and v6e 'TPU v6 lite'.
MEMORY_BANDWIDTH = (
    ('H200', 4.8e12),
    ('H100 PCIe', 2.0e12),
    ('H100 NVL', 3.9e12),
    ('H100', 3.35e12),
    ('A100-SXM4-40GB', 1.555e12),
    ('A100-PCIE-40GB', 1.555e12),
    ('A100 80GB PCIe', 1.935e12),
    ('A100', 2.039e12),
    ('L40', 864e9),
    ('L4', 300e9),
    ('TPU v6', 1.638e12),
    ('TPU v5 lite', 819e9),
    ('TPU v5e', 819e9),
    ('TPU v5', 2.765e12),
    ('TPU v4', 1.2e12),
)


def memory_bandwidth(device_kind: str) -> float | None:
  """Memory bandwidth (bytes/s) of one device, or None when unknown (CPU)."""
  return _by_kind(MEMORY_BANDWIDTH, device_kind)


def roofline_fraction(bytes_per_s: float, device_kind: str) -> float | None:
  """Achieved bytes/s of one device over its memory bandwidth, or None when unknown (CPU)."""
  bandwidth = memory_bandwidth(device_kind)
  return None if bandwidth is None else bytes_per_s / bandwidth


def train_flops_per_token(config) -> float:
  """Model FLOPs of training per token: forward + backward (3x forward) of the active
  matmul params (6 x active params, as `yuanjax.stats` counts them) and of the causal
  attention products at train.seq_len. What MFU divides by."""
  from yuanjax import stats  # pylint: disable=g-import-not-at-top  (model import, lazily)
  facts = stats.model_facts(config.model)
  return 3 * (facts['forward_flops_per_token'] +
              stats.attention_flops_per_token(config.model, config.train.seq_len))


def mfu(tokens_per_sec: float, flops_per_token: float, device_kind: str,
        num_devices: int) -> float | None:
  """Model FLOPs utilisation over all devices, or None when the peak is unknown (CPU)."""
  peak = peak_flops(device_kind)
  return None if peak is None else tokens_per_sec * flops_per_token / (peak * num_devices)


def _strict(v):
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
    record = {'step': int(step), 'kind': kind, **{k: _strict(v) for k, v in scalars.items()}}
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
  of the routed slots (analysis.stats.collapsed_layers); returns those layers."""
  bad = stats.collapsed_layers(load_LxE, top_k, threshold)
  E = np.shape(load_LxE)[-1]
  for layer, share in bad:
    logging.warning(
        'step %d: router of MoE layer %d collapsed: its %d most loaded experts of %d take %.1f%% '
        'of the routed slots (balanced: %.1f%%; threshold %.0f%%)', step, layer, top_k, E,
        100 * share, 100 * top_k / E, 100 * threshold)
  return bad
