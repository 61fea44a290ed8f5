"""Peak host memory of `python -m yuanjax.convert from-hf` and `to-hf` on a synthetic checkpoint.

  python benchmarks/convert_memory.py                 # ~1.8 GB bf16 checkpoint in a temp dir
  python benchmarks/convert_memory.py --layers 4 --ffn 4096 --keep DIR
  python benchmarks/convert_memory.py --repo OTHER_CHECKOUT   # measure another yuanjax

Writes a random bf16 HF Yuan checkpoint in the exact layout (the names and shapes of
yuanjax.interop.hf_mapping, sharded safetensors with an index), converts it with from-hf and
back with to-hf, each in a fresh child process, and prints each child's peak RSS (its
rusage.ru_maxrss, from os.wait4) next to the sizes that bound it: the largest single HF
tensor, one layer of the largest yuanjax leaf, the whole stacked largest leaf and the total
checkpoint. The children import JAX, which alone costs a few hundred MB: the "python -c
'import yuanjax.interop.hf'" line is that floor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from yuanjax import config_lib  # noqa: E402
from yuanjax.interop import hf_mapping  # noqa: E402

GB = 1e9
HEADS = 8


def model_config(args):
  """An M32-structured config.model of the sizes asked (8 heads of hidden / 8 dims, top-2)."""
  m = config_lib.m32_model()
  K = args.hidden // HEADS
  m.update(
      dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=HEADS,
           head_dim=K, rotary_dims=K, num_experts=args.experts, dense_ffn_size=args.ffn))
  m.moe.ffn_size = args.ffn
  return m


def size_arguments(p: argparse.ArgumentParser, layers: int) -> None:
  """The synthetic checkpoint's sizes (`model_config`)."""
  p.add_argument('--layers', type=int, default=layers)
  p.add_argument('--experts', type=int, default=8)
  p.add_argument('--hidden', type=int, default=1024)
  p.add_argument('--ffn', type=int, default=6144)
  p.add_argument('--vocab', type=int, default=32000)


def write_random_checkpoint(path, config: dict, shapes: dict, shards: int, seed: int = 0) -> None:
  """A random bf16 HF checkpoint written shard by shard (lm_head left out: tied, saved once)."""
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  rng = np.random.default_rng(seed)
  names, weight_map = list(shapes), {}
  for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
    fname = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
    part = {
        names[j]:
            (0.02 * rng.standard_normal(shapes[names[j]], np.float32)).astype(ml_dtypes.bfloat16)
        for j in chunk
    }
    save_file(part, os.path.join(path, fname), metadata={'format': 'pt'})
    weight_map.update({n: fname for n in part})
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)


def run_child(args: list[str], repo: str, cwd: str) -> tuple[float, float]:
  """(peak RSS in bytes, seconds) of `python args...` with `repo` first on the path."""
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
  t = time.time()
  proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f'{args} failed with exit code {proc.returncode}')
  return usage.ru_maxrss * 1024, time.time() - t  # Linux: KiB


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  size_arguments(p, layers=6)
  p.add_argument('--repo', default=ROOT, help='the yuanjax checkout to measure (default: this one)')
  p.add_argument('--keep', default=None, help='work in this dir and keep it (default: a temp dir)')
  p.add_argument('--json', action='store_true')
  args = p.parse_args()

  m = model_config(args)
  config = hf_mapping.hf_config_from_model(m, None, 'bfloat16')
  shapes = hf_mapping.hf_shapes(m)  # lm_head.weight not among them (tied)
  nbytes = lambda s: 2 * int(np.prod(s))  # bf16
  D, E, F, L = args.hidden, args.experts, args.ffn, args.layers
  sizes = {
      'largest HF tensor': max(nbytes(s) for s in shapes.values()),
      'largest yuanjax leaf, one layer (w1 [E, D, 2F])': nbytes((E, D, 2 * F)),
      'largest yuanjax leaf, stacked (w1 [L, E, D, 2F])': nbytes((L, E, D, 2 * F)),
      'total checkpoint': sum(nbytes(s) for s in shapes.values()),
  }
  work = args.keep or tempfile.mkdtemp(prefix='convert_memory-')
  os.makedirs(work, exist_ok=True)
  src, dst, back = (os.path.join(work, d) for d in ('hf', 'yj', 'hf_back'))
  try:
    if not os.path.isdir(src):
      t = time.time()
      write_random_checkpoint(src, config, shapes, shards=max(2, L // 2))
      print(f'wrote {src} ({sizes["total checkpoint"] / GB:.2f} GB) in {time.time() - t:.0f}s',
            file=sys.stderr)
    floor, _ = run_child(['-c', 'import yuanjax.interop.hf'], args.repo, work)
    from_hf, t_from = run_child(['-m', 'yuanjax.convert', 'from-hf', src, dst, '--overwrite', '-q'],
                                args.repo, work)
    to_hf, t_to = run_child(['-m', 'yuanjax.convert', 'to-hf', dst, back, '--overwrite', '-q'],
                            args.repo, work)
    with open(os.path.join(dst, 'config.json')) as f:
      fmt = json.load(f).get('format')
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  rows = dict(sizes)
  rows['peak RSS: python -c "import yuanjax.interop.hf"'] = floor
  rows[f'peak RSS: from-hf ({t_from:.0f}s, format {fmt})'] = from_hf
  rows[f'peak RSS: to-hf ({t_to:.0f}s)'] = to_hf
  if args.json:
    print(json.dumps({k: v / GB for k, v in rows.items()}, indent=2))
    return
  print(
      f'layers {L}, experts {E}, d {D}, expert ffn {F}, vocab {args.vocab}, bf16; yuanjax from {args.repo}'
  )
  for name, v in rows.items():
    print(f'  {name:<58} {v / GB:6.2f} GB')


if __name__ == '__main__':
  main()
