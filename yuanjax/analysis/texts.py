"""Two text sets for domain specialisation: Python code vs. the prose in it.

The embedded corpus is Python source, which holds both: `split_code_and_prose` separates a
file into its code (comments and docstrings removed, by `ast.unparse`) and its prose (the
docstrings and the comments).
"""
from __future__ import annotations

import ast
import io
import tokenize
from typing import Sequence

_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_docstring(node) -> bool:
  return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and
          isinstance(node.value.value, str))


def _comments(source: str) -> list[str]:
  out = []
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip('#').strip()
      if text and not text.startswith('!'):
        out.append(text)
  return out


def split_code_and_prose(source: str) -> tuple[str, str]:
  """(code, prose) of one Python file: the code without docstrings or comments, and the
  docstrings then the comments, one paragraph each. SyntaxError if it is not Python."""
  tree = ast.parse(source)
  docs = []
  for node in ast.walk(tree):
    if isinstance(node, _DOC_OWNERS) and node.body and _is_docstring(node.body[0]):
      docs.append(ast.get_docstring(node, clean=True))
      node.body = node.body[1:] or [ast.Pass()]
  prose = '\n\n'.join([d for d in docs if d] + _comments(source))
  return ast.unparse(tree), prose


def code_and_prose(files: Sequence[str], max_chars: int) -> tuple[str, str]:
  """Up to `max_chars` of code and of prose from Python `files` (skipping unparsable ones)."""
  code, prose = [], []
  for path in files:
    with open(path, encoding='utf-8') as f:
      try:
        c, p = split_code_and_prose(f.read())
      except (SyntaxError, ValueError):
        continue
    code.append(c)
    prose.append(p)
    if min(sum(map(len, code)), sum(map(len, prose))) >= max_chars:
      break
  return '\n'.join(code)[:max_chars], '\n\n'.join(prose)[:max_chars]


def chunks(text: str, n: int, size: int) -> list[str]:
  """`n` pieces of `size` characters from `text` (fewer if it is short), cut at line starts."""
  out, start = [], 0
  while len(out) < n and start < len(text):
    out.append(text[start:start + size])
    nl = text.find('\n', start + size - 1)
    start = len(text) if nl < 0 else nl + 1
  return out
