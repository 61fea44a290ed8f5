"""yuanjax.metrics' router-collapse warning (its device tables moved to yuanjax.cost: tests/test_cost.py)."""
import logging

import numpy as np

from yuanjax import metrics


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
