"""Tokenizer training and the Tokenizer wrapper.

    .venv/bin/python -m pytest -q tests/data/test_tokenizer.py
"""
import json
import os

import numpy as np
import pytest

from yuanjax.data import InputError, corpus
from yuanjax.data import tokenizer as tokenizer_lib
from yuanjax.data.__main__ import main as cli
from yuanjax.data.tokenizer import SPECIAL_SYMBOLS, Tokenizer

CODE = "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tx = 1  # two  spaces\n"
CJK = "你好，世界。这是一个测试。\n"
PROSE = "The quick brown fox jumps over the lazy dog 0123456789.\n"

ROUND_TRIP = [
    CODE,
    CJK,
    "  leading spaces, double  spaces,   triple, trailing  ",
    "\n\nnewlines\n\n\nonly\n",
    "tabs\t\tand\r\nCRLF\r\n",
    "unseen characters fall back to bytes: ü ߷ 𝄞 😀 ☃",
    "",
    " ",
    "\n",
    "mixed 中文 and code:\n    x = [1,  2]\n",
]


def write_corpus(d):
  (d / "a.txt").write_text(CODE * 3 + CJK * 3 + PROSE * 5, encoding="utf-8")
  with open(d / "b.jsonl", "w", encoding="utf-8") as f:
    for i in range(20):
      f.write(json.dumps({"text": f"line {i}: hello world\n  indented  {i * 7}"}) + "\n")
  return [str(d / "a.txt"), str(d / "*.jsonl")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  return tokenizer_lib.train_tokenizer(write_corpus(d), d / "tiny", 400)


@pytest.fixture(scope="module")
def tiny_n(tmp_path_factory):
  """A model with Yuan's ``<n>`` newline piece (trained on text whose newlines are <n>)."""
  d = tmp_path_factory.mktemp("tok_n")
  docs = [
      corpus.Document(t.replace("\n", "<n>"), "mem", None, 0)
      for t in (CODE * 3, CJK * 3, PROSE * 5)
  ]
  return tokenizer_lib.train_from_documents(docs, d / "yuanlike", 400,
                                            user_defined_symbols=SPECIAL_SYMBOLS + ("<n>",))


def test_files_and_special_ids(tiny):
  assert os.path.isfile(tiny) and os.path.isfile(tiny[:-len(".model")] + ".vocab")
  tok = Tokenizer(tiny)
  assert tok.vocab_size == 400
  ids = [
      tok.eod_id, tok.sep_id, tok.pad_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id
  ]
  assert len(set(ids)) == 6
  assert [tok.sp.id_to_piece(i) for i in ids] == list(SPECIAL_SYMBOLS)
  assert tok.sp.id_to_piece(tok.pad_id) == "<pad>"
  assert tok.newline_token is None


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_exact_round_trip(tiny, text):
  tok = Tokenizer(tiny)
  ids = tok.encode(text)
  assert all(isinstance(i, int) for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text  # numpy input too


def test_newlines_are_native_pieces(tiny):
  tok = Tokenizer(tiny)
  pieces = [tok.sp.id_to_piece(i) for i in tok.encode("x = 1\ny = 2\n")]
  assert any("\n" in p for p in pieces), pieces  # learned, not a <0x0A> byte fallback
  assert "<0x0A>" not in pieces


def test_training_is_deterministic(tiny, tmp_path):
  again = tokenizer_lib.train_tokenizer(write_corpus(tmp_path), tmp_path / "again", 400)
  assert open(again, "rb").read() == open(tiny, "rb").read()


def test_encode_batch_matches_encode(tiny):
  tok = Tokenizer(tiny)
  assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def test_newline_token_mode(tiny_n):
  tok = Tokenizer(tiny_n, newline_token="<n>")
  n_id = tok.sp.piece_to_id("<n>")
  text = "a\nb\n\n  c\n你好\n"
  ids = tok.encode(text)
  assert ids.count(n_id) == text.count("\n")
  assert not any("\n" in tok.sp.id_to_piece(i) or tok.sp.id_to_piece(i) == "<0x0A>" for i in ids)
  assert tok.decode(ids) == text
  for t in ROUND_TRIP:
    assert tok.decode(tok.encode(t)) == t
  # The same model without the option keeps newlines as bytes, still exact.
  plain = Tokenizer(tiny_n)
  assert n_id not in plain.encode(text) and plain.decode(plain.encode(text)) == text


def test_newline_token_must_exist(tiny):
  with pytest.raises(ValueError, match="<n>"):
    Tokenizer(tiny, newline_token="<n>")


def test_missing_model_and_missing_specials(tmp_path):
  with pytest.raises(ValueError, match="nope.model"):
    Tokenizer(tmp_path / "nope.model")
  docs = [corpus.Document(CODE * 5 + PROSE * 5, "mem", None, 0)]
  only_eod = tokenizer_lib.train_from_documents(docs, tmp_path / "eod", 350,
                                                user_defined_symbols=("<eod>",))
  tok = Tokenizer(only_eod)
  assert tok.sp.id_to_piece(tok.eod_id) == "<eod>"
  with pytest.raises(ValueError, match="<FIM_PREFIX>"):
    tok.fim_prefix_id
  assert not tok.has_piece("<pad>")


def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path):
  (tmp_path / "ok.txt").write_text(CODE)
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
  with pytest.raises(InputError, match=r"bad\.jsonl:3: no 'text' field"):
    tokenizer_lib.train_tokenizer(
        [str(tmp_path / "ok.txt"), str(tmp_path / "bad.jsonl")], tmp_path / "out", 300)
  assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "ok.txt"]


def test_cli(tmp_path, capsys):
  inputs = write_corpus(tmp_path)
  assert cli([
      "tokenizer", "--input", *inputs, "--vocab_size", "420", "--output",
      str(tmp_path / "cli")
  ]) == 0
  assert Tokenizer(tmp_path / "cli.model").vocab_size == 420
  assert "cli.model" in capsys.readouterr().out
  assert cli([
      "tokenizer", "--input",
      str(tmp_path / "missing.txt"), "--vocab_size", "300", "--output",
      str(tmp_path / "x")
  ]) == 2
  assert "missing.txt: no such file" in capsys.readouterr().err


def test_training_chunks_keep_every_byte():
  ascii_line = "x = [" + ", ".join(map(str, range(3000))) + "]"  # ~17 KB, no newline
  cjk_line = "数据" * 1500  # 9 KB of 3-byte characters
  texts = [CODE * 200, ascii_line + "\n" + CJK * 800, cjk_line, "no newline at all", ""]
  chunks = list(tokenizer_lib._sentences([corpus.Document(t, "mem", None, 0) for t in texts], 1024))
  assert "".join(chunks) == "".join(texts)
  sizes = [len(c.encode("utf-8")) for c in chunks]
  assert max(sizes) <= 4 * 1024  # within max_sentence_length: the trainer drops nothing
  assert all(n <= 1024 for c, n in zip(chunks, sizes) if not c.startswith("数"))


def test_aliases_and_bos_token(tiny):
  """Mixtral's (Llama's) conventions: '</s>' plays <eod> and <pad>, every text starts with '<s>'."""
  tok = Tokenizer(tiny, aliases={"<eod>": "</s>", "<pad>": "</s>"}, bos_token="<s>")
  sp = tok.sp
  assert tok.eod_id == tok.pad_id == sp.piece_to_id("</s>") != Tokenizer(tiny).eod_id
  assert tok.encode(CODE) == [sp.piece_to_id("<s>")] + sp.encode(CODE)
  assert tok.encode_batch([CODE, "x"]) == [tok.encode(CODE), tok.encode("x")]
  assert tok.decode(tok.encode(CODE)) == CODE
  with pytest.raises(ValueError, match=r"no piece '</eos>' \(aliases\['<eod>'\]\)"):
    Tokenizer(tiny, aliases={"<eod>": "</eos>"})
  with pytest.raises(ValueError, match="no <bos> piece"):
    Tokenizer(tiny, bos_token="<bos>")


# --------------------------------------------------------------------------- Yuan's added tokens


@pytest.fixture(scope="module")
def yuan_like(tmp_path_factory):
  """A model that has <eod>, <n>, <sep> and <FIM_MIDDLE> but lacks the other added tokens."""
  d = tmp_path_factory.mktemp("tok_yuan")
  docs = [corpus.Document(t.replace("\n", "<n>"), "mem", None, 0) for t in (CODE * 3, PROSE * 5)]
  return tokenizer_lib.train_from_documents(
      docs, d / "yuan", 400, user_defined_symbols=("<eod>", "<sep>", "<n>", "<FIM_MIDDLE>"))


def test_added_tokens_get_yuan_runtime_ids(yuan_like):
  tok = Tokenizer(yuan_like, newline_token="<n>", added_tokens=tokenizer_lib.YUAN_ADDED_TOKENS)
  sp = tok.sp
  size = sp.get_piece_size()
  missing = [t for t in tokenizer_lib.YUAN_ADDED_TOKENS if t not in ("<sep>", "<FIM_MIDDLE>")]
  want = {t: size + k for k, t in enumerate(missing)}  # next ids, in the runtime's order
  want.update({"<sep>": sp.piece_to_id("<sep>"), "<FIM_MIDDLE>": sp.piece_to_id("<FIM_MIDDLE>")})
  assert want["<sep>"] < size and want["<FIM_MIDDLE>"] < size  # kept their own ids
  assert {t: tok.token_id(t) for t in tokenizer_lib.YUAN_ADDED_TOKENS} == want
  assert (tok.fim_prefix_id, tok.fim_suffix_id, tok.pad_id) == (want["<FIM_PREFIX>"],
                                                                want["<FIM_SUFFIX>"], want["<pad>"])
  assert want["<pad>"] == size and want["<file_sep>"] == size + len(missing) - 1
  assert tok.vocab_size == size + len(missing)


def test_added_tokens_are_encoded_as_one_id(yuan_like):
  tok = Tokenizer(yuan_like, newline_token="<n>", added_tokens=tokenizer_lib.YUAN_ADDED_TOKENS)
  text = "<FIM_PREFIX>def f(x):\n<FIM_SUFFIX>    return x\n<FIM_MIDDLE><file_sep><mask>"
  ids = tok.encode(text)
  sp_enc = lambda s: tok.sp.encode(s.replace("\n", "<n>"))
  assert ids == (
      [tok.fim_prefix_id] + sp_enc("def f(x):\n") + [tok.fim_suffix_id] + sp_enc("    return x\n") +
      [tok.fim_middle_id, tok.token_id("<file_sep>"),
       tok.token_id("<mask>")])
  assert tok.decode(ids) == text
  assert tok.encode_batch([text, "x"]) == [ids, sp_enc("x")]
  plain = Tokenizer(yuan_like, newline_token="<n>")  # without: the SentencePiece pieces
  assert len(plain.encode("<FIM_PREFIX>")) > 1
  with pytest.raises(ValueError, match="<FIM_PREFIX>"):
    plain.fim_prefix_id
