"""Mixtral-8x7B (Jiang et al. 2024) as a yuanjax model: 32 layers, d 4096, 32 query heads
sharing 8 key/value heads (head dim 128, rotary over all of it, theta 1e6), RMSNorm eps 1e-5,
8 experts of ffn 14336, top-2 by the linear router (softmax, then top-2 renormalised),
vocab 32000, untied lm_head: 46.7B parameters, 12.9B active per token.

  python -m yuanjax.stats --config configs/mixtral_8x7b.py
  python -m yuanjax.train --config=configs/mixtral_8x7b.py:runlocal --workdir=/tmp/mixtral-local
  python -m launch.sweep --backend=local --config=configs/mixtral_8x7b.py:runlocal \
      --workdir=/tmp/mixtral-routers && python -m yuanjax.report /tmp/mixtral-routers

Released weights: `python -m yuanjax.convert from-hf Mixtral-8x7B-v0.1/ /tmp/mixtral`
(docs/interop.md). The architecture is from the HF config.json (mistralai/Mixtral-8x7B-v0.1).
Mixtral's training recipe was not published: the batch, schedule and data settings below are
yuanjax's M32 defaults at seq 4096, placeholders for a researcher's own run.

Variant `runlocal`: the same structure (standard attention, 4 heads / 2 key-value heads, full
rotary, untied head, 8 experts top-2, linear router) shrunk to run a few steps on a CPU.
`sweep()`: the router ablation on Mixtral's block -- the linear router (Mixtral's own), Yuan's
Attention Router, and 2 shared + top-2 of 14 half-size experts (same total and active params).
"""
from yuanjax import config_lib

VARIANTS = (None, 'runlocal')


def get_config(arg=None):
  config_lib.check_variant(arg, VARIANTS, 'configs/mixtral_8x7b.py')
  config = config_lib.base_config()
  config.model = config_lib.mixtral_model()
  config.train.update(
      dict(num_steps=100_000, batch_size=1024, seq_len=4096, log_every=50, eval_every=5000,
           eval_steps=32, sample_tokens=64))
  config.optimizer.update(dict(lr=1e-4, min_lr_ratio=0.1, warmup_steps=2000))
  config.checkpoint.update(dict(every=1000, keep=3))
  if arg == 'runlocal':
    m = config.model
    m.update(
        dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             rotary_dims=16, max_seq_len=256, dtype='float32', attention_backend='xla',
             dense_ffn_size=128))
    m.moe.ffn_size = 64
    config_lib.runlocal(config, m)
  return config


def sweep(arg=None):
  """Linear (Mixtral) vs Attention Router vs shared experts, on Mixtral's block."""
  ffn = get_config(arg).model.moe.ffn_size
  return [config_lib.router_overrides(r, ffn) for r in config_lib.ABLATION_ROUTERS]
