"""A direct NumPy transcription of the HF Yuan2-M32 forward pass, on the HF tensors.

Written from the paper (arXiv 2405.17976) and the released `yuan_moe_hf_model.py`, operation
by operation and in HF's layout (so it shares no code and no layout change with yuanjax):
float64 throughout, batch-first, no KV cache, positions 0..L-1, plain causal mask.

Also: tiny HF configs, random checkpoints in the exact HF layout (names, [out, in] linears,
conv weights [out, in, 2, 1]) and writers for safetensors (single file or sharded with index)
and for the torch zip format of pytorch_model*.bin (without torch).
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

f64 = np.float64


def tiny_hf_config(**kw) -> dict:
  """hidden 32, 2 heads x head_dim 32 (attention_projection_size 64 != hidden: rotary on
  hidden // heads = 16 of the 32 dims, quirk 2), 2 layers, 4 experts top-2, ffn 24, vocab 97."""
  c = {
      'architectures': ['YuanForCausalLM'],
      'model_type': 'yuan',
      'hidden_size': 32,
      'num_attention_heads': 2,
      'attention_projection_size': 64,
      'num_hidden_layers': 2,
      'vocab_size': 97,
      'rms_norm_eps': 1e-6,
      'max_position_embeddings': 64,
      'hidden_act': 'silu',
      'intermediate_size': 24,
      'torch_dtype': 'float32',
      'use_moe': True,
      'causal_mask': True,
      'eod_token': 77185,
      'sep_token': 77187,
      'use_flash_attention': False,
      'moe_config': {
          'moe_num_experts': 4,
          'moe_top_k': 2,
          'ffn_hidden_size': 24,
          'norm_topk_prob': True,
          'gated_linear_unit': True
      },
  }
  c.update(kw)
  return c


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """Every tensor of the HF checkpoint (spec's "HF checkpoint layout"), lm_head included."""
  D = c['hidden_size']
  P = c.get('attention_projection_size', D)
  E, F, V = c['moe_config']['moe_num_experts'], c['moe_config']['ffn_hidden_size'], c['vocab_size']
  s = {'model.embed_tokens.weight': (V, D)}
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    s.update({
        p + 'input_layernorm.weight': (D,),
        p + 'self_attn.q_proj.weight': (P, D),
        p + 'self_attn.k_proj.weight': (P, D),
        p + 'self_attn.v_proj.weight': (P, D),
        p + 'self_attn.o_proj.weight': (D, P),
        p + 'self_attn.lf_gate.conv1.weight': (D // 2, D, 2, 1),
        p + 'self_attn.lf_gate.conv1.bias': (D // 2,),
        p + 'self_attn.lf_gate.conv2.weight': (D, D // 2, 2, 1),
        p + 'self_attn.lf_gate.conv2.bias': (D,),
        p + 'self_attn.lf_gate.output_layernorm.weight': (D,),
        p + 'post_attention_layernorm.weight': (D,),
        p + 'mlp.gate.query.weight': (E, D),
        p + 'mlp.gate.key.weight': (E, D),
        p + 'mlp.gate.value.weight': (E, D),
    })
    for e in range(E):
      s[p + f'mlp.experts.{e}.w1.weight'] = (2 * F, D)
      s[p + f'mlp.experts.{e}.w2.weight'] = (D, F)
  s['model.norm.weight'] = (D,)
  s['lm_head.weight'] = (V, D)
  return s


def random_hf_tensors(c: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random weights; norms near 1, router weights bold enough to make routing matter."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in hf_shapes(c).items():
    if name == 'lm_head.weight':
      continue
    if name.endswith(('layernorm.weight', 'norm.weight')):
      a = 1.0 + 0.2 * rng.standard_normal(shape)
    elif '.gate.' in name:
      a = 0.4 * rng.standard_normal(shape)
    elif name.endswith('.bias'):
      a = 0.1 * rng.standard_normal(shape)
    else:
      a = rng.standard_normal(shape) / np.sqrt(shape[1])
    out[name] = a.astype(dtype)
  out['lm_head.weight'] = out['model.embed_tokens.weight'].copy()
  return out


# ---------------------------------------------------------------- the forward pass


def rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
  return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
  x = x - np.max(x, axis=axis, keepdims=True)
  e = np.exp(x)
  return e / np.sum(e, axis=axis, keepdims=True)


def conv2d_k2(x_BxLxC, w_OxIx2x1, b_O):
  """torch Conv2d(in, out, (2, 1), padding=(1, 0)) along the sequence, output cropped to L."""
  B, L, _ = x_BxLxC.shape
  xp = np.concatenate(
      [np.zeros((B, 1, x_BxLxC.shape[2])), x_BxLxC,
       np.zeros((B, 1, x_BxLxC.shape[2]))], 1)
  out = np.zeros((B, L + 1, w_OxIx2x1.shape[0]))
  for t in range(L + 1):
    for j in range(2):
      out[:, t] += xp[:, t + j] @ w_OxIx2x1[:, :, j, 0].T
  return out[:, :L] + b_O


def rotary_cos_sin(dim, L, base=10000.0, hf_bf16=False):
  """YuanRotaryEmbedding over `dim` dims. hf_bf16 (quirk 3, what the HF code really does):
  inv_freq and t = arange(L) are bfloat16, so is their outer product, and cos/sin of a
  bfloat16 tensor come out rounded to bfloat16."""
  inv_freq = 1.0 / (base**(np.arange(0, dim, 2, dtype=np.float32) / dim))
  t = np.arange(L, dtype=np.float32)
  if not hf_bf16:
    emb = np.tile(np.multiply.outer(t.astype(f64), inv_freq.astype(f64)), 2)
    return np.cos(emb), np.sin(emb)
  bf16 = ml_dtypes.bfloat16
  t, inv_freq = t.astype(bf16).astype(np.float32), inv_freq.astype(bf16).astype(np.float32)
  emb = np.tile(np.multiply.outer(t, inv_freq).astype(bf16).astype(np.float32), 2)
  return (np.cos(emb).astype(bf16).astype(f64), np.sin(emb).astype(bf16).astype(f64))


def rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(w: dict[str, np.ndarray], c: dict, tokens_BxL, hf_bf16_rope=False) -> np.ndarray:
  """Logits [B, L, V] in float64."""
  w = {k: np.asarray(v).astype(f64) for k, v in w.items()}
  D, H = c['hidden_size'], c['num_attention_heads']
  P = c.get('attention_projection_size', D)
  hd = P // H
  eps = c.get('rms_norm_eps', 1e-6)
  moe = c['moe_config']
  top_k = moe['moe_top_k']
  B, L = tokens_BxL.shape
  x = w['model.embed_tokens.weight'][tokens_BxL]
  rot_dim = D // H if hd != D // H else hd
  cos, sin = rotary_cos_sin(rot_dim, L, hf_bf16=hf_bf16_rope)
  causal = np.tril(np.ones((L, L), bool))
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    # --- attention (YuanAttention.forward)
    h = rms_norm(x, w[p + 'input_layernorm.weight'], eps)
    v = (h @ w[p + 'self_attn.v_proj.weight'].T).reshape(B, L, H, hd).transpose(0, 2, 1, 3)
    c1 = conv2d_k2(h, w[p + 'self_attn.lf_gate.conv1.weight'],
                   w[p + 'self_attn.lf_gate.conv1.bias'])
    c2 = conv2d_k2(c1, w[p + 'self_attn.lf_gate.conv2.weight'],
                   w[p + 'self_attn.lf_gate.conv2.bias'])
    f = rms_norm(c2 + h, w[p + 'self_attn.lf_gate.output_layernorm.weight'], 1e-6)
    qk = np.concatenate(
        [f @ w[p + 'self_attn.q_proj.weight'].T, f @ w[p + 'self_attn.k_proj.weight'].T], -1)
    qk = qk.reshape(B, L, H, qk.shape[-1] // H)
    q, k = qk[..., :hd].transpose(0, 2, 1, 3), qk[..., hd:].transpose(0, 2, 1, 3)
    q = np.concatenate(
        [q[..., :rot_dim] * cos + rotate_half(q[..., :rot_dim]) * sin, q[..., rot_dim:]], -1)
    k = np.concatenate(
        [k[..., :rot_dim] * cos + rotate_half(k[..., :rot_dim]) * sin, k[..., rot_dim:]], -1)
    scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
    o = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(B, L, P)
    x = x + o @ w[p + 'self_attn.o_proj.weight'].T
    # --- MoE (YuanMoeLayer.forward with ParallelAttention_router)
    h = rms_norm(x, w[p + 'post_attention_layernorm.weight'], eps).reshape(B * L, D)
    rq, rk, rv = (h @ w[p + f'mlp.gate.{n}.weight'].T for n in ('query', 'key', 'value'))
    attn = softmax(rq[:, :, None] * rk[:, None, :])  # [T, E, E]
    router_logits = np.einsum('tij,tj->ti', attn, rv)
    probs = softmax(router_logits)
    chosen = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]
    weights = np.take_along_axis(probs, chosen, -1)
    if moe['norm_topk_prob']:
      weights = weights / weights.sum(-1, keepdims=True)
    y = np.zeros_like(h)
    for t in range(B * L):
      for slot in range(top_k):
        e = chosen[t, slot]
        a = w[p + f'mlp.experts.{e}.w1.weight'] @ h[t]
        g, up = a[:a.shape[0] // 2], a[a.shape[0] // 2:]
        y[t] += weights[t, slot] * (w[p + f'mlp.experts.{e}.w2.weight'] @ (silu(g) * up))
    x = x + y.reshape(B, L, D)
  x = rms_norm(x, w['model.norm.weight'], eps)
  return x @ w['lm_head.weight'].T


# ---------------------------------------------------------------- writing checkpoints


def read_all(path) -> dict[str, np.ndarray]:
  """Every tensor of the *.safetensors files in `path`."""
  out = {}
  for file in sorted(os.listdir(path)):
    if file.endswith('.safetensors'):
      with safe_open(os.path.join(path, file), framework='numpy') as f:
        out.update({name: f.get_tensor(name) for name in f.keys()})
  return out


def assert_same_tensors(got: dict, want: dict) -> None:
  """The same names, dtypes, shapes and bytes."""
  assert sorted(got) == sorted(want)
  for name, a in want.items():
    assert (got[name].dtype, got[name].shape) == (a.dtype, a.shape), name
    assert got[name].tobytes() == a.tobytes(), name


def write_hf_dir(path, tensors: dict, config: dict, shards: int = 1, extra_files=None) -> None:
  """config.json + model.safetensors, or `shards` files with model.safetensors.index.json."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  names = list(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  else:
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
      fname = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
      save_file({names[j]: tensors[names[j]] for j in chunk}, os.path.join(path, fname),
                metadata={'format': 'pt'})
      weight_map.update({names[j]: fname for j in chunk})
    with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  for name, content in (extra_files or {}).items():
    mode = 'wb' if isinstance(content, bytes) else 'w'
    with open(os.path.join(path, name), mode) as f:
      f.write(content)


def yuan_sentencepiece(root, lines) -> bytes:
  """A 60-piece BPE sentencepiece model trained on `lines`, with Yuan's '<eod>', '<sep>', '<n>'
  (root/corpus.txt, root/tok.model); its bytes."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top  (optional elsewhere)
  corpus, prefix = os.path.join(root, 'corpus.txt'), os.path.join(root, 'tok')
  os.makedirs(root, exist_ok=True)
  with open(corpus, 'w') as f:
    f.write('\n'.join(lines))
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=60,
                                 user_defined_symbols=['<eod>', '<sep>', '<n>'], model_type='bpe',
                                 num_threads=1, minloglevel=2)
  with open(prefix + '.model', 'rb') as f:
    return f.read()


def write_yuan_dir_with_tokenizer(path, lines, seed: int) -> None:
  """A tiny Yuan HF dir (tiny_hf_config, random weights of `seed`) whose tokenizer.model is
  `yuan_sentencepiece` of `lines` (trained in `path`)."""
  config = tiny_hf_config()
  write_hf_dir(path, random_hf_tensors(config, seed=seed), config,
               extra_files={'tokenizer.model': yuan_sentencepiece(path, lines)})


_STORAGE_NAMES = {
    np.dtype(np.float32): 'FloatStorage',
    np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
    np.dtype(np.float16): 'HalfStorage'
}


@contextlib.contextmanager
def _fake_torch():
  """Stand-ins for the three globals torch.save pickles, so plain pickle writes them."""
  assert 'torch' not in sys.modules, 'real torch present: use torch.save instead'
  torch, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    raise NotImplementedError

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  for name in _STORAGE_NAMES.values():
    setattr(torch, name, type(name, (), {'__module__': 'torch'}))
  sys.modules['torch'], sys.modules['torch._utils'] = torch, utils
  try:
    yield torch
  finally:
    del sys.modules['torch'], sys.modules['torch._utils']


def write_torch_bin(path, tensors: dict, archive='archive') -> None:
  """A torch.save(state_dict) zip file (format of torch >= 1.6, pickle protocol 2), without torch.

  Tensors that are the same Python object share one storage (like tied weights); a tensor
  given as ('T', array) is stored transposed in its storage and pickled as a strided view.
  """
  with _fake_torch() as torch:
    storages, keys = [], {}

    class Storage:

      def __init__(self, data):
        self.data = data

    class Tensor:

      def __init__(self, storage, shape, stride):
        self.storage, self.shape, self.stride = storage, shape, stride

      def __reduce_ex__(self, proto):
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, self.stride, False,
                                                  collections.OrderedDict()))

    state = collections.OrderedDict()
    for name, value in tensors.items():
      transposed = isinstance(value, tuple)
      a = value[1] if transposed else value
      if id(a) not in keys:
        data = np.ascontiguousarray(a.T if transposed else a)
        keys[id(a)] = Storage(data)
        storages.append(keys[id(a)])
      st = keys[id(a)]
      if transposed:  # a 2-D array stored column-major
        stride = (1, a.shape[0])
      else:
        stride = tuple(int(np.prod(a.shape[d + 1:])) for d in range(a.ndim))
      state[name] = Tensor(st, tuple(a.shape), stride)

    def persistent_id(obj):
      if isinstance(obj, Storage):
        key = str(storages.index(obj))
        return ('storage', getattr(torch,
                                   _STORAGE_NAMES[obj.data.dtype]), key, 'cpu', obj.data.size)
      return None

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = persistent_id
    pickler.dump(state)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{archive}/data.pkl', buf.getvalue())
    zf.writestr(f'{archive}/byteorder', 'little')
    for key, st in enumerate(storages):
      zf.writestr(f'{archive}/data/{key}', st.data.tobytes())
    zf.writestr(f'{archive}/version', '3\n')
