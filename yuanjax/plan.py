"""Memory planner: what one device holds for a config on a mesh, and whether it fits.

  python -m yuanjax.plan --config configs/yuan_m32.py --config.mesh.expert=8 \
      --devices=8 --device_kind=H100-80G
  python -m yuanjax.plan --config configs/yuan_m32.py --config.mesh.expert=8 \
      --config.mesh.fsdp=4 --devices=32 --device_kind='TPU v5p'    # a v5p-64 slice: 32 chips

Nothing is allocated and no accelerator is needed: the train state (params and AdamW state)
is built with jax.eval_shape by the trainer's own `train_state.build`, its logical axes are
mapped to mesh axes by `config.mesh.rules` as in training, and each leaf's per-device shard is
its shape divided (rounded up) by the sizes of the mesh axes of its PartitionSpec, on a mesh
of `--devices` (default: the product of the fixed `config.mesh` axes; -1 takes the rest).
`--devices` counts JAX devices: GPUs, or TPU chips (v5p-N and v4-N slices name TensorCores,
two per chip: v5p-64 is 32 devices; v5e/v6e-N name chips).

Per device, in bytes:
  params       the params' shards (config.model.param_dtype)
  optimizer    AdamW's mu and nu (and counts), sharded like the params
  gradients    float32, sharded like the params; twice that with train.grad_accum > 1 (the
               accumulator and one micro-batch's gradients are both alive)
  activations  an analytic estimate of what the backward pass keeps, and of its peak (below)
  total        their sum; it fits a device when total <= HEADROOM x its memory (the rest is
               for XLA's scratch buffers, collectives and fragmentation; on GPU also set
               XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, as JAX takes only 75% by default).
               Without --device_kind the table's bytes are the CPU's and every device kind
               is judged by its own total (`device_total`), with the attention backend that
               runs on it (`device_attention_backend`; kinds it cannot run on are left out)

Activations. T = train.batch_size / train.grad_accum / (data*fsdp*expert) * train.seq_len
tokens per device per micro-batch; D hidden, H heads, G key/value heads (num_kv_heads), K
head_dim, F expert ffn (dense ffn for dense layers), E experts, k top_k, cf capacity_factor,
V vocab, L seq_len, tp = mesh tensor size (heads, ffn and vocab are split over it); b bytes
of config.model.dtype. Elements kept
per token and layer without remat:
  attention        LFA: 8 D (norms, convolutions and their shifted inputs, residual);
                   standard: 3 D (residual, norm, output); + 3 (H + G) K / tp (q, rotated q
                   and the attention output; k, v and rotated k); + what the backend that
                   runs keeps (config.model.attention_backend; 'auto' as on the device kind:
                   splash on TPU, cuDNN on GPU, XLA on the CPU, XLA where the first two
                   cannot run: yuanjax.model.attention.resolve_backend): 'xla' and
                   'dot_product_attention' (XLA's implementation) the scores and
                   probabilities, 2 H L / tp in float32; 'splash' only the log-sum-exp
                   (H / tp floats); 'cudnn' the log-sum-exp and the packed rows' segment mask
                   as cuDNN's bias, one L x L per row in the compute dtype (L b, not per head)
  MoE layer        3 D + cf k (2 D + 3 F / tp)   (dispatch and combine buffers, gate, up, act)
  dense layer      3 D + 3 F / tp
remat policy (config.model.remat, applied to each scanned block):
  none           every layer's amount
  full           D per layer (the block inputs) + one layer's amount (recomputed in its backward)
  dots           per layer D + the outputs of matmuls without batch dims (LFA convolutions 3 D,
                 q k v (H + 2 G) K / tp, output D; dense FFN 2 F / tp + D), + one layer's amount
  dots_saveable  dots + the batched matmuls too (expert FFN cf k (2 F / tp + D); XLA's
                 attention scores H L / tp in float32), + one layer's amount
plus, once, the embedding output (T D); with remat none and b < 4, the params cast to the
compute dtype that the backward reuses (params x b / 4); and the larger of the backward pass's
two peaks: the loss (float32 logits and their gradient, 2 T V / tp x 4 bytes in one piece;
with config.model.loss_chunk_len = c < L, 2 (T / L) c V / tp x 4 + the float32 head gradient
V D / tp x 4: yuanjax.loss), or one block's backward (its float32 weight gradients + one
layer's amount for its activations' gradients).

Against XLA (`--xla`: compiles the real train step for one device of this machine and prints
memory_analysis next to the estimate): XLA's temp bytes compare with gradients + activations,
its argument bytes with params + optimizer (+ the batch). For configs/yuan_m32.py:slice on
XLA:CPU the estimate is within 25% (README, Memory); XLA:CPU also makes float32 copies of
bfloat16 matmul operands, which a GPU or TPU does not. An estimate of what matters at scale
(XLA's fusion and scheduling move it by tens of percent); the state terms above are exact.

  python -m yuanjax.plan --config configs/yuan_m32.py:slice --devices=1 --xla

Prints a table, then (last line) one JSON object with the same numbers.
"""
from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from yuanjax import config_lib, cost, sharding
from yuanjax.model import attention

GiB = 2**30
HEADROOM = 0.85


def shard_bytes(shape, dtype, spec, mesh_shape: dict) -> int:
  """Bytes of one device's shard: each dim divided (rounded up) by its mesh axes' sizes."""
  n = np.dtype(dtype).itemsize
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    n *= -(-dim // math.prod(mesh_shape[a] for a in axes))
  return int(n)


def _resolve_mesh(config, devices: int | None) -> dict:
  sizes = [config.mesh[a] for a in sharding.MESH_AXES]
  if devices is None:  # -1 takes nothing: the product of the fixed axes
    devices = math.prod(s for s in sizes if s > 0) or 1
  if devices < 1:
    raise ValueError(f'--devices={devices}: must be at least 1')
  shape = sharding.mesh_shape(config.mesh, devices)  # errors name config.mesh.<axis>
  return dict(zip(sharding.MESH_AXES, shape))


def _with_specs(tree, mesh_specs) -> list[tuple]:
  """(path, leaf, PartitionSpec) of every leaf of `tree`, its spec from `mesh_specs` (a tree of
  PartitionSpecs of the same structure)."""
  specs = jax.tree_util.tree_leaves(mesh_specs,
                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(path, leaf, spec) for (path, leaf), spec in zip(flat, specs, strict=True)]


def state_leaves(config, mesh_shape: dict) -> list[dict]:
  """Every leaf of the abstract train state: path, shape, dtype, mesh spec, per-device and
  total bytes, and whether it is a param or optimizer state."""
  from yuanjax import train_state  # pylint: disable=g-import-not-at-top  (heavy; plan-time only)
  built = train_state.build(config)
  mesh_specs, values = built.mesh_specs, built.abstract
  out = []
  for part in ('params', 'opt_state'):
    for path, leaf, spec in _with_specs(getattr(values, part), getattr(mesh_specs, part)):
      out.append(
          dict(part=part, path=jax.tree_util.keystr(path), shape=tuple(leaf.shape),
               dtype=str(leaf.dtype), spec=tuple(spec),
               total_bytes=int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize,
               per_device_bytes=shard_bytes(leaf.shape, leaf.dtype, spec, mesh_shape)))
  return out


def attention_backend(config, device_kind: str | None = None) -> str:
  """The attention backend that runs on `device_kind` (`cost.device`; none or unknown: the
  CPU's) at train.seq_len."""
  d = None if device_kind is None else cost.device(device_kind)
  platform = 'cpu' if d is None else ('gpu' if d.gpu else 'tpu')
  return attention.resolve_backend(config.model, config.train.seq_len, platform)


def attention_backends(config, kinds: list[str]) -> dict[str, str]:
  """{kind: attention_backend(config, kind)} for each of `kinds` the config's attention runs
  on (an explicit 'splash' runs on no GPU); its ValueError when it runs on none of them."""
  out, error = {}, None
  for k in kinds:
    try:
      out[k] = attention_backend(config, k)
    except ValueError as e:
      error = e
  if not out:
    raise error
  return out


def attention_core_bytes(config, backend: str, tp: int) -> tuple[float, float]:
  """Bytes per token of one layer that the attention kernel keeps for the backward pass, and
  of those the scores that `dots_saveable` keeps too (module docstring)."""
  m, b = config.model, np.dtype(jnp.dtype(config.model.dtype)).itemsize
  H, L = m.num_heads / tp, config.train.seq_len
  if backend in ('xla', 'dot_product_attention'):
    return 2 * H * L * 4, H * L * 4
  return H * 4 + (L * b if backend == 'cudnn' else 0.0), 0.0


def activation_bytes(config, mesh_shape: dict,
                     backend: str | None = None) -> tuple[float, float, float]:
  """(bytes per device that the backward pass keeps, bytes of one layer's activations, tokens
  per device per micro-batch): the module docstring's per-layer formula, with the attention
  `backend` that runs (default: `attention_backend(config)`)."""
  m, t = config.model, config.train
  dp = mesh_shape['data'] * mesh_shape['fsdp'] * mesh_shape['expert']
  tp = mesh_shape['tensor']
  T = t.batch_size / t.grad_accum / dp * t.seq_len
  b = np.dtype(jnp.dtype(m.dtype)).itemsize
  D, H, K = m.hidden_size, m.num_heads, m.head_dim
  HK, GK = H * K / tp, attention.num_kv_heads(m) * K / tp
  lfa = m.attention_type == 'lfa'
  attn_core, attn_scores = attention_core_bytes(config, backend or attention_backend(config), tp)
  ck = m.moe.capacity_factor * m.router.top_k
  F = m.moe.ffn_size / tp
  Fd = m.dense_ffn_size / tp
  n_moe = 0 if m.moe_every == 0 else m.num_layers // m.moe_every
  n_dense = m.num_layers - n_moe

  # Bytes per token of one layer, by what a remat policy keeps.
  attn_all = ((8 if lfa else 3) * D + 3 * HK + 3 * GK) * b + attn_core
  moe_all = (3 * D + ck * (2 * D + 3 * F)) * b
  dense_all = (3 * D + 3 * Fd) * b
  attn_dots = (D + 3 * D * lfa + HK + 2 * GK + D) * b  # block input, convolutions, q k v, output
  moe_dots, dense_dots = 0.0, (2 * Fd + D) * b
  attn_saveable = attn_dots + attn_scores
  moe_saveable = ck * (2 * F + D) * b
  one_layer = attn_all + max(moe_all if n_moe else 0.0, dense_all if n_dense else 0.0)
  per_layer = {
      'none': None,
      'full': D * b,
      'dots': (attn_dots, moe_dots, dense_dots),
      'dots_saveable': (attn_saveable, moe_dots + moe_saveable, dense_dots),
  }[m.remat]
  if m.remat == 'none':
    layers = n_moe * (attn_all + moe_all) + n_dense * (attn_all + dense_all)
  elif m.remat == 'full':
    layers = m.num_layers * per_layer + one_layer
  else:
    a, mo, de = per_layer
    layers = n_moe * (a + mo) + n_dense * (a + de) + one_layer
  return T * (layers + D * b), T * one_layer, T


def loss_bytes(config, mesh_shape: dict, tokens: float) -> float:
  """The loss's float32 logits and their gradient: all [T, V] of them in one piece, or one
  chunk's [rows, loss_chunk_len, V] twice plus the float32 head-gradient accumulator."""
  m = config.model
  V = m.vocab_size / mesh_shape['tensor']
  chunk = m.loss_chunk_len
  if not chunk or chunk >= config.train.seq_len:
    return 2 * tokens * V * 4
  rows = tokens / config.train.seq_len
  return 2 * rows * chunk * V * 4 + V * m.hidden_size * 4


def check_device_kind(kind: str) -> str:
  """The `cost.DEVICES` name of --device_kind (a name there, or JAX's device_kind); ValueError
  unless that device's memory is known."""
  name = cost.device_name(kind)
  if name is None or cost.memory_gib(name) is None:
    raise ValueError(f'--device_kind={kind!r}: expected one of {sorted(cost.planned_devices())}')
  return name


def _abstract_mesh(mesh_shape: dict) -> jax.sharding.AbstractMesh:
  """A mesh of these axis sizes and no devices (what the config checks read)."""
  return jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape),
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_shape))


def plan(config: ml_collections.ConfigDict, devices: int | None = None,
         device_kind: str | None = None) -> dict:
  """The numbers the CLI prints (without `leaves` in its JSON)."""
  config_lib.validate(config)
  mesh_shape = _resolve_mesh(config, devices)
  n_devices = math.prod(mesh_shape.values())
  config_lib.validate_against_mesh(config, _abstract_mesh(mesh_shape))
  name = check_device_kind(device_kind) if device_kind else None
  kinds = [name] if name else cost.planned_devices()

  leaves = state_leaves(config, mesh_shape)
  params = [x for x in leaves if x['part'] == 'params']
  opt = [x for x in leaves if x['part'] == 'opt_state']
  param_count = sum(math.prod(x['shape']) for x in params)
  grad_copies = 2 if config.train.grad_accum > 1 else 1
  backend = attention_backend(config, name)
  per_device, tokens = device_bytes(config, mesh_shape, leaves, backend)
  totals = dict(params=sum(x['total_bytes'] for x in params),
                optimizer=sum(x['total_bytes'] for x in opt) + 4,
                gradients=grad_copies * param_count * 4)
  # Each kind judged with the attention that runs on it (per_device: `device_kind`'s).
  backends = attention_backends(config, kinds)
  kind_total = {
      k: device_bytes(config, mesh_shape, leaves, b)[0]['total'] for k, b in backends.items()
  }
  memory = {k: cost.memory_gib(k) for k in backends}
  fits = {k: kind_total[k] <= HEADROOM * memory[k] * GiB for k in backends}
  return dict(mesh=mesh_shape, devices=n_devices, param_count=int(param_count),
              remat=config.model.remat, attention_backend=backend,
              micro_batch_tokens_per_device=tokens, per_device=per_device, totals=totals,
              headroom=HEADROOM, device_memory_gib=memory, device_attention_backend=backends,
              device_total=kind_total, fits=fits, leaves=leaves)


def device_bytes(config, mesh_shape: dict, leaves: list[dict], backend: str) -> tuple[dict, float]:
  """(per device bytes: params, optimizer, gradients, activations with the attention `backend`
  and their total; tokens per device per micro-batch) of the train state's `leaves`."""
  params = [x for x in leaves if x['part'] == 'params']
  grads = sum(x['per_device_bytes'] // np.dtype(x['dtype']).itemsize * 4 for x in params)
  act, one_layer, tokens = activation_bytes(config, mesh_shape, backend)
  act += _backward_extra(config, mesh_shape, tokens, one_layer, params)
  per_device = dict(
      params=sum(x['per_device_bytes'] for x in params),
      optimizer=sum(x['per_device_bytes'] for x in leaves if x['part'] == 'opt_state') + 4,  # step
      gradients=(2 if config.train.grad_accum > 1 else 1) * grads,  # float32 (+ the accumulator)
      activations=int(act))
  per_device['total'] = sum(per_device.values())
  return per_device, tokens


def _backward_extra(config, mesh_shape: dict, tokens: float, one_layer: float,
                    params: list[dict]) -> float:
  """Param casts kept for the backward (remat none) + the larger of the two peaks of the
  backward pass: the loss's logits, or one block's float32 weight gradients and its activations'
  gradients."""
  b = np.dtype(jnp.dtype(config.model.dtype)).itemsize
  pb = np.dtype(jnp.dtype(config.model.param_dtype)).itemsize
  param_bytes = sum(x['per_device_bytes'] for x in params)
  casts = param_bytes * b / pb if config.model.remat == 'none' and b < pb else 0.0
  block = sum(x['per_device_bytes'] for x in params if x['path'].startswith("['blocks']"))
  from yuanjax.model import transformer  # pylint: disable=g-import-not-at-top
  one_block_grads = block * 4 / pb / transformer.num_blocks(config.model)  # float32 gradients
  return casts + max(loss_bytes(config, mesh_shape, tokens), one_block_grads + one_layer)


def inference_leaves(config, mesh_shape: dict, batch: int, context: int) -> list[dict]:
  """Every leaf that generation keeps (`yuanjax.generate` on a mesh): the params ('weights')
  and the decode cache of `batch` rows x `context` slots (`init_cache`: 'kv_cache' for the keys,
  values and row positions, 'lfa_state' for LFA's last two inputs), each with its mesh spec
  under `config.mesh.rules` (the cache by `transformer.cache_axes`) and its element count per
  device."""
  from yuanjax import generate, train_state  # pylint: disable=g-import-not-at-top  (heavy)
  from yuanjax.model import Transformer, transformer  # pylint: disable=g-import-not-at-top
  m, rules = generate.generation_config(config.model), sharding.rules(config.mesh)
  params = train_state.abstract_params(m, boxed=True)
  cache = jax.eval_shape(lambda: transformer.init_cache(Transformer(m), batch, context))
  parts = {'k': 'kv_cache', 'v': 'kv_cache', 'index': 'kv_cache', 'u_prev': 'lfa_state'}
  out = []
  for tree, logical, part in ((train_state.strip_boxes(params), nn.get_partition_spec(params),
                               None), (cache, transformer.cache_axes(cache), 'cache')):
    for path, leaf, spec in _with_specs(tree, nn.logical_to_mesh(logical, rules)):
      out.append(
          dict(part=parts[path[-1].key] if part else 'weights', path=jax.tree_util.keystr(path),
               shape=tuple(leaf.shape), dtype=str(leaf.dtype), spec=tuple(spec),
               per_device=shard_bytes(leaf.shape, np.int8, spec, mesh_shape)))
  return out


def inference(config: ml_collections.ConfigDict, batch: int, context: int,
              weight_bytes: float | None = None, devices: int | None = None,
              device_kind: str | None = None) -> dict:
  """Bytes per device of generating `batch` rows of `context` tokens (prompt + new) on the
  config's mesh: weights (every param at `weight_bytes` bytes; default the compute dtype's:
  2 for bfloat16, 1 for int8 weights), the KV cache and the LFA state (compute dtype; the row
  positions int32), their total, and whether it fits each device kind at HEADROOM. The batch
  is split over the 'act_batch' mesh axes (rounded up per device, as generation pads it),
  key/value heads over tensor. Not counted: the step's transient activations (for a prefill of
  P tokens, one layer's, and the attention scores, B H P S float32 split like the cache)."""
  config_lib.validate_model(config.model)
  for name, v in (('--inference_batch', batch), ('--inference_context', context)):
    if v < 1:
      raise ValueError(f'{name}={v}: must be >= 1')
  mesh_shape = _resolve_mesh(config, devices)
  config_lib.validate_model_against_mesh(config.model, _abstract_mesh(mesh_shape))
  b = np.dtype(jnp.dtype(config.model.dtype)).itemsize
  weight_bytes = b if weight_bytes is None else weight_bytes
  if weight_bytes <= 0:
    raise ValueError(f'--weight_bytes={weight_bytes}: must be > 0')
  leaves = inference_leaves(config, mesh_shape, batch, context)
  per_device = dict.fromkeys(('weights', 'kv_cache', 'lfa_state'), 0.0)
  for x in leaves:
    size = weight_bytes if x['part'] == 'weights' else np.dtype(x['dtype']).itemsize
    per_device[x['part']] += x['per_device'] * size
  per_device['total'] = sum(per_device.values())
  kinds = [check_device_kind(device_kind)] if device_kind else cost.planned_devices()
  memory = {k: cost.memory_gib(k) for k in kinds}
  return dict(mesh=mesh_shape, devices=math.prod(mesh_shape.values()), batch=batch, context=context,
              weight_bytes=weight_bytes, cache_dtype=config.model.dtype, per_device=per_device,
              headroom=HEADROOM, device_memory_gib=memory,
              fits={k: per_device['total'] <= HEADROOM * memory[k] * GiB for k in kinds})


def format_inference(r: dict) -> str:
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [
      f"inference: mesh {mesh} ({r['devices']} devices); batch {r['batch']} x context "
      f"{r['context']}; weights {r['weight_bytes']:g} bytes/param, cache {r['cache_dtype']}",
      f"{'':12} {'GiB/device':>10}"
  ]
  lines += [f'{k:12} {v / GiB:10.2f}' for k, v in r['per_device'].items()]
  for k, ok in r['fits'].items():
    usable = HEADROOM * r['device_memory_gib'][k]
    lines.append(f"{k:12} {r['device_memory_gib'][k]:>6} GiB: {'fits' if ok else 'does NOT fit'} "
                 f"({r['per_device']['total'] / GiB:.1f} GiB of {usable:.1f} usable at "
                 f'{HEADROOM:.0%})')
  return '\n'.join(lines)


def xla_memory(config: ml_collections.ConfigDict) -> dict:
  """XLA's memory_analysis of the real train step (`trainer.jit_train_step`: optimizer and step
  guard included), compiled on this machine's devices for `config.mesh` (one device unless the
  config asks for more) without allocating anything: `temp` (what the planner's gradients +
  activations estimate) and `argument` (params + optimizer, + the batch) bytes."""
  from yuanjax import step_cost  # pylint: disable=g-import-not-at-top  (heavy; --xla only)
  config_lib.validate(config)
  ma = step_cost.compile_step(config, sharding.make_mesh(config.mesh)).memory_analysis()
  return dict(temp=int(ma.temp_size_in_bytes), argument=int(ma.argument_size_in_bytes))


def compare(r: dict, xla: dict) -> dict:
  """Planner vs XLA: temp vs gradients + activations, argument vs params + optimizer."""
  d = r['per_device']
  ours = dict(temp=d['gradients'] + d['activations'], argument=d['params'] + d['optimizer'])
  return {k: dict(plan=ours[k], xla=xla[k], ratio=ours[k] / xla[k]) for k in ours}


def format_table(r: dict) -> str:
  g = lambda n: f'{n / GiB:10.2f}'
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [
      f"mesh {mesh} ({r['devices']} devices); {r['param_count'] / 1e9:.3f} B params; "
      f"remat={r['remat']}; attention={r['attention_backend']}; "
      f"{r['micro_batch_tokens_per_device']:g} tokens per device per "
      'micro-batch', f"{'':12} {'GiB/device':>10} {'GiB total':>10}"
  ]
  for k, v in r['per_device'].items():
    total = r['totals'].get(k)
    lines.append(f'{k:12} {g(v)} {g(total) if total is not None else "":>10}')
  for k, ok in r['fits'].items():
    usable = HEADROOM * r['device_memory_gib'][k]
    backend = r['device_attention_backend'][k]
    lines.append(f"{k:12} {r['device_memory_gib'][k]:>6} GiB: {'fits' if ok else 'does NOT fit'} "
                 f"({r['device_total'][k] / GiB:.1f} GiB of {usable:.1f} usable at "
                 f'{HEADROOM:.0%}' +
                 ('' if backend == r['attention_backend'] else f'; attention={backend}') + ')')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _INFERENCE_BATCH.value is not None or _INFERENCE_CONTEXT.value is not None:
    if _INFERENCE_BATCH.value is None or _INFERENCE_CONTEXT.value is None:
      raise app.UsageError('--inference_batch and --inference_context go together')
    r = inference(_CONFIG.value, _INFERENCE_BATCH.value, _INFERENCE_CONTEXT.value,
                  _WEIGHT_BYTES.value, _DEVICES.value, _DEVICE_KIND.value)
    print(format_inference(r))
    print(json.dumps(r))
    return
  r = plan(_CONFIG.value, _DEVICES.value, _DEVICE_KIND.value)
  print(format_table(r))
  out = {k: v for k, v in r.items() if k != 'leaves'}
  if _XLA.value:
    if r['devices'] != 1:
      raise app.UsageError(f"--xla compiles for one device; the mesh has {r['devices']}")
    out['xla'] = compare(r, xla_memory(_CONFIG.value))
    for k, v in out['xla'].items():
      print(f"{k:12} plan {v['plan'] / GiB:8.2f} GiB   XLA {v['xla'] / GiB:8.2f} GiB   "
            f"plan/XLA {v['ratio']:.2f}")
  print(json.dumps(out))


if __name__ == '__main__':
  # Flags are defined here, not at import, so that tests can import this module.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                            lock_config=True)
  _DEVICES = flags.DEFINE_integer(
      'devices', None, 'JAX devices (GPUs or TPU chips); default: '
      'the product of the fixed config.mesh axes')
  _DEVICE_KIND = flags.DEFINE_string(
      'device_kind', None, f'device to check against: one of {cost.planned_devices()} or '
      "JAX's device_kind of one (default: all of them)")
  flags.register_validator(
      'device_kind', lambda k: k is None or cost.memory_gib(k) is not None,
      f'expected one of {cost.planned_devices()} or the device_kind JAX '
      'gives one of them')
  _XLA = flags.DEFINE_bool(
      'xla', False, 'also compile the train step for one device of this machine (no '
      "allocation) and compare XLA's memory_analysis with the estimate")
  _INFERENCE_BATCH = flags.DEFINE_integer(
      'inference_batch', None, 'instead of training: the memory per device of generating this '
      'many rows (with --inference_context)')
  _INFERENCE_CONTEXT = flags.DEFINE_integer('inference_context', None,
                                            'tokens per row (prompt + new) for --inference_batch')
  _WEIGHT_BYTES = flags.DEFINE_float(
      'weight_bytes', None, 'bytes per param for --inference_batch (default: the compute '
      "dtype's; 1: int8 weights)")
  flags.mark_flags_as_required(['config'])
  app.run(main)
