"""Device mesh and logical-axis rules (JAX's own sharding; nothing home-made).

Mesh axes: data, fsdp, expert, tensor (config.mesh; one may be -1 for "the rest").
Modules name logical axes; only `config.mesh.rules` maps them to mesh axes.
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')   # the batch is split over these: no device idles

DEFAULT_RULES = (
    ('act_batch', BATCH_AXES), ('act_len', None), ('act_embed', None),
    ('act_heads', 'tensor'), ('act_kv', None), ('act_vocab', 'tensor'),
    ('act_expert', 'expert'), ('act_capacity', None),
    ('vocab', 'tensor'), ('embed', 'fsdp'), ('heads', 'tensor'), ('kv', None),
    ('mlp', 'tensor'), ('expert', 'expert'), ('shared', None), ('router', None),
    ('conv', None), ('norm', None), ('layers', None),
)


def mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1,
                                        rules=[(k, v) for k, v in DEFAULT_RULES]))


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 and checks the product; errors name config.mesh.<axis>."""
  sizes = [cfg[a] for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f'config.mesh.{a}={s}: must be a positive integer or -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh: {num_devices} devices do not divide by the fixed axes ({known})')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'have {num_devices}')
  return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)


def rules(cfg: ml_collections.ConfigDict):
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.rules)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
