"""A CPU-sized Yuan2.0-M32: the same structure (LFA, Attention Router, top-2 MoE, partial
rotary, tied embeddings) at tiny dims; a forward pass well under a second on a laptop.

  python -m yuanjax.stats --config configs/tiny.py
  python -m yuanjax.train --config=configs/tiny.py --workdir=/tmp/tiny
  python -m yuanjax.train --config=configs/tiny.py:runlocal --workdir=/tmp/tiny-local

`sweep()`: every router type on the same model, for quick router comparisons.
"""
from yuanjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.model = config_lib.tiny_model()
  config.data.update(dict(vocab_size=512, max_bytes=1_000_000))
  config.train.update(
      dict(num_steps=200, batch_size=8, seq_len=128, log_every=20, eval_every=100, eval_steps=4,
           sample_tokens=16))
  config.optimizer.update(dict(lr=1e-3, warmup_steps=20))
  config.checkpoint.every = 100
  if arg == 'runlocal':
    config.train.update(
        dict(num_steps=4, log_every=1, eval_every=0, eval_steps=1, sample_tokens=4, progress=False))
    config.checkpoint.every = 2
  elif arg is not None:
    raise ValueError(f'configs/tiny.py: unknown variant {arg!r} (expected none or runlocal)')
  return config


def sweep():
  """Every router on the tiny model (expert_choice is not causal: an ablation only)."""
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
      {
          'model.router.type': 'expert_choice'
      },
  ]
