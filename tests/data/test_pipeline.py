"""The grain pipeline: packing, FIM, shuffling, splits, process shards, checkpoint/resume.

    .venv/bin/python -m pytest -q tests/data/test_pipeline.py
"""
import itertools
import json

import grain
import numpy as np
import pytest

from yuanjax.data import BATCH_KEYS, SpecialIds, Tokenizer, corpus, data_config, make_datasets, make_pipeline
from yuanjax.data import pipeline as pl
from yuanjax.data import prepare as prepare_lib
from yuanjax.data import tokenizer as tokenizer_lib

EOD, PAD, P, M, S = 1, 0, 2, 3, 4
SPECIAL = SpecialIds(eod=EOD, pad=PAD, fim_prefix=P, fim_middle=M, fim_suffix=S)


def doc(*tokens):
  return np.asarray([*tokens, EOD], np.int32)


def numbered_docs(n, seed=0, min_len=3, max_len=30):
  """Document i holds tokens 100*i+10 ... (unique per document) and ends with <eod>."""
  rng = np.random.default_rng(seed)
  return [
      doc(*range(100 * i + 10, 100 * i + 10 + rng.integers(min_len, max_len))) for i in range(n)
  ]


def doc_id(tokens):
  return (int(tokens[0]) - 10) // 100


def take(it, n):
  return [next(it) for _ in range(n)]


def stream(batches):
  """The token stream the rows were cut from (rows do not overlap)."""
  rows = [
      np.concatenate([b["inputs"][r], b["targets"][r][-1:]])
      for b in batches
      for r in range(len(b["inputs"]))
  ]
  return np.concatenate(rows)


def split_docs(tokens):
  ends = np.flatnonzero(tokens == EOD)
  return [tokens[s + 1:e + 1] for s, e in zip(np.r_[-1, ends[:-1]], ends)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --------------------------------------------------------------------------- packing


def test_row_to_example_exact():
  ex = pl.row_to_example(np.array([10, 11, EOD, 12, EOD, EOD, 13, 14, -1, -1]), eod_id=EOD,
                         pad_id=PAD)
  np.testing.assert_array_equal(ex["inputs"], [10, 11, EOD, 12, EOD, EOD, 13, 14, PAD])
  np.testing.assert_array_equal(ex["targets"], [11, EOD, 12, EOD, EOD, 13, 14, PAD, PAD])
  np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 3, 4, 4, 0])
  np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 1, 1, 1, 1, 0, 0])
  assert {
      k: v.dtype for k, v in ex.items()
  } == dict(inputs=np.int32, targets=np.int32, segment_ids=np.int32, positions=np.int32,
            loss_mask=np.float32)


def test_packing_exact_arrays():
  docs = [doc(10, 11), doc(12), doc(13, 14, 15, 16), doc(17)]  # 3 + 2 + 5 + 2 = 12 tokens
  ds = make_pipeline(docs, seq_len=4, batch_size=1, special=SPECIAL, train=False, prefetch=0)
  batches = list(ds)
  assert len(batches) == 3 and all(b[k].shape == (1, 4) for b in batches for k in BATCH_KEYS)
  expect = [  # inputs, targets, segment_ids, positions, loss_mask
      ([10, 11, EOD, 12], [11, EOD, 12, EOD], [1, 1, 1, 2], [0, 1, 2, 0], [1, 1, 1, 1]),
      ([13, 14, 15, 16], [14, 15, 16, EOD], [1, 1, 1, 1], [0, 1, 2, 3], [1, 1, 1, 1]),
      ([17, EOD, PAD, PAD], [EOD, PAD, PAD, PAD], [1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]),
  ]
  for b, e in zip(batches, expect):
    for k, v in zip(BATCH_KEYS, e):
      np.testing.assert_array_equal(b[k][0], v, err_msg=k)


def test_documents_span_rows_and_positions_restart():
  # Stream: 10 11 E | 20 21 22 23 24 25 26 E | 30 E  (13 tokens), rows of seq_len + 1 = 6.
  docs = [doc(10, 11), doc(20, 21, 22, 23, 24, 25, 26), doc(30)]
  [b] = list(make_pipeline(docs, seq_len=5, batch_size=3, special=SPECIAL, train=False, prefetch=0))
  E = EOD
  np.testing.assert_array_equal(b["inputs"],
                                [[10, 11, E, 20, 21], [23, 24, 25, 26, E], [E, PAD, PAD, PAD, PAD]])
  np.testing.assert_array_equal(b["targets"], [[11, E, 20, 21, 22], [24, 25, 26, E, 30], [PAD] * 5])
  np.testing.assert_array_equal(b["segment_ids"],
                                [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
  # The document cut at the row boundary restarts at position 0 in the next row (Megatron/Yuan).
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["loss_mask"], [[1] * 5, [1] * 5, [0] * 5])


def test_train_batches_are_full_and_typed():
  it = iter(
      make_pipeline(numbered_docs(20), seq_len=16, batch_size=3, special=SPECIAL, fim_rate=0.5))
  for b in take(it, 20):
    assert sorted(b) == sorted(BATCH_KEYS)
    assert all(b[k].shape == (3, 16) for k in BATCH_KEYS)
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    assert (b["loss_mask"] == 1).all() and (b["segment_ids"] >= 1).all()
  it.close()


# --------------------------------------------------------------------------- FIM


def expected_fim(d, plan):
  start, stop, spm = plan
  prefix, middle, suffix = list(d[:start]), list(d[start:stop]), list(d[stop:-1])
  body = [P, S, *suffix, M, *prefix, *middle] if spm else [P, *prefix, S, *suffix, M, *middle]
  return body + [EOD]


def test_fim_layout_permutation_and_rates():
  docs = numbered_docs(4000, min_len=0, max_len=40)
  fim_rate, spm_rate = 0.3, 0.7
  n_fim = n_spm = 0
  for i, d in enumerate(docs):
    plan = pl.fim_plan(len(d) - 1, np.random.default_rng(i), fim_rate, spm_rate)
    out = pl.apply_fim(d, np.random.default_rng(i), special=SPECIAL, fim_rate=fim_rate,
                       spm_rate=spm_rate)
    if plan is None:
      np.testing.assert_array_equal(out, d)
      continue
    n_fim += 1
    n_spm += plan[2]
    assert out.tolist() == expected_fim(d, plan)
    assert out[-1] == EOD and out.dtype == np.int32
    assert sorted(out.tolist()) == sorted(d.tolist() + [P, M, S])  # a permutation plus sentinels
  # 4000 docs: std of the FIM share ~0.007, of the SPM share ~0.014; a wrong rate would fail.
  assert abs(n_fim / len(docs) - fim_rate) < 0.03
  assert abs(n_spm / n_fim - spm_rate) < 0.05


def test_fim_psm_and_spm_exact():
  d = doc(10, 11, 12, 13, 14)

  class Rng:  # scripted draws: FIM yes, cut points (3, 1) -> middle [1, 3), then the SPM coin

    def __init__(self, spm):
      self.coins = [0.0, 0.0 if spm else 0.99]

    def random(self):
      return self.coins.pop(0)

    def integers(self, low, high, size):
      assert (low, high, size) == (0, 6, 2)
      return np.array([3, 1])

  psm = pl.apply_fim(d, Rng(False), special=SPECIAL, fim_rate=0.5, spm_rate=0.5)
  spm = pl.apply_fim(d, Rng(True), special=SPECIAL, fim_rate=0.5, spm_rate=0.5)
  assert psm.tolist() == [P, 10, S, 13, 14, M, 11, 12, EOD]
  assert spm.tolist() == [P, S, 13, 14, M, 10, 11, 12, EOD]


def test_fim_rate_in_pipeline():
  docs = numbered_docs(3000, min_len=1, max_len=10)
  out = stream(
      list(
          make_pipeline(docs, seq_len=64, batch_size=4, special=SPECIAL, train=False, fim_rate=0.3,
                        fim_spm_rate=0.5, prefetch=0)))
  counts = [np.count_nonzero(out == t) for t in (P, M, S)]
  assert counts[0] == counts[1] == counts[2]
  assert abs(counts[0] / len(docs) - 0.3) < 0.035
  assert np.count_nonzero(out == EOD) == len(docs)


def test_rates_zero_are_identity():
  docs = numbered_docs(30)
  d = docs[0]
  assert pl.apply_fim(d, np.random.default_rng(0), special=SPECIAL, fim_rate=0.0, spm_rate=1.0) is d
  it = iter(
      make_pipeline(docs, seq_len=8, batch_size=2, special=SPECIAL, fim_rate=0.0, fim_spm_rate=1.0))
  got = split_docs(stream(take(it, 60)))
  it.close()
  for g in got[:60]:
    np.testing.assert_array_equal(g, docs[doc_id(g)])


def test_fim_only_with_sentinels():
  with pytest.raises(ValueError, match="FIM"):
    make_pipeline(numbered_docs(4), seq_len=8, batch_size=1, special=SpecialIds(eod=EOD),
                  fim_rate=0.1)


# --------------------------------------------------------------------------- shuffle, epochs


def doc_order(docs, n_docs_wanted, **kw):
  it = iter(make_pipeline(docs, seq_len=16, batch_size=2, special=SPECIAL, fim_rate=0.0, **kw))
  batches = [next(it)]
  while len(split_docs(stream(batches))) < n_docs_wanted:
    batches.append(next(it))
  it.close()
  return [doc_id(d) for d in split_docs(stream(batches))][:n_docs_wanted]


def test_shuffle_is_deterministic_by_seed_and_reshuffles_epochs():
  docs = numbered_docs(25, min_len=2, max_len=8)
  a = doc_order(docs, 60, seed=1)
  assert a == doc_order(docs, 60, seed=1)
  assert a != doc_order(docs, 60, seed=2)
  epochs = [a[:25], a[25:50]]  # the stream starts at a document start
  assert all(sorted(e) == list(range(25)) for e in epochs)
  assert epochs[0] != epochs[1]


# --------------------------------------------------------------------------- resume


def build_train(docs, **kw):
  return make_pipeline(docs, seq_len=12, batch_size=2, special=SPECIAL, seed=7, fim_rate=0.5,
                       prefetch=2, **kw)


def test_resume_with_get_state_set_state():
  docs = numbered_docs(15)
  ref_it = iter(build_train(docs))
  ref = take(ref_it, 40)
  ref_it.close()
  for k in (0, 1, 5, 13, 22):
    it = iter(build_train(docs))
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
    it.close()
    fresh = iter(build_train(docs))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 40 - k), ref[k:])
    fresh.close()


def test_resume_with_orbax_checkpoint_manager(tmp_path):
  import orbax.checkpoint as ocp

  docs = numbered_docs(15)
  ref_it = iter(build_train(docs))
  ref = take(ref_it, 30)
  ref_it.close()
  it = iter(build_train(docs))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    for step in range(1, 12):
      next(it)
      if step in (4, 11):
        mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 11]
  it.close()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    for step in (4, 11):
      restored = iter(build_train(docs))
      mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
      assert_batches_equal(take(restored, 30 - step), ref[step:])
      restored.close()


# --------------------------------------------------------------------------- splits and processes


def test_split_documents():
  train, ev = pl.split_documents(1000, 0.05)
  assert len(ev) == 50 and len(train) == 950 and not set(train) & set(ev)
  assert sorted([*train, *ev]) == list(range(1000))
  again = pl.split_documents(1000, 0.05)
  np.testing.assert_array_equal(again[1], ev)
  assert len(pl.split_documents(10, 0.01)[1]) == 1  # at least one eval doc when asked for any
  assert len(pl.split_documents(10, 0.0)[1]) == 0
  with pytest.raises(ValueError, match="eval_fraction"):
    pl.split_documents(10, 1.0)
  with pytest.raises(ValueError, match="no training documents"):
    pl.split_documents(1, 0.5)


def seen_docs(ds, n_batches=None):
  it = iter(ds)
  batches = list(itertools.islice(it, n_batches)) if n_batches else list(it)
  it.close()
  return batches, {doc_id(d) for d in split_docs(stream(batches)) if d[0] >= 10}


@pytest.mark.parametrize("process_count", [1, 3])
def test_process_shards_and_eval_split_disjoint_and_covering(process_count):
  docs = numbered_docs(60, min_len=2, max_len=6)
  train_ids, eval_ids = pl.split_documents(len(docs), 0.2)
  common = dict(seq_len=8, batch_size=2, special=SPECIAL, fim_rate=0.0, process_count=process_count)
  train_seen, eval_seen, eval_lens = [], [], []
  for p in range(process_count):
    ds = make_pipeline(docs, doc_ids=train_ids, train=True, process_index=p, **common)
    train_seen.append(seen_docs(ds, 40)[1])  # 40 batches of 16 tokens > 2 epochs of a shard
    batches, seen = seen_docs(
        make_pipeline(docs, doc_ids=eval_ids, train=False, process_index=p, **common))
    eval_seen.append(seen)
    eval_lens.append(len(batches))
  for group, ids in ((train_seen, train_ids), (eval_seen, eval_ids)):
    assert set().union(*group) == set(ids.tolist())  # covering
    assert sum(map(len, group)) == len(ids)  # disjoint
  assert len(set(eval_lens)) == 1  # every process runs the same number of eval steps


def test_eval_pads_to_the_longest_process():
  docs = [doc(*range(10, 40))] + [doc(50 + i) for i in range(5)]  # process 0 gets the long doc
  lens, masks = [], []
  for p in range(2):
    batches = list(
        make_pipeline(docs, seq_len=4, batch_size=2, special=SPECIAL, train=False, process_index=p,
                      process_count=2, prefetch=0))
    lens.append(len(batches))
    masks.append(sum(b["loss_mask"].sum() for b in batches))
  # Process 0 has docs 0, 2, 4: 31 + 2 + 2 = 35 tokens = 7 rows of 5 = ceil(7 / 2) = 4 batches;
  # process 1 has docs 1, 3, 5: 6 tokens = 1 batch, padded to 4.
  assert lens[0] == lens[1] == 4
  # Loss only on real targets: a full row gives seq_len of them; padding none.
  assert masks == [7 * 4, 4]


# --------------------------------------------------------------------------- make_datasets


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  d = tmp_path_factory.mktemp("prepared")
  text = "def f(x):\n    return x + 1  # comment\n\nclass A:\n    pass\n"
  tok = tokenizer_lib.train_from_documents([corpus.Document(text * 30, "m", None, 0)], d / "tok",
                                           320)
  with open(d / "docs.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"text": f"# doc {i}\n" + text * (i % 4 + 1)}) + "\n")
  prepare_lib.prepare(tok, str(d / "docs.jsonl"), d / "shards", progress=False)
  return tok, str(d / "shards")


def cfg_for(path, **overrides):
  cfg = data_config()
  cfg.path = path
  cfg.eval_fraction = 0.1
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_make_datasets(prepared):
  tok_path, shards = prepared
  train, make_eval, tok = make_datasets(cfg_for(shards), global_batch_size=4, seq_len=32,
                                        process_index=1, process_count=2)
  assert isinstance(train, grain.DatasetIterator) and isinstance(tok, Tokenizer)
  assert tok.model_path == tok_path
  b = next(train)
  assert all(b[k].shape == (2, 32) for k in BATCH_KEYS)
  assert b["inputs"].max() < tok.vocab_size
  ev = list(make_eval())
  assert ev and len(list(make_eval())) == len(ev)  # fresh each time
  assert all(e["inputs"].shape == (2, 32) for e in ev)
  train.close()


@pytest.mark.parametrize("override, kwargs, message", [
    (dict(fim_rate=1.5), {}, "fim_rate"),
    (dict(fim_spm_rate=-0.1), {}, "fim_spm_rate"),
    (dict(eval_fraction=1.0), {}, "eval_fraction"),
    (dict(seed=-1), {}, "seed"),
    ({}, dict(seq_len=0), "seq_len"),
    ({}, dict(global_batch_size=3, process_count=2), "not divisible by process_count"),
    ({}, dict(process_index=2, process_count=2), "process_index"),
    (dict(path="/nonexistent/shards"), {}, "/nonexistent/shards"),
    (dict(tokenizer="/nonexistent/tok.model"), {}, "/nonexistent/tok.model"),
])
def test_make_datasets_rejects_bad_config(prepared, override, kwargs, message):
  args = dict(global_batch_size=4, seq_len=16, process_index=0, process_count=1) | kwargs
  with pytest.raises(ValueError, match=message):
    make_datasets(cfg_for(**({"path": prepared[1]} | override)), **args)


def test_make_datasets_rejects_other_tokenizer(prepared, tmp_path):
  other = tokenizer_lib.train_from_documents(
      [corpus.Document("x = 1\n" * 50 + "hello world\n" * 50, "m", None, 0)], tmp_path / "other",
      290)
  with pytest.raises(
      ValueError,
      match=r"manifest.json: vocab_size=320 but tokenizer .*other.model has vocab_size=290"):
    make_datasets(cfg_for(prepared[1], tokenizer=other), global_batch_size=2, seq_len=8,
                  process_index=0, process_count=1)


def test_make_datasets_embedded_default(tmp_path):
  cfg = cfg_for(None, cache_dir=str(tmp_path), vocab_size=600, max_bytes=150_000)
  train, make_eval, tok = make_datasets(cfg, global_batch_size=2, seq_len=64, process_index=0,
                                        process_count=1)
  assert tok.vocab_size == 600 and tok.model_path.startswith(str(tmp_path))
  b = next(train)
  assert b["inputs"].shape == (2, 64)
  assert "\n" in tok.decode(b["inputs"][0])
  train.close()


def test_data_config_overrides_are_typed():
  cfg = data_config()
  assert cfg.path is None and cfg.tokenizer is None and cfg.fim_rate == 0.5 and cfg.fim_spm_rate == 0.5
  cfg.path = "/data/shards"
  with pytest.raises(TypeError):
    cfg.fim_rate = "high"


def test_make_datasets_rejects_other_eod_id(prepared, tmp_path):
  text = "def f(x):\n    return x + 1  # comment\n\nclass A:\n    pass\n"
  symbols = ("<sep>", "<eod>", "<pad>", "<FIM_PREFIX>", "<FIM_MIDDLE>", "<FIM_SUFFIX>"
            )  # <eod> moved
  other = tokenizer_lib.train_from_documents([corpus.Document(text * 30, "m", None, 0)],
                                             tmp_path / "o", 320, user_defined_symbols=symbols)
  with pytest.raises(ValueError,
                     match=r"manifest.json: eod_id=3 but tokenizer .*o.model has eod_id=4"):
    make_datasets(cfg_for(prepared[1], tokenizer=other), global_batch_size=2, seq_len=8,
                  process_index=0, process_count=1)


def test_no_eval_split_gives_empty_eval(prepared):
  train, make_eval, _ = make_datasets(cfg_for(prepared[1], eval_fraction=0.0), global_batch_size=2,
                                      seq_len=8, process_index=0, process_count=2)
  assert list(make_eval()) == []
  train.close()


def test_newline_token_recorded_by_prepare_and_used(tmp_path):
  text = "def f(x):\n    return x\n"
  docs = [corpus.Document((text * 30).replace("\n", "<n>"), "m", None, 0)]
  tok_path = tokenizer_lib.train_from_documents(
      docs, tmp_path / "yuanlike", 290,
      user_defined_symbols=tokenizer_lib.SPECIAL_SYMBOLS + ("<n>",))
  (tmp_path / "d.jsonl").write_text("".join(
      json.dumps({"text": f"{i}\n" + text}) + "\n" for i in range(12)))
  m = prepare_lib.prepare(tok_path, str(tmp_path / "d.jsonl"), tmp_path / "s", newline_token="<n>",
                          progress=False)
  assert m["newline_token"] == "<n>"
  train, _, tok = make_datasets(cfg_for(str(tmp_path / "s"), fim_rate=0.0), global_batch_size=1,
                                seq_len=16, process_index=0, process_count=1)
  assert tok.newline_token == "<n>"
  n_id = tok.sp.piece_to_id("<n>")
  assert n_id in next(train)["inputs"]
  first = prepare_lib.ShardedDocuments(tmp_path / "s")[0]
  assert tok.decode(first[:-1]) == "0\n" + text
  train.close()


def test_multi_process_accelerator_run_needs_data_path():
  from yuanjax.data import streams
  cfg = data_config()
  streams.check_source(cfg, 1, 'tpu')  # one process: a local try-out
  streams.check_source(cfg, 4, 'cpu')  # CPU runs (tests, studies) may use the embedded corpus
  with pytest.raises(
      ValueError, match='data.path is not set: a 4-process tpu run would train on '
      'the embedded'):
    streams.check_source(cfg, 4, 'tpu')
  cfg.path = 'gs://bucket/shards'
  streams.check_source(cfg, 4, 'tpu')
