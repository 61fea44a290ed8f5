"""Checkpoint conversion between Hugging Face (Yuan2.0-M32, Mixtral) and yuanjax.

  python -m yuanjax.convert from-hf SRC DST [--overwrite] [--compress]
      SRC: an HF dir (config.json, model_type yuan or mixtral; *.safetensors [+ index] or
           pytorch_model*.bin [+ index], read without torch). DST: DST/config.json, DST/config.py,
           DST/params/ (orbax), DST/hf_files/ (tokenizer.model, ...).
  python -m yuanjax.convert to-hf SRC DST [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]
      SRC: a from-hf DST. DST: model-0000i-of-0000n.safetensors, model.safetensors.index.json,
           config.json (+ the copied hf_files). --dtype defaults to the imported source's dtypes.

Nothing is written when the checks fail; an existing DST is refused unless --overwrite (the
new checkpoint is written next to it and swapped in at the end). Details: yuanjax.interop.hf (the
conversions) and yuanjax.interop.converted (DST's format).
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m yuanjax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  a = sub.add_parser('from-hf', help='HF Yuan or Mixtral checkpoint dir -> yuanjax checkpoint dir')
  b = sub.add_parser('to-hf', help='yuanjax checkpoint dir (from from-hf) -> HF safetensors dir')
  for s in (a, b):
    s.add_argument('src')
    s.add_argument('dst')
    s.add_argument('--overwrite', action='store_true', help='replace an existing DST')
    s.add_argument('-q', '--quiet', action='store_true', help='only warnings and errors')
  a.add_argument('--compress', action='store_true',
                 help='zstd-compress the orbax arrays (smaller, slower, more host memory)')
  b.add_argument('--dtype', choices=('bfloat16', 'float32', 'float16'), default=None,
                 help="tensor dtype (default: the imported source's, else bfloat16)")
  b.add_argument('--max-shard-size', default='5GB', help='per safetensors file (5GB, 500MB, 4GiB)')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
  logging.getLogger('yuanjax').setLevel(logging.WARNING if args.quiet else logging.INFO)
  from yuanjax.interop import hf  # after parsing: --help stays fast
  t0 = time.time()
  try:
    if args.command == 'from-hf':
      hf.import_hf(args.src, args.dst, overwrite=args.overwrite, compress=args.compress)
    else:
      hf.export_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError, NotImplementedError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
  logging.getLogger('yuanjax').info('done in %.1fs, peak RSS %.2f GiB', time.time() - t0, peak_gib)
  return 0


if __name__ == '__main__':
  sys.exit(main())
