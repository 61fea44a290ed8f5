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

VARIANTS = (None, 'runlocal')


def get_config(arg=None):
  config_lib.check_variant(arg, VARIANTS, 'configs/demo.py')
  config = config_lib.base_config()
  config.model = config_lib.small_model()
  config.data.vocab_size = 4096
  config.train.update(
      dict(num_steps=400, batch_size=16, seq_len=128, log_every=20, eval_every=200, eval_steps=8,
           sample_tokens=48))
  config.optimizer.update(dict(lr=1e-3, warmup_steps=40, min_lr_ratio=0.1))
  config.checkpoint.every = 100
  if arg == 'runlocal':
    config_lib.short_run(config, num_steps=6, log_every=2, eval_steps=2, checkpoint_every=3)
  return config


def sweep():
  """One run per router (paper Table 1): attention vs classical vs shared-expert."""
  return config_lib.router_sweep(config_lib.ABLATION_ROUTERS)
