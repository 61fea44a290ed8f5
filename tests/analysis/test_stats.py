"""yuanjax.analysis.stats against hand-computed loads."""
import numpy as np

from yuanjax.analysis import stats


def test_relative_load_is_one_when_balanced_and_scale_free():
  counts = np.array([[5, 5, 5, 5], [10, 0, 6, 4]])
  rel = stats.relative_load(counts)
  np.testing.assert_allclose(rel[0], 1.0)
  np.testing.assert_allclose(rel[1], [2.0, 0.0, 1.2, 0.8])
  np.testing.assert_allclose(stats.relative_load(counts / counts.sum(-1, keepdims=True)), rel)


def test_max_vio_and_dead_experts():
  load = np.array([[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(stats.max_vio(load), [0.0, 1.0, 3.0])
  np.testing.assert_array_equal(stats.dead_experts(load), [0, 1, 3])
  # 0.002 of the slots among 4 experts is 0.008 of the balanced share: dead at 1%, not at 0.5%
  almost = np.array([[0.498, 0.002, 0.25, 0.25]])
  assert stats.dead_experts(almost) == 1 and stats.dead_experts(almost, threshold=0.005) == 0


def test_expert_diversity_bounds():
  E = 8
  assert np.isclose(stats.expert_diversity(np.log(E), E), 1.0)
  assert np.isclose(stats.expert_diversity(0.0, E), 1 / E)
  np.testing.assert_allclose(stats.expert_diversity(np.log([2.0, 4.0]), E), [0.25, 0.5])
