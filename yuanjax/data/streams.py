"""The batch of one process from its input streams (several streams read as one iterator).

  train_iter, make_eval_iter, tokenizer = streams.make_data(config)

The global batch is made of `config.train.data_shards` input streams (default one per
process); each process reads only its own streams, concatenated row-wise in stream order
(the rows its devices hold), so the global batch is the same for any number of processes
reading the same streams.
"""
from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np

from yuanjax.data import pipeline


class ShardedIterator(grain.DatasetIterator):
  """Several input streams of one process as one checkpointable iterator: their batches
  concatenated row-wise, in shard order (the rows this process's devices hold)."""

  def __init__(self, iterators):
    super().__init__(iterators)

  def __next__(self):
    batches = [next(it) for it in self._parents]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {'shards': [it.get_state() for it in self._parents]}

  def set_state(self, state):
    for it, s in zip(self._parents, state['shards'], strict=True):
      it.set_state(s)


def check_source(data_cfg, process_count: int, platform: str) -> None:
  """A multi-process run on accelerators must name its data: without `data.path` it would
  train a large model on the embedded stdlib corpus (a few MB, a 4096-token tokenizer)."""
  if data_cfg.path is None and not data_cfg.get(
      'mixture') and process_count > 1 and platform != 'cpu':
    raise ValueError(
        f'data.path is not set: a {process_count}-process {platform} run would train on the '
        'embedded Python-stdlib corpus; prepare shards (python -m yuanjax.data prepare), copy them '
        'to a bucket and pass --config.data.path=gs://BUCKET/shards')


def make_data(config: ml_collections.ConfigDict):
  """(train_iter, make_eval_iter, tokenizer) of this process's input streams.

  Stream s of S (S = train.data_shards, or the process count) is `make_datasets` with
  process_index=s, process_count=S; process p of n reads streams [p S/n, (p+1) S/n)."""
  tcfg, n, p = config.train, jax.process_count(), jax.process_index()
  check_source(config.data, n, jax.devices()[0].platform)
  S = tcfg.data_shards or n
  make = lambda s: pipeline.make_datasets(config.data, global_batch_size=tcfg.batch_size, seq_len=
                                          tcfg.seq_len, process_index=s, process_count=S)
  streams = [make(s) for s in range(p * S // n, (p + 1) * S // n)]
  tokenizer = streams[0][2]
  if len(streams) == 1:
    return streams[0]
  return (ShardedIterator([t for t, _, _ in streams]),
          lambda: ShardedIterator([e() for _, e, _ in streams]), tokenizer)
