"""A CPU-sized Yuan2.0-M32: the same structure (LFA, Attention Router, top-2 MoE, partial
rotary, tied embeddings) at tiny dims; a forward pass well under a second on a laptop.

  python -m yuanjax.stats --config configs/tiny.py
  python -m yuanjax.train --config=configs/tiny.py --workdir=/tmp/tiny
  python -m yuanjax.train --config=configs/tiny.py:runlocal --workdir=/tmp/tiny-local

`sweep()`: every router type on the same model, for quick router comparisons.
"""
from yuanjax import config_lib

VARIANTS = (None, 'runlocal')


def get_config(arg=None):
  config_lib.check_variant(arg, VARIANTS, 'configs/tiny.py')
  config = config_lib.base_config()
  config.model = config_lib.tiny_model()
  config.data.update(dict(vocab_size=512, max_bytes=1_000_000))
  config.train.update(
      dict(num_steps=200, batch_size=8, seq_len=128, log_every=20, eval_every=100, eval_steps=4,
           sample_tokens=16))
  config.optimizer.update(dict(lr=1e-3, warmup_steps=20))
  config.checkpoint.every = 100
  if arg == 'runlocal':
    config_lib.short_run(config)
  return config


def sweep():
  """Every router on the tiny model (expert_choice is not causal: an ablation only)."""
  return config_lib.router_sweep(config_lib.ABLATION_ROUTERS + ('expert_choice',))
