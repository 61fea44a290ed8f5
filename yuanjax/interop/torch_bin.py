"""Read `torch.save` checkpoints (`pytorch_model*.bin`) with NumPy only: torch is not needed.

The released Yuan2-M32-hf weights are nine `pytorch_model-0000i-of-00009.bin` files whose
pickles use exactly three globals (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
`torch.BFloat16Storage`). Since torch 1.6 such a file is a zip archive:

  <archive>/data.pkl        the pickled state dict; each storage is a persistent id
                            ('storage', torch.<Type>Storage, key, location, numel)
  <archive>/data/<key>      the raw little-endian bytes of storage <key>
  <archive>/byteorder       'little' (absent in older files, which were all little-endian)

`TorchBinFile(path)` unpickles `data.pkl` with a restricted unpickler (only the globals above,
`torch._utils._rebuild_parameter` and the other `torch.*Storage` types are allowed, so a
malicious pickle cannot run code) into lazy `TensorRef`s; `get(name)` memory-maps the
storage record (records are stored uncompressed) and copies out just that tensor.

Anything else (the pre-1.6 non-zip format, other globals, nested checkpoints) raises
`TorchBinError` naming the file and suggesting `pip install torch==2.13.0`, with which the
file can be re-saved as safetensors.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'HalfStorage': np.dtype(np.float16),
    'DoubleStorage': np.dtype(np.float64),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
}
INSTALL_HINT = 'pip install torch==2.13.0'


class TorchBinError(ValueError):
  """A .bin file this reader cannot handle (the message says what and what to do)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor of a .bin file, not yet read: a strided view of one storage."""
  storage: _Storage
  offset: int  # in elements
  shape: tuple[int, ...]
  stride: tuple[int, ...]  # in elements

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                   tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, path):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise TorchBinError(
        f'{self._path}: the pickle uses {module}.{name}, which the torch-free reader does not '
        f'handle. Install torch ({INSTALL_HINT}) and re-save the weights as safetensors.')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and
            isinstance(pid[1], _StorageType)):
      raise TorchBinError(f'{self._path}: unsupported persistent id {pid!r} ({INSTALL_HINT})')
    _, storage_type, key, _location, numel = pid
    return _Storage(str(key), storage_type.dtype, int(numel))


class TorchBinFile:
  """A zip-format torch checkpoint holding a flat {name: tensor} state dict."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not zipfile.is_zipfile(self.path):
      raise TorchBinError(
          f'{self.path}: not a zip archive: the legacy (torch < 1.6) serialization format is not '
          f'supported without torch ({INSTALL_HINT}).')
    with zipfile.ZipFile(self.path) as zf:
      self._infos = {i.filename: i for i in zf.infolist()}
      pkls = [n for n in self._infos if n == 'data.pkl' or n.endswith('/data.pkl')]
      if len(pkls) != 1:
        raise TorchBinError(f'{self.path}: expected one data.pkl record, found {pkls}')
      self._prefix = pkls[0][:-len('data.pkl')]
      byteorder = self._prefix + 'byteorder'
      if byteorder in self._infos and zf.read(byteorder).strip() != b'little':
        raise TorchBinError(f'{self.path}: big-endian checkpoints are not supported')
      with zf.open(pkls[0]) as f:
        obj = _Unpickler(f, self.path).load()
    if not isinstance(obj, dict) or not all(isinstance(v, TensorRef) for v in obj.values()):
      raise TorchBinError(f'{self.path}: expected a flat state dict {{name: tensor}}')
    self.tensors: dict[str, TensorRef] = dict(obj)

  def _storage_bytes(self, key: str) -> np.ndarray:
    info = self._infos.get(f'{self._prefix}data/{key}')
    if info is None:
      raise TorchBinError(f'{self.path}: storage record data/{key} is missing')
    if info.compress_type != zipfile.ZIP_STORED:
      with zipfile.ZipFile(self.path) as zf:
        return np.frombuffer(zf.read(info), np.uint8)
    with open(self.path, 'rb') as f:  # the local header's lengths can differ from the central one
      f.seek(info.header_offset)
      header = f.read(30)
    name_len, extra_len = struct.unpack('<HH', header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if info.file_size == 0:
      return np.zeros((0,), np.uint8)
    return np.memmap(self.path, np.uint8, mode='r', offset=start, shape=(info.file_size,))

  def get(self, name: str) -> np.ndarray:
    """The tensor `name` as a fresh C-contiguous array (only its storage is mapped)."""
    ref = self.tensors[name]
    raw = self._storage_bytes(ref.storage.key)
    itemsize = ref.dtype.itemsize
    if raw.size < ref.storage.numel * itemsize:
      raise TorchBinError(f'{self.path}: storage of {name} is truncated')
    flat = raw[:ref.storage.numel * itemsize].view(ref.dtype)
    last = ref.offset + sum(
        (n - 1) * s for n, s in zip(ref.shape, ref.stride)) if all(ref.shape) else -1
    if ref.offset < 0 or last >= ref.storage.numel:
      raise TorchBinError(f'{self.path}: {name} reaches past its storage')
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.shape,
                                           strides=tuple(s * itemsize for s in ref.stride),
                                           writeable=False)
    return np.array(view, order='C')
