"""Peak host memory of `train.init_from` a raw HF dir: the params read into the train state's
shardings (yuanjax.finetune -> yuanjax.loader), against the checkpoint's largest tensor group.

  python benchmarks/finetune_memory.py                 # ~2.1 GB bf16 checkpoint in a temp dir
  python benchmarks/finetune_memory.py --layers 12 --keep DIR

Writes a random bf16 HF Yuan checkpoint (benchmarks/convert_memory.py's writer), then in a fresh
child process builds the fine-tune's train state abstractly (train_state.build on this host's
mesh) and loads the params as init_from does (loader.load with the state's shardings), and
prints the child's peak RSS (rusage) beside: the largest HF tensor, the largest tensor group
(one stacked yuanjax leaf, e.g. w1 [L, E, D, 2F], in the source's bf16), the params as placed
(param_dtype; on a CPU backend the "device" is this host's memory, so they count in the RSS)
and the floor of a child that only imports JAX and yuanjax. Target (issue 20): peak - params
placed on the CPU device <= 2 x largest group + 2 GB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import convert_memory  # noqa: E402
from yuanjax.interop import hf_mapping  # noqa: E402

GB = 1e9
CHILD = '''
import sys
import jax
from yuanjax import config_lib, finetune, sharding, train_state
config = config_lib.base_config()
config.train.init_from = sys.argv[1]
config.model = finetune.source_model(sys.argv[1])
config.train.update(dict(batch_size=jax.device_count(), seq_len=128))
finetune.resolve_model(config)
mesh = sharding.make_mesh(config.mesh)
built = train_state.build(config, mesh)
_, params = finetune.loader.load(sys.argv[1], shardings=lambda _: built.shardings.params)
jax.block_until_ready(params)
'''


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  convert_memory.size_arguments(p, layers=7)
  p.add_argument('--keep', default=None, help='work in this dir and keep it (default: a temp dir)')
  args = p.parse_args()
  m = convert_memory.model_config(args)
  shapes = hf_mapping.hf_shapes(m)
  bf16 = lambda s: 2 * int(np.prod(s))
  L, E, D, F = args.layers, args.experts, args.hidden, args.ffn
  group = bf16((L, E, D, 2 * F))
  sizes = {
      'largest HF tensor': max(bf16(s) for s in shapes.values()),
      'largest tensor group (w1 [L, E, D, 2F], bf16)': group,
      'total checkpoint (bf16)': sum(bf16(s) for s in shapes.values()),
      'params placed (float32)': 2 * sum(bf16(s) for s in shapes.values()),
  }
  work = args.keep or tempfile.mkdtemp(prefix='finetune_memory-')
  src = os.path.join(work, 'hf')
  try:
    if not os.path.isdir(src):
      t = time.time()
      convert_memory.write_random_checkpoint(src,
                                             hf_mapping.hf_config_from_model(m, None, 'bfloat16'),
                                             shapes, shards=max(2, L // 2))
      print(
          f'wrote {src} ({sizes["total checkpoint (bf16)"] / GB:.2f} GB) in '
          f'{time.time() - t:.0f}s', file=sys.stderr)
    floor, _ = convert_memory.run_child(['-c', 'import yuanjax.finetune'], ROOT, work)
    peak, secs = convert_memory.run_child(['-c', CHILD, src], ROOT, work)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  rows = dict(sizes)
  rows['peak RSS: python -c "import yuanjax.finetune"'] = floor
  rows[f'peak RSS: init_from the HF dir ({secs:.0f}s)'] = peak
  print(f'layers {L}, experts {E}, d {D}, expert ffn {F}, vocab {args.vocab}, bf16 source')
  for name, v in rows.items():
    print(f'  {name:<52} {v / GB:6.2f} GB')
  extra = peak - sizes['params placed (float32)']
  print(
      f'  peak - params placed = {extra / GB:.2f} GB; target 2 x group + 2 GB = '
      f'{(2 * group + 2 * GB) / GB:.2f} GB: {"met" if extra <= 2 * group + 2 * GB else "NOT met"}')


if __name__ == '__main__':
  main()
