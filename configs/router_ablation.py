"""Router ablation (Yuan2.0-M32 paper, Table 1): Attention Router vs classical (linear)
router vs shared-expert isolation, 3 seeds each, same tokens, same held-out eval split.

  python -m launch.sweep --backend=local --parallel=2 --num_processes=1 \
      --config=configs/router_ablation.py --workdir=workdir/studies/router  # docs/ablations.md
  python -m yuanjax.report workdir/studies/router                # table + plots
  python -m launch.sweep --backend=local --num_processes=1 \
      --config=configs/router_ablation.py:smoke --workdir=workdir/smoke
  python -m launch.sweep --backend=local --num_processes=1 \
      --config=configs/router_ablation.py:gpu --workdir=workdir/studies/router_gpu
  python -m launch.sweep --backend=local --num_processes=1 \
      --config=configs/router_ablation.py:long --workdir=workdir/studies/router_1m  # hours

Variants (the `:arg`, passed to both get_config and sweep): none (the CPU study, 2 cores),
`smoke` (a few steps, seconds; for tests: 2 routers x 2 seeds), `gpu` (one H100/H200, about an
hour for the whole sweep), `long` (the 1M-token study, docs/ablations.md: dropless dispatch,
480 steps = 983,040 tokens per run, the same 65,536 eval tokens every 80 steps; attention and
linear with LONG_SEEDS, the n a power analysis of a pilot's paired differences gives for a
0.01 gap, shared with 3 seeds; runs ordered seed by seed, so a partial study is paired).
`shared` is 2 always-on experts + top-2 of 14 routed experts of half the FFN size (the
paper's 2 + top-2 of 14): total and active parameters match the 8-expert variants (within 1%,
tests/test_ablation_configs.py). Seeds set `train.seed` only: parameter init and router noise;
the data order and the eval split are the same for every run.
"""
from yuanjax import config_lib

ROUTERS = config_lib.ABLATION_ROUTERS
SEEDS = (0, 1, 2)
LONG_SEEDS = tuple(range(10))  # attention and linear in the `long` study (the pilot's power)
VARIANTS = (None, 'smoke', 'gpu', 'long')


def study_config(arg, name):
  """The shared base of both ablation studies (this file and expert_count_ablation.py)."""
  config_lib.check_variant(arg, VARIANTS, name)
  config = config_lib.base_config()
  m = config.model = config_lib.small_model()
  config.data.vocab_size = 4096
  config.data.eval_fraction = 0.05  # 28 of the 557 documents held out: 95 batches
  config.train.update(
      dict(
          num_steps=80,
          batch_size=16,
          seq_len=128,
          log_every=10,
          eval_every=20,  # 4 points on the eval curve (the recorded CPU studies had 2)
          eval_steps=32,  # 65,536 eval tokens
          sample_tokens=0,
          progress=False))
  config.optimizer.update(dict(lr=1e-3, warmup_steps=8, min_lr_ratio=0.1))
  config.checkpoint.update(dict(every=40, keep=1))
  if arg == 'smoke':
    m.update(dict(hidden_size=64, num_layers=2, head_dim=16, rotary_dims=8))
    m.moe.ffn_size = 64
    config.data.eval_fraction = 0.02
    config.train.update(
        dict(num_steps=4, batch_size=4, seq_len=32, log_every=2, eval_every=2, eval_steps=2))
    config.checkpoint.every = 4
  elif arg == 'gpu':
    m.update(
        dict(hidden_size=512, num_layers=8, num_heads=8, head_dim=64, rotary_dims=32,
             max_seq_len=512, dtype='bfloat16', attention_backend='dot_product_attention'))
    m.moe.ffn_size = 768
    config.data.max_bytes = 40_000_000  # all of the stdlib (~33M tokens per run, few epochs)
    config.train.update(
        dict(num_steps=1000, batch_size=64, seq_len=512, log_every=50, eval_every=250,
             eval_steps=16))  # 524k eval tokens
    config.checkpoint.every = 250
  elif arg == 'long':
    m.moe.dispatch = 'dropless'  # nothing dropped: drops do not confound the routers
    config.train.update(dict(num_steps=480, eval_every=80))  # 983,040 tokens, 6 evaluations
    config.optimizer.warmup_steps = 48
    config.checkpoint.every = 80
  return config


def get_config(arg=None):
  return study_config(arg, 'configs/router_ablation.py')


def _runs(arg):
  """(router, seed) pairs; `long` goes seed by seed (attention, linear, then shared while
  its seeds last), so the runs finished at any moment are paired."""
  if arg == 'smoke':
    return [(r, s) for r in ROUTERS[:2] for s in SEEDS[:2]]
  if arg == 'long':
    return [(r, s) for s in LONG_SEEDS for r in ROUTERS if r != 'shared' or s in SEEDS]
  return [(r, s) for r in ROUTERS for s in SEEDS]


def sweep(arg=None):
  """One run per (router, seed); `smoke`: attention and linear, seeds 0 and 1."""
  ffn_size = get_config(arg).model.moe.ffn_size
  return [{**config_lib.router_overrides(r, ffn_size), 'train.seed': s} for r, s in _runs(arg)]
