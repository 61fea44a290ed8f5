"""Device mesh and logical-axis rules (JAX's own sharding; nothing home-made).

Mesh axes: data, fsdp, expert, tensor (config.mesh; one may be -1 for "the rest").
Modules name logical axes; only `config.mesh.rules` maps them to mesh axes.

Multi-slice TPU: `config.mesh.dcn.<axis>` splits an axis further across slices (over the
data-centre network); `config.mesh.<axis>` is then the size within a slice (ICI), and the
mesh axis has size ici * dcn. Put `data` (or `fsdp`) on DCN, not `expert` or `tensor`.
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')  # the batch is split over these: no device idles

DEFAULT_RULES = (
    ('act_batch', BATCH_AXES),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv', None),
    ('act_vocab', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('expert', 'expert'),
    ('shared', None),
    ('router', None),
    ('conv', None),
    ('norm', None),
    ('layers', None),
)


def mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, expert=1, tensor=1, dcn=dict(data=1, fsdp=1, expert=1, tensor=1),
           rules=[(k, v) for k, v in DEFAULT_RULES]))


def dcn_shape(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Per-axis sizes across slices (all 1 on one slice and on GPU clusters)."""
  sizes = tuple(cfg.dcn[a] for a in MESH_AXES)
  for a, s in zip(MESH_AXES, sizes):
    if not isinstance(s, int) or s < 1:
      raise ValueError(f'config.mesh.dcn.{a}={s!r}: must be a positive integer')
  return sizes


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """The global mesh shape (ICI size * DCN size per axis). Resolves -1 and checks the
  product; errors name config.mesh.<axis>."""
  dcn = dcn_shape(cfg)
  if num_devices % math.prod(dcn):
    raise ValueError(f'config.mesh.dcn: {dict(zip(MESH_AXES, dcn))} needs a multiple of '
                     f'{math.prod(dcn)} devices, have {num_devices}')
  ici = _ici_shape(cfg, num_devices // math.prod(dcn))
  return tuple(i * d for i, d in zip(ici, dcn))


def _ici_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  sizes = [cfg[a] for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f'config.mesh.{a}={s}: must be a positive integer or -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh: {num_devices} devices (per slice) do not divide by the '
                       f'fixed axes ({known})')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices '
                     f'(per slice), have {num_devices}; set one of config.mesh.'
                     f'{{data,fsdp,expert,tensor}} to -1 to take the rest')
  return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """An Auto-typed mesh (Linen's logical constraints need Auto axes); hybrid ICI x DCN when
  config.mesh.dcn splits an axis across slices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  if math.prod(dcn_shape(cfg)) == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return jax.sharding.Mesh(hybrid_device_grid(cfg, devices), MESH_AXES, axis_types=auto)


def hybrid_device_grid(cfg: ml_collections.ConfigDict, devices) -> np.ndarray:
  """Devices laid out as the global mesh, each slice a contiguous ICI block
  (`mesh_utils.create_hybrid_device_mesh`; processes stand in for slices where devices
  have no `slice_index`)."""
  shape, dcn = mesh_shape(cfg, len(devices)), dcn_shape(cfg)
  ici = tuple(s // d for s, d in zip(shape, dcn))
  try:
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not hasattr(devices[0], 'slice_index'))
  except ValueError as e:
    raise ValueError(f'config.mesh.dcn={dict(zip(MESH_AXES, dcn))}: {e}') from None


def rules(cfg: ml_collections.ConfigDict):
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.rules)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
