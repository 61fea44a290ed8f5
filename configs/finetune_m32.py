"""Supervised fine-tuning of the released Yuan2.0-M32 (Yuan's own SFT recipe,
examples/pretrain_yuan2.0_moe_2x32B_sft.sh): from the Yuan2-M32-hf weights with a fresh
optimizer (`train.init_from`, yuanjax.finetune), seq 16384 (rotary base 40890: NTK factor 4),
global batch 1152, lr 8e-5 constant, 4220 steps, wd 0.1, clip 1.0, full recompute, positions
reset per sample, no FIM, loss on the responses only (SFT shards, yuanjax.data.sft).

  python -m yuanjax.data prepare --format=sft --tokenizer Yuan2-M32-hf \
      --input sft.txt --output sft_shards --seq_len 16384
  python -m yuanjax.train --config=configs/finetune_m32.py --workdir=gs://BUCKET/m32-sft \
      --config.train.init_from=Yuan2-M32-hf --config.data.path=gs://BUCKET/sft_shards
  python -m yuanjax.train --config=configs/finetune_m32.py:runlocal --workdir=/tmp/m32-sft

Variants (meshes checked by `python -m yuanjax.plan`, tests/test_finetune_configs.py):
  (none)     a v5p-64 slice, 32 chips: experts over 8, tensor 4; 144 micro-batches of 8
  gpu        2 hosts of 8 H100s: experts over 8, fsdp 2; 72 micro-batches of 16. One host of
             8 H100s does not fit: AdamW's state and the float32 gradients (accumulator and
             micro-batch) alone take ~80 GiB per device (H200s fit: ~90 of 141 GiB).
  runlocal   a tiny random M32 saved in the HF layout and the synthetic `reverse: abc<sep>cba`
             task made on the fly (yuanjax.finetune.local_example), a few steps on the CPU.
`sweep()`: the learning rate.
"""
import os

from yuanjax import config_lib, finetune
from yuanjax.data import storage

VARIANTS = (None, 'gpu', 'runlocal')
# variant -> (mesh, grad_accum, devices the planner checks it on)
MESHES = {
    None: (dict(expert=8, tensor=4, data=1), 144, 32),
    'gpu': (dict(expert=8, fsdp=2, data=1), 72, 16),
}


def sft_model(m):
  """The released model as Yuan fine-tunes it: 16K positions (NTK base 40890), full recompute."""
  m.update(dict(max_seq_len=16384, rope_ntk_factor=4.0, remat='full'))
  return m


def sft_settings(config, mesh, grad_accum):
  """Yuan's SFT hyperparameters (module docstring) on `mesh`."""
  config.train.update(
      dict(num_steps=4220, batch_size=1152, seq_len=16384, grad_accum=grad_accum, log_every=10,
           eval_every=0, sample_tokens=0, init_from='Yuan2-M32-hf'))
  config.optimizer.update(
      dict(lr=8e-5, min_lr_ratio=1.0, warmup_steps=0, b1=0.9, b2=0.95, weight_decay=0.1,
           clip_norm=1.0))
  config.checkpoint.update(dict(every=200, keep=3))
  config.data.update(dict(path='sft_shards', fim_rate=0.0, chat_template='yuan2'))
  config.mesh.update(mesh)


# The held-out-style prompt a :runlocal run samples, per chat template (sft.prompt_ids's text).
SAMPLE_PROMPTS = {'yuan2': 'reverse: abcd<sep>', 'mistral': '[INST] reverse: abcd [/INST]'}


def runlocal(config, m, name: str):
  """A few CPU steps fine-tuning model `m` (random, saved in the HF layout on the fly under the
  cache, `name`) on the synthetic reverse task, in config.data.chat_template."""
  seq_len = 64
  template = config.data.chat_template
  root = os.path.join(storage.cache_root(), f'{name}-runlocal-v1')
  hf_dir, shards = finetune.local_example(root, m, seq_len, template)
  config.model = finetune.source_model(hf_dir)
  config.model.dtype = 'float32'
  config.train.update(dict(init_from=hf_dir, batch_size=16, seq_len=seq_len, grad_accum=1))
  config.optimizer.update(dict(lr=3e-3, warmup_steps=10, min_lr_ratio=1.0))
  config.data.update(dict(path=shards, fim_rate=0.0, eval_fraction=0.05))
  config.mesh.update(dict(expert=1, tensor=1, fsdp=1, data=-1))
  config_lib.short_run(config)
  config.train.sample_prompt = SAMPLE_PROMPTS[template]


def get_config(arg=None):
  config_lib.check_variant(arg, VARIANTS, 'configs/finetune_m32.py')
  config = config_lib.base_config()
  config.model = sft_model(config_lib.m32_model())
  sft_settings(config, *MESHES[None if arg == 'runlocal' else arg][:2])
  if arg == 'runlocal':
    m = config_lib.tiny_model()
    m.vocab_size = 128
    runlocal(config, m, 'finetune_m32')
  return config


def sweep():
  """The learning rate around Yuan's 8e-5."""
  return [{'optimizer.lr': lr} for lr in (4e-5, 8e-5, 1.6e-4)]
