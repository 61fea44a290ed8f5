"""grain input pipeline: token shards -> FIM -> packed rows -> batches, checkpointable.

Entry point for the trainer:

  from yuanjax.data import data_config, make_datasets
  cfg = data_config()                      # cfg.path=None: the embedded stdlib corpus
  train_iter, make_eval_iter, tok = make_datasets(cfg, global_batch_size=8, seq_len=1024)
  batch = next(train_iter)                 # dict of numpy arrays, see below
  for batch in make_eval_iter(): ...       # fresh, finite, same length on every process

Try it: `python -m yuanjax.data inspect --seq_len 64 --batch 2`.

Batch format (`local_batch = global_batch_size // process_count`), all `[local_batch, seq_len]`:

* `inputs`  int32   `row[:-1]` of a packed row of `seq_len + 1` tokens
* `targets` int32   `row[1:]`
* `segment_ids` int32  1-based document number within the row; a new segment starts after
  each `<eod>` (the `<eod>` belongs to the document it ends); 0 on padding
* `positions` int32  position within the segment, restarting at 0 at each new segment and at
  the start of each row (Yuan/Megatron `reset_position_ids` / `reset_attention_mask`)
* `loss_mask` float32  1, except 0 where the target is padding (only in the last eval batches)

Pipeline (`make_pipeline`), per JAX process:

1. Documents are addressed by their global index in the shards (`prepare.ShardedDocuments`).
2. Eval split (`split_documents`): a fixed, seed-independent grain shuffle of
   `range(num_docs)`; its first `ceil(eval_fraction * num_docs)` entries are the eval
   documents, the rest train. Disjoint by construction; stable for a given shards directory.
3. Process sharding: process `p` of `P` takes `ids[p::P]` of each split (disjoint, covering).
4. Train: `MapDataset.shuffle(seed).repeat(None)` (grain reshuffles every epoch). Eval: one
   pass in document order.
5. Fill-in-the-middle (`apply_fim`) through `MapDataset.random_map`, whose RNG is seeded
   from the seed and the element's index in the stream, so output depends only on (seed,
   process, position): a resumed iterator makes the same FIM choices.
6. Packing: `grain.experimental.RebatchIterDataset(batch_size=seq_len + 1)` concatenates the
   1-D token arrays and cuts fixed-length rows (documents span rows, as in Megatron/Yuan; unlike
   Megatron, consecutive rows do not share their boundary token, so one next-token transition in
   `seq_len + 1` is not trained). We use it rather than `ConcatThenSplitIterDataset` because
   the latter's checkpoint state does not survive the JSON round trip that `grain.checkpoint`
   performs (its tuple slices come back as lists and a restored iterator silently drops a
   document; seen with grain 0.2.18), while Rebatch's state is plain ints. Segment ids and
   positions are computed per row from the `<eod>` positions (`row_to_example`): that is
   exactly Yuan's rule.
7. Train only: `grain.experimental.WindowShuffleIterDataset` shuffles rows within windows of
   `shuffle_rows` (rows of one long document are consecutive after packing; without this a
   batch is a few documents). Its state re-reads the current window on restore: exact resume.
8. `.batch(local_batch)` and `grain.experimental.ThreadPrefetchIterDataset` (`prefetch`
   batches ahead in a thread; `read_threads` > 0 adds grain read threads via ReadOptions).

Eval batches are equal in number on every process (needed for SPMD eval): each process computes
every process's packed length (cheaply, from the index and the FIM RNG) and pads its own stream
with masked tokens up to the largest count. Eval applies FIM at the same rates as training
(as Megatron/Yuan do), so eval and train loss are comparable.

Checkpointing: the train iterator is a `grain.DatasetIterator`; `get_state()/set_state()` and
`grain.checkpoint.CheckpointSave/CheckpointRestore` (Orbax) resume it exactly.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import os
import weakref
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict

from yuanjax.data import prepare as prepare_lib
from yuanjax.data import storage
from yuanjax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_SPLIT_SEED = 0x5EED  # the eval split does not move when the training seed changes
_TRAIN_STREAM, _EVAL_STREAM, _ROW_STREAM = 0, 1, 2
_READ_BUFFER = 32  # documents read ahead (grain polls every pending one per element: keep small)
# Shards in a bucket: a document is a ranged read (a round trip), so with data.read_threads=0
# this many grain threads read ahead (grain's own ReadOptions default, as in MaxText).
_REMOTE_READ_THREADS = 16
_PAD = -1  # marks padding inside the token stream before rows are turned into examples
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Token ids the pipeline needs. FIM ids may be None when `fim_rate == 0`."""

  eod: int
  pad: int = 0
  fim_prefix: int | None = None
  fim_middle: int | None = None
  fim_suffix: int | None = None

  @classmethod
  def from_tokenizer(cls, tok: Tokenizer, fim: bool = True) -> SpecialIds:
    return cls(
        eod=tok.eod_id,
        pad=tok.pad_id if tok.has_piece('<pad>') else 0,
        fim_prefix=tok.fim_prefix_id if fim else None,
        fim_middle=tok.fim_middle_id if fim else None,
        fim_suffix=tok.fim_suffix_id if fim else None,
    )


# --------------------------------------------------------------------------- split & sharding


def split_documents(num_docs: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Returns sorted `(train_ids, eval_ids)`: disjoint, together `range(num_docs)`.

  Eval is the first `ceil(eval_fraction * num_docs)` entries of a grain shuffle of
  `range(num_docs)` with a fixed seed (independent of the training seed)."""
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f'eval_fraction must be in [0, 1), got {eval_fraction}')
  num_eval = math.ceil(eval_fraction * num_docs)
  if num_eval >= num_docs:
    raise ValueError(
        f'eval_fraction={eval_fraction} leaves no training documents out of {num_docs}')
  order = grain.MapDataset.range(num_docs).shuffle(seed=_SPLIT_SEED)
  is_eval = np.zeros(num_docs, bool)
  is_eval[[order[i] for i in range(num_eval)]] = True
  return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def process_shard(ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """Process `p`'s share of `ids`: `ids[p::P]`."""
  return np.asarray(ids)[process_index::process_count]


def _stream_seed(seed: int, process_index: int, stream: int) -> int:
  """A 32-bit seed for one (process, train/eval) FIM stream."""
  return int(np.random.SeedSequence([seed, process_index, stream]).generate_state(1)[0])


# --------------------------------------------------------------------------- FIM


def fim_plan(num_tokens: int, rng: np.random.Generator, fim_rate: float, spm_rate: float):
  """Draws the FIM decision for a document of `num_tokens` content tokens.

  Returns None (leave it alone) or `(start, stop, spm)`: the middle is `[start, stop)`.
  All randomness of `apply_fim` is drawn here, in a fixed order."""
  if fim_rate <= 0.0 or rng.random() >= fim_rate:
    return None
  start, stop = np.sort(rng.integers(0, num_tokens + 1, size=2))
  return int(start), int(stop), bool(rng.random() < spm_rate)


def apply_fim(doc: np.ndarray, rng: np.random.Generator, *, special: SpecialIds, fim_rate: float,
              spm_rate: float) -> np.ndarray:
  """Fill-in-the-middle on one document (StarCoder/Megatron convention, token level).

  `doc` ends with `<eod>`, which stays last. With probability `fim_rate` the content is
  cut at two uniform points into prefix / middle / suffix and rearranged as
  PSM `<FIM_PREFIX> prefix <FIM_SUFFIX> suffix <FIM_MIDDLE> middle <eod>` or, with probability
  `spm_rate`, SPM `<FIM_PREFIX> <FIM_SUFFIX> suffix <FIM_MIDDLE> prefix middle <eod>`."""
  plan = fim_plan(len(doc) - 1, rng, fim_rate, spm_rate)
  if plan is None:
    return doc
  start, stop, spm = plan
  prefix, middle, suffix = doc[:start], doc[start:stop], doc[stop:-1]
  p, m, s = ([x] for x in (special.fim_prefix, special.fim_middle, special.fim_suffix))
  parts = (p, s, suffix, m, prefix, middle) if spm else (p, prefix, s, suffix, m, middle)
  return np.concatenate([*parts, doc[-1:]]).astype(np.int32)


def _fim_length(num_tokens: int, rng: np.random.Generator, *, fim_rate: float,
                spm_rate: float) -> int:
  """Length after `apply_fim`, drawing the same random numbers (3 sentinels if FIM)."""
  return num_tokens + (0 if fim_plan(num_tokens - 1, rng, fim_rate, spm_rate) is None else 3)


# --------------------------------------------------------------------------- packing


def row_to_example(row: np.ndarray, *, eod_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """One packed row of `seq_len + 1` tokens -> a training example (see module docstring).

  Negative entries are padding (they only trail the last eval rows)."""
  row = np.asarray(row)
  valid = row >= 0
  tokens = np.where(valid, row, pad_id).astype(np.int32)
  seq_len = len(row) - 1
  in_valid = valid[:-1]
  ends = (tokens[:-1] == eod_id) & in_valid
  starts = np.empty(seq_len, bool)
  starts[0] = True
  starts[1:] = ends[:-1]
  segment_ids = np.cumsum(starts, dtype=np.int32)
  index = np.arange(seq_len, dtype=np.int32)
  positions = index - np.maximum.accumulate(np.where(starts, index, 0))
  return dict(
      inputs=tokens[:-1],
      targets=tokens[1:],
      segment_ids=np.where(in_valid, segment_ids, 0).astype(np.int32),
      positions=np.where(in_valid, positions, 0).astype(np.int32),
      loss_mask=valid[1:].astype(np.float32),
  )


class _ReadAndFim:
  """Global document id -> int32 tokens after FIM: one `random_map` stage (grain's per-stage
  overhead dominates for short documents, so reading and FIM share one)."""

  def __init__(self, source, special: SpecialIds, fim_rate: float, spm_rate: float):
    self.source, self.special, self.fim_rate, self.spm_rate = source, special, fim_rate, spm_rate

  def __call__(self, doc_id, rng: np.random.Generator) -> np.ndarray:
    doc = np.asarray(self.source[int(doc_id)], dtype=np.int32)
    return apply_fim(doc, rng, special=self.special, fim_rate=self.fim_rate, spm_rate=self.spm_rate)


def _doc_lengths(source, ids: np.ndarray) -> np.ndarray:
  if hasattr(source, 'doc_lengths'):
    return np.asarray(source.doc_lengths())[ids]
  return np.asarray([len(source[int(i)]) for i in ids], dtype=np.int64)


def _eval_tokens(source, ids: np.ndarray, *, seed: int, process_index: int, fim_rate: float,
                 fim_spm_rate: float) -> int:
  """Tokens in one process's eval stream after FIM, from the index alone (no token reads)."""
  if len(ids) == 0:
    return 0
  fim = functools.partial(_fim_length, fim_rate=fim_rate, spm_rate=fim_spm_rate)
  lengths = grain.MapDataset.source(_doc_lengths(source, ids).tolist())
  lengths = lengths.random_map(fim, seed=_stream_seed(seed, process_index, _EVAL_STREAM))
  return int(sum(lengths[i] for i in range(len(lengths))))  # direct indexing: no thread pool


def eval_num_batches(source, eval_ids: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                     fim_rate: float, fim_spm_rate: float, process_count: int) -> int:
  """Eval batches per process: the largest process's packed eval stream, in whole batches."""
  return max(
      math.ceil(
          _eval_tokens(source, process_shard(eval_ids, p, process_count), seed=seed,
                       process_index=p, fim_rate=fim_rate, fim_spm_rate=fim_spm_rate) /
          ((seq_len + 1) * batch_size)) for p in range(process_count))


def make_pipeline(
    source: Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    special: SpecialIds,
    doc_ids: np.ndarray | None = None,
    train: bool = True,
    seed: int = 0,
    fim_rate: float = 0.0,
    fim_spm_rate: float = 0.5,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 0,
    prefetch: int = 2,
    shuffle_rows: int = 0,
    eval_batches: int | None = None,
) -> grain.IterDataset:
  """Builds one process's dataset; `iter()` of it is a checkpointable `grain.DatasetIterator`.

  Args:
    source: random-access documents (int arrays, each ending with `special.eod`), e.g.
      `prepare.ShardedDocuments`.
    doc_ids: the global document ids of this split (all processes); None = all documents.
    batch_size: rows per batch on this process (the local batch).
    train: True = shuffled, repeated forever; False = one pass in order, padded so that every
      process yields the same number of full batches (`eval_batches`, or the fewest that hold
      the largest process's share).
  Other arguments as in `data_config`."""
  _check_range('seq_len', seq_len, 1)
  _check_range('batch_size', batch_size, 1)
  _check_range('seed', seed, 0, 2**32 - 1)
  _check_range('prefetch', prefetch, 0)
  _check_range('read_threads', read_threads, 0)
  _check_range('process_count', process_count, 1)
  _check_range('process_index', process_index, 0, process_count - 1)
  for name, rate in (('fim_rate', fim_rate), ('fim_spm_rate', fim_spm_rate)):
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f'{name} must be in [0, 1], got {rate}')
  if fim_rate > 0 and None in (special.fim_prefix, special.fim_middle, special.fim_suffix):
    raise ValueError(
        "fim_rate > 0 needs the tokenizer's <FIM_PREFIX>/<FIM_MIDDLE>/<FIM_SUFFIX> ids")

  if getattr(source, 'loss_masked', False):  # SFT shards: whole samples per row
    from yuanjax.data import sft  # pylint: disable=g-import-not-at-top  (sft imports this module)
    return sft.make_pipeline(source, seq_len=seq_len, batch_size=batch_size, special=special,
                             doc_ids=doc_ids, train=train, seed=seed, fim_rate=fim_rate,
                             process_index=process_index, process_count=process_count,
                             prefetch=prefetch)
  rows = _packed_rows(
      source, seq_len=seq_len, batch_size=batch_size, special=special, doc_ids=doc_ids, train=train,
      seed=seed, fim_rate=fim_rate, fim_spm_rate=fim_spm_rate, process_index=process_index,
      process_count=process_count, read_threads=read_threads, eval_batches=eval_batches)
  if train:
    return _batched(_shuffled(rows, shuffle_rows, seed, process_index), batch_size, prefetch)
  return _batched(rows, batch_size, prefetch)


def _packed_rows(source, *, seq_len, batch_size, special, doc_ids, train, seed, fim_rate,
                 fim_spm_rate, process_index, process_count, read_threads,
                 eval_batches) -> grain.IterDataset:
  """One process's documents -> FIM -> packed examples of `seq_len` (steps 1-6 above)."""
  all_ids = np.arange(len(source)) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
  ids = process_shard(all_ids, process_index, process_count)
  read = _ReadAndFim(source, special, fim_rate, fim_spm_rate)
  row_len = seq_len + 1

  if train:
    if len(ids) == 0:
      raise ValueError(f'process {process_index} of {process_count} gets no training documents '
                       f'({len(all_ids)} in all)')
    docs = grain.MapDataset.source(ids).shuffle(seed=seed).repeat(None)
    docs = docs.random_map(read, seed=_stream_seed(seed, process_index, _TRAIN_STREAM))
  else:
    num_batches = eval_batches or eval_num_batches(
        source, all_ids, seq_len=seq_len, batch_size=batch_size, seed=seed, fim_rate=fim_rate,
        fim_spm_rate=fim_spm_rate, process_count=process_count)
    parts = []
    if len(ids):
      docs = grain.MapDataset.source(ids)
      parts.append(docs.random_map(read, seed=_stream_seed(seed, process_index, _EVAL_STREAM)))
    tokens = _eval_tokens(source, ids, seed=seed, process_index=process_index, fim_rate=fim_rate,
                          fim_spm_rate=fim_spm_rate)
    pad = num_batches * batch_size * row_len - tokens
    if pad > 0:
      parts.append(grain.MapDataset.source([np.full(pad, _PAD, np.int32)]))
    docs = grain.MapDataset.concatenate(parts) if len(parts) > 1 else (
        parts[0] if parts else grain.MapDataset.source([]))

  ds = docs.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=_READ_BUFFER))
  ds = grain.experimental.RebatchIterDataset(ds, batch_size=row_len, drop_remainder=True)
  return ds.map(functools.partial(row_to_example, eod_id=special.eod, pad_id=special.pad))


def _shuffled(rows: grain.IterDataset, shuffle_rows: int, seed: int,
              process_index: int) -> grain.IterDataset:
  """Rows of one long document are consecutive after packing; shuffling rows within a window
  keeps a batch from being a few documents (correlated batches train badly)."""
  if shuffle_rows <= 1:
    return rows
  return grain.experimental.WindowShuffleIterDataset(
      rows, window_size=shuffle_rows, seed=_stream_seed(seed, process_index, _ROW_STREAM))


def _batched(rows: grain.IterDataset, batch_size: int, prefetch: int) -> grain.IterDataset:
  ds = rows.batch(batch_size, drop_remainder=True)
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


def _check_range(name: str, value, low: int, high: int | None = None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be an integer, got {value!r}')
  if value < low or (high is not None and value > high):
    bound = f'>= {low}' if high is None else f'in [{low}, {high}]'
    raise ValueError(f'{name} must be {bound}, got {value}')


# --------------------------------------------------------------------------- trainer entry point


def data_config() -> ml_collections.ConfigDict:
  """The `data` section of a training config: every field `make_datasets` reads.

  `seq_len` and the batch size are not here: the trainer passes them (model and batch
  settings own them)."""
  c = ml_collections.ConfigDict()
  # Shards dir written by `prepare`, local or gs://BUCKET/PATH; None: the embedded default.
  c.path = config_dict.placeholder(str)
  c.tokenizer = config_dict.placeholder(str)  # .model; None: the manifest's (or embedded) tokenizer
  # Embedded default data and copies of remote indexes; None: $YUANJAX_CACHE or ~/.cache/yuanjax.
  c.cache_dir = config_dict.placeholder(str)
  c.vocab_size = 4096  # embedded default tokenizer's vocabulary size
  c.max_bytes = 8_000_000  # embedded default corpus: stdlib bytes used
  c.seed = 0  # document shuffle and FIM randomness
  c.eval_fraction = 0.02  # documents held out for eval (at least one if > 0)
  c.fim_rate = 0.5  # share of documents turned fill-in-the-middle (Yuan: 0.5)
  c.fim_spm_rate = 0.5  # share of FIM documents in SPM order, the rest PSM (Yuan: 0.5)
  # Grain read threads; 0: read in the prefetch thread (fastest on CPU), or 16 when the shards
  # are in a bucket (`path` a gs:// URL).
  c.read_threads = 0
  c.prefetch = 4  # batches prepared ahead in a background thread (0: off)
  c.shuffle_rows = 2048  # train rows shuffled within windows of this many rows (0/1: off)
  # Weighted sources instead of `path` (Megatron's DATA_PATH='w1 p1 w2 p2'): a tuple of
  # {'path': ..., 'weight': w > 0[, 'name': ...]}; weights normalised, rows mixed in exactly
  # those token shares; every source made with the same tokenizer. Metrics log each source's
  # realised share (data/share/NAME) and eval loss (eval_loss/NAME).
  c.mixture = ()
  # SFT shards: the chat template they must have been prepared with (yuanjax.data.sft.TEMPLATES;
  # None: whichever their manifest records).
  c.chat_template = config_dict.placeholder(str)
  return c


_open_iterators: weakref.WeakSet = weakref.WeakSet()


def _noop():
  pass


@atexit.register
def _close_open_iterators():
  """Closes the iterators make_datasets handed out, before interpreter teardown.

  Workaround (grain 0.2.18): `DatasetIterator.__del__` calls `close()`, and
  `ThreadPrefetchDatasetIterator.close` uses module globals (`queue`, `dataset`) that
  are already None when an iterator is collected during teardown, printing "Exception ignored
  in ... __del__" on every exit. We close them here and make any later `close()` a no-op."""
  for it in list(_open_iterators):
    it.close()
    nodes = [it]
    while nodes:
      node = nodes.pop()
      node.close = _noop
      nodes.extend(getattr(node, '_parents', ()))


def _tracked_iter(ds: grain.IterDataset) -> grain.DatasetIterator:
  it = iter(ds)
  _open_iterators.add(it)
  return it


def mixture_sources(data_cfg) -> list[dict]:
  """`data.mixture` checked: `[{'name', 'path', 'weight'}]` with the weights normalised to sum
  to 1 (names default to the path's last part); [] when there is no mixture."""
  mixture = data_cfg.get('mixture') or ()
  if not mixture:
    return []
  if data_cfg.path is not None:
    raise ValueError('data.path and data.mixture are both set: a mixture names its own paths')
  out = []
  for i, item in enumerate(mixture):
    item = dict(item)
    if set(item) - {'path', 'weight', 'name'} or not {'path', 'weight'} <= set(item):
      raise ValueError(f'data.mixture[{i}]: expected {{path, weight[, name]}}, got {item}')
    name = item.get('name') or item['path'].rstrip('/').rsplit('/', 1)[-1]
    w = item['weight']
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
      raise ValueError(f'data.mixture[{i}] ({name}): weight must be a positive number, got {w!r}')
    out.append(dict(name=name, path=item['path'], weight=float(w)))
  names = [m['name'] for m in out]
  if len(set(names)) != len(names):
    raise ValueError(f'data.mixture: source names {names} repeat; give each a distinct name')
  total = sum(m['weight'] for m in out)
  return [dict(m, weight=m['weight'] / total) for m in out]


def _open_tokenizer(data_cfg, source, default_tok: str | None) -> Tokenizer:
  """The tokenizer a config names, or the one the (first) source's manifest names."""
  manifest = source.manifest
  tok_path = data_cfg.tokenizer or default_tok or prepare_lib.manifest_tokenizer_path(
      source.path, manifest)
  field = 'data.tokenizer' if data_cfg.tokenizer else f'tokenizer of {source.path}/manifest.json'
  if storage.is_url(tok_path):
    tok_path = storage.cached_copy(tok_path, cache_dir=data_cfg.cache_dir)
  if not os.path.isfile(tok_path):
    raise ValueError(f'{field}: {tok_path}: no such file')
  options = manifest.get('tokenizer_options') or {'newline_token': manifest.get('newline_token')}
  return Tokenizer(tok_path, **options)


def _check_tokenizer(source, tok: Tokenizer, strict: bool, name: str | None = None) -> None:
  """The shards were made with `tok` (vocab_size and eod_id; the model file's sha256 too when
  `strict`, else a differing file is only a warning)."""
  manifest, where = source.manifest, f'{source.path}/manifest.json'
  if name is not None:
    where = f'data.mixture source {name!r}: {where}'
  for key, have in (('vocab_size', tok.vocab_size), ('eod_id', tok.eod_id)):
    if manifest[key] != have:
      raise ValueError(f'{where}: {key}={manifest[key]} but tokenizer {tok.model_path} has '
                       f'{key}={have}; the shards were made with another tokenizer')
  want = prepare_lib.tokenizer_fingerprint(tok.model_path, tok.vocab_size)
  if manifest.get('tokenizer_sha256') in (None, want['tokenizer_sha256']):
    return
  if strict:
    raise ValueError(
        f'{where}: prepared with another tokenizer '
        f'({prepare_lib.manifest_fingerprint(manifest)}, not {tok.model_path}: {want})')
  log.warning('%s differs from the tokenizer the shards in %s were made with', tok.model_path,
              source.path)


def resolve_data(data_cfg) -> tuple[list[prepare_lib.ShardedDocuments], Tokenizer]:
  """Opens the shards (one source, or every source of `data.mixture` in order) and the tokenizer
  a config names (building the embedded default if needed)."""
  mixture = mixture_sources(data_cfg)
  default_tok = None
  if mixture:
    paths = [m['path'] for m in mixture]
  elif data_cfg.path is None:
    _check_range('data.vocab_size', data_cfg.vocab_size, 1)
    _check_range('data.max_bytes', data_cfg.max_bytes, 1)
    default_tok, path = prepare_lib.ensure_default_data(data_cfg.cache_dir,
                                                        vocab_size=data_cfg.vocab_size,
                                                        max_bytes=data_cfg.max_bytes)
    paths = [path]
  else:
    paths = [data_cfg.path]
  sources = [prepare_lib.ShardedDocuments(p, cache_dir=data_cfg.cache_dir) for p in paths]
  tok = _open_tokenizer(data_cfg, sources[0], default_tok)
  for i, source in enumerate(sources):
    _check_tokenizer(source, tok, strict=bool(mixture),
                     name=mixture[i]['name'] if mixture else None)
  return sources, tok


def _with_source(example: dict, source: int) -> dict:
  return {**example, 'source': np.int32(source)}


def _source_seed(seed: int, source: int) -> int:
  """Source s's seed in a mixture (its own shuffle and FIM randomness)."""
  return int(np.random.SeedSequence([seed, source, 0x313]).generate_state(1)[0])


def _mixture_pipelines(sources, weights, eval_fraction: float, *, batch_size: int,
                       shuffle_rows: int, prefetch: int, seed: int, **rows):
  """(train, eval) datasets of a mixture. Train: each source's packed rows, mixed row by row in
  the proportions `weights` (grain's deterministic `IterDataset.mix`: exact token shares, a
  checkpointable state), then shuffled within windows and batched. Eval: each source's eval
  rows in whole batches, padded to the same number of batches, taken round-robin (batch i is
  source i % K on every process). Every example carries `source` (its index)."""
  for s in sources:
    if getattr(s, 'loss_masked', False):
      raise ValueError(f'data.mixture: {s.path} holds SFT shards (yuanjax.data.sft), which '
                       'mixtures do not pack yet; train on them alone (data.path)')
  train, evals, splits = [], [], [split_documents(len(s), eval_fraction) for s in sources]
  num_eval = max(
      eval_num_batches(src, ev, seq_len=rows['seq_len'], batch_size=batch_size, seed=_source_seed(
          seed, i), fim_rate=rows['fim_rate'], fim_spm_rate=rows['fim_spm_rate'],
                       process_count=rows['process_count'])
      for i, (src, (_, ev)) in enumerate(zip(sources, splits)))
  for i, (src, (tr, ev)) in enumerate(zip(sources, splits)):
    tag = functools.partial(_with_source, source=i)
    common = dict(rows, batch_size=batch_size, seed=_source_seed(seed, i))
    train.append(_packed_rows(src, doc_ids=tr, train=True, eval_batches=None, **common).map(tag))
    evals.append(
        _packed_rows(src, doc_ids=ev, train=False, eval_batches=num_eval,
                     **common).map(tag).batch(batch_size, drop_remainder=True))
  mixed = _shuffled(grain.IterDataset.mix(train, weights), shuffle_rows, seed,
                    rows['process_index'])
  eval_ds = grain.IterDataset.mix(evals, [1] * len(evals))
  if prefetch:
    eval_ds = grain.experimental.ThreadPrefetchIterDataset(eval_ds, prefetch_buffer_size=prefetch)
  return _batched(mixed, batch_size, prefetch), eval_ds


def make_datasets(
    data_cfg,
    *,
    global_batch_size: int,
    seq_len: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[grain.DatasetIterator, Callable[[], grain.DatasetIterator], Tokenizer]:
  """Returns `(train_iter, make_eval_iter, tokenizer)` for this JAX process.

  `train_iter` is an endless, checkpointable `grain.DatasetIterator` of
  `[global_batch_size // process_count, seq_len]` batches (see the module docstring);
  `make_eval_iter()` returns a fresh, finite iterator over the held-out documents with the
  same number of batches on every process. Raises ValueError naming the bad field or file."""
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_range('process_count', process_count, 1)
  _check_range('process_index', process_index, 0, process_count - 1)
  _check_range('global_batch_size', global_batch_size, 1)
  _check_range('seq_len', seq_len, 1)
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by process_count={process_count}')
  for name in ('fim_rate', 'fim_spm_rate'):
    if not 0.0 <= data_cfg[name] <= 1.0:
      raise ValueError(f'data.{name} must be in [0, 1], got {data_cfg[name]}')
  if not 0.0 <= data_cfg.eval_fraction < 1.0:
    raise ValueError(f'data.eval_fraction must be in [0, 1), got {data_cfg.eval_fraction}')
  for name, low, high in (('seed', 0, 2**32 - 1), ('prefetch', 0, None), ('read_threads', 0, None)):
    _check_range(f'data.{name}', data_cfg[name], low, high)

  _check_range('data.shuffle_rows', data_cfg.shuffle_rows, 0)
  sources, tok = resolve_data(data_cfg)
  from yuanjax.data import sft  # pylint: disable=g-import-not-at-top  (sft imports this module)
  for source in sources:
    sft.check_chat_template(source, data_cfg.get('chat_template'))
  remote = any(source.remote for source in sources)
  common = dict(
      seq_len=seq_len,
      batch_size=global_batch_size // process_count,
      special=SpecialIds.from_tokenizer(tok, fim=data_cfg.fim_rate > 0),
      seed=data_cfg.seed,
      fim_rate=data_cfg.fim_rate,
      fim_spm_rate=data_cfg.fim_spm_rate,
      process_index=process_index,
      process_count=process_count,
      read_threads=data_cfg.read_threads or (_REMOTE_READ_THREADS if remote else 0),
      prefetch=data_cfg.prefetch,
  )
  mixture = mixture_sources(data_cfg)
  if mixture:
    train_ds, eval_ds = _mixture_pipelines(sources, [m['weight'] for m in mixture],
                                           data_cfg.eval_fraction,
                                           shuffle_rows=data_cfg.shuffle_rows, **common)
  else:
    [source] = sources
    train_ids, eval_ids = split_documents(len(source), data_cfg.eval_fraction)
    train_ds = make_pipeline(source, doc_ids=train_ids, train=True,
                             shuffle_rows=data_cfg.shuffle_rows, **common)
    eval_ds = make_pipeline(source, doc_ids=eval_ids, train=False, **common)
  return _tracked_iter(train_ds), lambda: _tracked_iter(eval_ds), tok
