"""analysis.significance against hand computations, the normal approximation and simulation."""
import math

import numpy as np
import pytest

from yuanjax.analysis import significance


def test_paired_interval_by_hand():
  """d = 1, 2, 3: mean 2, std 1, t_{0.975, 2} = 4.302653 -> 2 ± 4.302653 / √3."""
  out = significance.paired_interval([1.0, 2.0, 3.0])
  half = 4.302652729911275 / math.sqrt(3)
  assert out['n'] == 3 and out['mean'] == 2.0 and out['std'] == 1.0
  np.testing.assert_allclose([out['low'], out['high']], [2 - half, 2 + half], rtol=1e-9)


def test_paired_interval_needs_two_pairs():
  out = significance.paired_interval([0.5])
  assert out['mean'] == 0.5 and math.isnan(out['std']) and math.isnan(out['low'])


def test_power_is_alpha_at_zero_and_grows():
  assert significance.power(0.0, 1.0, 10) == pytest.approx(0.05, abs=1e-9)
  powers = [significance.power(d, 1.0, 10) for d in (0.2, 0.5, 1.0, 2.0)]
  assert powers == sorted(powers) and powers[-1] > 0.99


def test_detectable_difference_matches_the_normal_formula_for_large_n():
  """For large n the t is normal: (z_0.975 + z_0.8) s / √n = 2.8016 s / √n."""
  n, std = 2000, 0.01
  want = (1.959964 + 0.841621) * std / math.sqrt(n)
  assert significance.detectable_difference(std, n) == pytest.approx(want, rel=2e-3)


def test_detectable_difference_has_the_stated_power_in_simulation():
  """Simulated paired studies whose true gap is the detectable difference reject ~80%."""
  n, std = 8, 0.012
  delta = significance.detectable_difference(std, n)
  rng = np.random.default_rng(0)
  d = rng.normal(delta, std, size=(20000, n))
  t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
  rejected = np.mean(np.abs(t) > 2.364624251592785)  # t_{0.975, 7}
  assert rejected == pytest.approx(0.8, abs=0.015)


def test_pairs_needed_is_the_smallest_n_that_detects_the_gap():
  n = significance.pairs_needed(0.01, 0.01)
  assert significance.detectable_difference(0.01, n) <= 0.01
  assert significance.detectable_difference(0.01, n - 1) > 0.01
  assert n == 10  # std = gap: 10 pairs (the classic 7.85 of the normal approximation, plus t)
  with pytest.raises(ValueError, match='must both be positive'):
    significance.pairs_needed(0.0, 0.01)
