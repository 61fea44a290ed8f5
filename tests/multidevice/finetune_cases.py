"""The fine-tuning tests' source checkpoint and config (tests/test_finetune.py and the 8-device
worker, tests/multidevice/finetune_worker.py): a tiny random M32-structured model saved in the
HF layout (float32) and converted, and a short constant-lr run of it on the embedded corpus."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from yuanjax import config_lib, convert, finetune
from yuanjax.interop import hf
from yuanjax.model import Transformer

# The 8-device case (finetune_worker.py): experts over 4 devices, data over 2.
MESH, MESH_BATCH, MESH_STEPS = dict(data=2, expert=4), 8, 2


def source_model():
  m = config_lib.tiny_model()  # 8 experts: expert parallelism 4 divides them
  m.moe.capacity_factor = 8.0  # no slot dropped: any mesh routes every token alike
  return m


def write_source(root: str):
  """Random params of source_model() saved as ROOT/hf (HF layout) and ROOT/yj (converted)."""
  m = source_model()
  params = nn.unbox(Transformer(m).init(jax.random.key(5), jnp.zeros((1, 8), jnp.int32))['params'])
  hf.save_hf(os.path.join(root, 'hf'), m, params, dtype='float32')
  assert convert.main(['from-hf', os.path.join(root, 'hf'), os.path.join(root, 'yj'), '-q']) == 0
  return params


def config(init_from: str, cache: str, steps: int = 2, batch_size: int = 4, mesh=None):
  """A fine-tune of init_from: config.model the source's, float32, no slot dropped; constant
  lr (a run cut short and resumed has the same schedule as an uninterrupted one)."""
  c = config_lib.base_config()
  c.model = finetune.source_model(init_from)
  c.model.dtype = 'float32'
  c.model.moe.capacity_factor = 8.0
  c.train.update(
      dict(init_from=init_from, num_steps=steps, batch_size=batch_size, seq_len=32, log_every=1,
           eval_every=0, eval_steps=1, sample_tokens=0, progress=False))
  c.optimizer.update(dict(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0))
  c.checkpoint.update(dict(every=2, async_save=False))
  c.data.update(dict(cache_dir=cache, vocab_size=512, max_bytes=300_000, fim_rate=0.0))
  c.mesh.update(mesh or {})
  return c
