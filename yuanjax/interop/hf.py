"""Import and export Hugging Face checkpoints: Yuan2-M32-hf (any HF Yuan MoE) and Mixtral.

config.json's `model_type` picks the mapping (yuanjax.interop.mappings): 'yuan'
(hf_mapping.py: LFA, attention router, tied lm_head) or 'mixtral' (mixtral_mapping.py:
MixtralForCausalLM, standard GQA attention, linear router, untied lm_head); any other type is
an error naming it and the known ones, raised before anything is written.

Commands:
  python -m yuanjax.convert from-hf SRC DST [--overwrite] [--compress]
  python -m yuanjax.convert to-hf SRC DST [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

Python:
  from yuanjax.interop import hf
  hf.import_hf(src, dst)                 # = from-hf; the converted format: interop/converted.py
  hf.export_hf(dst, out)                 # = to-hf
  hf.save_hf(out, config.model, params)  # in-memory params -> an HF dir
  m, params = hf.params_from_hf(src)     # an HF dir converted in memory
  # loading any checkpoint (HF, converted, workdir) for use: yuanjax.loader

The converted format (DST of from-hf: config.json, config.py, params/ with one orbax leaf
per layer, hf_files/) is yuanjax.interop.converted's; its Orbax I/O is yuanjax.checkpoint's.

from-hf reads config.json and the weights lazily (hf_weights.py; .bin without torch), checks
every tensor name/shape/dtype and the lm_head before writing anything (one error lists every
missing, unexpected, mis-shaped and mis-typed tensor; Yuan: an lm_head.weight must equal the
embedding; Mixtral: lm_head.weight is required, a param of its own), then builds one layer at a
time (that layer's leaves of every per-layer param; first the non-layer params) and adds it to the
orbax checkpoint with orbax's partial saving (one save per layer: finalize merges each save,
and many small saves made it slow). Peak host memory: about twice one layer's leaves in their
stored dtype (tensorstore copies a leaf into its chunks while writing), or twice the
embedding if larger; M32 in bf16: a layer is w1 [32, 2048, 16384] 2.1 GB + w2 1.07 GB +
attention/router ~0.1 GB = 3.3 GB, so ~6.6 GB plus the runtime (JAX ~0.2 GB), where the
stacked layout needed ~103 GB. Measured on a synthetic 1.95 GB checkpoint (6 layers, layer
0.31 GB, stacked w1 1.21 GB; benchmarks/convert_memory.py): peak RSS 1.77 GB for from-hf and
1.23 GB for to-hf, 2.76 GB and 2.30 GB with the stacked layout; RSS also counts source file
pages mapped while reading, which the OS can reclaim. Everything is written to .DST.tmp-* next
to DST and renamed at the end (yuanjax.publish); an existing DST is an error unless --overwrite.

to-hf writes (in the model's format: Yuan for attention_type 'lfa', Mixtral for 'standard')
safetensors shards (model-0000i-of-0000n.safetensors, at most --max-shard-size each),
model.safetensors.index.json and config.json (the imported source's config.json with the size
fields refreshed, else the released M32 / Mixtral-8x7B values), plus DST/hf_files/ from an
import.
The dtype is the imported source's (per tensor) unless --dtype says otherwise (default then
bfloat16). Tensors stream straight into their shard files, read one layer of one param at a
time: peak host memory is one layer's leaf (M32: w1, 2.1 GB) plus a chunk. HF -> yuanjax ->
HF reproduces every tensor bit for bit (only transposes and permutations; bf16/f16 -> f32 ->
bf16/f16 is exact). Mapping details: hf_mapping.py.

`yuanjax.loader` on an HF dir converts in memory (the whole model in param_dtype); for M32,
convert first and restore with shardings.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import time
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from yuanjax import checkpoint, publish
from yuanjax.interop import converted, hf_mapping, mappings
from yuanjax.interop.hf_mapping import EMBED, LM_HEAD, HFConfigError
from yuanjax.interop.hf_weights import HFWeights, SafetensorsShardWriter, is_weight_file, parse_size
from yuanjax.model import attention

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ('float32', 'bfloat16', 'float16')
AUX_FILE_MAX_BYTES = 64 << 20


class HFCheckpointError(ValueError):
  """The weights do not match the config (every missing/unexpected/mis-shaped tensor listed)."""


# ---------------------------------------------------------------- shared helpers


def _copy_aux_files(src_dir: str, dst_dir: str, skip=()) -> list[str]:
  """Copies the small non-weight files of src_dir (tokenizer, modelling code, ...)."""
  copied = []
  if not os.path.isdir(src_dir):
    return copied
  for name in sorted(os.listdir(src_dir)):
    path = os.path.join(src_dir, name)
    if (not os.path.isfile(path) or is_weight_file(name) or name == 'config.json' or name in skip or
        os.path.getsize(path) > AUX_FILE_MAX_BYTES):
      continue
    os.makedirs(dst_dir, exist_ok=True)
    shutil.copy2(path, os.path.join(dst_dir, name))
    copied.append(name)
  return copied


# ---------------------------------------------------------------- reading HF


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{src}: no config.json')
  with open(path) as f:
    return json.load(f)


def _fmt(items, limit=100):
  lines = [f'      {x}' for x in items[:limit]]
  if len(items) > limit:
    lines.append(f'      ... and {len(items) - limit} more')
  return lines


def model_config_from_hf(c: dict, src: str = '') -> ml_collections.ConfigDict:
  """config.model for an HF config.json dict (read from `src`, named in errors), by its
  model_type (yuanjax.interop.mappings)."""
  return mappings.for_hf_config(c, src).model_config_from_hf(c)


def check_hf_weights(weights: HFWeights, m: ml_collections.ConfigDict, src: str = '') -> None:
  """Raises HFCheckpointError listing every missing, unexpected, mis-shaped or mis-typed tensor,
  or (Yuan: tied) an lm_head that is not equal to the embedding."""
  mapping = mappings.for_model(m)
  tied = mapping.TIED_LM_HEAD
  required = mapping.hf_shapes(m)
  optional = {LM_HEAD: (m.vocab_size, m.hidden_size)} if tied else {}
  expected = {**required, **optional}
  present = weights.shapes
  ignored = lambda n: n.endswith('rotary_emb.inv_freq')  # a buffer some HF versions saved
  missing = [f'{n} [expected {list(s)}]' for n, s in required.items() if n not in present]
  unexpected = [
      f'{n} {list(s)} {d}' for n, (s, d) in present.items() if n not in expected and not ignored(n)
  ]
  misshaped = [
      f'{n}: expected {list(expected[n])}, found {list(s)}' for n, (s, _) in present.items()
      if n in expected and tuple(s) != tuple(expected[n])
  ]
  bad_dtype = [
      f'{n}: {d}' for n, (_, d) in present.items()
      if n in expected and d.name not in SUPPORTED_DTYPES
  ]
  lines = []
  for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped),
                       (f'not one of {SUPPORTED_DTYPES}', bad_dtype)):
    if items:
      lines += [f'  {title} ({len(items)}):'] + _fmt(items)
  if lines:
    raise HFCheckpointError(
        f'{src or "checkpoint"}: the weights do not match config.json (hidden_size={m.hidden_size}, '
        f'heads={m.num_heads} x head_dim={m.head_dim}, '
        f'kv heads={attention.num_kv_heads(m)}, '
        f'layers={m.num_layers}, experts={m.num_experts}, '
        f'ffn={m.moe.ffn_size}, vocab={m.vocab_size}); nothing was written:\n' + '\n'.join(lines))
  if tied and LM_HEAD in present:
    embed, head = weights.get(EMBED), weights.get(LM_HEAD)
    if not np.array_equal(embed.astype(np.float32), head.astype(np.float32)):
      diff = float(np.max(np.abs(embed.astype(np.float32) - head.astype(np.float32))))
      raise HFCheckpointError(
          f'{src or "checkpoint"}: lm_head.weight differs from model.embed_tokens.weight (max |diff| '
          f'{diff:g}); yuanjax ties input and output embeddings, so an untied checkpoint cannot be '
          'imported; nothing was written')


def _dtype_record(weights: HFWeights) -> tuple[str, dict[str, str]]:
  counts = collections.Counter(d.name for _, d in weights.shapes.values())
  main = counts.most_common(1)[0][0]
  return main, {n: d.name for n, (_, d) in sorted(weights.shapes.items()) if d.name != main}


def _bits(a: np.ndarray) -> np.ndarray:
  """2-byte floats viewed as uint16: NumPy transposes those at native speed (values untouched)."""
  return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _build_layer(g: hf_mapping.Group, get: Callable[[str], np.ndarray], i: int | None,
                 dtype) -> list[np.ndarray]:
  """The group's yuanjax leaves for layer i (i=None: a group that is not per layer), in `dtype`."""
  dtype = np.dtype(dtype)
  read = lambda name: _bits(get(name).astype(dtype, copy=False))
  return [np.ascontiguousarray(a).view(dtype) for a in g.to_jax(*[read(n) for n in g.names(i)])]


def _build_group(g: hf_mapping.Group, get: Callable[[str], np.ndarray], num_layers: int,
                 dtype) -> list[np.ndarray]:
  """The group's yuanjax leaves (stacked over layers when per-layer), in `dtype`."""
  if not g.per_layer:
    return _build_layer(g, get, None, dtype)
  dtype = np.dtype(dtype)
  outs = [np.empty((num_layers, *s), dtype) for s in g.leaf_shapes]
  for i in range(num_layers):
    for out, a in zip(outs, _build_layer(g, get, i, dtype)):
      out[i] = a
  return outs


def _storage_dtype(g: hf_mapping.Group, weights: HFWeights, num_layers: int,
                   param_dtype) -> np.dtype:
  """The source dtype of the group when param_dtype holds it exactly (bf16/f16 in f32), else
  param_dtype: orbax casts to the target dtype on restore, and bf16 halves memory and disk."""
  param_dtype = np.dtype(param_dtype)
  names = [n for i in (range(num_layers) if g.per_layer else [None]) for n in g.names(i)]
  dtypes = {weights.shapes[n][1] for n in names}
  if len(dtypes) == 1:
    (d,) = dtypes
    if d == param_dtype or (param_dtype == np.float32 and d.name in ('bfloat16', 'float16')):
      return d
  return param_dtype


def _open_hf(src: str):
  """(hf config dict, config.model, weights) of an HF dir, fully checked."""
  hf_cfg = read_hf_config(src)
  m = model_config_from_hf(hf_cfg, os.path.join(src, 'config.json'))
  weights = HFWeights(src)
  check_hf_weights(weights, m, src)
  mappings.check_against_model(m)
  return hf_cfg, m, weights


def params_from_hf(src: str, place: Callable | None = None,
                   param_dtype=None) -> tuple[ml_collections.ConfigDict, dict]:
  """(config.model, params as NumPy arrays) of an HF dir, converted in memory.

  place(leaf path, NumPy array) -> what the tree holds instead (e.g. a jax.Array on its target
  sharding, yuanjax.loader), called group by group, so only one group's NumPy leaves are alive
  at a time; each group is then built in its storage dtype (the source's when param_dtype holds
  it exactly: `_storage_dtype`) and `place` casts. param_dtype: that of the target params
  (default config.model's)."""
  _, m, weights = _open_hf(src)
  pdtype = np.dtype(param_dtype or m.param_dtype)
  flat = {}
  for g in mappings.for_model(m).tensor_groups(m):
    if place is None:
      flat.update(zip(g.leaves, _build_group(g, weights.get, m.num_layers, pdtype)))
      continue
    dtype = _storage_dtype(g, weights, m.num_layers, pdtype)
    for path, a in zip(g.leaves, _build_group(g, weights.get, m.num_layers, dtype)):
      flat[path] = place(path, a)
  return m, converted.nest(flat)


# ---------------------------------------------------------------- import


def import_hf(src: str, dst: str, overwrite: bool = False, compress: bool = False) -> None:
  """HF checkpoint dir -> converted yuanjax dir (yuanjax.interop.converted).

  compress: zstd-compress the orbax arrays (about halves bf16-sourced float32 params on disk,
  costs host memory for the compressed leaf and time).
  """
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  publish.check_absent(dst, overwrite)
  hf_cfg, m, weights = _open_hf(src)
  main_dtype, overrides = _dtype_record(weights)
  pdtype = np.dtype(m.param_dtype)
  log.info('%s: %d tensors (%s, %s) -> %s', src, len(weights.shapes), weights.format, main_dtype,
           dst)

  def write(tmp):
    partial_path = os.path.join(tmp, 'params.partial')
    groups = mappings.for_model(m).tensor_groups(m)
    dtypes = [_storage_dtype(g, weights, m.num_layers, pdtype) for g in groups]
    # One partial save for the params that are not per layer, then one per layer holding that
    # layer's leaves of every per-layer param (few saves: orbax's finalize merges each one).
    for i in [None, *range(m.num_layers)]:
      t0 = time.time()
      flat = {}
      for g, dtype in zip(groups, dtypes):
        if g.per_layer == (i is not None):
          flat.update(
              zip(converted.stored_paths(g.leaves, i), _build_layer(g, weights.get, i, dtype)))
      converted.save_part(partial_path, flat, compress)
      log.info('  %s: %d leaves, %.2f GB (%.1fs)', 'global' if i is None else f'layer {i}',
               len(flat),
               sum(a.nbytes for a in flat.values()) / 1e9,
               time.time() - t0)
      del flat
    checkpoint.finish_parts(partial_path, os.path.join(tmp, 'params'))
    converted.write_config(
        tmp, m, {
            'config': hf_cfg,
            'dtype': main_dtype,
            'dtype_overrides': overrides,
            'has_lm_head': LM_HEAD in weights.shapes,
            'weight_format': weights.format,
            'source': src
        }, dst)
    _copy_aux_files(src, os.path.join(tmp, 'hf_files'))

  publish.directory(dst, write, overwrite)
  log.info('wrote %s', dst)


# ---------------------------------------------------------------- export


def _write_hf(dst: str, m: ml_collections.ConfigDict, get_leaves: Callable, hf_meta: dict,
              dtype: str | None, max_shard_size, overwrite: bool, aux_dir: str | None) -> None:
  """Writes an HF dir; get_leaves(paths, i) -> the arrays of those param paths for layer i
  (i=None: params that are not per layer)."""
  if dtype is not None and dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {SUPPORTED_DTYPES}')
  main = dtype or hf_meta.get('dtype', 'bfloat16')
  overrides = {} if dtype else hf_meta.get('dtype_overrides', {})
  mapping = mappings.for_model(m)
  hf_cfg = mapping.hf_config_from_model(m, hf_meta.get('config'), main)
  mappings.check_against_model(m)
  has_lm_head = mapping.TIED_LM_HEAD and hf_meta.get('has_lm_head', True)  # Yuan: tied copy
  groups = mapping.tensor_groups(m)
  plan = []
  for g in groups:
    for i in (range(m.num_layers) if g.per_layer else [None]):
      plan += [(n, s, overrides.get(n, main)) for n, s in zip(g.names(i), g.hf_shapes)]
    if has_lm_head and EMBED in g.hf_names:
      plan.append((LM_HEAD, g.hf_shapes[0], overrides.get(LM_HEAD, main)))
  np_dtype = {n: np.dtype(jnp.dtype(d)) for n, _, d in plan}

  def write_group(writer, g):
    for i in (range(m.num_layers) if g.per_layer else [None]):  # one layer in memory at a time
      raw = [np.asarray(x) for x in get_leaves(g.leaves, i)]
      if len({r.dtype for r in raw}) > 1:
        raw = [r.astype(np.float32) for r in raw]
      leaf_dtype = raw[0].dtype
      for name, a in zip(g.names(i), g.to_hf(*[_bits(r) for r in raw])):
        a = np.ascontiguousarray(a).view(leaf_dtype)  # moved as bits, then cast
        writer.add(name, a.astype(np_dtype[name], copy=False))
        if name == EMBED and has_lm_head:
          writer.add(LM_HEAD, a.astype(np_dtype[LM_HEAD], copy=False))

  def write(tmp):
    writer = SafetensorsShardWriter(tmp, plan, parse_size(max_shard_size))
    for g in groups:
      write_group(writer, g)
    writer.close()
    converted.write_json(os.path.join(tmp, 'config.json'), hf_cfg)
    if aux_dir:
      _copy_aux_files(aux_dir, tmp)
    log.info('%d tensors in %d shards (%s)', len(plan), len(writer.shard_files), main)

  publish.directory(os.path.abspath(dst), write, overwrite)


def save_hf(dst: str, model_config: ml_collections.ConfigDict, params, *, dtype: str = 'bfloat16',
            hf_config: dict | None = None, max_shard_size='5GB', overwrite: bool = False) -> None:
  """Writes in-memory params (boxed or not) of `model_config` as an HF checkpoint dir."""
  params = nn.unbox(params)

  def get_leaves(paths, i):
    return [
        np.asarray(converted.get(params, path) if i is None else converted.get(params, path)[i])
        for path in paths
    ]

  _write_hf(dst, model_config, get_leaves, {'config': hf_config}, dtype, max_shard_size, overwrite,
            None)


def export_hf(src: str, dst: str, *, dtype: str | None = None, max_shard_size='5GB',
              overwrite: bool = False) -> None:
  """Converted yuanjax dir (from-hf layout) -> HF checkpoint dir (see the module docstring)."""
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  publish.check_absent(dst, overwrite)
  if not converted.is_converted(src):
    raise FileNotFoundError(f'{src}: not a converted yuanjax checkpoint (config.json with '
                            f'"format": "{converted.FORMAT}" and params/)')
  converted.require_current_format(src)
  m, hf_record = converted.read(src)
  _write_hf(dst, m, converted.leaf_reader(src, m), hf_record, dtype, max_shard_size, overwrite,
            os.path.join(src, 'hf_files'))
  log.info('wrote %s', dst)


__all__ = [
    'HFCheckpointError', 'HFConfigError', 'check_hf_weights', 'export_hf', 'import_hf',
    'model_config_from_hf', 'params_from_hf', 'save_hf'
]
