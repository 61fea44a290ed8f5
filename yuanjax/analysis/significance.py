"""How sure a seeded ablation is: paired t intervals and power (NumPy + SciPy; no JAX).

Seeds set a run's initialisation; every variant sees the same data in the same order, so two
variants trained with the same seed form a pair, and the per-seed differences d_i (variant
minus base) remove the share of seed noise that both runs have in common. For n pairs:

  mean difference  m = mean(d),  s = std(d, ddof=1)
  95% interval     m ± t_{0.975, n-1} · s / √n        (Student's t)
  power            P(paired t-test rejects 0 at α) when the true difference is δ: the
                   noncentral t with n-1 degrees of freedom and noncentrality δ√n / s
  detectable       the δ whose power is 0.8 at the study's n (the minimum detectable
                   difference), and the n whose detectable δ is a given gap
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize
from scipy import stats as sps

ALPHA = 0.05  # two-sided
POWER = 0.8


def paired_interval(diffs, alpha: float = ALPHA) -> dict:
  """Mean of the paired differences, its std and its (1 - alpha) t interval; nan for n < 2."""
  d = np.asarray(diffs, np.float64)
  n = len(d)
  mean = float(d.mean()) if n else math.nan
  if n < 2:
    return dict(n=n, mean=mean, std=math.nan, low=math.nan, high=math.nan)
  std = float(d.std(ddof=1))
  half = float(sps.t.ppf(1 - alpha / 2, n - 1)) * std / math.sqrt(n)
  return dict(n=n, mean=mean, std=std, low=mean - half, high=mean + half)


def power(delta: float, std: float, n: int, alpha: float = ALPHA) -> float:
  """Probability that a two-sided paired t-test at `alpha` over n pairs whose differences
  have std `std` rejects 'no difference' when the true mean difference is `delta`."""
  df, nc = n - 1, delta * math.sqrt(n) / std
  crit = sps.t.ppf(1 - alpha / 2, df)
  # P(T < -crit | nc) written as P(T > crit | -nc): SciPy's nct.cdf is nan far in that tail.
  return float(sps.nct.sf(crit, df, nc) + sps.nct.sf(crit, df, -nc))


def detectable_difference(std: float, n: int, alpha: float = ALPHA, want: float = POWER) -> float:
  """The smallest true difference that n pairs detect with probability `want`; nan for
  n < 2 or a std that is not positive."""
  if n < 2 or not std > 0:
    return math.nan
  high = std
  while power(high, std, n, alpha) < want:  # bracket the root, doubling (nct is nan far out)
    high *= 2
  return float(optimize.brentq(lambda d: power(d, std, n, alpha) - want, 0.0, high))


def pairs_needed(std: float, delta: float, alpha: float = ALPHA, want: float = POWER,
                 most: int = 1000) -> int:
  """The smallest n (>= 2) whose detectable difference is at most `delta`."""
  if not (std > 0 and delta > 0):
    raise ValueError(f'pairs_needed: std {std} and delta {delta} must both be positive')
  for n in range(2, most + 1):
    if power(delta, std, n, alpha) >= want:
      return n
  raise ValueError(f'pairs_needed: more than {most} pairs for delta {delta} at std {std}')
