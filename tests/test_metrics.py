"""yuanjax.metrics' device tables (which entry each JAX device_kind string finds) and its
router-collapse warning."""
import logging

import numpy as np
import pytest

from yuanjax import metrics


@pytest.mark.parametrize(
    'kind, bandwidth',
    [
        ('NVIDIA H100 80GB HBM3', 3.35e12),
        ('NVIDIA H100 PCIe', 2.0e12),
        ('NVIDIA H200', 4.8e12),
        ('NVIDIA A100-SXM4-40GB', 1.555e12),
        ('NVIDIA A100-SXM4-80GB', 2.039e12),
        ('NVIDIA L40S', 864e9),
        ('NVIDIA L4', 300e9),
        ('TPU v4', 1.2e12),
        ('TPU v5 lite', 819e9),  # v5e
        ('TPU v5', 2.765e12),  # v5p
        ('TPU v6 lite', 1.638e12),  # v6e
        ('cpu', None),
    ])
def test_memory_bandwidth_by_device_kind(kind, bandwidth):
  assert metrics.memory_bandwidth(kind) == bandwidth
  want = None if bandwidth is None else 0.25
  assert metrics.roofline_fraction(0.25 * (bandwidth or 1.0), kind) == want


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA L40S', 362e12),
    ('NVIDIA L4', 121e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
    ('cpu', None),
])
def test_peak_flops_by_device_kind(kind, peak):
  assert metrics.peak_flops(kind) == peak


def test_log_collapse_warns_for_a_top_2_collapse(caplog):
  """The trainer's flag: layer 1 (every token on experts 2 and 7 of 8) warns, layer 0
  (balanced) does not."""
  load = np.full((2, 8), 1 / 8)
  load[1] = 0.0
  load[1, [2, 7]] = 0.5
  with caplog.at_level(logging.WARNING):
    assert metrics.log_collapse(5, load, top_k=2, threshold=0.9) == [(1, 1.0)]
  assert 'step 5: router of MoE layer 1 collapsed: its 2 most loaded experts of 8 take 100.0%' \
      in caplog.text
  assert 'layer 0' not in caplog.text
