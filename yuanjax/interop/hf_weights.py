"""The weight files of a Hugging Face checkpoint directory: lazy reading, sharded writing.

Reading (`HFWeights(dir)`), first match wins:
  model.safetensors.index.json  -> the .safetensors files it names
  *.safetensors                 -> all of them
  pytorch_model.bin.index.json  -> the .bin files it names   (read without torch: torch_bin.py)
  pytorch_model*.bin            -> all of them
Only headers are read up front; `get(name)` reads one tensor (safetensors `safe_open`, or a
memory-mapped storage record of a .bin file).

Writing (`SafetensorsShardWriter`): the tensors' names, shapes and dtypes are planned up
front and packed in order into shards of at most `max_shard_bytes` (a bigger tensor gets a
shard of its own), named `model-0000i-of-0000n.safetensors`, plus
`model.safetensors.index.json`. Tensors must then be `add`ed in plan order; each goes
straight to its file (the safetensors header is written from the plan), so nothing is
buffered. Files carry `{"format": "pt"}` metadata, which transformers requires.
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from yuanjax.interop import torch_bin

SAFETENSORS_INDEX = 'model.safetensors.index.json'
BIN_INDEX = 'pytorch_model.bin.index.json'
_ST_DTYPES = {
    'F64': np.float64,
    'F32': np.float32,
    'F16': np.float16,
    'BF16': ml_dtypes.bfloat16,
    'I64': np.int64,
    'I32': np.int32,
    'I16': np.int16,
    'I8': np.int8,
    'U8': np.uint8,
    'BOOL': np.bool_,
}


def is_weight_file(name: str) -> bool:
  """True for weight files and their indexes (what `HFWeights` may read)."""
  return name.endswith(('.safetensors', '.bin')) or name in (SAFETENSORS_INDEX, BIN_INDEX)


def _files_from_index(path: str, index_name: str) -> list[str]:
  with open(os.path.join(path, index_name)) as f:
    weight_map = json.load(f)['weight_map']
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise FileNotFoundError(f'{path}/{index_name} names files that do not exist: {missing}')
  return [os.path.join(path, f) for f in files]


class HFWeights:
  """Every tensor of an HF checkpoint dir: `shapes` {name: (shape, dtype)}, `get(name)`."""

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
      self.format, files = 'safetensors', _files_from_index(path, SAFETENSORS_INDEX)
    elif glob.glob(os.path.join(path, '*.safetensors')):
      self.format, files = 'safetensors', sorted(glob.glob(os.path.join(path, '*.safetensors')))
    elif os.path.isfile(os.path.join(path, BIN_INDEX)):
      self.format, files = 'bin', _files_from_index(path, BIN_INDEX)
    elif glob.glob(os.path.join(path, 'pytorch_model*.bin')):
      self.format, files = 'bin', sorted(glob.glob(os.path.join(path, 'pytorch_model*.bin')))
    else:
      raise FileNotFoundError(
          f'{path}: no weights (expected {SAFETENSORS_INDEX}, *.safetensors, {BIN_INDEX} '
          'or pytorch_model*.bin)')
    self.files = files
    self.shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self._where: dict[str, str] = {}
    self._readers: dict[str, torch_bin.TorchBinFile] = {}
    duplicates = []
    for file in files:
      reader = self._open(file)
      for name, shape_dtype in reader.items():
        if name in self._where:
          duplicates.append(name)
        self.shapes[name] = shape_dtype
        self._where[name] = file
    if duplicates:
      raise ValueError(f'{path}: tensors stored in more than one file: {sorted(duplicates)}')

  def _open(self, file: str) -> dict:
    if self.format == 'bin':
      tb = self._readers[file] = torch_bin.TorchBinFile(file)
      return {n: (r.shape, r.dtype) for n, r in tb.tensors.items()}
    out = {}
    with safe_open(file, framework='numpy') as f:
      for name in f.keys():
        sl = f.get_slice(name)
        dtype = sl.get_dtype()
        if dtype not in _ST_DTYPES:
          raise ValueError(f'{file}: tensor {name} has unsupported dtype {dtype}')
        out[name] = (tuple(sl.get_shape()), np.dtype(_ST_DTYPES[dtype]))
    return out

  def get(self, name: str) -> np.ndarray:
    file = self._where[name]
    if self.format == 'bin':
      return self._readers[file].get(name)
    with safe_open(file, framework='numpy') as f:
      return f.get_tensor(name)


def parse_size(size: int | str) -> int:
  """Bytes from 5000000000, '5GB' (10^9) or '4GiB' (2^30); also KB/MB/KiB/MiB."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*', size, re.IGNORECASE)
  if not m:
    raise ValueError(f'cannot parse size {size!r} (examples: 5GB, 500MB, 4GiB, 1000000)')
  unit = (m.group(2) or 'B').upper()
  powers = {
      'B': 1,
      'KB': 10**3,
      'MB': 10**6,
      'GB': 10**9,
      'TB': 10**12,
      'KIB': 2**10,
      'MIB': 2**20,
      'GIB': 2**30,
      'TIB': 2**40
  }
  return int(float(m.group(1)) * powers[unit])


_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsShardWriter:
  """Streams planned tensors into size-capped safetensors shards, then writes the index.

  Each shard's header is known from the plan, so every tensor goes straight to its file when
  it is `add`ed (plan order): nothing beyond the tensor at hand is buffered.
  """

  def __init__(self, path: str, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               max_shard_bytes: int):
    self.path = path
    self.plan = [(n, tuple(int(d) for d in s), np.dtype(d)) for n, s, d in plan]
    shards, size = [[]], 0
    for entry in self.plan:
      nbytes = _nbytes(entry)
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append(entry)
      size += nbytes
    n = len(shards)
    self.shards = shards
    self.shard_files = [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
    self.weight_map = {
        e[0]: self.shard_files[i] for i, entries in enumerate(shards) for e in entries
    }
    self.total_size = sum(_nbytes(e) for e in self.plan)
    self._shard, self._pos, self._file = 0, 0, None

  def _open_shard(self) -> None:
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, shape, dtype in self.shards[self._shard]:
      end = offset + _nbytes((name, shape, dtype))
      header[name] = {
          'dtype': _ST_NAMES[dtype],
          'shape': list(shape),
          'data_offsets': [offset, end]
      }
      offset = end
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)  # the data starts 8-byte aligned
    self._file = open(os.path.join(self.path, self.shard_files[self._shard]), 'wb')
    self._file.write(len(blob).to_bytes(8, 'little') + blob)

  def add(self, name: str, array: np.ndarray) -> None:
    if self._shard >= len(self.shards):
      raise AssertionError(f'{name}: every planned tensor was already written')
    want = self.shards[self._shard][self._pos]
    if (name, tuple(array.shape), array.dtype) != want:
      raise AssertionError(f'expected {want}, got {(name, array.shape, array.dtype)}')
    if self._file is None:
      self._open_shard()
    self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self._pos += 1
    if self._pos == len(self.shards[self._shard]):
      self._file.close()
      self._file, self._shard, self._pos = None, self._shard + 1, 0

  def close(self) -> None:
    if self._shard != len(self.shards):
      raise AssertionError(f'shard {self._shard + 1} of {len(self.shards)} is incomplete')
    index = {
        'metadata': {
            'total_size': self.total_size
        },
        'weight_map': dict(sorted(self.weight_map.items()))
    }
    with open(os.path.join(self.path, SAFETENSORS_INDEX), 'w') as f:
      json.dump(index, f, indent=2)
      f.write('\n')


def _nbytes(entry) -> int:
  _, shape, dtype = entry
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
