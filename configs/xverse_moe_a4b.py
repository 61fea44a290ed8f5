"""XVERSE-MoE-A4.2B (XVERSE Technology 2024) as a yuanjax model: 28 layers, d 2560, 32 heads
(head dim 80, rotary over all of it, theta 5e5), standard attention, fine-grained experts of
d_ff 1728: 64 routed (top-6, linear router) + 2 shared always-on, untied lm_head, vocab
100534: 25.8B parameters, 4.2B active per token (the model card's figures).

  python -m yuanjax.stats --config configs/xverse_moe_a4b.py
  python -m yuanjax.train --config=configs/xverse_moe_a4b.py:runlocal --workdir=/tmp/xverse-local
  python -m launch.sweep --backend=local --config=configs/xverse_moe_a4b.py:runlocal \
      --workdir=/tmp/xverse-routers && python -m yuanjax.report /tmp/xverse-routers

Where the sizes come from: layers, d_model, heads, d_ff, experts (64 + 2 shared), top-k and
lr 3.5e-4 from the model card (huggingface.co/xverse/XVERSE-MoE-A4.2B, README); vocab 100534,
rope_theta 500000, rms_norm_eps 1e-6, max_position_embeddings 8192, tie_word_embeddings false
and router_aux_loss_coef 0.01 (as `routers.weight_from_pooled_coef`: 0.01 x 6 / 28 in yuanjax's
per-layer normalisation) from its config.json, which has no num_key_value_heads (so 32 key/value
heads, no GQA). Inferred, not read: the 2 shared experts have the routed experts' d_ff 1728
(with it and the untied head the totals come out at the card's 25.8B / 4.2B). Not read from
either: whether the top-6 weights are renormalised (the modelling code was not at hand;
DeepSeekMoE's convention, no renormalisation, is assumed) and the training batch and schedule
(yuanjax defaults at seq 8192, the card's training length).

Variant `runlocal`: the same structure (standard attention, untied head, 16 routed top-6 + 2
shared fine-grained experts) shrunk to run a few steps on a CPU.
`sweep()`: XVERSE's linear router vs Yuan's Attention Router on this block (the 2 shared
experts kept in both).
"""
from yuanjax import config_lib
from yuanjax.model import routers

VARIANTS = (None, 'runlocal')


def xverse_model():
  m = config_lib.m32_model()
  m.update(
      dict(vocab_size=100534, hidden_size=2560, num_layers=28, num_heads=32, head_dim=80,
           rotary_dims=80, rope_base=5e5, max_seq_len=8192, norm_eps=1e-6,
           attention_type='standard', tie_embeddings=False, num_experts=64, dense_ffn_size=1728))
  m.router.update(
      dict(type='shared', num_shared_experts=2, top_k=6, norm_topk_prob=False,
           load_balance_weight=routers.weight_from_pooled_coef(0.01, 6, 28)))  # HF: 0.01
  m.moe.ffn_size = 1728
  return m


def get_config(arg=None):
  config_lib.check_variant(arg, VARIANTS, 'configs/xverse_moe_a4b.py')
  config = config_lib.base_config()
  config.model = xverse_model()
  config.train.update(
      dict(num_steps=100_000, batch_size=512, seq_len=8192, log_every=50, eval_every=5000,
           eval_steps=32, sample_tokens=64))
  config.optimizer.update(dict(lr=3.5e-4, min_lr_ratio=0.1, warmup_steps=2000))
  config.checkpoint.update(dict(every=1000, keep=3))
  if arg == 'runlocal':
    m = config.model
    m.update(
        dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, rotary_dims=16,
             max_seq_len=256, dtype='float32', attention_backend='xla', num_experts=16,
             dense_ffn_size=32))
    m.moe.ffn_size = 32
    config_lib.runlocal(config, m)
    config.optimizer.lr = 1e-3
  return config


def sweep(arg=None):
  """The linear router (XVERSE's) vs the Attention Router, both with the 2 shared experts."""
  get_config(arg)
  return [{'model.router.type': 'shared'}, {'model.router.type': 'attention'}]
