"""Command line for the data side. Examples:

  python -m yuanjax.data tokenizer --input 'corpus/*.jsonl' --vocab_size 32000 --output out/tok
  python -m yuanjax.data prepare --tokenizer out/tok.model --input 'corpus/*.jsonl' \
      --output out/shards
  python -m yuanjax.data prepare --tokenizer out/tok.model --text_key content \
      --input 'gs://BUCKET/hf/*.parquet' --output out/shards --workers 8
  python -m yuanjax.data prepare --format=sft --tokenizer T --input sft.txt --output out/sft \
      --seq_len 4096 --newline_token '<n>'   # instruction<sep>response samples (data/sft.py)
  python -m yuanjax.data default [--vocab_size 4096 --max_bytes 8000000]   # embedded stdlib data
  python -m yuanjax.data inspect [--path out/shards] --seq_len 128 --batch 4 --steps 100

Errors in the input name the file and line and exit with status 2 before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from yuanjax.data import corpus, pipeline, prepare, sft, tokenizer


def _tokenizer(args):
  path = tokenizer.train_tokenizer(args.input, args.output, args.vocab_size, text_key=args.text_key,
                                   max_sentences=args.max_sentences)
  tok = tokenizer.Tokenizer(path)
  print(f'wrote {path} (vocab {tok.vocab_size}, eod {tok.eod_id})')


def _prepare(args):
  if args.format == 'sft':
    return _prepare_sft(args)
  workers = args.workers or prepare.default_workers()
  t0 = time.perf_counter()
  m = prepare.prepare(args.tokenizer, args.input, args.output, text_key=args.text_key,
                      txt_format=args.txt_format, shard_tokens=args.shard_tokens,
                      newline_token=args.newline_token, overwrite=args.overwrite, workers=workers)
  dt = time.perf_counter() - t0
  print(f"wrote {args.output}: {m['num_docs']} documents, {m['num_tokens']} tokens, "
        f"{len(m['shards'])} shard(s), {m['num_skipped_empty']} empty skipped, "
        f"{m['num_skipped_invalid']} not UTF-8 skipped")
  print(f"{dt:.2f} s with {workers} worker(s): {m['num_docs'] / dt:.0f} documents/s, "
        f"{m['num_tokens'] / dt:.0f} tokens/s; per core {m['num_docs'] / dt / workers:.0f} "
        f"documents/s, {m['num_tokens'] / dt / workers:.0f} tokens/s")


def _prepare_sft(args):
  if args.seq_len is None:
    raise ValueError('--format=sft needs --seq_len (a longer sample is skipped, not truncated)')
  tok = args.tokenizer
  if os.path.isdir(tok):  # a checkpoint or tokenizer dir: as its model family's runtime reads it
    from yuanjax import loader  # pylint: disable=g-import-not-at-top  (imports jax)
    tok = loader.load_tokenizer(tok)
  m = sft.prepare_sft(tok, args.input, args.output, seq_len=args.seq_len,
                      newline_token=args.newline_token, chat_template_name=args.chat_template,
                      shard_tokens=args.shard_tokens, overwrite=args.overwrite)
  print(f"wrote {args.output}: {m['num_docs']} samples, {m['num_tokens']} tokens "
        f"({m['num_scored_tokens']} scored), {len(m['shards'])} shard(s); skipped: "
        f"{m['num_skipped'] or 'none'}")
  for place in m['skipped_at']:
    print(f'  skipped {place}')


def _default(args):
  t0 = time.perf_counter()
  tok, shards = prepare.ensure_default_data(args.cache_dir, args.vocab_size, args.max_bytes,
                                            progress=True)
  m = prepare.load_manifest(shards)
  print(
      f"tokenizer {tok}\nshards    {shards}\n{m['num_docs']} documents, {m['num_tokens']} tokens; "
      f"built in {m['build_seconds']} s; this call {time.perf_counter() - t0:.2f} s")


def _inspect(args):
  cfg = pipeline.data_config()
  for k in ('path', 'tokenizer', 'cache_dir', 'seed', 'fim_rate', 'fim_spm_rate', 'prefetch',
            'read_threads'):
    if getattr(args, k) is not None:
      cfg[k] = getattr(args, k)
  train, make_eval, tok = pipeline.make_datasets(cfg, global_batch_size=args.batch,
                                                 seq_len=args.seq_len, process_index=0,
                                                 process_count=1)
  batch = next(train)
  for k, v in batch.items():
    print(f'{k:12s} {v.dtype} {v.shape}')
  print('row 0:', repr(tok.decode(batch['inputs'][0][:200]))[:400])
  t0 = time.perf_counter()
  for _ in range(args.steps):
    next(train)
  dt = time.perf_counter() - t0
  print(f'train: {args.steps * args.batch / dt:.0f} rows/s, '
        f'{args.steps * args.batch * args.seq_len / dt / 1e6:.2f} M tokens/s')
  n_eval = sum(1 for _ in make_eval())
  print(f'eval: {n_eval} batches')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m yuanjax.data', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='cmd', required=True)

  t = sub.add_parser('tokenizer', help='train a SentencePiece BPE tokenizer')
  t.add_argument('--input', nargs='+', required=True, help='.txt/.jsonl files or globs')
  t.add_argument('--vocab_size', type=int, required=True)
  t.add_argument('--output', required=True, help='prefix: writes PREFIX.model and PREFIX.vocab')
  t.add_argument('--text_key', default='text')
  t.add_argument('--max_sentences', type=int, default=200_000,
                 help='chunks kept for training (sampled)')
  t.set_defaults(fn=_tokenizer)

  r = sub.add_parser('prepare', help='tokenize documents into shards')
  r.add_argument('--tokenizer', required=True)
  r.add_argument('--input', nargs='+', required=True,
                 help='.txt, .jsonl(.gz|.zst) or .parquet files or globs, local or gs://')
  r.add_argument('--output', required=True,
                 help='shards directory (must not exist unless --overwrite)')
  r.add_argument('--text_key', default='text', help='jsonl field / parquet column of the text')
  r.add_argument('--txt_format', default='document', choices=corpus.TXT_FORMATS,
                 help="'document': a .txt file is one document; 'yuan': one per line, <n> newlines")
  r.add_argument('--workers', type=int, default=0,
                 help='processes that tokenize (default 0: one per core); output is identical')
  r.add_argument('--format', choices=('text', 'sft'), default='text',
                 help="sft: instruction/response samples, loss on the response (yuanjax.data.sft)")
  r.add_argument('--seq_len', type=int, default=None,
                 help='--format=sft: the training seq_len (longer samples are skipped)')
  r.add_argument('--shard_tokens', type=int, default=prepare.DEFAULT_SHARD_TOKENS)
  r.add_argument('--newline_token', default=None, help="e.g. '<n>' for Yuan's released tokenizer")
  r.add_argument('--chat_template', default=None, choices=tuple(sft.TEMPLATES),
                 help="--format=sft: how samples are rendered (default: the tokenizer's)")
  r.add_argument('--overwrite', action='store_true')
  r.set_defaults(fn=_prepare)

  d = sub.add_parser('default', help='build (once) the embedded stdlib tokenizer and shards')
  d.add_argument('--cache_dir', default=None)
  d.add_argument('--vocab_size', type=int, default=4096)
  d.add_argument('--max_bytes', type=int, default=8_000_000)
  d.set_defaults(fn=_default)

  i = sub.add_parser('inspect', help='build the pipeline, print a batch and the throughput')
  i.add_argument('--path', default=None)
  i.add_argument('--tokenizer', default=None)
  i.add_argument('--cache_dir', default=None)
  i.add_argument('--seq_len', type=int, default=128)
  i.add_argument('--batch', type=int, default=4)
  i.add_argument('--steps', type=int, default=100)
  i.add_argument('--seed', type=int, default=None)
  i.add_argument('--fim_rate', type=float, default=None)
  i.add_argument('--fim_spm_rate', type=float, default=None)
  i.add_argument('--prefetch', type=int, default=None)
  i.add_argument('--read_threads', type=int, default=None)
  i.set_defaults(fn=_inspect)

  args = p.parse_args(argv)
  try:
    args.fn(args)
  except (corpus.InputError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
