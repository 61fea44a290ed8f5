"""yuanjax.analysis.plots: each figure draws the numbers it is given."""
import matplotlib

matplotlib.use('Agg')

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from yuanjax.analysis import plots  # noqa: E402


def teardown_function():
  plt.close('all')


def test_relative_load_heatmap_shows_the_matrix_centred_at_one():
  rel = np.array([[1.0, 2.0, 0.5, 0.5], [0.0, 4.0, 0.0, 0.0]])
  fig = plots.relative_load_heatmap(rel, layers_M=[1, 3])
  im = fig.axes[0].images[0]
  np.testing.assert_array_equal(im.get_array(), rel)
  assert isinstance(im.norm, mcolors.TwoSlopeNorm) and im.norm.vcenter == 1.0
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ['1', '3']


def test_relative_load_panels_share_one_colour_scale():
  """One panel per variant (shapes may differ: 8 vs 16 experts), one norm over all of them."""
  small, big = np.full((2, 8), 1.0), np.full((3, 16), 0.5)
  big[1, 3] = 3.0
  fig = plots.relative_load_panels({'8 experts': small, '16 experts': big})
  panels = [ax for ax in fig.axes if ax.images]
  assert [ax.get_title() for ax in panels] == ['8 experts', '16 experts']
  np.testing.assert_array_equal(panels[1].images[0].get_array(), big)
  assert all(ax.images[0].norm.vmax == 3.0 and ax.images[0].norm.vcenter == 1.0 for ax in panels)


def test_matrix_grid_spreads_panels_over_the_depth():
  mats = np.arange(10 * 3 * 3, dtype=float).reshape(10, 3, 3)
  fig = plots.matrix_grid(mats, max_panels=3)
  panels = [ax for ax in fig.axes if ax.images]
  assert [ax.get_title() for ax in panels] == ['layer 0', 'layer 4', 'layer 9']  # 0, 4.5, 9
  np.testing.assert_array_equal(panels[2].images[0].get_array(), mats[9])
  assert {ax.images[0].get_clim() for ax in panels} == {(0.0, 89.0)}  # one scale, all layers


def test_colored_tokens_wraps_and_colours_by_expert():
  fig = plots.colored_tokens(['def', ' f', '():\n', '  x'], [0, 1, 1, -1], 2, width=5)
  texts = fig.axes[0].texts
  assert [t.get_text() for t in texts] == ['def', ' f', '():', '  x']
  rows = [t.get_position()[1] for t in texts]
  assert rows == [0, 0, 1, 2]  # ' f' fits in 5 columns; '():' wraps; '\n' breaks
  colors = plots.expert_colors(2)
  assert texts[1].get_bbox_patch().get_facecolor()[:3] == colors[1][:3]
  assert texts[3].get_bbox_patch().get_facecolor()[:3] == (0.85, 0.85, 0.85)


def test_domain_bars_and_bands():
  shares = {'code': np.array([0.5, 0.1, 0.4]), 'prose': np.array([0.2, 0.6, 0.2])}
  fig = plots.domain_bars(shares, uniform=2 / 3)
  heights = [p.get_height() for p in fig.axes[0].patches]
  np.testing.assert_allclose(heights, [0.5, 0.1, 0.4, 0.2, 0.6, 0.2])
  y = np.array([[3.0, 2.0], [5.0, 4.0]])
  fig = plots.mean_with_band({'a': ([10, 20], y)})
  np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [4.0, 3.0])
  assert fig.legends[0].get_texts()[0].get_text() == 'a (2 seeds)'


def test_sorted_panels_label_experts_by_load_rank():
  fig = plots.relative_load_panels({'a': np.array([[3.0, 1.0, 0.0]])}, sorted_experts=True)
  ax = fig.axes[0]
  assert ax.get_xlabel() == 'experts by load, most loaded first'
  assert [t.get_text() for t in ax.get_xticklabels()] == ['1', '2', '3']


def test_curves_mark_eval_points_and_colour_by_variant():
  """Seeds of a variant share one colour and one legend entry; a 3-point curve is marked, a
  100-point one is not."""
  steps = list(range(100))
  runs = {
      'a s0': (steps, steps),
      'a s1': (steps, steps),
      'b s0': (steps, steps),
      'eval': ([0, 50, 99], [3.0, 2.0, 1.0])
  }
  groups = {'a s0': 'a', 'a s1': 'a', 'b s0': 'b', 'eval': 'eval'}
  fig = plots.curves(runs, groups=groups)
  lines = fig.axes[0].lines
  colours = [mcolors.to_hex(l.get_color()) for l in lines]
  assert colours[0] == colours[1] and len(set(colours)) == 3
  assert [l.get_marker() for l in lines] == ['None', 'None', 'None', 'o']
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ['a', 'b', 'eval']


LONG = 'type=shared num_shared_experts=2 num_experts=14 ffn_size=96 (mean of 3 seeds)'


def _extent(fig, artist):
  fig.canvas.draw()
  return artist.get_window_extent(fig.canvas.get_renderer())


def test_long_variant_names_neither_clip_nor_squeeze_the_plot():
  """A sweep's variant names are long: a panel title stays inside its figure (wrapped), and a
  legend of long names leaves the axes most of the figure's width (it sits below them)."""
  fig = plots.relative_load_panels({LONG: np.ones((4, 14)), 'b': np.ones((4, 8))})
  title = _extent(fig, fig.axes[0].title)
  assert 0 <= title.x0 and title.x1 <= fig.bbox.width
  x = [1e5, 2e5, 3e5]
  flat = (x, [0.0] * 3, [-1.0] * 3, [1.0] * 3)
  bands = {LONG + ' and more words': flat, 'b': flat}
  fig = plots.lines_with_bands(bands, zero_line=True)
  assert _extent(fig, fig.axes[0]).width > 0.7 * fig.bbox.width
