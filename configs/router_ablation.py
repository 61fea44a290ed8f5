"""Router ablation (Yuan2.0-M32 paper, Table 1): Attention Router vs classical (linear)
router vs shared-expert isolation, 3 seeds each, same tokens, same held-out eval split.

  python -m launch.sweep --backend=local --parallel=2 --config=configs/router_ablation.py \
      --workdir=/tmp/router                                     # the CPU study (docs/ablations.md)
  python -m yuanjax.report /tmp/router                           # table + plots
  python -m launch.sweep --backend=local --config=configs/router_ablation.py:smoke --workdir=/tmp/s
  python -m launch.sweep --backend=local --config=configs/router_ablation.py:gpu --workdir=/tmp/g

Variants (the `:arg`, passed to both get_config and sweep): none (the CPU study, 2 cores),
`smoke` (a few steps, seconds; for tests: 2 routers x 2 seeds), `gpu` (one H100/H200, about an
hour for the whole sweep). `shared` is 2 always-on experts + top-2 of 14 routed experts of half
the FFN size (the paper's 2 + top-2 of 14): total and active parameters match the 8-expert
variants (within 1%, tests/test_ablation_configs.py). Seeds set `train.seed` only:
parameter init and router noise; the data order and the eval split are the same for every run.
"""
from yuanjax import config_lib

ROUTERS = config_lib.ABLATION_ROUTERS
SEEDS = (0, 1, 2)
VARIANTS = (None, 'smoke', 'gpu')


def _check(arg, name):
  if arg not in VARIANTS:
    raise ValueError(f'{name}: unknown variant {arg!r} (expected none, smoke or gpu)')


def study_config(arg, name):
  """The shared base of both ablation studies (this file and expert_count_ablation.py)."""
  _check(arg, name)
  config = config_lib.base_config()
  m = config_lib.tiny_model()
  m.update(
      dict(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, head_dim=32, rotary_dims=16,
           max_seq_len=256, num_experts=8))
  m.moe.ffn_size = 192
  config.model = m
  config.data.vocab_size = 4096
  config.data.eval_fraction = 0.05  # 28 of the 557 documents held out: 95 batches
  config.train.update(
      dict(
          num_steps=80,
          batch_size=16,
          seq_len=128,
          log_every=10,
          eval_every=40,
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
  return config


def get_config(arg=None):
  return study_config(arg, 'configs/router_ablation.py')


def sweep(arg=None):
  """One run per (router, seed); `smoke`: attention and linear, seeds 0 and 1."""
  config = get_config(arg)
  routers, seeds = (ROUTERS[:2], SEEDS[:2]) if arg == 'smoke' else (ROUTERS, SEEDS)
  return [{
      **config_lib.router_overrides(r, config.model.moe.ffn_size), 'train.seed': s
  } for r in routers for s in seeds]
