"""Shared by the 8-device splash worker and its 1-device reference: one LFA attention layer
(head_dim 256, partial rotary, 4 query heads on 2 key/value heads) over 8 rows of 128
positions (packed documents, padding), forward and gradients (params and input)."""
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from yuanjax import config_lib, sharding
from yuanjax.model import attention, layers

B, L, D = 8, 128, 32
# Expert-parallel: rows over 'expert'; tensor-parallel: heads (and kv heads) over 'tensor'.
MESHES = (dict(expert=8), dict(data=2, expert=2, tensor=2))


def mesh_name(axes):
  return ','.join(f'{k}{v}' for k, v in axes.items())


def model_config(backend):
  m = config_lib.tiny_model()
  m.update(attention_backend=backend, hidden_size=D, num_heads=4, num_kv_heads=2, head_dim=256,
           rotary_dims=64)
  m.splash.update({b: 128 for b in attention.SPLASH_BLOCKS})
  return m


def inputs():
  seg = np.ones((B, L), np.int32)
  seg[1::2, 50:] = 2  # odd rows: two documents
  seg[2::4, 100:] = 0  # every fourth row: padding after 100 tokens
  x = np.random.default_rng(0).normal(size=(B, L, D)).astype(np.float32)
  return x, jnp.asarray(seg)


def run(backend, mesh_axes=None):
  """{'out', 'dx', 'params/<name>'...} of the layer, under a mesh of `mesh_axes` (or none)."""
  x, seg = inputs()
  pos = layers.positions_from_segments(seg)
  mod = attention.Attention(model_config(backend))
  v = attention.Attention(model_config('xla')).init(jax.random.key(0), x, seg, pos)

  def loss(v, x):
    out = mod.apply(v, x, seg, pos)
    return jnp.sum(jnp.sin(out)), out

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh_axes is None:
    (_, out), (dv, dx) = step(v, x)
  else:
    cfg = config_lib.base_config().mesh
    cfg.update({'data': 1, **mesh_axes})
    with jax.set_mesh(sharding.make_mesh(cfg)), nn.logical_axis_rules(sharding.rules(cfg)):
      (_, out), (dv, dx) = step(v, x)
  grads = traverse_util.flatten_dict(nn.unbox(dv)['params'], sep='/')
  return dict(out=out, dx=dx, **{f'params/{k}': g for k, g in grads.items()})
