"""Supervised fine-tuning of Mixtral-8x7B from its HF weights (`train.init_from`), with Yuan's
SFT recipe (configs/finetune_m32.py): seq 16384, global batch 1152, lr 8e-5 constant, 4220
steps, wd 0.1, clip 1.0, full recompute, positions reset per sample, no FIM, loss on the
responses only. Mixtral's rotary range (32K, theta 1e6) needs no change. Its tokenizer has no
`<sep>`: the samples are rendered in Mixtral-Instruct's chat template (data.chat_template
'mistral', yuanjax.data.sft: `<s>[INST] u1 [/INST] a1</s>...`, the assistant turns and their
`</s>` scored), the tokenizer read as HF reads Mixtral's.

  python -m yuanjax.data prepare --format=sft --tokenizer Mixtral-8x7B-v0.1 \
      --input sft.jsonl --output sft_shards --seq_len 16384
  python -m yuanjax.train --config=configs/finetune_mixtral.py --workdir=gs://BUCKET/mx-sft \
      --config.train.init_from=Mixtral-8x7B-v0.1 --config.data.path=gs://BUCKET/sft_shards
  python -m yuanjax.train --config=configs/finetune_mixtral.py:runlocal --workdir=/tmp/mx-sft

Variants: as configs/finetune_m32.py (none: v5p-64, experts over 8 x tensor 4; gpu: 4 hosts
of 8 H100s, experts over 8 x fsdp 4, 36 micro-batches of 32; runlocal: a tiny random Mixtral
in the HF layout, a Llama-style character tokenizer (<s> </s>, no <sep>) and the reverse task
made on the fly, in the mistral template). `sweep()`: the learning rate.
"""
import os

from yuanjax import config_lib, workdir

_m32 = workdir.load_config_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'finetune_m32.py'))
VARIANTS = _m32.VARIANTS
# variant -> (mesh, grad_accum, devices the planner checks it on)
MESHES = {None: _m32.MESHES[None], 'gpu': (dict(expert=8, fsdp=4, data=1), 36, 32)}


def tiny_mixtral():
  """Mixtral's structure at CPU size: standard attention, 4 query heads on 2 key/value heads,
  full rotary (theta 1e6), the linear router, an untied lm_head."""
  m = config_lib.tiny_model()
  m.update(
      dict(vocab_size=128, attention_type='standard', num_kv_heads=2, head_dim=16, rotary_dims=16,
           rope_base=1e6, norm_eps=1e-5, tie_embeddings=False))
  m.router.type = 'linear'
  return m


def get_config(arg=None):
  config_lib.check_variant(arg, VARIANTS, 'configs/finetune_mixtral.py')
  config = config_lib.base_config()
  config.model = config_lib.mixtral_model()
  config.model.remat = 'full'
  _m32.sft_settings(config, *MESHES[None if arg == 'runlocal' else arg][:2])
  config.train.init_from = 'Mixtral-8x7B-v0.1'
  config.data.chat_template = 'mistral'
  if arg == 'runlocal':
    _m32.runlocal(config, tiny_mixtral(), 'finetune_mixtral-mistral')  # not the yuan2 cache
  return config


sweep = _m32.sweep
