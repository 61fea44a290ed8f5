"""Input-pipeline throughput: shard reads from a bucket and from disk, and the M32 pipeline
against what one v5p host consumes.

  python benchmarks/data_pipeline.py [--seconds 10] [--threads 16] [--skip_storage]
      [--skip_emulator] [--shards DIR] [--shuffle_rows N]

Data: the embedded stdlib shards (`yuanjax.data.ensure_default_data`), or `--shards` (a
prepared directory on disk; the tests pass a tiny one with `--shuffle_rows 8`).

1. Storage (needs the `gcs` and `test` extras): the shards are uploaded to a local
   gcp-storage-emulator (127.0.0.1) and `ShardedDocuments` reads random documents for
   `--seconds` with `--threads` threads, from the emulator and from local disk: reads/s and MB/s
   for this one process. The emulator is a single-threaded Python server on this machine, so its
   figure is a floor for the request overhead, not GCS's bandwidth.
2. Pipeline: `make_datasets` with configs/yuan_m32.py's data settings (seq 4096, FIM 0.5, SPM
   0.5, 2048-row shuffle window), one process, 8-row batches, timed for `--seconds` after the
   first batch (which fills the shuffle window): tokens/s per host. Against it: what one v5p host
   (4 chips) consumes training M32 at 50% MFU = 4 x peak (yuanjax.cost.peak_flops('TPU v5'))
   x 0.5 / model FLOPs per token (yuanjax.cost.train_flops_per_token, at seq 4096). The ratio
   should be >= 3 (the pipeline runs in the host's spare cores while the chips compute).

The last line printed is JSON with every figure.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

V5P_CHIPS_PER_HOST = 4
MFU = 0.5


def time_reads(docs, seconds: float, threads: int) -> dict:
  """Random documents read for `seconds` by `threads` threads: reads/s and MB/s."""
  rng = np.random.default_rng(0)
  order = rng.integers(0, len(docs), size=1_000_000)
  deadline = time.perf_counter() + seconds

  def worker(k):
    n = nbytes = 0
    for i in order[k::threads]:
      if time.perf_counter() > deadline:
        break
      nbytes += docs[int(i)].nbytes
      n += 1
    return n, nbytes

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(worker, range(threads)))
  dt = time.perf_counter() - t0
  n, nbytes = map(sum, zip(*results))
  return dict(reads_per_s=n / dt, mb_per_s=nbytes / dt / 1e6)  # int32: 4 bytes/token, as on disk


def storage_figures(shards: str, seconds: float, threads: int, emulator: bool = True,
                    shuffle_rows: int | None = None) -> dict:
  """Random reads from disk and (with `emulator`) from the emulator, and the M32 pipeline from
  the emulator."""
  from yuanjax.data import ShardedDocuments, storage
  out = {'local': time_reads(ShardedDocuments(shards), seconds, threads)}
  if not emulator:
    return out
  with storage.emulator('bench') as host, tempfile.TemporaryDirectory() as cache:
    storage.upload_tree(os.path.dirname(shards), 'gs://bench/data')
    url = f'gs://bench/data/{os.path.basename(shards)}'
    docs = ShardedDocuments(url, cache_dir=cache)
    out['emulator'] = dict(time_reads(docs, seconds, threads), endpoint=host)
    out['emulator_pipeline'] = pipeline_figures(seconds, url, cache, shuffle_rows)
  return out


def pipeline_figures(seconds: float, path: str | None = None, cache: str | None = None,
                     shuffle_rows: int | None = None) -> dict:
  """The M32 input pipeline's tokens/s on one host (shards at `path`; None: the embedded
  default on disk) and its ratio to a v5p host's consumption at 50% MFU."""
  import configs.yuan_m32 as m32
  from yuanjax import cost
  from yuanjax.data import make_datasets
  config = m32.get_config()
  config.data.update(dict(path=path, cache_dir=cache))
  if shuffle_rows is not None:
    config.data.shuffle_rows = shuffle_rows
  rows = 8
  train, _, _ = make_datasets(config.data, global_batch_size=rows, seq_len=config.train.seq_len,
                              process_index=0, process_count=1)
  try:
    t0 = time.perf_counter()
    next(train)
    first = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      next(train)
      n += 1
    tokens_per_s = n * rows * config.train.seq_len / (time.perf_counter() - t0)
  finally:
    train.close()  # stops its read-ahead (before the emulator stops)
  flops_per_token = cost.train_flops_per_token(config)
  consumed = V5P_CHIPS_PER_HOST * cost.peak_flops('TPU v5') * MFU / flops_per_token
  return dict(seq_len=config.train.seq_len, fim_rate=config.data.fim_rate, first_batch_s=first,
              pipeline_tokens_per_s=tokens_per_s, train_flops_per_token=flops_per_token,
              v5p_host_tokens_per_s_at_50pct_mfu=consumed, ratio=tokens_per_s / consumed)


def _print_storage(figures: dict, threads: int) -> None:
  for where in ('local', 'emulator'):
    if f := figures.get(where):
      print(f"{where:9s} {f['reads_per_s']:9.0f} reads/s {f['mb_per_s']:8.2f} MB/s "
            f'({threads} threads, one process)')
  if f := figures.get('emulator_pipeline'):
    print(f"M32 pipeline from the emulator: {f['pipeline_tokens_per_s']:,.0f} tokens/s "
          f"(first batch {f['first_batch_s']:.1f} s), ratio {f['ratio']:.1f}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--seconds', type=float, default=10.0)
  p.add_argument('--threads', type=int, default=16)
  p.add_argument('--skip_storage', action='store_true')
  p.add_argument('--skip_emulator', action='store_true', help='storage reads from disk only')
  p.add_argument('--shards', default=None, help='a prepared shards directory on disk')
  p.add_argument('--shuffle_rows', type=int, default=None, help='default: the M32 config\'s')
  args = p.parse_args(argv)
  if args.shards:
    shards = path = os.path.abspath(args.shards)
  else:
    from yuanjax.data import ensure_default_data
    (_, shards), path = ensure_default_data(), None  # the pipeline: the config's default
  result = {}
  if not args.skip_storage:
    result['storage'] = storage_figures(shards, args.seconds, args.threads, not args.skip_emulator,
                                        args.shuffle_rows)
    _print_storage(result['storage'], args.threads)
  result['pipeline'] = f = pipeline_figures(args.seconds, path, shuffle_rows=args.shuffle_rows)
  print(
      f"M32 pipeline (seq {f['seq_len']}, FIM {f['fim_rate']}): "
      f"{f['pipeline_tokens_per_s']:,.0f} tokens/s per host "
      f"(first batch {f['first_batch_s']:.1f} s)\nv5p host at 50% MFU consumes "
      f"{f['v5p_host_tokens_per_s_at_50pct_mfu']:,.0f} tokens/s "
      f"({f['train_flops_per_token'] / 1e9:.2f} GFLOP/token): ratio {f['ratio']:.1f} (target >= 3)")
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
