"""SentencePiece tokenizer: training (BPE, byte fallback, exact round trip) and a thin wrapper.

Train on .txt files (one document each) and/or .jsonl files (one document per line):

  python -m yuanjax.data tokenizer --input 'corpus/**/*.jsonl' --vocab_size 32000 --output out/tok
  # writes out/tok.model and out/tok.vocab

Use it:

  tok = Tokenizer('out/tok.model')
  ids = tok.encode('def f(x):\\n    return x\\n')
  assert tok.decode(ids) == 'def f(x):\\n    return x\\n'

Training settings (`TRAINER_OPTIONS`): BPE, `byte_fallback` (no `<unk>` ever),
`normalization_rule_name='identity'`, `remove_extra_whitespaces=False`,
`add_dummy_prefix=False` (a document's encoding does not depend on a phantom leading space),
`split_digits=True`, `allow_whitespace_only_pieces=True` (indentation runs become single
pieces: ~1.5x fewer tokens on Python source) and Yuan's user-defined symbols
`SPECIAL_SYMBOLS`. Decoding is the exact inverse of encoding for any text, including
newlines, tabs, runs of spaces and CJK.

Newlines. SentencePiece's trainer reads *lines*, so a plain file input would never teach it a
newline piece. We feed documents as chunks of whole lines (newlines included, each chunk at most
`max_sentence_bytes`), so newlines become ordinary pieces (`newline_token=None`).
Yuan's released tokenizer instead has no newline piece: Yuan's runtime writes every `\\n` as
the literal piece `<n>` before encoding and turns `<n>` back into `\\n` after decoding. Load
it with `Tokenizer(path, newline_token='<n>')` to do the same. (A literal `<n>` in the text
therefore decodes as a newline in that mode; the same holds for Yuan's own runtime.)

Like every SentencePiece model with user-defined symbols, a literal `<eod>` (or any other
special symbol) inside a text is encoded as that symbol's id.

Added and special tokens (released tokenizers). Yuan's runtime loads `tokenizer.model` with HF's
SentencePiece-based LlamaTokenizer(eos_token='<eod>') and then adds `YUAN_ADDED_TOKENS`, in that
order. HF splits every one of its special tokens (bos, eos, unk: `hf_special_tokens`) and added
tokens out of a text before the SentencePiece model sees it, so a literal `<eod>` is its id 77185
whatever kind of piece the model holds it as. `Tokenizer(path, added_tokens=...)` does the same
(what `yuanjax.loader.load_tokenizer` passes, `tokenizer_options()` of the model's mapping): a
token already in the SentencePiece model keeps its id, each one that is not gets the next id
from the model's size on; the text is split on them and the parts between encoded as plain
`SentencePieceProcessor.encode` does (a text without them encodes exactly as before), and
decoding writes each of them back as its text.

Other released tokenizers (Mixtral's Llama-style `tokenizer.model`: `<unk> <s> </s>`, no
`<eod>`): `aliases` names the piece that plays each of yuanjax's special roles
(`{'<eod>': '</s>', '<pad>': '</s>'}`), and `bos_token='<s>'` starts every encoded text
with that id, as HF's LlamaTokenizer does (`add_bos_token`).
"""
from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from yuanjax import publish
from yuanjax.data import corpus

EOD, SEP, PAD = '<eod>', '<sep>', '<pad>'
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = '<FIM_PREFIX>', '<FIM_MIDDLE>', '<FIM_SUFFIX>'
SPECIAL_SYMBOLS = (EOD, SEP, PAD, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
# Added by Yuan's runtime after loading tokenizer.model, in this order (Yuan2.0-M32 README).
YUAN_ADDED_TOKENS = (
    SEP,
    PAD,
    '<mask>',
    '<predict>',
    FIM_SUFFIX,
    FIM_PREFIX,
    FIM_MIDDLE,
    '<commit_before>',
    '<commit_msg>',
    '<commit_after>',
    '<jupyter_start>',
    '<jupyter_text>',
    '<jupyter_code>',
    '<jupyter_output>',
    '<empty_output>',
    '<repo_name>',
    '<file_sep>',
)
# HF LlamaTokenizer's special tokens when tokenizer_config.json does not name them.
LLAMA_SPECIAL_TOKENS = dict(bos_token='<s>', eos_token='</s>', unk_token='<unk>')

TRAINER_OPTIONS = dict(
    model_type='bpe',
    byte_fallback=True,
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
)


def hf_special_tokens(tokenizer_config: dict | None = None, **runtime: str) -> dict[str, str]:
  """HF LlamaTokenizer's special tokens {bos_token, eos_token, unk_token[, pad_token]}, in the
  order it adds them: Llama's defaults, then tokenizer_config.json's (a value may be an
  AddedToken dict), then the runtime's keyword arguments (Yuan's eos_token='<eod>')."""
  named = {
      k: v.get('content') if isinstance(v, dict) else v
      for k, v in (tokenizer_config or {}).items()
      if k in (*LLAMA_SPECIAL_TOKENS, 'pad_token')
  }
  return {**LLAMA_SPECIAL_TOKENS, **{k: v for k, v in named.items() if v}, **runtime}


class Tokenizer:
  """A `sentencepiece.SentencePieceProcessor` with Yuan's special ids and newline handling.

  Args:
    model_path: a SentencePiece `.model` file.
    newline_token: `None` (newlines are encoded natively; our trained tokenizers) or a piece
      such as `'<n>'` that stands for `'\\n'` (Yuan's released tokenizer).
    added_tokens: tokens split out of every text, in order: each keeps its SentencePiece id, one
      the model lacks gets the next id past it (module docstring).
    aliases: {yuanjax special piece: the piece of this model that plays it}, e.g.
      `{'<eod>': '</s>'}` (module docstring).
    bos_token: a piece every `encode` starts with (`None`: none)."""

  def __init__(self, model_path: str | os.PathLike, newline_token: str | None = None,
               added_tokens: Sequence[str] = (), aliases: dict[str, str] | None = None,
               bos_token: str | None = None):
    self.model_path = os.fspath(model_path)
    self._aliases = dict(aliases or {})
    if not os.path.isfile(self.model_path):
      raise ValueError(f'tokenizer: {self.model_path}: no such file')
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    self.newline_token = newline_token
    self._added = self._add_tokens(added_tokens)
    self._added_pieces = {i: t for t, i in self._added.items()}
    by_length = sorted(self._added, key=len, reverse=True)
    self._split = re.compile('(' + '|'.join(map(re.escape, by_length)) + ')') if by_length else None
    if newline_token is not None and self._piece_id(newline_token) is None:
      raise ValueError(
          f'tokenizer: {self.model_path} has no piece {newline_token!r} (newline_token)')
    for role, piece in self._aliases.items():
      if piece not in self._added and self._sp_piece_id(piece) is None:
        raise ValueError(f'tokenizer: {self.model_path} has no piece {piece!r} (aliases[{role!r}])')
    if self._piece_id(EOD) is None:
      raise ValueError(f'tokenizer: {self.model_path} has no {EOD} piece')
    self._bos_piece = bos_token
    self._bos = [] if bos_token is None else [self._special(bos_token)]

  def _add_tokens(self, tokens: Sequence[str]) -> dict[str, int]:
    """{token: id}: its SentencePiece id if it has one, else the next id past the model."""
    ids, next_id = {}, self._sp.get_piece_size()
    for t in tokens:
      if t in ids:
        continue
      i = self._sp_piece_id(t)
      ids[t] = next_id if i is None else i
      next_id += i is None
    return ids

  def _piece_id(self, piece: str) -> int | None:
    piece = self._aliases.get(piece, piece)
    return self._added[piece] if piece in self._added else self._sp_piece_id(piece)

  def _sp_piece_id(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    # piece_to_id answers unk_id for unknown pieces.
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  def _special(self, piece: str) -> int:
    i = self._piece_id(piece)
    if i is None:
      raise ValueError(f'tokenizer: {self.model_path} has no {piece} piece')
    return i

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    return self._sp

  @property
  def vocab_size(self) -> int:
    return max(self._sp.get_piece_size(), max(self._added_pieces, default=-1) + 1)

  @property
  def options(self) -> dict:
    """This tokenizer's keyword arguments (JSON-serialisable; a manifest records them)."""
    return dict(newline_token=self.newline_token, added_tokens=list(self._added),
                aliases=dict(self._aliases), bos_token=self._bos_piece)

  @property
  def eod_piece(self) -> str:
    """The piece that ends documents (`<eod>`, or the one aliased to it)."""
    return self._aliases.get(EOD, EOD)

  def token_id(self, piece: str) -> int:
    """The id of a special or added token (ValueError naming the model if it has none)."""
    return self._special(piece)

  eod_id = property(lambda self: self._special(EOD), doc='id of <eod> (ends every document)')
  sep_id = property(lambda self: self._special(SEP))
  pad_id = property(lambda self: self._special(PAD))
  fim_prefix_id = property(lambda self: self._special(FIM_PREFIX))
  fim_middle_id = property(lambda self: self._special(FIM_MIDDLE))
  fim_suffix_id = property(lambda self: self._special(FIM_SUFFIX))

  def has_piece(self, piece: str) -> bool:
    return self._piece_id(piece) is not None

  def _pre(self, text: str) -> str:
    return text if self.newline_token is None else text.replace('\n', self.newline_token)

  def _parts(self, text: str) -> list[str]:
    """The text split on the added tokens (odd parts), after the newline replacement."""
    text = self._pre(text)
    return [text] if self._split is None else self._split.split(text)

  def _join(self, parts: list[str], encoded: Iterator[list[int]], bos: bool) -> list[int]:
    ids = list(self._bos) if bos else []
    for i, part in enumerate(parts):
      ids.extend([self._added[part]] if i % 2 else next(encoded) if part else [])
    return ids

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Ids of `text`; `add_bos=False`: without the `bos_token` (a chat template's parts)."""
    parts = self._parts(text)
    return self._join(parts, iter(self._sp.encode([p for p in parts[::2] if p])), add_bos)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Encodes many texts at once in SentencePiece's own C++ thread pool."""
    parts = [self._parts(t) for t in texts]
    plain = [p for ps in parts for p in ps[::2] if p]
    encoded = iter(self._sp.encode(plain, num_threads=num_threads))
    return [self._join(ps, encoded, True) for ps in parts]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of `ids`, the inverse of `encode`: the `bos_token` it starts with dropped, added
    tokens written as their text."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
    ids = ids[1:] if self._bos and ids[:1] == self._bos else ids
    parts, run = [], []
    for i in ids:  # runs of SentencePiece ids, and the added tokens
      if i in self._added_pieces:
        parts += [self._sp.decode(run), self._added_pieces[i]]
        run = []
      else:
        run.append(i)
    text = ''.join(parts) + self._sp.decode(run)
    return text if self.newline_token is None else text.replace(self.newline_token, '\n')

  def __repr__(self) -> str:
    return (f'Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, '
            f'newline_token={self.newline_token!r})')


def _sentences(documents: Iterable[corpus.Document], max_bytes: int) -> Iterator[str]:
  """Cuts documents into training chunks: whole lines (newlines kept), at most `max_bytes`.

  A line longer than that is cut into `max_bytes`-character slices, at most
  `4 * max_bytes` bytes of UTF-8 each, so that none exceeds the trainer's
  `max_sentence_length` (which would silently drop it). `"".join` of the chunks of a
  document is the document."""
  for doc in documents:
    chunk, size = [], 0
    for line in doc.text.splitlines(keepends=True):
      n = len(line.encode('utf-8'))
      if chunk and size + n > max_bytes:
        yield ''.join(chunk)
        chunk, size = [], 0
      if n > max_bytes:
        yield from (line[i:i + max_bytes] for i in range(0, len(line), max_bytes))
        continue
      chunk.append(line)
      size += n
    if chunk:
      yield ''.join(chunk)


def train_from_documents(
    documents: Iterable[corpus.Document],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    user_defined_symbols: Sequence[str] = SPECIAL_SYMBOLS,
    max_sentence_bytes: int = 4096,
    max_sentences: int = 200_000,
    num_threads: int | None = None,
) -> str:
  """Trains a tokenizer on `documents`; writes `PREFIX.model` / `PREFIX.vocab` atomically.

  `max_sentences` caps how many chunks SentencePiece keeps in memory (it samples beyond that).
  Returns the `.model` path."""
  output_prefix = os.fspath(output_prefix)
  if vocab_size < 1:
    raise ValueError(f'vocab_size must be positive, got {vocab_size}')
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  failure: list[BaseException] = []

  def sentences():
    try:
      yield from _sentences(documents, max_sentence_bytes)
    except BaseException as e:  # SentencePiece re-raises as RuntimeError; keep the original.
      failure.append(e)
      raise

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,  # (a model_prefix would be recorded in the model's bytes)
        vocab_size=vocab_size,
        user_defined_symbols=list(user_defined_symbols),
        max_sentence_length=4 * max_sentence_bytes,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
        **TRAINER_OPTIONS,
    )
  except RuntimeError as e:
    if failure:
      raise failure[0] from None
    raise ValueError(f'tokenizer training failed: {e}') from e
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  vocab = ''.join(f'{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n' for i in range(sp.get_piece_size()))
  publish.file(output_prefix + '.vocab', vocab.encode('utf-8'))
  publish.file(output_prefix + '.model', model.getvalue())
  return output_prefix + '.model'


def train_tokenizer(
    inputs: str | Sequence[str],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    text_key: str = 'text',
    **kwargs,
) -> str:
  """Trains a tokenizer on .txt / .jsonl files or globs (see `train_from_documents`)."""
  files = corpus.expand_inputs(inputs)
  return train_from_documents(corpus.read_documents(files, text_key), output_prefix, vocab_size,
                              **kwargs)
