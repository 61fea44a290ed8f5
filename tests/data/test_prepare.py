"""Input reading (corpus), shard writing/reading (prepare) and the embedded default corpus.

    .venv/bin/python -m pytest -q tests/data/test_prepare.py
"""
import json
import os
import sys
import threading

import numpy as np
import pytest

from yuanjax.data import InputError, ShardedDocuments, Tokenizer, corpus
from yuanjax.data import prepare as prepare_lib
from yuanjax.data import tokenizer as tokenizer_lib
from yuanjax.data.__main__ import main as cli

TEXT = "def f(x):\n    return x  # two  spaces\n\n你好，世界\n"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  docs = [corpus.Document(TEXT * 20 + "The quick brown fox, 12345.\n" * 10, "mem", None, 0)]
  return tokenizer_lib.train_from_documents(docs, d / "tok", 360)


def make_inputs(d):
  (d / "a.txt").write_text("hello\nworld  \n", encoding="utf-8")
  (d / "b.jsonl").write_text(
      "\n".join(
          json.dumps(r, ensure_ascii=False) for r in [
              {
                  "text": "first doc",
                  "id": 1
              },
              {
                  "text": "",
                  "id": 2
              },  # empty: skipped and counted
              {
                  "text": "你好\n\tthird",
                  "id": 3
              },
          ]) + "\n\n",
      encoding="utf-8")
  return [str(d / "a.txt"), str(d / "b.jsonl")], ["hello\nworld  \n", "first doc", "你好\n\tthird"]


# --------------------------------------------------------------------------- corpus


def test_expand_inputs(tmp_path):
  for name in ("b.jsonl", "a.txt", "sub/c.txt"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("x")
  files = corpus.expand_inputs([
      str(tmp_path / "**" / "*.txt"),
      str(tmp_path / "b.jsonl"),
      str(tmp_path / "a.txt")
  ])
  assert files == [
      str(tmp_path / "a.txt"),
      str(tmp_path / "sub" / "c.txt"),
      str(tmp_path / "b.jsonl")
  ]
  with pytest.raises(InputError, match="nope.txt: no such file"):
    corpus.expand_inputs([str(tmp_path / "a.txt"), str(tmp_path / "nope.txt")])
  with pytest.raises(InputError, match=r"\*.parquet: pattern matches no file"):
    corpus.expand_inputs(str(tmp_path / "*.parquet"))
  (tmp_path / "d.csv").write_text("x")
  with pytest.raises(InputError, match="d.csv: unsupported file type"):
    corpus.expand_inputs(str(tmp_path / "d.csv"))
  with pytest.raises(InputError, match="is a directory"):
    corpus.expand_inputs(str(tmp_path / "sub"))


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"txt": "b"}\n', r"bad.jsonl:2: no 'text' field"),
    ('{"text": "a"}\n\n{"text": 3}\n', r"bad.jsonl:3: field 'text' is int"),
    ('{"text": "a"}\n{"text": "b"\n', r"bad.jsonl:2: invalid JSON"),
    ('["text"]\n', r"bad.jsonl:1: no 'text' field"),
    ("\n\n", r"bad.jsonl: no documents"),
])
def test_read_documents_errors(tmp_path, content, message):
  (tmp_path / "bad.jsonl").write_text(content)
  with pytest.raises(InputError, match=message):
    list(corpus.read_documents([str(tmp_path / "bad.jsonl")]))


def test_read_documents_txt_errors_and_text_key(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(InputError, match="empty.txt: empty file"):
    list(corpus.read_documents([str(tmp_path / "empty.txt")]))
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  with pytest.raises(InputError, match="latin1.txt: not UTF-8"):
    list(corpus.read_documents([str(tmp_path / "latin1.txt")]))
  (tmp_path / "k.jsonl").write_text('{"content": "x"}\n')
  [doc] = corpus.read_documents([str(tmp_path / "k.jsonl")], text_key="content")
  assert (doc.text, doc.line, doc.where) == ("x", 1, f"{tmp_path / 'k.jsonl'}:1")


def test_stdlib_sources_sorted_capped_no_tests():
  files = corpus.stdlib_sources(max_bytes=300_000)
  assert files == sorted(files) and files == corpus.stdlib_sources(max_bytes=300_000)
  sizes = [os.path.getsize(f) for f in files]
  assert sum(sizes[:-1]) < 300_000 <= sum(sizes)
  root = corpus.stdlib_root()
  assert all(f.startswith(root) and f.endswith(".py") for f in files)
  assert not any({"test", "tests", "site-packages"} & set(os.path.relpath(f, root).split(os.sep))
                 for f in files)


# --------------------------------------------------------------------------- prepare


def test_prepare_writes_eod_after_each_document(tok_path, tmp_path):
  inputs, texts = make_inputs(tmp_path)
  out = tmp_path / "shards"
  m = prepare_lib.prepare(tok_path, inputs, out, progress=False)
  tok = Tokenizer(tok_path)
  assert (m["num_docs"], m["num_skipped_empty"], len(m["shards"])) == (3, 1, 1)
  assert (m["vocab_size"], m["eod_id"], m["tokenizer"]) == (tok.vocab_size, tok.eod_id,
                                                            os.path.abspath(tok_path))
  assert json.load(open(out / "manifest.json")) == m
  # The raw files: flat uint32 tokens and int64 start offsets (plus the end).
  flat = np.fromfile(out / "shard_00000.bin", dtype=np.uint32)
  offsets = np.load(out / "shard_00000.idx.npy")
  expected = [tok.encode(t) + [tok.eod_id] for t in texts]
  assert flat.tolist() == sum(expected, [])
  assert offsets.tolist() == np.cumsum([0] + [len(e) for e in expected]).tolist()
  assert m["num_tokens"] == len(flat) and np.count_nonzero(flat == tok.eod_id) == 3
  docs = ShardedDocuments(out)
  assert len(docs) == 3 and docs.doc_lengths().tolist() == [len(e) for e in expected]
  for i, text in enumerate(texts):
    assert docs[i].dtype == np.int32 and docs[i][-1] == tok.eod_id
    assert tok.decode(docs[i][:-1]) == text
  with pytest.raises(IndexError):
    docs[3]


def test_prepare_rolls_over_shards(tok_path, tmp_path):
  texts = [f"document number {i}: " + "x = 1\n" * (i % 5) for i in range(40)]
  (tmp_path / "many.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  m = prepare_lib.prepare(tok_path, str(tmp_path / "*.jsonl"), tmp_path / "s", shard_tokens=50,
                          progress=False)
  assert len(m["shards"]) > 3 and m["num_docs"] == 40
  assert all(s["num_tokens"] >= 50 for s in m["shards"][:-1])
  docs, tok = ShardedDocuments(tmp_path / "s"), Tokenizer(tok_path)
  assert [tok.decode(docs[i][:-1]) for i in range(len(docs))] == texts
  assert docs.doc_lengths().sum() == m["num_tokens"]


@pytest.mark.parametrize("bad", ["missing", "no_key", "empty_file", "all_empty"])
def test_bad_input_raises_before_writing(tok_path, tmp_path, bad):
  inputs, _ = make_inputs(tmp_path)
  if bad == "missing":
    inputs.append(str(tmp_path / "missing.jsonl"))
    message = "missing.jsonl: no such file"
  elif bad == "no_key":
    # The bad line is the last one: the error must still come before anything is written.
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n' * 5 + '{"title": "x"}\n')
    inputs.append(str(tmp_path / "c.jsonl"))
    message = r"c.jsonl:6: no 'text' field"
  elif bad == "empty_file":
    (tmp_path / "e.txt").write_text("")
    inputs.append(str(tmp_path / "e.txt"))
    message = "e.txt: empty file"
  else:
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    inputs = [str(tmp_path / "e.jsonl")]
    message = "no non-empty documents"
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(InputError, match=message):
    prepare_lib.prepare(tok_path, inputs, tmp_path / "out", progress=False)
  assert sorted(os.listdir(tmp_path)) == before  # no output dir, no temp dir left behind


def test_failure_while_writing_leaves_nothing(tok_path, tmp_path, monkeypatch):
  inputs, _ = make_inputs(tmp_path)
  before = sorted(os.listdir(tmp_path))

  def boom(self, texts, num_threads=-1):
    raise RuntimeError("disk full")

  monkeypatch.setattr(Tokenizer, "encode_batch", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    prepare_lib.prepare(tok_path, inputs, tmp_path / "out", progress=False)
  assert sorted(os.listdir(tmp_path)) == before


def test_existing_output_needs_overwrite(tok_path, tmp_path):
  inputs, _ = make_inputs(tmp_path)
  prepare_lib.prepare(tok_path, inputs[:1], tmp_path / "out", progress=False)
  with pytest.raises(ValueError, match="already exists"):
    prepare_lib.prepare(tok_path, inputs, tmp_path / "out", progress=False)
  m = prepare_lib.prepare(tok_path, inputs, tmp_path / "out", overwrite=True, progress=False)
  assert m["num_docs"] == 3 and ShardedDocuments(tmp_path / "out").manifest == m
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_reader_errors(tok_path, tmp_path):
  with pytest.raises(ValueError, match="nowhere: no such directory"):
    ShardedDocuments(tmp_path / "nowhere")
  (tmp_path / "plain").mkdir()
  with pytest.raises(ValueError, match="manifest.json: no such file"):
    ShardedDocuments(tmp_path / "plain")
  inputs, _ = make_inputs(tmp_path)
  prepare_lib.prepare(tok_path, inputs, tmp_path / "s", progress=False)
  os.remove(tmp_path / "s" / "shard_00000.idx.npy")
  with pytest.raises(ValueError, match="shard_00000.idx.npy: missing shard file"):
    ShardedDocuments(tmp_path / "s")


def test_cli_prepare(tok_path, tmp_path, capsys):
  inputs, _ = make_inputs(tmp_path)
  assert cli([
      "prepare", "--tokenizer", tok_path, "--input", *inputs, "--output",
      str(tmp_path / "o")
  ]) == 0
  assert "3 documents" in capsys.readouterr().out
  (tmp_path / "x.jsonl").write_text('{"text": "a"}\nnot json\n')
  assert cli([
      "prepare", "--tokenizer", tok_path, "--input",
      str(tmp_path / "x.jsonl"), "--output",
      str(tmp_path / "o2")
  ]) == 2
  assert "x.jsonl:2: invalid JSON" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o2")


# --------------------------------------------------------------------------- embedded default


def test_default_data_builds_once(tmp_path, monkeypatch):
  builds = []
  real_train = prepare_lib.train_from_documents

  def counting_train(*args, **kwargs):
    builds.append(1)
    return real_train(*args, **kwargs)

  monkeypatch.setattr(prepare_lib, "train_from_documents", counting_train)
  results = []
  threads = [
      threading.Thread(target=lambda: results.append(
          prepare_lib.ensure_default_data(str(tmp_path), vocab_size=600, max_bytes=200_000)))
      for _ in range(2)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(results) == 2 and results[0] == results[1] and len(builds) == 1
  tok_path, shards = results[0]
  key = os.path.basename(os.path.dirname(shards))
  assert f"py{sys.version_info.major}.{sys.version_info.minor}" in key and "v600" in key and "b200000" in key
  m = prepare_lib.load_manifest(shards)
  assert m["source"] == "python-stdlib" and m["num_docs"] >= 5 and m["build_seconds"] < 60
  assert prepare_lib.manifest_tokenizer_path(shards, m) == tok_path
  tok, docs = Tokenizer(tok_path), ShardedDocuments(shards)
  assert tok.vocab_size == 600 and m["vocab_size"] == 600
  first = corpus.stdlib_sources(200_000)[0]
  assert tok.decode(docs[0][:-1]) == open(first, encoding="utf-8").read()
  assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
  # Cached: no rebuild, also through $YUANJAX_CACHE.
  monkeypatch.setenv("YUANJAX_CACHE", str(tmp_path))
  assert prepare_lib.ensure_default_data(vocab_size=600, max_bytes=200_000) == (tok_path, shards)
  assert len(builds) == 1


def test_outputs_are_not_private(tok_path, tmp_path):
  inputs, _ = make_inputs(tmp_path)
  prepare_lib.prepare(tok_path, inputs, tmp_path / "s", progress=False)
  assert os.stat(tmp_path / "s").st_mode & 0o055 == 0o055
  assert os.stat(tok_path).st_mode & 0o044 == 0o044


def test_shard_not_whole_tokens_and_out_of_vocab_ids_name_the_file(tok_path, tmp_path):
  inputs, texts = make_inputs(tmp_path)
  prepare_lib.prepare(tok_path, inputs, tmp_path / "s", progress=False)
  bin_path = tmp_path / "s" / "shard_00000.bin"
  tokens = np.fromfile(bin_path, np.uint32)
  tokens[1] = 360  # == vocab_size: one past the last id
  tokens.tofile(bin_path)
  docs = ShardedDocuments(tmp_path / "s")
  assert docs[1].size and docs[2].size  # other documents still read
  with pytest.raises(ValueError,
                     match=r"shard_00000.bin: document 0 holds token id 360 >= vocab_size=360"):
    docs[0]
  with open(bin_path, "ab") as f:
    f.write(b"\0\0")  # half a token
  with pytest.raises(ValueError, match=r"shard_00000.bin: .* not a whole number of uint32 tokens"):
    ShardedDocuments(tmp_path / "s")


def test_prepare_skips_and_counts_invalid_utf8(tok_path, tmp_path, capsys):
  inputs, texts = make_inputs(tmp_path)
  (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  with open(tmp_path / "b.jsonl", "ab") as f:
    f.write(b'{"text": "caf\xe9"}\n')  # raw invalid byte in the line
    f.write(b'{"text": "lone \\ud800 surrogate"}\n')  # valid JSON, not encodable as UTF-8
  inputs.append(str(tmp_path / "latin1.txt"))
  assert cli([
      "prepare", "--tokenizer", tok_path, "--input", *inputs, "--output",
      str(tmp_path / "s")
  ]) == 0
  assert "1 empty skipped, 3 not UTF-8 skipped" in capsys.readouterr().out
  m = prepare_lib.load_manifest(tmp_path / "s")
  assert (m["num_docs"], m["num_skipped_empty"], m["num_skipped_invalid"]) == (3, 1, 3)
  docs, tok = ShardedDocuments(tmp_path / "s"), Tokenizer(tok_path)
  assert [tok.decode(docs[i][:-1]) for i in range(len(docs))] == texts


# --------------------------------------------------------------------------- formats, workers

FORMAT_TEXTS = ["first doc", "你好\n\tthird line\n", "x = 1\n\ny = 2  # two  spaces"]


def write_formats(d):
  """FORMAT_TEXTS in every input format: {suffix: path}."""
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in FORMAT_TEXTS)
  (d / "p.jsonl").write_text(lines, encoding="utf-8")
  (d / "g.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
  (d / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
  pq.write_table(pa.table({
      "text": FORMAT_TEXTS,
      "id": [1, 2, 3]
  }), d / "q.parquet", row_group_size=2)
  (d / "y.txt").write_text("".join(t.replace("\n", "<n>") + "\n" for t in FORMAT_TEXTS),
                           encoding="utf-8")
  return {p.name.split(".", 1)[1]: str(p) for p in d.iterdir()}


def test_every_format_reads_the_same_documents(tmp_path):
  files = write_formats(tmp_path)
  for suffix, path in files.items():
    fmt = "yuan" if suffix == "txt" else "document"
    docs = list(corpus.read_documents([path], txt_format=fmt))
    assert [d.text for d in docs] == FORMAT_TEXTS, suffix
    assert [d.line for d in docs] == [1, 2, 3], suffix
  parquet = corpus.read_documents([files["parquet"]])
  assert [d.nbytes for d in parquet] == [len(t.encode()) for t in FORMAT_TEXTS]  # UTF-8 bytes
  [whole] = corpus.read_documents([files["txt"]])  # the default: a .txt file is one document
  assert whole.text.count("\n") == 3 and "<n>" in whole.text


def test_format_errors_name_file_and_line(tmp_path):
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": \n'))
  with pytest.raises(InputError, match=r"bad.jsonl.gz:2: invalid JSON"):
    list(corpus.read_documents([str(tmp_path / "bad.jsonl.gz")]))
  (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-12])
  with pytest.raises(InputError, match=r"cut.jsonl.gz: cannot read"):
    list(corpus.read_documents([str(tmp_path / "cut.jsonl.gz")]))
  pq.write_table(pa.table({"content": ["a"]}), tmp_path / "k.parquet")
  with pytest.raises(InputError, match=r"k.parquet: no 'text' column \(columns: content\)"):
    list(corpus.read_documents([str(tmp_path / "k.parquet")]))
  pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
  with pytest.raises(InputError, match=r"n.parquet:2: 'text' is null"):
    list(corpus.read_documents([str(tmp_path / "n.parquet")]))
  docs = list(corpus.read_documents([str(tmp_path / "n.parquet")], skip_invalid=True))
  assert [(d.text, d.where, d.error) for d in docs][1] == ("", f"{tmp_path / 'n.parquet'}:2",
                                                           "'text' is null")
  (tmp_path / "y.txt").write_bytes(b"ok<n>line\n\xff bad\n")
  docs = list(corpus.read_documents([str(tmp_path / "y.txt")], skip_invalid=True,
                                    txt_format="yuan"))
  assert [(d.text, d.line, bool(d.error)) for d in docs] == [("ok\nline", 1, False), ("", 2, True)]


def test_prepare_is_byte_identical_for_any_number_of_workers(tok_path, tmp_path, capsys):
  (tmp_path / "in").mkdir()
  files = write_formats(tmp_path / "in")
  inputs = [p for s, p in sorted(files.items()) if s != "txt"]
  outputs = []
  for workers in (1, 2):
    out = tmp_path / f"w{workers}"
    assert cli([
        "prepare", "--tokenizer", tok_path, "--input", *inputs, "--output",
        str(out), "--shard_tokens", "40", "--workers",
        str(workers)
    ]) == 0
    outputs.append({p.name: p.read_bytes() for p in out.iterdir()})
  printed = capsys.readouterr().out
  assert "with 2 worker(s):" in printed and "per core" in printed and "tokens/s" in printed
  assert len(outputs[0]) > 3 and outputs[0] == outputs[1]
  m = json.loads(outputs[0]["manifest.json"])
  assert m["num_docs"] == 4 * len(FORMAT_TEXTS) and m["txt_format"] == "document"
  with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
    prepare_lib.prepare(tok_path, inputs, tmp_path / "w0", workers=0)
