"""yuanjax.analysis.texts: code and prose are separated."""
from yuanjax.analysis import texts

SOURCE = '''"""Module doc."""
import os  # why os

# A comment line.
class A:
  """Class doc."""

  def f(self, x):
    """Function doc."""
    return x + 1  # add one
'''


def test_split_code_and_prose():
  code, prose = texts.split_code_and_prose(SOURCE)
  for piece in ('import os', 'class A:', 'def f(self, x):', 'return x + 1'):
    assert piece in code
  for piece in ('doc', '#', 'comment', 'add one'):
    assert piece not in code
  assert prose.split('\n\n') == [
      'Module doc.', 'Class doc.', 'Function doc.', 'why os', 'A comment line.', 'add one'
  ]


def test_code_and_prose_caps_and_skips_bad_files(tmp_path):
  good, bad = tmp_path / 'a.py', tmp_path / 'b.py'
  good.write_text(SOURCE)
  bad.write_text('def (:\n')
  code, prose = texts.code_and_prose([str(bad), str(good)], max_chars=12)
  assert code == 'import os\n\nc' and prose == 'Module doc.\n'


def test_chunks_cut_at_line_starts():
  text = 'aaaa\nbb\ncccccc\nd\n'
  assert texts.chunks(text, 5, 3) == ['aaa', 'bb\n', 'ccc', 'd\n']
  assert texts.chunks(text, 2, 3) == ['aaa', 'bb\n']
