"""The tiled loss on 8 virtual CPU devices, the batch split over them (a process of its own):
prints JSON with the relative errors of its value and gradients against the one-piece loss
on the same mesh, and the all-reduces XLA put inside loop bodies (per chunk) and outside."""
import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from yuanjax import config_lib, loss, sharding

B, L, D, V, CHUNK = 8, 64, 32, 512, 16


def main():
  cfg = config_lib.base_config()
  cfg.mesh.data = 8
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules(cfg.mesh)
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, L, D))
  head = 0.3 * jax.random.normal(k[1], (V, D))
  targets = jax.random.randint(k[2], (B, L), 0, V)
  mask = (jax.random.uniform(k[3], (B, L)) > 0.3).astype(jnp.float32)
  out, loops = {}, {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    x = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    for c in (0, CHUNK):
      f = jax.jit(
          jax.value_and_grad(lambda x, h, c=c: loss.cross_entropy_sum(x, h, targets, mask, c),
                             argnums=(0, 1)))
      hlo = f.lower(x, head).compile().as_text()
      out[c] = jax.tree.leaves(f(x, head))
      # Computations other than the entry that all-reduce: loop bodies (or their callees).
      loops[c] = sum(
          comp.count('all-reduce(')
          for comp in re.split(r'\n(?=\S)', hlo)
          if not comp.startswith('ENTRY'))
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  print(
      json.dumps(
          dict(rel=[rel(a, b) for a, b in zip(out[CHUNK], out[0])], loop_all_reduces=loops[CHUNK])))


if __name__ == '__main__':
  main()
