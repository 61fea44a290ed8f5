"""The converted checkpoint format: what `python -m yuanjax.convert from-hf SRC DST` writes.

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
                    `restore_params(DST, train_state.abstract_params(config.model))` restores the
                    layers and stacks them into the model's tree (abstract leaves with shardings
                    give sharded jax.Arrays: each layer restored sharded like the stacked leaf
                    minus its layers axis, stacked on device one param at a time); plain orbax
                    works too with the per-layer tree as target. Leaves are stored in the source
                    dtype when param_dtype holds it exactly (bf16 for M32: half the disk and
                    memory); orbax casts to the abstract dtype (float32) on restore. Chunks <=
                    256 MiB, split along the first axis (experts for w1/w2). Format
                    "yuanjax-hf/1" (one stacked leaf per param) is refused with a request to
                    re-run from-hf.
  DST/hf_files/     the source's other small files (tokenizer.model, modelling code, ...)

The saved config.model comes back through `config_lib.upgrade` (`read`); every Orbax read and
write goes through yuanjax.checkpoint (`restore_tree`, `stored_tree`, `save_part`,
`finish_parts`). HF import and export (yuanjax.interop.hf) write and read this format.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yuanjax import checkpoint, config_lib, train_state

FORMAT = 'yuanjax-hf/2'  # /1: one stacked leaf per param (refused)
CHUNK_BYTES = 256 << 20
_CONFIG_PY = '''"""yuanjax config of a checkpoint converted from Hugging Face (`python -m yuanjax.convert from-hf`).

  --config {dir}/config.py   config_lib.base_config() with config.model as stored in the
                             config.json next to this file
  params: {dir}/params       (yuanjax.interop.converted.restore_params)
  tokenizer: {dir}/hf_files/tokenizer.model if the source had one, with the model type's
             conventions (Yuan: newlines as '<n>'; Mixtral: '<s>' first, '</s>' ends a
             document): yuanjax.loader.load_tokenizer
"""
import json
import os

import ml_collections

from yuanjax import config_lib


def get_config(arg=None):
  del arg
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.json')) as f:
    saved = json.load(f)
  base = getattr(config_lib, 'base_config', None)
  config = base() if base else ml_collections.ConfigDict()
  config.model = config_lib.upgrade(saved['model'])
  if 'train' in config:
    config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
  return config
'''

# ---------------------------------------------------------------- the directory


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


def require_current_format(path) -> None:
  fmt = _saved_format(path)
  if fmt != FORMAT:
    raise ValueError(
        f'{path}: converted checkpoint of format {fmt!r}; this yuanjax reads {FORMAT!r} (one orbax '
        'leaf per layer, written and read one layer at a time). Re-run the conversion: '
        f'python -m yuanjax.convert from-hf SRC {path} --overwrite')


def read(path) -> tuple[ml_collections.ConfigDict, dict]:
  """(config.model, the "hf" record) of a converted dir; config.model through
  config_lib.upgrade (fields added since it was written get their old behaviour)."""
  with open(os.path.join(path, 'config.json')) as f:
    saved = json.load(f)
  return config_lib.upgrade(saved['model']), saved.get('hf', {})


def write_json(path: str, obj) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


def write_config(tmp: str, m: ml_collections.ConfigDict, hf_record: dict, dst: str) -> None:
  """config.json and config.py into `tmp` (published as `dst`)."""
  write_json(os.path.join(tmp, 'config.json'), {
      'format': FORMAT,
      'model': m.to_dict(),
      'hf': hf_record
  })
  with open(os.path.join(tmp, 'config.py'), 'w') as f:
    f.write(_CONFIG_PY.format(dir=dst))


# ---------------------------------------------------------------- the params tree


def nest(flat: Mapping[tuple[str, ...], object]) -> dict:
  """{('a', 'b'): x} -> {'a': {'b': x}}."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def get(tree, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def layer_key(i: int) -> str:
  """The key of layer i's leaf under a per-layer param's path in a converted checkpoint."""
  return str(i)


def stored_paths(leaves, i: int | None) -> list[tuple[str, ...]]:
  """Paths in the converted checkpoint of these param paths' leaves for layer i (None: not
  per layer)."""
  return list(leaves) if i is None else [leaf + (layer_key(i),) for leaf in leaves]


def save_part(partial_dir: str, flat: Mapping[tuple[str, ...], np.ndarray], compress: bool):
  """Adds leaves {stored path: array} to the params' partial save (one part per layer)."""
  checkpoint.save_part(partial_dir, nest(flat), chunk_bytes=CHUNK_BYTES, compress=compress)


def leaf_reader(path: str, m: ml_collections.ConfigDict) -> Callable:
  """get_leaves(paths, i): the leaves of those param paths for layer i (None: params that are
  not per layer) of a converted dir, in their stored dtypes, one layer at a time."""
  abstract = train_state.abstract_params(m)
  params_dir = os.path.join(path, 'params')

  def get_leaves(paths, i):
    flat = {}
    for p in paths:
      leaf = get(abstract, p)
      if i is None:
        flat[p] = leaf
      else:
        flat[p + (layer_key(i),)] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    tree = checkpoint.restore_tree(params_dir, nest(flat), cast=False)
    return [get(tree, p) for p in flat]

  return get_leaves


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
  train_state.abstract_params(config.model); with shardings they come back as sharded
  jax.Arrays, without as NumPy arrays), in the abstract dtypes.

  One param at a time: a per-layer param's layers are restored (sharded like the stacked leaf
  minus its layers axis) and stacked, so memory peaks at the params restored so far plus about
  twice the current one (on the devices when sharded, else on the host).
  """
  path = os.path.abspath(path)
  require_current_format(path)
  params_dir = os.path.join(path, 'params')
  stored = checkpoint.stored_tree(params_dir)

  def restore(kpath, leaf):
    keys = tuple(k.key for k in kpath)
    node = get(stored, keys)
    sharding = getattr(leaf, 'sharding', None)
    if not isinstance(node, Mapping):
      return get(checkpoint.restore_tree(params_dir, nest({keys: leaf})), keys)
    n = leaf.shape[0]
    if set(node) != {layer_key(i) for i in range(n)}:
      raise ValueError(f'{path}: {"/".join(keys)} has layers {sorted(node)} in the checkpoint, '
                       f'the model has {n}')
    part_sharding = _layer_sharding(sharding, leaf.ndim) if sharding is not None else None
    item = {
        layer_key(i): jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=part_sharding)
        for i in range(n)
    }
    parts = get(checkpoint.restore_tree(params_dir, nest({keys: item})), keys)
    parts = [parts.pop(layer_key(i)) for i in range(n)]
    if part_sharding is not None:
      return _stacker(sharding)(*parts)
    stacked = np.stack(parts)
    del parts
    return stacked if sharding is None else jax.device_put(stacked, sharding)

  return jax.tree_util.tree_map_with_path(restore, abstract)
