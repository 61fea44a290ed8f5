"""`prepare` as an Apache Beam pipeline: the same documents and tokens, on many machines.

  python -m yuanjax.data.beam_prepare --tokenizer tok.model --input 'corpus/*.jsonl.zst' \
      --output shards [--files_per_shard 1] [-- BEAM PIPELINE OPTIONS]

DirectRunner (the default) runs it here; Dataflow, Flink or Spark run it over terabytes (docs/data.md,
"Preparing a corpus on Dataflow"). Needs the `beam` extra in its own environment
(`make venv-beam`: apache-beam pins protobuf and pyarrow below the versions the rest of the
project uses).

How shards are cut (the manifest's `cut`): local `prepare` closes a shard every `shard_tokens`
tokens (`cut: 'tokens'`); here shard k holds the documents of input files
[k * files_per_shard, (k + 1) * files_per_shard) in the sorted input order (`cut: 'input_files'`),
written by one worker. Documents keep the local order (files sorted, documents in file order), so
`ShardedDocuments` of either output yields the same documents with the same tokens; only the
shard boundaries differ. A group of files without documents writes no shard. Each worker writes
its shard and a `.meta.json`; the launching process then writes `manifest.json` (last: an output
directory without one is incomplete) and removes the `.meta.json` files. A bad input (bad JSON,
a missing field) fails the pipeline with the error naming the file and line, as locally.

Before the pipeline runs: the arguments and tokenizer are checked, the input must hold a
non-empty document, and an existing output (a directory or a URL prefix) is refused without
`--overwrite`; with it, the old `manifest.json` is deleted first.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import tqdm
from apache_beam.options.pipeline_options import PipelineOptions

from yuanjax.data import corpus, storage
from yuanjax.data import prepare as prepare_lib
from yuanjax.data.tokenizer import Tokenizer

_BATCH_BYTES = 1 << 20


def _write(url: str, data: bytes) -> None:
  fs, path = storage.filesystem(url)
  with fs.open(path, 'wb') as f:
    f.write(data)


class _ShardOfFiles(beam.DoFn):
  """(shard number, input files) -> that shard's files and `.meta.json`; yields the number."""

  def __init__(self, tokenizer_path: str, newline_token: str | None, output_dir: str, text_key: str,
               txt_format: str):
    super().__init__()
    self.args = (tokenizer_path, newline_token)
    self.output_dir, self.text_key, self.txt_format = output_dir, text_key, txt_format
    self.tok = None

  def setup(self):
    path, newline_token = self.args
    if storage.is_url(path):
      path = storage.cached_copy(path)
    self.tok = Tokenizer(path, newline_token=newline_token)

  def process(self, element):
    shard, files = element
    counts = dict(empty=0, invalid=0)
    docs = corpus.read_documents(files, self.text_key, skip_invalid=True,
                                 txt_format=self.txt_format)
    batches = prepare_lib.text_batches(docs, counts, tqdm.tqdm(disable=True))
    parts = [prepare_lib.encode_texts(self.tok, texts, 1) for texts in batches]
    meta = dict(shard=shard, num_skipped_empty=counts['empty'],
                num_skipped_invalid=counts['invalid'], num_docs=0, num_tokens=0)
    if parts:
      tokens = np.concatenate([t for t, _ in parts])
      lengths = np.concatenate([n for _, n in parts])
      name = f'shard_{shard:05d}'
      index = io.BytesIO()
      np.save(index, np.concatenate([[0], np.cumsum(lengths)]).astype(prepare_lib.INDEX_DTYPE))
      _write(storage.join(self.output_dir, name + '.bin'), tokens.tobytes())
      _write(storage.join(self.output_dir, name + '.idx.npy'), index.getvalue())
      meta.update(tokens=name + '.bin', index=name + '.idx.npy', num_docs=len(lengths),
                  num_tokens=int(tokens.size))
    _write(_meta_url(self.output_dir, shard), json.dumps(meta).encode())
    yield shard


def run(tokenizer_path: str, inputs: str | Sequence[str], output_dir: str, *,
        text_key: str = 'text', txt_format: str = 'document', newline_token: str | None = None,
        files_per_shard: int = 1, overwrite: bool = False,
        pipeline_args: Sequence[str] = ()) -> dict:
  """Runs the pipeline (DirectRunner unless `pipeline_args` say otherwise); returns the
  manifest, which it writes last. Every check runs before anything is written."""
  if files_per_shard < 1:
    raise ValueError(f'files_per_shard must be positive, got {files_per_shard}')
  if txt_format not in corpus.TXT_FORMATS:
    raise corpus.InputError(f'txt_format={txt_format!r}: expected one of {corpus.TXT_FORMATS}')
  files = corpus.expand_inputs(inputs)
  if not storage.is_url(output_dir):
    output_dir = os.path.abspath(output_dir)
  recorded = tokenizer_path if storage.is_url(tokenizer_path) else os.path.abspath(tokenizer_path)
  tok = Tokenizer(
      storage.cached_copy(tokenizer_path) if storage.is_url(tokenizer_path) else tokenizer_path,
      newline_token=newline_token)
  docs = corpus.read_documents(files, text_key, skip_invalid=True, txt_format=txt_format)
  if not any(d.text for d in docs):  # stops at the first document
    raise corpus.InputError('no non-empty documents in the input')
  fs = _fresh_output(output_dir, overwrite)
  groups = [
      (k, files[i:i + files_per_shard]) for k, i in enumerate(range(0, len(files), files_per_shard))
  ]
  write = _ShardOfFiles(tokenizer_path, newline_token, output_dir, text_key, txt_format)
  with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as p:
    _ = (p | beam.Create(groups) | beam.Reshuffle() | beam.ParDo(write))
  metas = [json.loads(storage.read_bytes(_meta_url(output_dir, k))) for k, _ in groups]
  shards = [{
      k: m[k] for k in ('tokens', 'index', 'num_docs', 'num_tokens')
  } for m in metas if m['num_docs']]
  skipped = {k: sum(m[f'num_skipped_{k}'] for m in metas) for k in ('empty', 'invalid')}
  manifest = prepare_lib.make_manifest(tok, recorded, shards, skipped, cut='input_files',
                                       files_per_shard=files_per_shard, text_key=text_key,
                                       txt_format=txt_format, num_inputs=len(files))
  _write(storage.join(output_dir, prepare_lib.MANIFEST), json.dumps(manifest, indent=1).encode())
  for k, _ in groups:
    fs.rm(fs._strip_protocol(_meta_url(output_dir, k)))
  return manifest


def _meta_url(output_dir: str, shard: int) -> str:
  return storage.join(output_dir, f'shard_{shard:05d}.meta.json')


def _fresh_output(output_dir: str, overwrite: bool):
  """The output's filesystem, after refusing an existing output (local or URL) without
  `overwrite`; with it, the old `manifest.json` is deleted first, so the directory reads as
  incomplete until the new one is written."""
  fs, out = storage.filesystem(output_dir)
  with storage.errors(output_dir, 'destination'):
    if fs.exists(out) and not overwrite:
      raise ValueError(f'{output_dir}: already exists (pass --overwrite to replace it)')
    manifest = fs._strip_protocol(storage.join(output_dir, prepare_lib.MANIFEST))
    if fs.exists(manifest):
      fs.rm(manifest)
    fs.makedirs(out, exist_ok=True)
  return fs


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  ours, beam_args = (argv[:argv.index('--')],
                     argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
  p = argparse.ArgumentParser(prog='python -m yuanjax.data.beam_prepare', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--tokenizer', required=True)
  p.add_argument('--input', nargs='+', required=True)
  p.add_argument('--output', required=True)
  p.add_argument('--text_key', default='text')
  p.add_argument('--txt_format', default='document', choices=corpus.TXT_FORMATS)
  p.add_argument('--newline_token', default=None)
  p.add_argument('--files_per_shard', type=int, default=1)
  p.add_argument('--overwrite', action='store_true')
  args = p.parse_args(ours)
  try:
    m = run(args.tokenizer, args.input, args.output, text_key=args.text_key,
            txt_format=args.txt_format, newline_token=args.newline_token,
            files_per_shard=args.files_per_shard, overwrite=args.overwrite, pipeline_args=beam_args)
  except (corpus.InputError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f"wrote {args.output}: {m['num_docs']} documents, {m['num_tokens']} tokens, "
        f"{len(m['shards'])} shard(s)")
  return 0


if __name__ == '__main__':
  sys.exit(main())
