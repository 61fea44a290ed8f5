"""yuanjax.analysis.routing_stats against hand-computed loads."""
import numpy as np

from yuanjax.analysis import routing_stats


def test_relative_load_is_one_when_balanced_and_scale_free():
  counts = np.array([[5, 5, 5, 5], [10, 0, 6, 4]])
  rel = routing_stats.relative_load(counts)
  np.testing.assert_allclose(rel[0], 1.0)
  np.testing.assert_allclose(rel[1], [2.0, 0.0, 1.2, 0.8])
  np.testing.assert_allclose(routing_stats.relative_load(counts / counts.sum(-1, keepdims=True)),
                             rel)


def test_max_vio_and_dead_experts():
  load = np.array([[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(routing_stats.max_vio(load), [0.0, 1.0, 3.0])
  np.testing.assert_array_equal(routing_stats.dead_experts(load), [0, 1, 3])
  # 0.002 of the slots among 4 experts is 0.008 of the balanced share: dead at 1%, not at 0.5%
  almost = np.array([[0.498, 0.002, 0.25, 0.25]])
  assert routing_stats.dead_experts(almost) == 1 and routing_stats.dead_experts(
      almost, threshold=0.005) == 0


def test_expert_diversity_bounds():
  E = 8
  assert np.isclose(routing_stats.expert_diversity(np.log(E), E), 1.0)
  assert np.isclose(routing_stats.expert_diversity(0.0, E), 1 / E)
  np.testing.assert_allclose(routing_stats.expert_diversity(np.log([2.0, 4.0]), E), [0.25, 0.5])


# Routing-decision statistics on a hand-made routing: 1 layer, 4 tokens, top-2 of 4 experts.
EXPERTS = np.array([[[0, 1], [0, 1], [0, 2], [3, 1]]])  # [M=1, N=4, K=2]


def test_expert_load_and_token_share_by_hand():
  np.testing.assert_allclose(routing_stats.expert_load(EXPERTS, 4), [[3 / 8, 3 / 8, 1 / 8, 1 / 8]])
  np.testing.assert_allclose(routing_stats.token_share(EXPERTS, 4), [[3 / 4, 3 / 4, 1 / 4, 1 / 4]])
  mask = np.array([True, True, False, False])
  np.testing.assert_allclose(routing_stats.expert_load(EXPERTS, 4, mask), [[0.5, 0.5, 0, 0]])
  # -1 (no expert) is not a slot.
  np.testing.assert_allclose(routing_stats.expert_load(np.array([[[2, -1]]]), 4), [[0, 0, 1, 0]])


def test_coactivation_by_hand():
  p = routing_stats.coactivation(EXPERTS, 4)[0]
  # Expert 0 fires on tokens 0, 1, 2; with 1 on two of them, with 2 on one.
  np.testing.assert_allclose(p[0], [0, 2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(p[1], [2 / 3, 0, 0, 1 / 3])
  np.testing.assert_allclose(p[2], [1, 0, 0, 0])
  np.testing.assert_allclose(p[3], [0, 1, 0, 0])
  never = routing_stats.coactivation(np.array([[[0, 1]]]), 3)[0]
  np.testing.assert_allclose(never[2], 0.0)  # expert 2 never fires


def test_router_entropy_by_hand():
  probs = np.array([[[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]],
                    [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]]])  # [M=2, N=2, E=4]
  np.testing.assert_allclose(routing_stats.router_entropy(probs), [np.log(4) / 2, np.log(2)])
  np.testing.assert_allclose(routing_stats.router_entropy(probs, np.array([True, False])),
                             [0, np.log(2)])


def test_saturation():
  np.testing.assert_allclose(routing_stats.saturation(EXPERTS, EXPERTS), [1.0])
  # Order within the top-k does not matter; one of the 8 final choices differs.
  earlier = np.array([[[1, 0], [0, 1], [0, 3], [1, 3]]])
  np.testing.assert_allclose(routing_stats.saturation(earlier, EXPERTS), [7 / 8])
  other = np.array([[[0, 3], [2, 3], [2, 3], [1, 2]]])
  np.testing.assert_allclose(routing_stats.saturation(other, EXPERTS), [3 / 8])


def test_same_expert_as_previous():
  first = np.array([[[[0, 1], [0, 2], [1, 0], [1, 3]], [[2, 0], [2, 1], [2, 3], [0, 1]]]])
  np.testing.assert_allclose(routing_stats.same_expert_as_previous(first), [4 / 6])
  mask = np.array([[True, True, True, True], [True, True, False, False]])
  np.testing.assert_allclose(routing_stats.same_expert_as_previous(first, mask), [3 / 4])


def _routed_load(experts_NxK, num_experts=8):
  """[1, E] load of one layer whose tokens go to `experts_NxK`."""
  return routing_stats.expert_load(np.asarray(experts_NxK)[None], num_experts)


def test_collapse_onto_top_k_is_flagged_balanced_is_not():
  """Top-2 of 8: every token on experts 2 and 7 is a collapse (share 1); the effective expert
  count exp(H) of that load is 2, which the old rule `exp(H) < 0.25 * 8` never flagged."""
  collapsed = _routed_load([[2, 7]] * 64)
  balanced = _routed_load([[(2 * i) % 8, (2 * i + 1) % 8] for i in range(64)])
  np.testing.assert_allclose(routing_stats.top_k_load_share(collapsed, 2), [1.0])
  np.testing.assert_allclose(routing_stats.top_k_load_share(balanced, 2), [2 / 8])
  p = collapsed[0][collapsed[0] > 0]
  assert np.isclose(np.exp(-(p * np.log(p)).sum()), 2.0)  # not < 0.25 * 8
  both = np.concatenate([balanced, collapsed])
  assert routing_stats.collapsed_layers(both, top_k=2, threshold=0.9) == [(1, 1.0)]
  assert routing_stats.collapsed_layers(balanced, top_k=2, threshold=0.9) == []
  # Top-1 of 4 with 95% of tokens on one expert; and k >= E (always share 1) is never flagged.
  assert routing_stats.collapsed_layers([[0.95, 0.05, 0, 0]], top_k=1, threshold=0.9) == [(0, 0.95)]
  assert routing_stats.collapsed_layers([[0.5, 0.5]], top_k=2, threshold=0.9) == []


def test_top1_margin_by_hand():
  probs = np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], [[0.34, 0.33, 0.33],
                                                         [0.34, 0.33, 0.33]]])  # [M=2, N=2, E=3]
  np.testing.assert_allclose(routing_stats.top1_margin(probs), [(0.2 + 0.7) / 2, 0.01])
  np.testing.assert_allclose(routing_stats.top1_margin(probs, np.array([False, True])), [0.7, 0.01])
  # Near-uniform probabilities with a fixed argmax: entropy near log E, margin near 0.
  assert routing_stats.router_entropy(probs)[1] > 0.999 * np.log(3)
