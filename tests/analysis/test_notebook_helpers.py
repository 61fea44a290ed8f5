"""yuanjax.analysis.notebook: the helpers the notebooks share."""
import numpy as np

from yuanjax.analysis import notebook


def test_smoke_switch_and_workdir(monkeypatch, tmp_path):
  monkeypatch.setenv('YUANJAX_NOTEBOOK_DIR', str(tmp_path))
  monkeypatch.setenv('YUANJAX_NOTEBOOK_SMOKE', '1')
  assert notebook.smoke() and notebook.workdir('q') == str(tmp_path / 'q-smoke')
  monkeypatch.setenv('YUANJAX_NOTEBOOK_SMOKE', '0')
  assert not notebook.smoke() and notebook.workdir('q') == str(tmp_path / 'q')
  small, full = notebook.quickstart_config(True), notebook.quickstart_config(False)
  assert small.train.num_steps < full.train.num_steps and small.model.num_layers == 2


class _Pieces:
  """decode() as sentencepiece does it: the leading space of the text is dropped."""
  vocab = ['▁def', '▁f', '(', '):', '\n', '▁▁return']

  def decode(self, ids):
    return ''.join(self.vocab[i] for i in ids).replace('▁', ' ').lstrip(' ')


def test_token_pieces_rebuild_the_text():
  ids = [0, 1, 2, 3, 4, 5]
  pieces = notebook.token_pieces(_Pieces(), ids)
  assert pieces == ['def', ' f', '(', '):', '\n', '  return']
  assert ''.join(pieces) == _Pieces().decode(ids)


def test_markdown_table():
  t = notebook.markdown_table(['a', 'b'], [[1, 0.123456], ['x', np.float64(2.0).item()]])
  assert t.splitlines() == ['| a | b |', '|---|---|', '| 1 | 0.1235 |', '| x | 2 |']
