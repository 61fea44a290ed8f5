"""Int8 weights for inference (`--quantize int8` of generation and evaluation): the one owner.

  params = quantize.quantize_params(params, config.model)   # matmul weights -> QInt8
  m, params = loader.load(path, quantize='int8')            # what generation loads

Weight-only, post-training, symmetric absmax with one float32 scale per output channel: for a
weight w contracted over axes C (its input), scale = max over C of |w| / 127 and values =
round(w / scale), int8 in [-127, 127], so |w - values * scale| <= scale / 2 everywhere (a
channel of zeros gets scale 1). The scale keeps w's rank (size 1 on C), so scanned layers'
leading axis slices values and scales alike.

The model is unchanged: it reads every weight as `w.astype(dtype)` (and the embedding table as
`w.take(ids, axis=0)`), which a `QInt8` answers by dequantizing (float32 values x scale, then
the compute dtype) inside the jitted forward, right where the weight is used: device memory
holds the int8 values and the scales, never a float copy of the whole model.

Which weights (`CONTRACTED`, by the param's logical axis names; 'layers' and the expert axes
are kept, so experts get a scale per expert and output channel):
  attention  wq, wk, wv [D, H, K] per (head, head dim); wo [H, K, D] per D
  LFA convs  [2, D, D/2] and [2, D/2, D] per tap and output channel: each tap is a D x D/2
             matmul read at every step (2 D^2 weights per layer, 5% of M32's non-expert ones)
  experts    w1 [E, D, 2F], w2 [E, F, D] (and shared experts, dense MLPs) per output column
  router     [D, E] per expert: its logits decide the routing, but int8's 0.4% per-weight error
             moves them far less than the experts' own outputs move (measured: test_quantize)
  embedding  [V, D] per row (vocabulary entry): a row is what the lookup reads and the tied
             LM head's output channel (its logit), so one scale serves both; an untied lm_head
             likewise. The largest non-expert weight (0.28 B of M32's params), read each step.
Kept in param_dtype: RMSNorm scales and the convs' biases (vectors). A param of any other
layout is an error naming it (a new weight must choose its contracted axes here).

Why not qwix (0.1.8, pinned in constraints.txt): its PTQ provider (`qwix.PtqProvider` with
a rule `weight_qtype='int8'`, `qwix.quantize_model` + `qwix.quantize_params`) on configs' tiny
model, 2026-12:
  - the LFA conv's `kernel[0]` is traced back to conv1_kernel and replaced by a 2-D int8 param
    under its 3-D logical partitioning: `model.init` fails (AssertionError);
  - the scanned layers: the axes to quantize are found on a layer's weight but applied to the
    stacked [layers, ...] param: wq's scale came out [1, D, H, 1] (per input channel, shared
    over layers and head dim) instead of [layers, 1, H, K], w1's [layers, 1, D, 1] instead of
    [layers, E, 1, 2F]: silently wrong;
  - `jnp.take` of the embedding gets qwix's WithAux: TypeError;
  - the dropless dispatch's `jax.lax.ragged_dot` is not intercepted by PTQ (only by its QAT
    provider) and the routers' `@` not at all: those weights stay float, silently.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yuanjax import train_state

MODES = ('none', 'int8')
f32 = jnp.float32
_QMAX = 127.0

# A weight's logical axes (without 'layers') -> the axes it contracts (its input).
CONTRACTED: dict[tuple[str, ...], tuple[str, ...]] = {
    ('embed', 'heads', 'kv'): ('embed',),  # attention wq, wk, wv
    ('heads', 'kv', 'embed'): ('heads', 'kv'),  # attention wo
    ('conv', 'embed', 'mlp'): ('embed',),  # LFA conv1 (per tap)
    ('conv', 'mlp', 'embed'): ('mlp',),  # LFA conv2
    ('expert', 'embed', 'mlp'): ('embed',),  # experts' w1
    ('expert', 'mlp', 'embed'): ('mlp',),  # experts' w2
    ('shared', 'embed', 'mlp'): ('embed',),  # shared experts' w1
    ('shared', 'mlp', 'embed'): ('mlp',),  # shared experts' w2
    ('embed', 'mlp'): ('embed',),  # dense MLP w1
    ('mlp', 'embed'): ('mlp',),  # dense MLP w2
    ('embed', 'router'): ('embed',),  # routers
    ('vocab', 'embed'): ('embed',),  # embedding (the tied LM head), lm_head
}


@flax.struct.dataclass
class QInt8:
  """An int8 weight: `values` (int8, the weight's shape) x `scale` (float32, the same rank,
  size 1 on the contracted axes). A pytree whose first leaf is `values`, so Flax's check of a
  param's shape against its init sees the weight's shape."""
  values: jax.Array
  scale: jax.Array

  def astype(self, dtype):
    """The dequantized weight in `dtype` (what the model's `w.astype(dtype)` reads)."""
    return (self.values.astype(f32) * self.scale).astype(dtype)

  def take(self, indices, axis: int = 0):
    """Dequantized rows (jnp.take along `axis`, a non-contracted axis): the embedding lookup
    reads only those rows' int8 values and scales. Float32, as the table's `take` would keep
    its dtype; the caller casts."""
    return (jnp.take(self.values, indices, axis=axis).astype(f32) *
            jnp.take(self.scale, indices, axis=axis))


def check_mode(mode, name: str = 'quantize') -> None:
  """ValueError naming `name` (the argument or flag) unless `mode` is one of MODES."""
  if mode not in MODES:
    raise ValueError(f'{name}={mode!r}: expected one of {MODES}')


def quantize_array(w, reduce_axes: tuple[int, ...]) -> QInt8:
  """Int8 values and float32 scales of `w` (a NumPy or jax array), per channel: the scale is
  the absmax over `reduce_axes` (the contracted axes) / 127. NumPy in, NumPy out."""
  xp = jnp if isinstance(w, jax.Array) else np
  w32 = w.astype(np.float32)
  absmax = xp.max(xp.abs(w32), axis=reduce_axes, keepdims=True)
  # x (1 / 127) as a float32 constant: XLA may turn a division by a constant into that
  # product; so the host and the device give the same scales, bit for bit.
  scale = xp.where(absmax > 0, absmax * np.float32(1 / _QMAX), np.float32(1)).astype(np.float32)
  values = xp.clip(xp.rint(w32 / scale), -_QMAX, _QMAX).astype(np.int8)
  return QInt8(values, scale)


def _names_by_path(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[str, ...]]:
  boxed = train_state.abstract_params(m, boxed=True)
  flat = flax.traverse_util.flatten_dict(boxed)
  return {path: tuple(leaf.names) for path, leaf in flat.items()}


def reduce_axes_of(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...] | None]:
  """Param path -> the axes its scale reduces over (`CONTRACTED`), or None for a param kept
  in param_dtype (a vector: a norm's scale, a bias). ValueError naming any other param."""
  out = {}
  for path, names in _names_by_path(m).items():
    layout = tuple(n for n in names if n != 'layers')
    if layout in CONTRACTED:
      out[path] = tuple(i for i, n in enumerate(names) if n in CONTRACTED[layout])
    elif len(layout) == 1:
      out[path] = None
    else:
      raise ValueError(f'quantize: params/{"/".join(path)} has logical axes {names}, which '
                       'yuanjax.quantize.CONTRACTED does not list (which axes does it contract?)')
  return out


@functools.partial(jax.jit, static_argnums=1)
def _quantize_on_device(w, reduce_axes):
  return quantize_array(w, reduce_axes)


def _quantize_host(w: np.ndarray, reduce_axes: tuple[int, ...]) -> QInt8:
  """A host leaf, one slice of its leading axis at a time when that axis is not reduced (the
  layers of a stacked weight; float32 work memory of one slice), then put on the device."""
  if 0 in reduce_axes:
    q = quantize_array(np.asarray(w), reduce_axes)
  else:
    inner = tuple(a - 1 for a in reduce_axes)
    parts = [quantize_array(np.asarray(w[i]), inner) for i in range(w.shape[0])]
    q = QInt8(np.stack([p.values for p in parts]), np.stack([p.scale for p in parts]))
  return QInt8(jnp.asarray(q.values), jnp.asarray(q.scale))


def _quantize_leaf(w, reduce_axes: tuple[int, ...], donate: bool) -> QInt8:
  """Host (NumPy) leaves quantized on the host; device leaves on their devices, the values
  keeping w's sharding (w deleted after if `donate`)."""
  if not isinstance(w, jax.Array):
    return _quantize_host(w, reduce_axes)
  q = _quantize_on_device(w, reduce_axes)
  q = QInt8(jax.device_put(q.values, w.sharding), q.scale)
  if donate:
    w.delete()
  return q


def quantize_params(params: Mapping, m: ml_collections.ConfigDict, mode: str = 'int8', *,
                    donate: bool = False):
  """Params of config.model `m` (unboxed; NumPy or jax arrays) with every matmul weight a
  `QInt8` (`reduce_axes_of`): host leaves quantized on the host (a layer at a time) and put
  on the default device, device leaves quantized where they are (and deleted one by one if
  `donate`: memory then peaks at the float params plus one int8 weight). The other params as
  jax arrays in m.param_dtype. mode 'none': the params as they are."""
  check_mode(mode)
  if mode == 'none':
    return params
  axes = reduce_axes_of(m)
  pdtype = jnp.dtype(m.param_dtype)
  flat = flax.traverse_util.flatten_dict(params)
  if set(flat) != set(axes):
    raise ValueError(f'quantize: the params are not those of config.model (differ at '
                     f'{sorted(set(flat) ^ set(axes))[:3]})')
  out = {}
  for path, w in flat.items():
    out[path] = jnp.asarray(w, pdtype) if axes[path] is None else _quantize_leaf(
        w, axes[path], donate)
  return flax.traverse_util.unflatten_dict(out)


def abstract_params(m: ml_collections.ConfigDict, mode: str = 'int8'):
  """ShapeDtypeStructs of the params `quantize_params` gives for config.model `m` (nothing
  allocated)."""
  check_mode(mode)
  abstract = train_state.abstract_params(m)
  if mode == 'none':
    return abstract
  reduce_axes = reduce_axes_of(m)

  def leaf(path, a):
    axes = reduce_axes[path]
    if axes is None:
      return a
    scale = tuple(1 if i in axes else n for i, n in enumerate(a.shape))
    return QInt8(jax.ShapeDtypeStruct(a.shape, jnp.int8), jax.ShapeDtypeStruct(scale, f32))

  flat = flax.traverse_util.flatten_dict(abstract)
  return flax.traverse_util.unflatten_dict({p: leaf(p, a) for p, a in flat.items()})


def param_bytes(params) -> int:
  """Bytes of a params tree (QInt8 leaves: values and scales)."""
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


def bytes_per_param(m: ml_collections.ConfigDict, mode: str = 'int8') -> float:
  """Mean bytes per parameter of config.model `m` under `mode` (int8: about 1, the scales
  and float vectors included; 'none': param_dtype's size)."""
  check_mode(mode)
  abstract = abstract_params(m, mode)
  n = sum(math.prod(a.shape) for a in jax.tree.leaves(train_state.abstract_params(m)))
  return param_bytes(abstract) / n
