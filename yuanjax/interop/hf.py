"""Import, export and load Hugging Face checkpoints: Yuan2-M32-hf (any HF Yuan MoE) and Mixtral.

config.json's `model_type` picks the mapping (yuanjax.interop.mappings): 'yuan'
(hf_mapping.py: LFA, attention router, tied lm_head) or 'mixtral' (mixtral_mapping.py:
MixtralForCausalLM, standard GQA attention, linear router, untied lm_head); any other type is
an error naming it and the known ones, raised before anything is written.

Commands:
  python -m yuanjax.convert from-hf SRC DST [--overwrite] [--compress]
  python -m yuanjax.convert to-hf SRC DST [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

Python:
  from yuanjax.interop import hf
  model, params = hf.load(path)          # path: an HF dir or a converted (from-hf) dir
  model, params = hf.load(path, exact_hf_rope=True)   # HF's bfloat16 rotary rounding (quirk 3)
  logits_BxLxV, aux = model.apply({'params': params}, tokens_BxL)
  tokenizer = hf.load_tokenizer(path)    # yuanjax.data.tokenizer.Tokenizer: Yuan's '<n>'
                                         # newlines, or Mixtral's '<s>' / '</s>'
  # text: yuanjax.generate (python -m yuanjax.generate --checkpoint path --prompt ...)

A converted checkpoint (DST of from-hf):
  DST/config.json   {"format": "yuanjax-hf/2",
                     "model": config.model (every field of config_lib.m32_model()),
                     "hf": {"config": the source config.json verbatim,
                            "dtype": the source tensors' dtype, "dtype_overrides": {name: dtype},
                            "has_lm_head": bool, "weight_format": "safetensors" | "bin",
                            "source": SRC}}
  DST/config.py     an ml_collections config file (`--config DST/config.py`): config.model
  DST/params/       orbax PyTree checkpoint (the StandardCheckpointer layout) of the unboxed
                    params with ONE LEAF PER LAYER: each per-layer param (everything under
                    blocks/layer_0, stacked [num_layers, ...] in the model) is stored as a dict
                    {'0': layer 0's [...], '1': ..., }, e.g. blocks/layer_0/moe/w1/5 is layer
                    5's experts' w1 [E, D, 2F]; embedding and final_norm/scale are plain leaves.
                    `restore_params(DST, abstract_params(config.model))` restores the layers and
                    stacks them into the model's tree (abstract leaves with shardings give
                    sharded jax.Arrays: each layer restored sharded like the stacked leaf minus
                    its layers axis, stacked on device one param at a time); plain orbax works
                    too with the per-layer tree as target. Leaves are stored in the source dtype
                    when param_dtype holds it exactly (bf16 for M32: half the disk and memory);
                    orbax casts to the abstract dtype (float32) on restore. Chunks <= 256 MiB,
                    split along the first axis (experts for w1/w2). Format "yuanjax-hf/1" (one
                    stacked leaf per param) is refused with a request to re-run from-hf.
  DST/hf_files/     the source's other small files (tokenizer.model, modelling code, ...)

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

`hf.load` on an HF dir converts in memory (the whole model in param_dtype); for M32, convert
first and restore with shardings (`restore_params`).
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocpv1
from orbax.checkpoint.experimental.v1 import partial as ocp_partial

from yuanjax import config_lib, publish, train_state
from yuanjax.interop import hf_mapping, mappings
from yuanjax.interop.hf_mapping import EMBED, LM_HEAD, HFConfigError
from yuanjax.interop.hf_weights import HFWeights, SafetensorsShardWriter, is_weight_file, parse_size
from yuanjax.model import Transformer, attention

log = logging.getLogger(__name__)

FORMAT = 'yuanjax-hf/2'  # /1: one stacked leaf per param (refused)
SUPPORTED_DTYPES = ('float32', 'bfloat16', 'float16')
AUX_FILE_MAX_BYTES = 64 << 20
CHUNK_BYTES = 256 << 20
_STANDARD_HANDLER = 'orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler'
_CONFIG_PY = '''"""yuanjax config of a checkpoint converted from Hugging Face (`python -m yuanjax.convert from-hf`).

  --config {dir}/config.py   config_lib.base_config() with config.model as stored in the
                             config.json next to this file
  params: {dir}/params       (yuanjax.interop.hf.restore_params)
  tokenizer: {dir}/hf_files/tokenizer.model if the source had one, with the model type's
             conventions (Yuan: newlines as '<n>'; Mixtral: '<s>' first, '</s>' ends a
             document): yuanjax.interop.hf.load_tokenizer
"""
import json
import os

import ml_collections

from yuanjax import config_lib
from yuanjax.interop import hf_mapping


def get_config(arg=None):
  del arg
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.json')) as f:
    saved = json.load(f)
  base = getattr(config_lib, 'base_config', None)
  config = base() if base else ml_collections.ConfigDict()
  config.model = hf_mapping.model_config_from_saved(saved['model'])
  if 'train' in config:
    config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
  return config
'''


class HFCheckpointError(ValueError):
  """The weights do not match the config (every missing/unexpected/mis-shaped tensor listed)."""


# ---------------------------------------------------------------- shared helpers


def _saved_format(path) -> str | None:
  cfg = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg):
    return None
  with open(cfg) as f:
    fmt = json.load(f).get('format')
  return fmt if isinstance(fmt, str) else None


def is_converted(path) -> bool:
  """True for a from-hf output dir (config.json with a "format": "yuanjax-hf/..." key; one
  written by an older yuanjax counts too, and is then refused with a clear error on loading)."""
  return (_saved_format(path) or '').startswith('yuanjax-hf/')


def _require_current_format(path) -> None:
  fmt = _saved_format(path)
  if fmt != FORMAT:
    raise ValueError(
        f'{path}: converted checkpoint of format {fmt!r}; this yuanjax reads {FORMAT!r} (one orbax '
        'leaf per layer, written and read one layer at a time). Re-run the conversion: '
        f'python -m yuanjax.convert from-hf SRC {path} --overwrite')


def _get(tree, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


abstract_params = train_state.abstract_params  # unboxed ShapeDtypeStructs of the model's params


def _check_against_model(m) -> None:
  """The mapping must produce exactly the model's param tree (guards against model changes)."""
  model = {
      tuple(k.key for k in path): tuple(
          leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(m))
  }
  ours = mappings.for_model(m).leaf_shapes(m)
  only_model = sorted(set(model.items()) - set(ours.items()))
  only_ours = sorted(set(ours.items()) - set(model.items()))
  if only_model or only_ours:
    fmt = lambda items: ', '.join(f'{"/".join(p)} {list(s)}' for p, s in items) or 'none'
    raise AssertionError(
        f'the HF mapping and Transformer(config.model) params disagree: only in the '
        f'model: {fmt(only_model)}; only in the mapping: {fmt(only_ours)}')


def _nest(flat: Mapping[tuple[str, ...], object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def _write_json(path: str, obj) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


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


def _read_hf_config(src: str) -> dict:
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


def _layer_key(i: int) -> str:
  """The key of layer i's leaf under a per-layer param's path in a converted checkpoint."""
  return str(i)


def _stored_leaves(g: hf_mapping.Group, i: int | None) -> list[tuple[str, ...]]:
  """Paths in the converted checkpoint of the group's leaves for layer i (None: not per layer)."""
  return list(g.leaves) if i is None else [leaf + (_layer_key(i),) for leaf in g.leaves]


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
  hf_cfg = _read_hf_config(src)
  m = model_config_from_hf(hf_cfg, os.path.join(src, 'config.json'))
  weights = HFWeights(src)
  check_hf_weights(weights, m, src)
  _check_against_model(m)
  return hf_cfg, m, weights


def params_from_hf(src: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config.model, params as NumPy arrays) of an HF dir, converted in memory."""
  _, m, weights = _open_hf(src)
  pdtype = np.dtype(m.param_dtype)
  flat = {}
  for g in mappings.for_model(m).tensor_groups(m):
    flat.update(zip(g.leaves, _build_group(g, weights.get, m.num_layers, pdtype)))
  return m, _nest(flat)


# ---------------------------------------------------------------- import


def _finish_orbax(partial_path: str, params_dir: str) -> None:
  """Finalizes the partial save and moves its PyTree dir to params_dir (a plain
  StandardCheckpointer layout)."""
  ocp_partial.finalize(partial_path)
  trees = [
      d for d in os.listdir(partial_path)
      if os.path.isfile(os.path.join(partial_path, d, '_METADATA'))
  ]
  if len(trees) != 1:
    raise AssertionError(
        f'unexpected orbax partial-save layout in {partial_path}: {os.listdir(partial_path)}')
  os.rename(os.path.join(partial_path, trees[0]), params_dir)
  now = time.time_ns()
  _write_json(
      os.path.join(params_dir, '_CHECKPOINT_METADATA'), {
          'item_handlers': _STANDARD_HANDLER,
          'metrics': {},
          'performance_metrics': {},
          'init_timestamp_nsecs': now,
          'commit_timestamp_nsecs': now,
          'custom_metadata': {}
      })
  shutil.rmtree(partial_path)


def _orbax_save_context(compress: bool) -> ocpv1.Context:
  """How each partial save is written: no defensive copy of the leaves (we do not mutate them
  while they are written); chunks of at most CHUNK_BYTES split along the first axis (experts
  for w1/w2), so a sharded restore reads only what it needs and to-hf holds one chunk beyond
  the layer's leaf (tensorstore copies a leaf into its chunks once while writing); no zstd
  unless asked (it also buffers the compressed leaf, and is ~5x slower)."""
  storage = ocpv1.options.ArrayOptions.Saving.StorageOptions(chunk_byte_size=CHUNK_BYTES,
                                                             shard_axes=(0,))
  return ocpv1.Context(
      memory_options=ocpv1.options.MemoryOptions(deepcopy_host_arrays=False),
      array_options=ocpv1.options.ArrayOptions(saving=ocpv1.options.ArrayOptions.Saving(
          storage_options=storage, use_compression=compress)))


def import_hf(src: str, dst: str, overwrite: bool = False, compress: bool = False) -> None:
  """HF checkpoint dir -> converted yuanjax dir (layout in the module docstring).

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
          flat.update(zip(_stored_leaves(g, i), _build_layer(g, weights.get, i, dtype)))
      with _orbax_save_context(compress):
        ocp_partial.save(partial_path, _nest(flat))
      log.info('  %s: %d leaves, %.2f GB (%.1fs)', 'global' if i is None else f'layer {i}',
               len(flat),
               sum(a.nbytes for a in flat.values()) / 1e9,
               time.time() - t0)
      del flat
    _finish_orbax(partial_path, os.path.join(tmp, 'params'))
    _write_json(
        os.path.join(tmp, 'config.json'), {
            'format': FORMAT,
            'model': m.to_dict(),
            'hf': {
                'config': hf_cfg,
                'dtype': main_dtype,
                'dtype_overrides': overrides,
                'has_lm_head': LM_HEAD in weights.shapes,
                'weight_format': weights.format,
                'source': src
            }
        })
    with open(os.path.join(tmp, 'config.py'), 'w') as f:
      f.write(_CONFIG_PY.format(dir=dst))
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
  _check_against_model(m)
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
    _write_json(os.path.join(tmp, 'config.json'), hf_cfg)
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
        np.asarray(_get(params, path) if i is None else _get(params, path)[i]) for path in paths
    ]

  _write_hf(dst, model_config, get_leaves, {'config': hf_config}, dtype, max_shard_size, overwrite,
            None)


def _orbax_leaf_reader(params_dir: str, m: ml_collections.ConfigDict) -> Callable:
  """get_leaves(paths, i) of `_write_hf`: reads one layer's leaves (in their stored dtype)."""
  abstract = abstract_params(m)

  def get_leaves(paths, i):
    flat = {}
    for path in paths:
      leaf = _get(abstract, path)
      if i is None:
        flat[path] = leaf
      else:
        flat[path + (_layer_key(i),)] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = _partial_restore(ckptr, params_dir, _nest(flat), sharded=False, cast=False)
    return [_get(tree, p) for p in flat]

  return get_leaves


def export_hf(src: str, dst: str, *, dtype: str | None = None, max_shard_size='5GB',
              overwrite: bool = False) -> None:
  """Converted yuanjax dir (from-hf layout) -> HF checkpoint dir (see the module docstring)."""
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  publish.check_absent(dst, overwrite)
  if not is_converted(src):
    raise FileNotFoundError(f'{src}: not a converted yuanjax checkpoint (config.json with '
                            f'"format": "{FORMAT}" and params/)')
  _require_current_format(src)
  with open(os.path.join(src, 'config.json')) as f:
    saved = json.load(f)
  m = hf_mapping.model_config_from_saved(saved['model'])
  _write_hf(dst, m, _orbax_leaf_reader(os.path.join(src, 'params'), m), saved.get('hf', {}), dtype,
            max_shard_size, overwrite, os.path.join(src, 'hf_files'))
  log.info('wrote %s', dst)


# ---------------------------------------------------------------- load


def _partial_restore(ckptr, params_dir: str, item, *, sharded: bool, cast: bool = True):
  """Restores the sub-tree `item` (ShapeDtypeStructs) of params_dir: sharded jax.Arrays, or
  NumPy arrays in item's dtypes (cast) or in their stored dtypes (not cast)."""
  if sharded:
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  else:
    restore_args = jax.tree.map(
        lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype if cast else None), item)
  return ckptr.restore(
      params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                              partial_restore=True))


def _layer_sharding(sharding, ndim: int):
  """The sharding of one layer of a leaf sharded as `sharding` over [num_layers, ...]."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  return None  # anything else: the layers are read to host and placed once stacked


@functools.lru_cache(maxsize=None)
def _stacker(sharding):
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def restore_params(path: str, abstract) -> dict:
  """Params of a converted dir restored onto `abstract` (ShapeDtypeStructs, e.g.
  abstract_params(config.model); with shardings they come back as sharded jax.Arrays, without
  as NumPy arrays), in the abstract dtypes.

  One param at a time: a per-layer param's layers are restored (sharded like the stacked leaf
  minus its layers axis) and stacked, so memory peaks at the params restored so far plus about
  twice the current one (on the devices when sharded, else on the host).
  """
  path = os.path.abspath(path)
  _require_current_format(path)
  params_dir = os.path.join(path, 'params')
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(params_dir).item_metadata.tree

  def restore(kpath, leaf):
    keys = tuple(k.key for k in kpath)
    node = _get(stored, keys)
    sharding = getattr(leaf, 'sharding', None)
    if not isinstance(node, Mapping):
      with ocp.PyTreeCheckpointer() as ckptr:
        return _get(
            _partial_restore(ckptr, params_dir, _nest({keys: leaf}), sharded=sharding is not None),
            keys)
    n = leaf.shape[0]
    if set(node) != {_layer_key(i) for i in range(n)}:
      raise ValueError(f'{path}: {"/".join(keys)} has layers {sorted(node)} in the checkpoint, '
                       f'the model has {n}')
    part_sharding = _layer_sharding(sharding, leaf.ndim) if sharding is not None else None
    item = {
        _layer_key(i): jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=part_sharding)
        for i in range(n)
    }
    with ocp.PyTreeCheckpointer() as ckptr:
      parts = _get(
          _partial_restore(ckptr, params_dir, _nest({keys: item}), sharded=part_sharding
                           is not None), keys)
    parts = [parts.pop(_layer_key(i)) for i in range(n)]
    if part_sharding is not None:
      return _stacker(sharding)(*parts)
    stacked = np.stack(parts)
    del parts
    return stacked if sharding is None else jax.device_put(stacked, sharding)

  return jax.tree_util.tree_map_with_path(restore, abstract)


def load(path: str, exact_hf_rope: bool = False, overrides: Mapping[str, object] | None = None):
  """(Transformer, params) from an HF dir or a converted dir.

  The model computes in the checkpoint's own dtype (`torch_dtype` of its config.json; the
  source's for a converted dir) unless overrides set 'dtype'.
  overrides: dotted config.model fields, e.g. {'dtype': 'float32', 'moe.dispatch': 'dense'}.
  exact_hf_rope: reproduce the released HF runtime's bfloat16 rotary rounding (spec, quirk 3:
  inv_freq, positions, angles and cos/sin rounded to bfloat16), for agreement with it; sets
  config.model.rope_hf_bf16 (Yuan only: an error for Mixtral). The default is exact float32.
  """
  path = os.fspath(path)
  if exact_hf_rope and _mapping_of_dir(path) is not hf_mapping:  # before reading any weight
    raise ValueError(f'{path}: exact_hf_rope reproduces the HF Yuan runtime\'s bfloat16 rotary '
                     'angles (spec quirk 3); HF Mixtral computes its angles in float32')
  if is_converted(path):
    with open(os.path.join(path, 'config.json')) as f:
      saved = json.load(f)
    m, params = hf_mapping.model_config_from_saved(saved['model']), None
    hf_cfg = saved.get('hf', {}).get('config', {})
  else:
    m, params = params_from_hf(path)
    hf_cfg = _read_hf_config(path)
  source_dtype = hf_cfg.get('torch_dtype', hf_cfg.get('dtype'))  # 'dtype': transformers >= 5
  if source_dtype in SUPPORTED_DTYPES:
    m.dtype = source_dtype
  config_lib.override(m, overrides or {}, 'config.model')
  if exact_hf_rope:
    m.rope_hf_bf16 = True
  config_lib.validate_model(m)
  _check_against_model(m)
  if params is None:
    params = restore_params(path, abstract_params(m))
  pdtype = jnp.dtype(m.param_dtype)
  params = jax.tree.map(lambda a: jnp.asarray(a, pdtype), params)
  return Transformer(m), params


def _mapping_of_dir(path: str):
  """The mapping module of an HF dir (its model_type) or a converted dir (its model)."""
  if is_converted(path):
    with open(os.path.join(path, 'config.json')) as f:
      return mappings.for_model(hf_mapping.model_config_from_saved(json.load(f)['model']))
  return mappings.for_hf_config(_read_hf_config(path), os.path.join(path, 'config.json'))


def load_tokenizer(path: str, model_file: str | None = None):
  """The tokenizer of an HF dir or a converted dir, as the model's own runtime builds it
  (`tokenizer_options()` of its mapping), from its tokenizer.model or `model_file`.

  Yuan: newlines as '<n>', then the added tokens (tokenizer.YUAN_ADDED_TOKENS: one that the
  model lacks gets the next id past it, in order; each is encoded as one id).
  Mixtral: Llama's sentencepiece model as is, '<s>' first, '</s>' ends documents (eod_id).
  """
  from yuanjax.data import tokenizer  # lazily: the data package is optional here
  options = _mapping_of_dir(path).tokenizer_options()
  candidates = [model_file] if model_file else [
      os.path.join(path, 'tokenizer.model'),
      os.path.join(path, 'hf_files', 'tokenizer.model')
  ]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return tokenizer.Tokenizer(candidate, **options)
  raise FileNotFoundError(f'{path}: no tokenizer.model (nor hf_files/tokenizer.model)'
                          if not model_file else f'{model_file}: no such file')


__all__ = [
    'FORMAT', 'HFCheckpointError', 'HFConfigError', 'abstract_params', 'check_hf_weights',
    'export_hf', 'import_hf', 'is_converted', 'load', 'load_tokenizer', 'model_config_from_hf',
    'params_from_hf', 'restore_params', 'save_hf'
]
