"""Import, export and load the released Yuan2-M32-hf checkpoint (and any HF Yuan MoE checkpoint).

Commands:
  python -m yuanjax.convert from-hf SRC DST [--overwrite] [--compress]
  python -m yuanjax.convert to-hf SRC DST [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

Python:
  from yuanjax.interop import hf
  model, params = hf.load(path)          # path: an HF dir or a converted (from-hf) dir
  model, params = hf.load(path, exact_hf_rope=True)   # HF's bfloat16 rotary rounding (quirk 3)
  logits_BxLxV, aux = model.apply({'params': params}, tokens_BxL)
  tokenizer = hf.load_tokenizer(path)    # yuanjax.data.tokenizer.Tokenizer, newline_token='<n>'
  # text: yuanjax.generate (python -m yuanjax.generate --checkpoint path --prompt ...)

A converted checkpoint (DST of from-hf):
  DST/config.json   {"format": "yuanjax-hf/1",
                     "model": config.model (every field of config_lib.m32_model()),
                     "hf": {"config": the source config.json verbatim,
                            "dtype": the source tensors' dtype, "dtype_overrides": {name: dtype},
                            "has_lm_head": bool, "weight_format": "safetensors" | "bin",
                            "source": SRC}}
  DST/config.py     an ml_collections config file (`--config DST/config.py`): config.model
  DST/params/       orbax PyTree checkpoint of the unboxed params, the layout
                    `ocp.StandardCheckpointer().save(DST/'params', params)` writes; restore with
                    ocp.StandardCheckpointer().restore(DST/'params', abstract_params(config.model))
                    (= `restore_params`; abstract leaves with shardings give sharded jax.Arrays).
                    Leaves are stored in the source dtype when param_dtype holds it exactly
                    (bf16 for M32: half the disk and memory); orbax casts to the abstract
                    dtype (float32) on restore. Chunks <= 256 MiB, split along layers/experts.
  DST/hf_files/     the source's other small files (tokenizer.model, modelling code, ...)

from-hf reads config.json and the weights lazily (hf_weights.py; .bin without torch), checks
every tensor name/shape/dtype and the tied lm_head before writing anything (one error lists
every missing, unexpected, mis-shaped and mis-typed tensor), then builds one param leaf at a
time (stacked over layers) and adds it to the orbax checkpoint with orbax's partial saving.
Peak host memory: about twice the largest stacked leaf in its stored dtype (tensorstore copies
a leaf into its chunks while writing) = the largest leaf in float32; M32: experts' w1
[24, 32, 2048, 16384] bf16 = 51.5 GB, so ~103 GB. Everything is written to DST.tmp-* next to
DST and renamed at the end; an existing DST is an error unless --overwrite.

to-hf writes safetensors shards (model-0000i-of-0000n.safetensors, at most --max-shard-size
each), model.safetensors.index.json and config.json (the imported source's config.json with
the size fields refreshed, else the released M32 values), plus DST/hf_files/ from an import.
The dtype is the imported source's (per tensor) unless --dtype says otherwise (default then
bfloat16). Tensors stream straight into their shard files: peak host memory is one stored
leaf plus a chunk. HF -> yuanjax -> HF reproduces every tensor bit for bit (only transposes
and permutations; bf16/f16 -> f32 -> bf16/f16 is exact). Mapping details: hf_mapping.py.

`hf.load` on an HF dir converts in memory (the whole model in param_dtype); for M32, convert
first and restore with shardings (`restore_params`).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tempfile
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

from yuanjax import config_lib
from yuanjax.interop import hf_mapping
from yuanjax.interop.hf_mapping import EMBED, LM_HEAD, HFConfigError, model_config_from_hf
from yuanjax.interop.hf_weights import HFWeights, SafetensorsShardWriter, is_weight_file, parse_size
from yuanjax.model import Transformer

log = logging.getLogger(__name__)

FORMAT = 'yuanjax-hf/1'
SUPPORTED_DTYPES = ('float32', 'bfloat16', 'float16')
AUX_FILE_MAX_BYTES = 64 << 20
CHUNK_BYTES = 256 << 20
_STANDARD_HANDLER = 'orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler'
_CONFIG_PY = '''"""yuanjax config of a checkpoint converted from Hugging Face (`python -m yuanjax.convert from-hf`).

  --config {dir}/config.py   config_lib.base_config() with config.model as stored in the
                             config.json next to this file
  params: {dir}/params       (yuanjax.interop.hf.restore_params)
  tokenizer: {dir}/hf_files/tokenizer.model if the source had one; Yuan's tokenizer writes
             newlines as '<n>' (yuanjax.interop.hf.load_tokenizer does that)
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


def is_converted(path) -> bool:
  """True for a from-hf output dir (config.json with our "format" key)."""
  cfg = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg):
    return False
  with open(cfg) as f:
    return json.load(f).get('format') == FORMAT


def abstract_params(m: ml_collections.ConfigDict) -> dict:
  """Unboxed ShapeDtypeStructs of `Transformer(m).init(...)['params']` (nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return nn.unbox(jax.eval_shape(Transformer(m).init, jax.random.key(0), tokens)['params'])


def _check_against_model(m) -> None:
  """The mapping must produce exactly the model's param tree (guards against model changes)."""
  model = {tuple(k.key for k in path): tuple(leaf.shape)
           for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(m))}
  ours = hf_mapping.leaf_shapes(m)
  only_model = sorted(set(model.items()) - set(ours.items()))
  only_ours = sorted(set(ours.items()) - set(model.items()))
  if only_model or only_ours:
    fmt = lambda items: ', '.join(f'{"/".join(p)} {list(s)}' for p, s in items) or 'none'
    raise AssertionError(f'the HF mapping and Transformer(config.model) params disagree: only in the '
                         f'model: {fmt(only_model)}; only in the mapping: {fmt(only_ours)}')


def _nest(flat: Mapping[tuple[str, ...], object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def _check_dst(dst: str, overwrite: bool) -> None:
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f'{dst} exists; pass --overwrite (overwrite=True) to replace it')


def _tmp_dir_for(dst: str) -> str:
  parent = os.path.dirname(dst) or '.'
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=os.path.basename(dst) + '.tmp-', dir=parent)


def _commit(tmp: str, dst: str, overwrite: bool) -> None:
  """Renames the finished tmp dir to dst (moving an old dst aside first when overwriting)."""
  _check_dst(dst, overwrite)
  old = None
  if os.path.lexists(dst):
    old = tempfile.mkdtemp(prefix=os.path.basename(dst) + '.old-', dir=os.path.dirname(dst) or '.')
    os.rmdir(old)
    os.rename(dst, old)
  os.rename(tmp, dst)
  if old:
    shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def _fix_permissions(tmp: str) -> None:
  """mkdtemp makes a 0700 dir: give it (and the files in it) the modes the umask asks for."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  for name in os.listdir(tmp):
    path = os.path.join(tmp, name)
    if os.path.isfile(path) and not os.path.islink(path):
      os.chmod(path, 0o666 & ~umask)


def _in_tmp_dir(dst: str, overwrite: bool, write: Callable[[str], None]) -> None:
  _check_dst(dst, overwrite)
  tmp = _tmp_dir_for(dst)
  try:
    write(tmp)
    _fix_permissions(tmp)
    _commit(tmp, dst, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
    if (not os.path.isfile(path) or is_weight_file(name) or name == 'config.json' or name in skip
        or os.path.getsize(path) > AUX_FILE_MAX_BYTES):
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


def check_hf_weights(weights: HFWeights, m: ml_collections.ConfigDict, src: str = '') -> None:
  """Raises HFCheckpointError listing every missing, unexpected, mis-shaped or mis-typed tensor,
  or an lm_head that is not equal to the embedding (yuanjax ties them)."""
  expected = hf_mapping.hf_shapes(m)
  expected_lm = (m.vocab_size, m.hidden_size)
  present = weights.shapes
  ignored = lambda n: n.endswith('rotary_emb.inv_freq')   # a buffer some HF versions saved
  missing = [f'{n} [expected {list(s)}]' for n, s in expected.items() if n not in present]
  unexpected = [f'{n} {list(s)} {d}' for n, (s, d) in present.items()
                if n not in expected and n != LM_HEAD and not ignored(n)]
  misshaped = [f'{n}: expected {list(expected.get(n, expected_lm))}, found {list(s)}'
               for n, (s, _) in present.items()
               if (n in expected or n == LM_HEAD) and tuple(s) != tuple(expected.get(n, expected_lm))]
  bad_dtype = [f'{n}: {d}' for n, (_, d) in present.items()
               if (n in expected or n == LM_HEAD) and d.name not in SUPPORTED_DTYPES]
  lines = []
  for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped),
                       (f'not one of {SUPPORTED_DTYPES}', bad_dtype)):
    if items:
      lines += [f'  {title} ({len(items)}):'] + _fmt(items)
  if lines:
    raise HFCheckpointError(
        f'{src or "checkpoint"}: the weights do not match config.json (hidden_size={m.hidden_size}, '
        f'heads={m.num_heads} x head_dim={m.head_dim}, layers={m.num_layers}, experts={m.num_experts}, '
        f'ffn={m.moe.ffn_size}, vocab={m.vocab_size}); nothing was written:\n' + '\n'.join(lines))
  if LM_HEAD in present:
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


def _build_group(g: hf_mapping.Group, get: Callable[[str], np.ndarray], num_layers: int,
                 dtype) -> list[np.ndarray]:
  """The group's yuanjax leaves (stacked over layers when per-layer), in `dtype`."""
  dtype = np.dtype(dtype)
  read = lambda name: _bits(get(name).astype(dtype, copy=False))
  if not g.per_layer:
    return [np.ascontiguousarray(a).view(dtype) for a in g.to_jax(*[read(n) for n in g.names(None)])]
  outs = [np.empty((num_layers, *s), _bits(np.empty(0, dtype)).dtype) for s in g.leaf_shapes]
  for i in range(num_layers):
    for out, a in zip(outs, g.to_jax(*[read(n) for n in g.names(i)])):
      out[i] = a
  return [o.view(dtype) for o in outs]


def _storage_dtype(g: hf_mapping.Group, weights: HFWeights, num_layers: int, param_dtype) -> np.dtype:
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
  m = model_config_from_hf(hf_cfg)
  weights = HFWeights(src)
  check_hf_weights(weights, m, src)
  _check_against_model(m)
  return hf_cfg, m, weights


def params_from_hf(src: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config.model, params as NumPy arrays) of an HF dir, converted in memory."""
  _, m, weights = _open_hf(src)
  pdtype = np.dtype(m.param_dtype)
  flat = {}
  for g in hf_mapping.tensor_groups(m):
    flat.update(zip(g.leaves, _build_group(g, weights.get, m.num_layers, pdtype)))
  return m, _nest(flat)


# ---------------------------------------------------------------- import


def _finish_orbax(partial_path: str, params_dir: str) -> None:
  """Finalizes the partial save and moves its PyTree dir to params_dir (a plain
  StandardCheckpointer layout)."""
  ocp_partial.finalize(partial_path)
  trees = [d for d in os.listdir(partial_path)
           if os.path.isfile(os.path.join(partial_path, d, '_METADATA'))]
  if len(trees) != 1:
    raise AssertionError(f'unexpected orbax partial-save layout in {partial_path}: {os.listdir(partial_path)}')
  os.rename(os.path.join(partial_path, trees[0]), params_dir)
  now = time.time_ns()
  _write_json(os.path.join(params_dir, '_CHECKPOINT_METADATA'), {
      'item_handlers': _STANDARD_HANDLER, 'metrics': {}, 'performance_metrics': {},
      'init_timestamp_nsecs': now, 'commit_timestamp_nsecs': now, 'custom_metadata': {}})
  shutil.rmtree(partial_path)


def _orbax_save_context(ndim: int, compress: bool) -> ocpv1.Context:
  """How each group is written: no defensive copy of the leaf (we do not mutate it while it
  is written); chunks of at most CHUNK_BYTES split along layers (then experts/the 2nd axis)
  first, so a sharded restore reads only what it needs and to-hf holds one chunk beyond the
  leaf (tensorstore copies a leaf into its chunks once while writing); no zstd unless asked
  (it also buffers the compressed leaf, and is ~5x slower)."""
  storage = ocpv1.options.ArrayOptions.Saving.StorageOptions(
      chunk_byte_size=CHUNK_BYTES, shard_axes=(0, 1) if ndim >= 3 else (0,))
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
  _check_dst(dst, overwrite)
  hf_cfg, m, weights = _open_hf(src)
  main_dtype, overrides = _dtype_record(weights)
  pdtype = np.dtype(m.param_dtype)
  log.info('%s: %d tensors (%s, %s) -> %s', src, len(weights.shapes), weights.format, main_dtype, dst)

  def write(tmp):
    partial_path = os.path.join(tmp, 'params.partial')
    for g in hf_mapping.tensor_groups(m):
      t0 = time.time()
      dtype = _storage_dtype(g, weights, m.num_layers, pdtype)
      arrays = _build_group(g, weights.get, m.num_layers, dtype)
      with _orbax_save_context(arrays[0].ndim, compress):
        ocp_partial.save(partial_path, _nest(dict(zip(g.leaves, arrays))))
      log.info('  %s %s %s (%.1fs)', ', '.join('/'.join(p) for p in g.leaves),
               [list(a.shape) for a in arrays], dtype.name, time.time() - t0)
      del arrays
    _finish_orbax(partial_path, os.path.join(tmp, 'params'))
    _write_json(os.path.join(tmp, 'config.json'), {
        'format': FORMAT, 'model': m.to_dict(),
        'hf': {'config': hf_cfg, 'dtype': main_dtype, 'dtype_overrides': overrides,
               'has_lm_head': LM_HEAD in weights.shapes, 'weight_format': weights.format,
               'source': src}})
    with open(os.path.join(tmp, 'config.py'), 'w') as f:
      f.write(_CONFIG_PY.format(dir=dst))
    _copy_aux_files(src, os.path.join(tmp, 'hf_files'))

  _in_tmp_dir(dst, overwrite, write)
  log.info('wrote %s', dst)


# ---------------------------------------------------------------- export


def _write_hf(dst: str, m: ml_collections.ConfigDict, get_leaves: Callable, hf_meta: dict,
              dtype: str | None, max_shard_size, overwrite: bool, aux_dir: str | None) -> None:
  """Writes an HF dir; get_leaves(paths) -> the arrays of those param paths."""
  if dtype is not None and dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {SUPPORTED_DTYPES}')
  main = dtype or hf_meta.get('dtype', 'bfloat16')
  overrides = {} if dtype else hf_meta.get('dtype_overrides', {})
  hf_cfg = hf_mapping.hf_config_from_model(m, hf_meta.get('config'), main)
  _check_against_model(m)
  has_lm_head = hf_meta.get('has_lm_head', True)
  groups = hf_mapping.tensor_groups(m)
  plan = []
  for g in groups:
    for i in (range(m.num_layers) if g.per_layer else [None]):
      plan += [(n, s, overrides.get(n, main)) for n, s in zip(g.names(i), g.hf_shapes)]
    if has_lm_head and EMBED in g.hf_names:
      plan.append((LM_HEAD, g.hf_shapes[0], overrides.get(LM_HEAD, main)))
  np_dtype = {n: np.dtype(jnp.dtype(d)) for n, _, d in plan}

  def write_group(writer, g):
    raw = [np.asarray(x) for x in get_leaves(g.leaves)]
    if len({r.dtype for r in raw}) > 1:
      raw = [r.astype(np.float32) for r in raw]
    leaf_dtype, leaves = raw[0].dtype, [_bits(r) for r in raw]
    for i in (range(m.num_layers) if g.per_layer else [None]):
      per_layer = [leaf[i] for leaf in leaves] if g.per_layer else leaves
      for name, a in zip(g.names(i), g.to_hf(*per_layer)):
        a = np.ascontiguousarray(a).view(leaf_dtype)    # moved as bits, then cast
        writer.add(name, a.astype(np_dtype[name], copy=False))
        if name == EMBED and has_lm_head:
          writer.add(LM_HEAD, a.astype(np_dtype[LM_HEAD], copy=False))

  def write(tmp):
    writer = SafetensorsShardWriter(tmp, plan, parse_size(max_shard_size))
    for g in groups:
      write_group(writer, g)     # its leaves are freed on return
    writer.close()
    _write_json(os.path.join(tmp, 'config.json'), hf_cfg)
    if aux_dir:
      _copy_aux_files(aux_dir, tmp)
    log.info('%d tensors in %d shards (%s)', len(plan), len(writer.shard_files), main)

  _in_tmp_dir(os.path.abspath(dst), overwrite, write)


def save_hf(dst: str, model_config: ml_collections.ConfigDict, params, *, dtype: str = 'bfloat16',
            hf_config: dict | None = None, max_shard_size='5GB', overwrite: bool = False) -> None:
  """Writes in-memory params (boxed or not) of `model_config` as an HF checkpoint dir."""
  params = nn.unbox(params)

  def get_leaves(paths):
    out = []
    for path in paths:
      node = params
      for k in path:
        node = node[k]
      out.append(np.asarray(node))
    return out
  _write_hf(dst, model_config, get_leaves, {'config': hf_config}, dtype, max_shard_size,
            overwrite, None)


def _orbax_leaf_reader(params_dir: str, m: ml_collections.ConfigDict) -> Callable:
  abstract = abstract_params(m)

  def get_leaves(paths):
    flat = {}
    for path in paths:
      node = abstract
      for k in path:
        node = node[k]
      flat[path] = node
    item = _nest(flat)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    out = []
    for path in paths:
      node = tree
      for k in path:
        node = node[k]
      out.append(node)
    return out
  return get_leaves


def export_hf(src: str, dst: str, *, dtype: str | None = None, max_shard_size='5GB',
              overwrite: bool = False) -> None:
  """Converted yuanjax dir (from-hf layout) -> HF checkpoint dir (see the module docstring)."""
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  _check_dst(dst, overwrite)
  if not is_converted(src):
    raise FileNotFoundError(f'{src}: not a converted yuanjax checkpoint (config.json with '
                            f'"format": "{FORMAT}" and params/)')
  with open(os.path.join(src, 'config.json')) as f:
    saved = json.load(f)
  m = hf_mapping.model_config_from_saved(saved['model'])
  _write_hf(dst, m, _orbax_leaf_reader(os.path.join(src, 'params'), m), saved.get('hf', {}),
            dtype, max_shard_size, overwrite, os.path.join(src, 'hf_files'))
  log.info('wrote %s', dst)


# ---------------------------------------------------------------- load


def restore_params(path: str, abstract) -> dict:
  """Params of a converted dir restored onto `abstract` (ShapeDtypeStructs; with shardings
  they come back as sharded jax.Arrays, without as NumPy arrays)."""
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), 'params'), abstract)


def _apply_overrides(m: ml_collections.ConfigDict, overrides: Mapping[str, object]) -> None:
  for key, value in overrides.items():
    node = m
    *path, last = key.split('.')
    for k in path:
      node = node[k]
    if last not in node:
      raise KeyError(f'config.model has no field {key!r}')
    node[last] = value


def load(path: str, exact_hf_rope: bool = False, overrides: Mapping[str, object] | None = None):
  """(Transformer, params) from an HF dir or a converted dir.

  overrides: dotted config.model fields, e.g. {'dtype': 'float32', 'moe.dispatch': 'dense'}.
  exact_hf_rope: reproduce the released HF runtime's bfloat16 rotary rounding (spec, quirk 3:
  inv_freq, positions, angles and cos/sin rounded to bfloat16), for agreement with it; sets
  config.model.rope_hf_bf16. The default is exact float32 rotary.
  """
  path = os.fspath(path)
  if is_converted(path):
    with open(os.path.join(path, 'config.json')) as f:
      m = hf_mapping.model_config_from_saved(json.load(f)['model'])
    params = None
  else:
    m, params = params_from_hf(path)
  _apply_overrides(m, overrides or {})
  if exact_hf_rope:
    m.rope_hf_bf16 = True
  config_lib.validate_model(m)
  _check_against_model(m)
  if params is None:
    params = restore_params(path, abstract_params(m))
  pdtype = jnp.dtype(m.param_dtype)
  params = jax.tree.map(lambda a: jnp.asarray(a, pdtype), params)
  return Transformer(m), params


def load_tokenizer(path: str):
  """Yuan's SentencePiece tokenizer of an HF dir or a converted dir (tokenizer.model)."""
  from yuanjax.data.tokenizer import Tokenizer   # lazily: the data package is optional here
  for candidate in (os.path.join(path, 'tokenizer.model'),
                    os.path.join(path, 'hf_files', 'tokenizer.model')):
    if os.path.isfile(candidate):
      return Tokenizer(candidate, newline_token='<n>')
  raise FileNotFoundError(f'{path}: no tokenizer.model (nor hf_files/tokenizer.model)')


__all__ = ['FORMAT', 'HFCheckpointError', 'HFConfigError', 'abstract_params', 'check_hf_weights',
           'export_hf', 'import_hf', 'is_converted', 'load', 'load_tokenizer', 'model_config_from_hf',
           'params_from_hf', 'restore_params', 'save_hf']
