"""CPU demo: a small Yuan2.0-M32 (LFA, Attention Router, 8 experts top-2) trained on the
embedded corpus (this Python's standard library sources) with a tokenizer trained on it.

  python -m yuanjax.train --config=configs/demo.py --workdir=/tmp/yuanjax-demo
  python -m yuanjax.train --config=configs/demo.py:runlocal --workdir=/tmp/d   # seconds
  python -m yuanjax.train --config=configs/demo.py --workdir=/tmp/d \
      --config.model.router.type=linear

`make demo` runs the first command. Variants: `runlocal` (a handful of steps, for tests).
`sweep()` compares the routers, as in the paper's Table 1.
"""
from yuanjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  m = config_lib.tiny_model()
  m.update(
      dict(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, head_dim=32, rotary_dims=16,
           max_seq_len=256, num_experts=8))
  m.moe.ffn_size = 192
  config.model = m
  config.data.vocab_size = 4096
  config.train.update(
      dict(num_steps=400, batch_size=16, seq_len=128, log_every=20, eval_every=200, eval_steps=8,
           sample_tokens=48))
  config.optimizer.update(dict(lr=1e-3, warmup_steps=40, min_lr_ratio=0.1))
  config.checkpoint.every = 100
  if arg == 'runlocal':
    config.train.update(
        dict(num_steps=6, log_every=2, eval_every=0, eval_steps=2, sample_tokens=4, progress=False))
    config.checkpoint.every = 3
  elif arg is not None:
    raise ValueError(f'configs/demo.py: unknown variant {arg!r} (expected none or runlocal)')
  return config


def sweep():
  """One run per router (paper Table 1): attention vs classical vs shared-expert."""
  return [
      {
          'model.router.type': 'attention'
      },
      {
          'model.router.type': 'linear'
      },
      {
          'model.router.type': 'shared',
          'model.router.num_shared_experts': 2
      },
  ]
