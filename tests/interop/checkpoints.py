"""The tiny HF checkpoints the interop tests share, of both families, and their logits.

Yuan (hf_reference: hidden 32, 2 heads x head_dim 32, 2 layers, 4 experts top-2, vocab 97):
float32 in one safetensors file, bfloat16 in three shards with an index, bfloat16 in two torch
.bin files with an index (tied lm_head sharing the embedding's storage, one tensor stored
transposed). Mixtral (mixtral_reference: hidden 32, 4 heads / 2 kv heads x head_dim 8, untied
lm_head): float32 in one file with a Llama-style tokenizer, bfloat16 in three shards. Each is
written and converted (`python -m yuanjax.convert from-hf`) once per session (conftest.py).
"""
import dataclasses
import functools
import json
import os
import types

import jax
import ml_dtypes
import numpy as np

from tests.interop import hf_reference, mixtral_reference
from yuanjax import convert, loader

# (family, kind) -> (dtype, shards or 'bin')
KINDS = {
    ('yuan', 'safetensors-f32'): (np.float32, 1),
    ('yuan', 'sharded-bf16'): (ml_dtypes.bfloat16, 3),
    ('yuan', 'bin-bf16'): (ml_dtypes.bfloat16, 'bin'),
    ('mixtral', 'f32'): (np.float32, 1),
    ('mixtral', 'bf16-sharded'): (ml_dtypes.bfloat16, 3),
}
TOKENS = {
    'yuan': np.random.default_rng(7).integers(0, 97, (2, 13)),
    'mixtral': np.random.default_rng(11).integers(0, 97, (2, 13)),
}
F32 = {'dtype': 'float32'}


@dataclasses.dataclass(frozen=True)
class Family:
  reference: types.ModuleType  # forward(tensors, config, tokens) in NumPy
  config: object  # tiny HF config.json dict (**overrides)
  tensors: object  # random tensors (config, seed, dtype)
  seed: int


FAMILIES = {
    'yuan':
        Family(hf_reference, hf_reference.tiny_hf_config, hf_reference.random_hf_tensors, 3),
    'mixtral':
        Family(mixtral_reference, mixtral_reference.tiny_config, mixtral_reference.random_tensors,
               4),
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  family: str
  kind: str
  src: str  # the HF dir
  dst: str  # its conversion
  tensors: dict
  config: dict
  extra_files: tuple  # the source's other files (they travel to hf_files/ and back)

  @property
  def reference(self) -> types.ModuleType:
    return FAMILIES[self.family].reference

  @property
  def tokens(self) -> np.ndarray:
    return TOKENS[self.family]


def llama_style_tokenizer(root) -> bytes:
  """A sentencepiece model laid out as Mixtral's: <unk> 0, <s> 1, </s> 2, no <eod>; 97 pieces."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  (root / 'corpus.txt').write_text('\n'.join(f'line {i} of some text' for i in range(300)))
  spm.SentencePieceTrainer.train(input=str(root / 'corpus.txt'), model_prefix=str(root / 'tok'),
                                 vocab_size=97, model_type='bpe', byte_fallback=False,
                                 num_threads=1, minloglevel=2)
  return (root / 'tok.model').read_bytes()


def write_bin_dir(path, tensors, config):
  """Two pytorch_model-*.bin files + index; lm_head shares the embedding's storage, o_proj of
  layer 1 is stored transposed (a strided view)."""
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  tensors = dict(tensors)
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight']  # same object: shared storage
  first = [n for n in tensors if 'layers.1.' not in n and n != 'model.norm.weight']
  files = {
      'pytorch_model-00001-of-00002.bin': first,
      'pytorch_model-00002-of-00002.bin': [n for n in tensors if n not in first]
  }
  weight_map = {}
  for file, names in files.items():
    part = {
        n: ('T', tensors[n]) if n == 'model.layers.1.self_attn.o_proj.weight' else tensors[n]
        for n in names
    }
    hf_reference.write_torch_bin(os.path.join(path, file), part, archive=file[:-4])
    weight_map.update({n: file for n in names})
  with open(os.path.join(path, 'pytorch_model.bin.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)


def _extra_files(family: str, kind: str, root) -> dict:
  if family == 'yuan':
    return {'README.md': 'tiny\n'}
  return {'tokenizer.model': llama_style_tokenizer(root)} if kind == 'f32' else {}


def build(family: str, kind: str, root) -> Checkpoint:
  """Writes the (family, kind) HF checkpoint under `root` and converts it."""
  dtype, layout = KINDS[family, kind]
  fam = FAMILIES[family]
  config = fam.config(torch_dtype=np.dtype(dtype).name)
  tensors = fam.tensors(config, seed=fam.seed, dtype=dtype)
  src, dst = str(root / 'hf'), str(root / 'yj')
  extra = {} if layout == 'bin' else _extra_files(family, kind, root)
  if layout == 'bin':
    write_bin_dir(src, tensors, config)
  else:
    hf_reference.write_hf_dir(src, tensors, config, shards=layout, extra_files=extra)
  assert convert.main(['from-hf', src, dst, '-q']) == 0
  return Checkpoint(family, kind, src, dst, tensors, config, tuple(sorted(extra)))


@functools.lru_cache(maxsize=None)
def loaded(path, exact_hf_rope=False):
  return loader.load_model(str(path), overrides=F32, exact_hf_rope=exact_hf_rope)


_APPLY = {}  # config JSON -> jitted apply: checkpoints of one model share one compilation


def forward(model, params, tokens):
  key = model.config.to_json_best_effort(sort_keys=True)
  return np.asarray(_APPLY.setdefault(key, jax.jit(model.apply))({'params': params}, tokens)[0])


@functools.lru_cache(maxsize=None)
def logits_of(path, family: str, exact_hf_rope=False):
  """The float32 logits of the family's TOKENS from the HF or converted dir at `path`."""
  return forward(*loaded(str(path), exact_hf_rope), TOKENS[family])
