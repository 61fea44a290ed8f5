"""Yuan2.0-M32 pre-training as released: 24 layers, d 2048, 32 experts top-2 with the
Attention Router; seq 4096, global batch 1536, AdamW (0.9, 0.95, wd 0.1), lr 1e-4 -> 1e-5
cosine, 6400 warm-up steps, clip 1.0, bf16 compute, FIM 0.5 / SPM 0.5, no balancing loss.

  python -m yuanjax.stats --config configs/yuan_m32.py
  python -m yuanjax.data prepare --tokenizer tok.model --input 'corpus/*.parquet' --output shards
  gcloud storage cp tok.model gs://BUCKET/tok.model && gcloud storage cp -r shards gs://BUCKET/
  python -m yuanjax.train --config=configs/yuan_m32.py --workdir=gs://BUCKET/m32 \
      --config.data.path=gs://BUCKET/shards --config.data.tokenizer=gs://BUCKET/tok.model \
      --config.mesh.expert=8

A multi-process run of this config without `data.path` refuses to start (it would otherwise
train on the embedded stdlib corpus); launch/README.md has the whole v5p sequence.
  python -m yuanjax.train --config=configs/yuan_m32.py:runlocal --workdir=/tmp/m32-local

Variant `runlocal`: the same structure shrunk to run a few steps on a CPU.
Variant `slice`: the performance slice of docs/performance.md (train step): 2 layers
x 32 experts at the real M32 sizes, seq 4096 x batch 2, bf16 compute, capacity dispatch
(factor 1.25), no remat -- what `benchmarks/train_step.py` times and analyses:

  python benchmarks/train_step.py --config=configs/yuan_m32.py:slice [--compile_only]
Variant `long`: Yuan's 16K context (seq 16384, the NTK-aware rotary base 40890 from
rope_ntk_factor 4, remat full) with the same tokens per step (384 x 16384); 48 micro-batches of
8 rows: one row per device on 8 devices (docs/model.md, Attention backends):

  python -m yuanjax.plan --config=configs/yuan_m32.py:long --config.mesh.expert=8 \
      --config.mesh.fsdp=2 --devices=16 --device_kind=H100-80G
  python -m yuanjax.plan --config=configs/yuan_m32.py:long --config.mesh.expert=8 \
      --config.mesh.fsdp=4 --config.train.grad_accum=12 --devices=32 --device_kind='TPU v5p'
`sweep()`: the paper's Table 2 (8 / 16 / 32 experts, top-2, per-expert size fixed).
"""
from yuanjax import config_lib

VARIANTS = (None, 'runlocal', 'slice', 'long')


def get_config(arg=None):
  config_lib.check_variant(arg, VARIANTS, 'configs/yuan_m32.py')
  config = config_lib.m32_pretraining()
  if arg == 'runlocal':
    config_lib.runlocal(config, config_lib.tiny_model())
  elif arg == 'slice':
    config.model.num_layers = 2
    config.train.update(
        dict(num_steps=100, batch_size=2, seq_len=4096, log_every=10, eval_every=0, progress=False))
  elif arg == 'long':
    config.model.update(dict(max_seq_len=16384, rope_ntk_factor=4.0, remat='full'))
    config.train.update(dict(batch_size=384, seq_len=16384, grad_accum=48))
  return config


def sweep():
  """Paper Table 2: 8, 16, 32 experts at fixed per-expert size."""
  return [{'model.num_experts': e} for e in (8, 16, 32)]
